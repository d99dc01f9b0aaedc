"""Normal forms of one matrix under a group acting on its rows (or its columns).

`row_reduce(M, group)` returns G in the group and the entries of G M that are zero (and one)
by construction: O(n) gives G M = R, upper triangular with a non-negative diagonal (QR);
GL(n) gives [I, *] when M is wide (G = inverse of its leading block, the reduced row echelon
form) and [I; 0] when it is tall. Both are unique for generic M, so they serve as canonical
forms as well as for compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ILL_CONDITIONED = 1e8


@dataclass
class Reduction:
    """G with masks of G M (rows) or M G^-1 (columns) that are 0 and 1 by construction."""

    g: torch.Tensor
    zeros: torch.Tensor
    ones: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.zeros.sum())


def _leading_columns(m: torch.Tensor, pivot: bool) -> torch.Tensor:
    """rows(M) columns whose block G inverts: the first ones (unique, canonical) unless
    `pivot` or that block is ill-conditioned, then the best-conditioned ones QR finds."""
    rows = m.shape[0]
    if not pivot and torch.linalg.cond(m[:, :rows]) < ILL_CONDITIONED:
        return torch.arange(rows)
    import scipy.linalg

    _, _, piv = scipy.linalg.qr(m.numpy(), pivoting=True, mode="economic")
    return torch.as_tensor(piv[:rows]).sort().values


def row_reduce(m: torch.Tensor, group: str, pivot: bool = False) -> Reduction:
    """G acting on the rows of M (G M) with as many entries zero as the group allows.

    `pivot` (GL, wide M): pick the columns that become I for conditioning rather than
    uniqueness; the count of zeros is the same.
    """
    m = m.to(torch.float64)
    rows, cols = m.shape
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ones = torch.zeros(rows, cols, dtype=torch.bool)
    if group == "o":
        q, r = torch.linalg.qr(m, mode="complete")
        sign = torch.ones(rows, dtype=torch.float64)
        diag = torch.diagonal(r)
        sign[: len(diag)] = torch.where(diag < 0, -1.0, 1.0)
        return Reduction(sign.unsqueeze(1) * q.T, i > j, ones)
    if group != "gl":
        raise ValueError(f"row_reduce needs group 'o' or 'gl', got {group!r}")
    if rows > cols:  # tall: G M = [I; 0], the rest of G^-1 spans the complement of M's columns
        q, _ = torch.linalg.qr(m, mode="complete")
        g = torch.linalg.inv(torch.cat([m, q[:, cols:]], dim=1))
        ones = i == j
        return Reduction(g, ~ones, ones)
    lead = _leading_columns(m, pivot)
    g = torch.linalg.inv(m[:, lead])
    in_lead = torch.zeros(cols, dtype=torch.bool)
    in_lead[lead] = True
    ones[torch.arange(rows), lead] = True
    return Reduction(g, in_lead.unsqueeze(0) & ~ones, ones)


def col_reduce(m: torch.Tensor, group: str, pivot: bool = False) -> Reduction:
    """T acting on the columns of M (M T^-1), returned as T, with the masks of M T^-1."""
    red = row_reduce(m.T, group, pivot)
    # (T^-T) M^T = G M^T  =>  T = G^-T (= G for orthogonal G).
    t = red.g if group == "o" else torch.linalg.inv(red.g).T
    return Reduction(t, red.zeros.T, red.ones.T)


def svd_reduce(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonal (T_out, T_in) with T_out M T_in^-1 diagonal; and the mask of its zeros."""
    u, _, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=True)
    rows, cols = m.shape
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return u.T, vh, i != j
