"""`qlnas search`, `qlnas report` and `qlnas tensorboard`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="architecture search with Ray Tune and Optuna")
    add_search_arguments(p)
    p.set_defaults(func=run_search_cmd)

    r = sub.add_parser("report", help="leaderboard, plots and best config of a search")
    r.add_argument("dir", help="the search folder (--out of qlnas search)")
    r.add_argument("--format", choices=("md", "csv", "json"), default="md")
    r.add_argument("--pareto", default=None, metavar="Y,X",
                   help="the Pareto plot's two metrics, e.g. val_top1,gmacs (default: the "
                        "search's two objectives, else val_top1,params_m)")
    r.set_defaults(func=run_report_cmd)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default=None,
                   help="search space YAML (see search_spaces/); with --resume, optional: the "
                        "search's own copy is used, and a given one must be the same space "
                        "(search.num_trials may grow)")
    p.add_argument("--out", default=None, help="search folder (default runs/search-<space>)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out")
    p.add_argument("--add-trials", type=int, default=0, metavar="N",
                   help="with --resume: N more trials than the search's budget (a finished "
                        "search continues, its sampler informed by every trial so far)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address; 'local' starts a new local Ray (default: a "
                        "running cluster, else a local Ray)")


def resolve_space(space: str) -> str:
    """`space` as given, or, when it is not there, relative to this qlnas checkout (so
    `--space search_spaces/x.yaml` also works from `ray submit`, which runs in the home)."""
    from pathlib import Path

    path = Path(space)
    if path.exists() or path.is_absolute():
        return space
    repo = Path(__file__).resolve().parents[2] / path
    return str(repo) if repo.exists() else space


def run_search_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlnas.errors import UserError
    from qlnas.search.run import run_search
    from qlnas.tables import format_rows

    if args.space is None and not (args.resume and args.out):
        raise UserError("--space is needed (or --resume --out DIR, which reads DIR/space.yaml)")
    out = Path(args.out or f"runs/search-{Path(args.space).stem}")
    space = resolve_space(args.space) if args.space is not None else None
    rows = run_search(space, out, resume=args.resume, address=args.address,
                      add_trials=args.add_trials)
    print(format_rows(rows, "md"))
    _print_skipped(rows)
    print(f"\nleaderboard: {out / 'leaderboard.md'} (and .csv)")
    print(f"Pareto plot: {out / 'pareto.png'}   learning curves: {out / 'curves.png'}")
    if (out / "best_config.yaml").is_file():
        print(f"best config: {out / 'best_config.yaml'} (qlnas train --config ...)")
    print(f"TensorBoard: qlnas tensorboard {out}   (or tensorboard --logdir {out / 'trials'})")
    _print_study(out)
    return _outcome(rows, out)


def _print_study(out, stream=None) -> None:
    """Where the search's Optuna study is, and the line that opens it from Python."""
    from qlnas.search.study import find_study_ref

    ref = find_study_ref(out)
    if ref is not None:
        print(f"Optuna study: {ref.name!r} in {ref.storage}   (qlnas dashboard {out})",
              file=stream)
        print(f"  from Python: {ref.snippet()}", file=stream)


def _print_skipped(rows: list[dict]) -> None:
    """What the constraints saved: infeasible configurations never trained."""
    skipped = [r for r in rows if r["status"] == "infeasible"]
    trained = [r["wall_s"] for r in rows if r["status"] in ("completed", "pruned", "diverged")
               and not r.get("reused_from")]  # a reused result took no training
    if skipped:
        saved = f"; about {len(skipped) * sum(trained) / len(trained):.0f} s of training " \
            "saved at the mean trial's time" if trained else ""
        print(f"\nconstraints: {len(skipped)} infeasible configurations skipped before any "
              f"worker started{saved}")


def _outcome(rows: list[dict], out) -> int:
    """0 when a trial completed; else 1, with a line that counts what happened instead."""
    import sys

    counts = {s: sum(r["status"] == s for r in rows) for s in
              ("completed", "pruned", "diverged", "errored", "infeasible", "running")}
    errored = counts["errored"]
    where = f"see the error column of {out / 'leaderboard.md'}"
    if counts["completed"]:
        if errored:
            print(f"qlnas: warning: {errored} of {len(rows)} trials errored; {where}",
                  file=sys.stderr)
        return 0
    what = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"qlnas: error: no trial completed ({len(rows)} trials: {what or 'none run'}); "
          f"{where}", file=sys.stderr)
    return 1


def run_report_cmd(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from qlnas.search.report import write_report
    from qlnas.tables import format_rows

    rows = write_report(args.dir, pareto=args.pareto)
    print(format_rows(rows, args.format))
    stream = sys.stdout if args.format == "md" else sys.stderr  # csv, json: stdout parses
    for name, what in (("pareto.png", "Pareto plot"), ("curves.png", "learning curves")):
        if (Path(args.dir) / name).is_file():
            print(f"{what}: {Path(args.dir) / name}", file=stream)
    _print_study(args.dir, stream)
    return 0
