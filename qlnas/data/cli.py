"""`qlnas data write|info|demo`: make `.beton` files and look inside them."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write, inspect or build FFCV datasets")
    cmds = p.add_subparsers(dest="data_command", required=True)

    w = cmds.add_parser("write", help="ImageFolder tree (SRC/<class>/<image>), or a flat folder "
                        "with --labels, -> OUT.beton")
    w.add_argument("src", help="folder with one sub-folder per class (flat with --labels)")
    w.add_argument("out", help="the .beton file to write (class list goes to OUT.classes.json)")
    w.add_argument("--max-res", type=int, default=512, help="longest side kept (default 512)")
    w.add_argument("--quality", type=int, default=None,
                   help="JPEG quality, not in raw mode (default 90)")
    w.add_argument("--write-mode", choices=("jpg", "raw", "smart", "proportion"), default="jpg",
                   help="how images are stored (default jpg)")
    w.add_argument("--compress-probability", type=float, default=None,
                   help="JPEG share in proportion mode (default 0.5)")
    w.add_argument("--smart-threshold", type=int, default=None,
                   help="smart mode: JPEG above this many raw bytes (default (max-res/2)^2*3)")
    w.add_argument("--subset", default=None,
                   help="class folder names: 'imagenet100' (built in) or a file, one a line")
    w.add_argument("--labels", default=None, metavar="FILE",
                   help="SRC is flat; FILE gives each image's class: LOC_val_solution.csv "
                   "format or 'filename wnid' lines")
    w.add_argument("--classes", default=None, metavar="FILE", dest="known_classes",
                   help="with --labels: the classes labels may name, a .beton (its class list, "
                   "e.g. the train file) or a file with a class name starting each line")
    w.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                   help="at most N images per class (first in name order)")
    w.add_argument("--workers", type=int, default=None, help="processes (default: cores, <=8)")
    w.add_argument("--skip-corrupt", action="store_true",
                   help="leave out undecodable images and list them (default: stop)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    w.set_defaults(func=run_write)

    i = cmds.add_parser("info", help="samples, classes, fields and image sizes of a .beton")
    i.add_argument("file")
    i.add_argument("--verify", action="store_true",
                   help="decode every sample and list those that fail (exit 1 if any)")
    i.add_argument("--workers", type=int, default=None, help="threads for --verify")
    i.set_defaults(func=run_info)

    d = cmds.add_parser("demo", help="build the embedded digits dataset (train/val .beton)")
    d.add_argument("dir", nargs="?", default=None,
                   help="output folder (default $QLNAS_CACHE or ~/.cache/qlnas)")
    d.set_defaults(func=run_demo)


def run_write(args: argparse.Namespace) -> int:
    from qlnas.data.info import format_conversions
    from qlnas.data.writer import write_beton

    result = write_beton(
        args.src, args.out, max_res=args.max_res, quality=args.quality,
        write_mode=args.write_mode, compress_probability=args.compress_probability,
        smart_threshold=args.smart_threshold, subset=args.subset,
        limit_per_class=args.limit_per_class, workers=args.workers,
        skip_corrupt=args.skip_corrupt, overwrite=args.overwrite, labels=args.labels,
        known_classes=args.known_classes)
    print(f"wrote {result.path}: {result.num_samples} images, {len(result.classes)} classes")
    print(f"sources: {format_conversions(result.conversions)}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} corrupt image(s):")
        for path in result.skipped:
            print(f"  {path}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from qlnas.data.info import beton_info, format_info

    print(format_info(beton_info(args.file)))
    if not args.verify:
        return 0
    from qlnas.data.integrity import describe_samples, verify

    bad = verify(args.file, args.workers)
    for field, samples in bad.items():
        print(f"verify:   {field}: {len(samples)} sample(s) fail to decode")
        for sample in samples:
            print(f"  {describe_samples(args.file, [sample])}")
    return 1 if any(bad.values()) else 0


def run_demo(args: argparse.Namespace) -> int:
    from qlnas.data.demo import demo_dataset

    train, val = demo_dataset(args.dir)
    print(f"train: {train}\nval:   {val}")
    return 0
