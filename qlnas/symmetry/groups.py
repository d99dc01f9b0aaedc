"""The groups that act on a residual stream: names, their order, random elements.

A group element is an invertible n x n matrix T acting as u -> T u on the stream. The
monomial subgroups are recognised from the matrix itself (one non-zero per row and column),
which is how `apply` knows when a layer that reads the stream channel by channel can follow.
"""

from __future__ import annotations

import torch

GROUPS = ("gl", "o", "monomial", "signed_perm", "perm_pos_scale", "perm")
"""From largest to smallest: GL(n), O(n), permutations times non-zero scalings, signed
permutations, permutations times positive scalings, permutations."""

DESCRIPTIONS = {
    "gl": "GL(n): every invertible matrix",
    "o": "O(n): orthogonal matrices",
    "monomial": "permutations times non-zero scalings",
    "signed_perm": "permutations times signs",
    "perm_pos_scale": "permutations times positive scalings",
    "perm": "permutations",
}

# Proper and improper subgroups of each group (the lattice is small enough to list).
_SUBGROUPS = {
    "gl": set(GROUPS),
    "o": {"o", "signed_perm", "perm"},
    "monomial": {"monomial", "signed_perm", "perm_pos_scale", "perm"},
    "signed_perm": {"signed_perm", "perm"},
    "perm_pos_scale": {"perm_pos_scale", "perm"},
    "perm": {"perm"},
}


def meet(a: str, b: str) -> str:
    """The largest group contained in both (their intersection)."""
    common = _SUBGROUPS[a] & _SUBGROUPS[b]
    return next(g for g in GROUPS if g in common and _SUBGROUPS[g] >= common)


def is_subgroup(a: str, b: str) -> bool:
    """True when every element of group `a` is in group `b`."""
    return a in _SUBGROUPS[b]


def has_scaling(group: str) -> bool:
    return group in ("gl", "monomial", "perm_pos_scale")


def has_sign(group: str) -> bool:
    return group in ("gl", "o", "monomial", "signed_perm")


def monomial_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(perm, scale) with t[perm[j], j] = scale[j] when t is monomial, else None."""
    nz = t != 0
    if not (bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all())):
        return None
    perm = nz.to(torch.int8).argmax(0)
    cols = torch.arange(t.shape[1])
    return perm, t[perm, cols]


def monomial_matrix(perm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The matrix with t[perm[j], j] = scale[j]."""
    t = torch.zeros(len(perm), len(perm), dtype=scale.dtype)
    t[perm, torch.arange(len(perm))] = scale
    return t


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _log_uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    """Scales between 1/2 and 2, so random elements stay well conditioned."""
    return torch.exp((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.6931)


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_element(group: str, n: int, gen: torch.Generator,
                   perm: torch.Tensor | None = None) -> torch.Tensor:
    """A random n x n element of `group`; `perm` fixes the permutation of monomial groups."""
    if group == "gl":
        s = _log_uniform(n, gen)
        return random_orthogonal(n, gen) @ torch.diag(s) @ random_orthogonal(n, gen)
    if group == "o":
        return random_orthogonal(n, gen)
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    if perm is None:
        perm = torch.randperm(n, generator=gen)
    scale = torch.ones(n, dtype=torch.float64)
    if has_scaling(group):
        scale = scale * _log_uniform(n, gen)
    if has_sign(group):
        scale = scale * _signs(n, gen)
    return monomial_matrix(perm, scale)
