"""`qlnas symmetry verify|compress|canonicalize`: the weight-space symmetries of a QLNet."""

from __future__ import annotations

import argparse

GROUP_CHOICES = ("auto", "gl", "o", "monomial", "signed_perm", "perm_pos_scale", "perm")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--randomize", action=argparse.BooleanOptionalAction, default=None,
                   help="random BN statistics first (default: for a model name, not a file)")
    p.add_argument("--size", type=int, default=64, help="input resolution of the checks (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and group elements")


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="model file to write (plain form)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="weights of the written file (float64 keeps the output change at "
                        "rounding level; zeros stay exact either way)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("symmetry", help="verify, compress or canonicalise a model by its "
                                        "weight-space symmetries")
    ssub = p.add_subparsers(dest="symmetry_command", required=True)

    v = ssub.add_parser("verify", help="apply random group elements per stream; exit 0 when "
                                       "the output changes by less than 1e-10")
    v.add_argument("model", metavar="MODEL_OR_CKPT", help="model file or qlnet model name")
    v.add_argument("--group", choices=GROUP_CHOICES, default="auto",
                   help="group to test on every stream (auto: the one derived from the spec)")
    v.add_argument("--trials", type=int, default=3, help="random elements per stream (3)")
    v.add_argument("--batch", type=int, default=2, help="random inputs (2)")
    _common(v)
    v.set_defaults(func=run_verify)

    c = ssub.add_parser("compress", help="make weights exactly zero by a group element "
                                         "(GL block only)")
    c.add_argument("ckpt", metavar="CKPT", help="model file (or qlnet model name)")
    c.add_argument("--strategy", choices=("auto", "skip", "last"), default="auto",
                   help="which matrices to reduce: skip projections, each stage's last A, "
                        "or whichever zeros more (auto)")
    _output(c)
    _common(c)
    c.set_defaults(func=run_compress)

    k = ssub.add_parser("canonicalize", help="put a model into the canonical gauge of its "
                                             "groups")
    k.add_argument("ckpt", metavar="CKPT", help="model file (or qlnet model name)")
    _output(k)
    _common(k)
    k.set_defaults(func=run_canonicalize)


def _load(args: argparse.Namespace):
    import torch

    from qlnas.errors import UserError
    from qlnas.symmetry.fold import randomize_bn
    from qlnas.symmetry.inputs import load_model

    if args.size < 8:
        raise UserError(f"--size {args.size}: expected at least 8")
    model, meta, is_file = load_model(args.model if hasattr(args, "model") else args.ckpt)
    randomize = (not is_file) if args.randomize is None else args.randomize
    if randomize:
        randomize_bn(model, torch.Generator().manual_seed(args.seed))
    return model.to(torch.float64).eval(), meta, randomize


def _name(meta: dict) -> str:
    return str(meta.get("model_name", "model"))


def run_verify(args: argparse.Namespace) -> int:
    from qlnas.symmetry.streams import find_streams
    from qlnas.symmetry.verify import EXACT, verify
    from qlnas.tables import format_rows

    model, meta, randomized = _load(args)
    streams = find_streams(model)
    print(f"{_name(meta)}: float64, eval, {args.trials} random element(s) per stream, "
          f"{args.batch} random input(s) of {args.size}x{args.size}"
          + (", random BN statistics" if randomized else ""))
    rows = verify(model, args.group, args.trials, args.size, args.batch, args.seed,
                  progress=True)
    table = []
    for r in rows:
        stream = next((s for s in streams if s.name == r.stream), None)
        group = r.group if stream is not None else ("auto" if args.group == "auto"
                                                    else args.group)
        derived = r.derived if stream is not None else "-"
        table.append({"stream": r.stream, "width": r.width, "group": group,
                      "derived": derived, "largest_rel_change": f"{r.change:.1e}",
                      "holds": "yes" if r.holds else "NO"})
    print(format_rows(table, "md"))
    print("derived from the spec:")
    for s in streams:
        tie = "; permutation tied across streams (eq5)" if s.tied else ""
        print(f"  {s.name} ({s.width}): {s.group}: {'; '.join(s.reasons)}{tie}")
    if getattr(model.spec, "coef_bn", False):
        print("  coef_bn: the BN after each coefficient conv acts on the block's internal "
              "channels (it folds into that conv's rows and a bias); it cuts no group")
    broken = [r.stream for r in rows if not r.holds]
    if not broken:
        print(f"every stream: the group holds (relative change < {EXACT:g})")
        return 0
    print(f"BROKEN on {', '.join(broken)}: relative change >= {EXACT:g}; the group named "
          "is not a symmetry of this model there")
    return 1


def _save(path: str, model, meta: dict, dtype: str, **extra) -> None:
    import torch

    from qlnas.models.io import save_model_file

    model = model.to(getattr(torch, dtype))
    save_model_file(path, model, _name(meta), **extra)


def _changes(model, ref_model, size: int, seed: int) -> tuple[float, float]:
    import torch

    from qlnas.symmetry.inputs import image_batch, random_inputs
    from qlnas.symmetry.verify import relative_change

    with torch.no_grad():
        x = random_inputs(2, size, seed)
        images = image_batch(size)
        return (relative_change(model(x), ref_model(x)),
                relative_change(model(images), ref_model(images)))


def run_compress(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qlnas.symmetry.compress import compress, count_zeros, sparse_bytes

    model, meta, _ = _load(args)
    with tqdm(total=2, desc="compress", leave=False) as bar:
        result = compress(model, args.strategy)
        bar.update()
        rand_change, image_change = _changes(result.model, model, args.size, args.seed)
        bar.update()
    total = sum(p.numel() for p in model.parameters())
    dense, sparse = sparse_bytes(result.model)
    dense0, sparse0 = sparse_bytes(model)
    print(f"{_name(meta)}: strategy {result.plan.strategy}, streams "
          + ", ".join(f"{k} ({v.shape[0]})" for k, v in result.plan.transforms.items()))
    for t in result.plan.targets:
        print(f"  {t.module}: {int(t.zeros.sum()):,} zeros")
    print(f"exact zeros: before {result.zeros_before:,}, after {result.zeros_after:,} "
          f"(of {total:,} weights)")
    print(f"relative output change (float64): random inputs {rand_change:.1e}, "
          f"embedded digits {image_change:.1e}")
    print(f"weights stored sparsely (1-bit mask + float32 non-zeros): {sparse / 1e6:.3f} MB "
          f"(before {sparse0 / 1e6:.3f} MB; dense {dense / 1e6:.3f} MB)")
    _save(args.out, result.model, meta, args.dtype, symmetry="compress",
          symmetry_strategy=result.plan.strategy)
    print(f"wrote {args.out} ({args.dtype}; {count_zeros(result.model):,} exact zeros)")
    return 0


def run_canonicalize(args: argparse.Namespace) -> int:
    from qlnas.symmetry.canonical import canonicalize
    from qlnas.symmetry.streams import find_streams

    model, meta, _ = _load(args)
    out = canonicalize(model)
    rand_change, image_change = _changes(out, model, args.size, args.seed)
    print(f"{_name(meta)}: canonical gauge on "
          + ", ".join(f"{s.name} ({s.group})" for s in find_streams(model)))
    print(f"relative output change (float64): random inputs {rand_change:.1e}, "
          f"embedded digits {image_change:.1e}")
    _save(args.out, out, meta, args.dtype, symmetry="canonical")
    print(f"wrote {args.out} ({args.dtype})")
    return 0
