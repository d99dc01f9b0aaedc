"""`qlnas bench kernels`: the depthwise layers of a model, their traffic floor, the table."""

import json
import os
import subprocess
import sys
import textwrap

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from qlnas.bench.kernels import KERNELS, Layer, main, model_layers
from qlnas.bench.metrics import op_traffic_bytes


def test_layers_are_the_models_depthwise_convs_with_their_counts():
    layers = model_layers("qlnet50_eq3_softball_ds", 128, 32)
    # qlnet50: 3, 4, 6, 3 blocks; the first block of stages 2-4 has stride 2.
    assert sum(layers.values()) == 16 and len(layers) == 7
    assert layers[Layer(32, 64, 4, 32, 32, 1)] == 3
    assert layers[Layer(32, 256, 4, 8, 8, 1)] == 5
    assert layers[Layer(32, 64, 4, 32, 32, 2)] == 1
    assert model_layers("qlnet50_eq7_nows_x6_softball_ds", 64, 2) == {}  # per-channel dw only


@pytest.mark.parametrize("stride", [1, 2])
def test_forward_floor_is_what_the_conv_reads_and_writes(stride):
    layer = Layer(2, 6, 4, 9, 7, stride)
    x = torch.randn(2, 6, 9, 7)
    w = torch.randn(24, 1, 3, 3)
    counted = op_traffic_bytes(lambda: F.conv2d(x, w, None, stride, 1, 1, 6))
    assert layer.traffic_bytes("forward", 4) == counted
    assert layer.traffic_bytes("forward", 2) == counted // 2


def test_the_table_on_disk(tmp_path):
    # A subprocess: the run keeps freed memory in its process, as training does.
    proc = subprocess.run([sys.executable, "-m", "qlnas.bench.kernels", "--resolution", "32",
                           "--batch", "2", "--reps", "1", "--out", str(tmp_path), "--label",
                           "k"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "k.json").read_text())
    assert result["copy_gb_s"] > 0 and result["nominal_gb_s"] is None  # CPU: no data sheet
    assert len(result["rows"]) == 7 * len(KERNELS) * 2  # layers x kernels x backends
    assert {r["backend"] for r in result["rows"]} == {"reference", "native"}
    assert all(r["ms"] > 0 and r["gb_s"] > 0 and "x_copy_bw" in r for r in result["rows"])
    assert len(result["totals"]) == len(KERNELS) * 2
    assert matplotlib.image.imread(tmp_path / "k.png").shape[2] in (3, 4)
    assert "over the model" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--model", "qlnet50_eq7_nows_x6_softball_ds"], "no depthwise conv with a channel"),
    (["--model", "nonesuch"], "--model nonesuch"),
    (["--dtype", "bfloat16", "--backends", "native"], "native kernel does not run"),
    (["--batch", "0"], "--batch 0"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert main(argv + ["--resolution", "16", "--batch" if "--batch" not in argv else "--reps",
                        "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_default_backends_are_those_that_run_in_the_dtype(tmp_path):
    # CPU bfloat16: the native kernel is float32 only, so the default is the reference alone
    # (it used to stop with the error meant for an explicit --backends native). A subprocess:
    # the run keeps freed memory in its process, which would hide later tests' peaks.
    proc = subprocess.run([sys.executable, "-m", "qlnas.bench.kernels", "--dtype", "bfloat16",
                           "--resolution", "8", "--batch", "1", "--reps", "1", "--out",
                           str(tmp_path), "--label", "k"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "k.json").read_text())
    assert {r["backend"] for r in result["rows"]} == {"reference"}
    assert result["dtype"] == "bfloat16"


@pytest.mark.slow
def test_triton_backend_runs_in_the_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from qlnas.bench.kernels import KERNELS, Layer, measure
        rows = measure({Layer(1, 8, 4, 6, 6, 1): 2, Layer(1, 8, 2, 7, 5, 2): 1}, ["triton"],
                       "cpu", torch.float32, reps=1, progress=False)
        assert sorted({r["kernel"] for r in rows}) == sorted(KERNELS)
        assert len(rows) == 8 and all(r["gb_s"] > 0 for r in rows)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
