import subprocess
import sys

from qlnas.bench.loader import main


def test_benchmark_runs_on_a_tiny_input(tmp_path, capsys):
    """Every split and resolution gets a row with the three loaders and their ratios."""
    assert main(["--count", "24", "--work-dir", str(tmp_path), "--resolution", "32", "48",
                 "--batch-size", "8", "--workers", "1", "--epochs", "1",
                 "--bound-samples", "50", "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " px  img/s:" in line]
    assert [row.split()[:2] for row in rows] == [["train", "32"], ["train", "48"],
                                                  ["val", "32"], ["val", "48"]]
    for row in rows:
        for part in ("torchvision", "stock", "ours", "ours/stock", "ours/torchvision"):
            assert part in row
    assert all(("decode bound" in row) == row.startswith("train") for row in rows)
    assert (tmp_path / "loader.json").is_file()


def test_help_answers_before_ffcv_is_loaded():
    # --help must not pay for FFCV's import and numba's start-up (seconds) before it prints.
    code = ("import sys\nfrom qlnas.cli import main\n"
            "try:\n    main(['bench', 'loader', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'ffcv' or m.startswith('ffcv.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "qlnas bench loader" in out.stdout and out.stdout.strip().endswith("[]")
