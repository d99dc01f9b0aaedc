"""torch.compile sees each QL-ConvNet as one graph: no graph breaks, in training and in fused
inference, counted on CPU with Dynamo's own `explain`.

On a GPU every graph break is a round trip to Python and a boundary that Inductor cannot fuse
across; the eager-only fast paths (native and Triton kernels, oneDNN post-ops) must step aside
before they touch anything Dynamo refuses to trace.
"""

import pytest
import timm
import torch

import qlnas  # noqa: F401 - registers the models
from qlnas.models.complexity import TABLE1
from qlnas.models.fuse import fuse

MODELS = [name for name in TABLE1 if name.startswith("qlnet")] + ["qlnet50_glb_softball_ds"]


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()
    return explained.graph_break_count, [str(b.reason).splitlines()[0]
                                         for b in explained.break_reasons]


@pytest.mark.parametrize("name", MODELS)
def test_one_graph_in_training_and_in_fused_inference(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    breaks, reasons = graph_breaks(model.train(), x)
    assert breaks == 0, f"{name} train: {reasons[:3]}"
    with torch.no_grad():
        breaks, reasons = graph_breaks(fuse(model.eval()), x)
    assert breaks == 0, f"{name} fused eval: {reasons[:3]}"
