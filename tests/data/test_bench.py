from qlnas.data.bench import main


def test_benchmark_runs_on_a_tiny_input(tmp_path, capsys):
    assert main(["--count", "24", "--work-dir", str(tmp_path), "--resolution", "32",
                 "--batch-size", "8", "--workers", "1", "--epochs", "1",
                 "--bound-samples", "50"]) == 0
    out = capsys.readouterr().out
    for line in ("torchvision", "stock", "ours / stock FFCV", "ours / torchvision",
                 "decode bound"):
        assert line in out
