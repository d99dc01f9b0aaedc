"""`qlnas models`: the table of registered variants, or the paper's Table 1 comparison."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered variants with parameters and GMACs")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size (default 1000)")
    p.add_argument("--resolution", type=int, default=224, help="input size for GMACs (224)")
    p.add_argument("--table1", action="store_true",
                   help="compare with the paper's Table 1 (100 classes)")
    p.add_argument("--filter", default="qlnet*", help="timm name pattern (default qlnet*)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import timm
    from tqdm import tqdm

    from qlnas.models.complexity import model_row, table1_rows
    from qlnas.tables import format_rows

    if args.table1:
        rows = table1_rows()
    else:
        names = timm.list_models(args.filter)
        rows = []
        for name in tqdm(names, desc="counting", leave=False):
            row = model_row(name, args.num_classes, args.resolution)
            rows.append({"model": name, "params_m": round(row["params_m"], 3),
                         "gmacs": round(row["gmacs"], 3)})
    print(format_rows(rows, args.format))
    return 0
