"""The Triton depthwise kernels (CUDA) compute what PyTorch's conv computes.

No GPU here: they run in Triton's CPU interpreter, in a subprocess because the interpreter is
chosen when triton is imported. The kernels' code is the one a GPU compiles.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F, timm, qlnas
    from qlnas.models import fuse, triton_dw
    from qlnas.models.layers import reference_path
    from tests.models.test_fast_paths import perturbed, step_errors
    torch.manual_seed(0)
    worst = 0.0
    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    for n, k, s, h, w in [(6, 4, 1, 9, 9), (6, 4, 2, 9, 9), (5, 2, 1, 7, 11), (40, 4, 2, 5, 6),
                          (3, 6, 2, 6, 7), (70, 4, 1, 3, 3)]:
        x = torch.randn(2, n, h, w, requires_grad=True)
        wt = torch.randn(n * k, 1, 3, 3, requires_grad=True)
        ref = F.conv2d(x, wt, None, s, 1, 1, n)
        g = torch.randn_like(ref)
        rgx, rgw = torch.autograd.grad(ref, (x, wt), g)
        y = triton_dw.depthwise3x3(x, wt, s)
        gx, gw = torch.autograd.grad(y, (x, wt), g)
        b, o = torch.randn(n * k), torch.randn_like(ref)
        with torch.no_grad():
            z = triton_dw.depthwise3x3_mul(x, wt, b, o, s)
            zr = F.conv2d(x, wt, b, s, 1, 1, n) * o
        worst = max(worst, rel(y, ref), rel(gx, rgx), rel(gw, rgw), rel(z, zr))
    # A whole model: a training step through every block (batch 8: train-mode BN over fewer
    # samples amplifies fp32 rounding), and fused inference.
    m = perturbed("qlnet26n_eq3_softball_ds").train()
    x = torch.randn(8, 3, 32, 32)
    worst = max(worst, *step_errors(m, x))
    m.eval()
    with torch.no_grad(), reference_path():
        ref = m(x)
    with torch.inference_mode():
        worst = max(worst, rel(fuse(m)(x), ref))
    print(worst)
""")


@pytest.mark.slow
def test_triton_kernels_match_pytorch_in_the_interpreter():
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="1", QLNAS_TRITON="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4
