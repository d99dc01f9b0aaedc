"""Peak memory, aten-op traffic and the machine record of the benchmarks."""

import torch

from qlnas.bench.metrics import PeakMemory, machine, op_traffic_bytes


def test_peak_memory_counts_what_the_phase_allocates():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
        del block
    assert mem.peak >= 60 * 2**20


def test_op_traffic_counts_operands_once_per_op_and_skips_views():
    a, b = torch.ones(1000), torch.ones(1000)
    assert op_traffic_bytes(lambda: a + b) == 3 * 4000  # two inputs and the output
    assert op_traffic_bytes(lambda: a.view(10, 100).t()) == 0


def test_machine_names_the_libraries():
    info = machine()
    assert info["torch"] == torch.__version__ and info["cpus"] >= 1
    assert {"platform", "python", "cpu", "timm"} <= set(info)
