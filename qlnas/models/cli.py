"""`qlnas models`: the table of registered variants, or the paper's Table 1 comparison;
`qlnas convert`: the authors' published checkpoints -> our model files."""

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

    c = sub.add_parser("convert", help="convert a checkpoint of the authors' published QLNet "
                                       "(their timm ResNet fork) into a qlnet50_liu2023 file")
    c.add_argument("src", metavar="SRC", help="their checkpoint: a state dict (.pth, .bin, "
                   ".safetensors) or timm's {state_dict|model|state_dict_ema} wrapper; a "
                   "pickle: load only files you trust")
    c.add_argument("out", metavar="OUT", help="our model file to write (plain form)")
    c.add_argument("--ema", action="store_true",
                   help="take the EMA weights (state_dict_ema) of a timm training checkpoint")
    c.set_defaults(func=run_convert)


def run(args: argparse.Namespace) -> int:
    import timm
    from tqdm import tqdm

    from qlnas.models.complexity import model_row, provenance, table1_rows
    from qlnas.tables import format_rows

    if args.table1:
        rows = table1_rows()
    else:
        names = timm.list_models(args.filter)
        rows = []
        for name in tqdm(names, desc="counting", leave=False):
            row = model_row(name, args.num_classes, args.resolution)
            rows.append({"model": name, "params_m": round(row["params_m"], 3),
                         "gmacs": round(row["gmacs"], 3), "source": provenance(name)})
    print(format_rows(rows, args.format))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from qlnas.models.complexity import count_params
    from qlnas.models.convert import MODEL_NAME, convert_file

    model = convert_file(args.src, args.out, ema=args.ema)
    dtype = str(model.fc.weight.dtype).removeprefix("torch.")
    print(f"{args.src}: the authors' layout, {model.num_classes} classes -> {args.out} "
          f"({MODEL_NAME}, {count_params(model):,} parameters, {dtype})")
    print(f"load it with timm.create_model({MODEL_NAME!r}, num_classes={model.num_classes}, "
          f"checkpoint_path={str(args.out)!r}), or fine-tune it with "
          f"qlnas train --model {MODEL_NAME} --init-from {args.out}")
    return 0
