"""The `qlnas` command line."""

import json
import subprocess
import sys

from qlnas.cli import main


def test_models_table1_json(capsys):
    assert main(["models", "--table1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in rows} >= {"resnet50", "mobilenetv3_large_100",
                                          "qlnet50_eq5_softball_ds"}


def test_models_table_csv(capsys):
    assert main(["models", "--filter", "qlnet26n_eq4*", "--num-classes", "10",
                 "--format", "csv"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "model,params_m,gmacs,source"
    assert out[1].startswith("qlnet26n_eq4_softball_ds,")


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "qlnas.cli", "models", "--filter",
                           "qlnet26n_glb_none"], capture_output=True, text=True, check=True)
    assert "qlnet26n_glb_none" in proc.stdout


def test_the_demo_runs_the_search_command_with_all_its_options():
    """`qlnas demo` is `qlnas search` on demo.yaml: every option the search command reads is
    there with its default (a hand-built set once lacked --add-trials, and make demo crashed)."""
    from qlnas.cli import build_parser
    from qlnas.demo import search_args, space_path

    args = search_args("runs/x")
    parsed = build_parser().parse_args(["search", "--space", str(space_path()), "--out",
                                        "runs/x"])
    expected = {k: v for k, v in vars(parsed).items() if k not in ("command", "func",
                                                                    "verbose")}
    assert vars(args) == expected
