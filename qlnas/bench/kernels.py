"""`qlnas bench kernels`: each depthwise kernel's achieved memory bandwidth against the device's.

The QL blocks' 3x3 depthwise conv with a channel multiplier is memory-bound: a handful of
multiply-adds per byte. For every distinct depthwise layer of a model (shapes from one forward
pass at the given resolution and batch) this times its four kernels, forward, forward with the
folded bias and the block's product (inference), input gradient and weight gradient, on each
backend: ``reference`` (PyTorch's conv: oneDNN or cuDNN), ``native`` (the CPU kernel) and
``triton`` (CUDA, or Triton's interpreter where ``TRITON_INTERPRET=1``). Bandwidth is the
traffic floor (every input read once, every output written once) over the time, against the
device's copy bandwidth measured in the same run and, on CUDA, the card's nominal peak.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KERNELS = ("forward", "forward_mul", "grad_input", "grad_weight")
BACKENDS = ("reference", "native", "triton")
# Nominal memory bandwidth in GB/s by card name (vendors' data sheets); the first match wins.
NOMINAL_GB_S = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
                ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0),
                ("RTX 4090", 1008.0), ("RTX 3090", 936.0))


@dataclass(frozen=True)
class Layer:
    """One depthwise conv: input (batch, n, h, w), k output copies per channel, a stride."""

    batch: int
    n: int
    k: int
    h: int
    w: int
    stride: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.h - 1) // self.stride + 1, (self.w - 1) // self.stride + 1

    def describe(self) -> str:
        ho, wo = self.out_hw
        return f"{self.n}x{self.h}x{self.w} -> {self.n * self.k}x{ho}x{wo} /{self.stride}"

    def traffic_bytes(self, kernel: str, itemsize: int) -> int:
        """The floor: bytes of every operand the kernel must read or write, each once."""
        ho, wo = self.out_hw
        x = self.batch * self.n * self.h * self.w
        y = self.batch * self.n * self.k * ho * wo
        wt = 9 * self.n * self.k
        elements = {"forward": x + wt + y, "forward_mul": x + wt + self.n * self.k + 2 * y,
                    "grad_input": y + wt + x, "grad_weight": y + x + wt}[kernel]
        return elements * itemsize


def model_layers(name: str, resolution: int, batch: int) -> dict[Layer, int]:
    """The distinct depthwise layers with a multiplier of a timm model, with how often each
    occurs (from a forward pass's shapes)."""
    import timm
    import torch

    import qlnas  # noqa: F401 - registers the QL-ConvNets
    from qlnas.models.layers import DepthwiseConv3x3

    model = timm.create_model(name, num_classes=10).eval()
    seen: dict[Layer, int] = {}

    def hook(module, inputs, _output):
        _, n, h, w = inputs[0].shape
        layer = Layer(batch, n, module.k, h, w, module.stride)
        seen[layer] = seen.get(layer, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, DepthwiseConv3x3) and m.expand and m.k > 1]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return seen


def _kernels(layer: Layer, backend: str, device: str, dtype) -> dict[str, Callable[[], None]]:
    """The four kernels of one layer on one backend, as calls with their inputs bound."""
    import torch
    import torch.nn.functional as F

    from qlnas.models import native

    problem = _unavailable(backend, device, dtype) if backend in BACKENDS else None
    if problem:
        raise RuntimeError(problem)
    ho, wo = layer.out_hw
    c = layer.n * layer.k
    cl = torch.channels_last
    x = torch.randn(layer.batch, layer.n, layer.h, layer.w, device=device, dtype=dtype)
    x = x.contiguous(memory_format=cl)
    weight = torch.randn(c, 1, 3, 3, device=device, dtype=dtype)
    bias = torch.randn(c, device=device, dtype=dtype)
    other = torch.randn(layer.batch, c, ho, wo, device=device, dtype=dtype).contiguous(
        memory_format=cl)
    gy = torch.randn_like(other)
    if backend == "reference":
        def conv(inp, wt):
            return F.conv2d(inp, wt, None, layer.stride, 1, 1, layer.n)

        def conv_mul():
            return F.conv2d(x, weight, bias, layer.stride, 1, 1, layer.n) * other
    elif backend == "native":

        def conv(inp, wt):
            return native.depthwise3x3(inp, wt, layer.k, layer.stride)

        def conv_mul():
            return native.depthwise3x3_mul(x, weight, bias, other, layer.stride)
    elif backend == "triton":
        from qlnas.models import triton_dw

        def conv(inp, wt):
            return triton_dw.depthwise3x3(inp, wt, layer.stride)

        def conv_mul():
            return triton_dw.depthwise3x3_mul(x, weight, bias, other, layer.stride)
    else:
        raise ValueError(f"backend {backend!r}; expected one of {', '.join(BACKENDS)}")

    # The backward graphs are built once, untimed; each timed call runs one gradient.
    x_grad = x.detach().requires_grad_(True)
    w_grad = weight.detach().requires_grad_(True)
    y_for_x, y_for_w = conv(x_grad, weight), conv(x, w_grad)

    def forward():
        with torch.no_grad():
            conv(x, weight)

    def forward_mul():
        with torch.no_grad():
            conv_mul()

    def grad_input():
        torch.autograd.grad(y_for_x, x_grad, gy, retain_graph=True)

    def grad_weight():
        torch.autograd.grad(y_for_w, w_grad, gy, retain_graph=True)

    return {"forward": forward, "forward_mul": forward_mul, "grad_input": grad_input,
            "grad_weight": grad_weight}


def _unavailable(backend: str, device: str, dtype) -> str | None:
    """Why `backend` cannot run on `device` in `dtype`, or None."""
    import torch
    x = torch.empty(1, device=device, dtype=dtype)
    if backend == "native":
        from qlnas.models import native
        if not native.eligible(x):
            return f"the native kernel does not run on {device} {dtype} (CPU float32 only)"
    if backend == "triton":
        from qlnas.models import triton_dw
        if not triton_dw.runs_on(x):
            return "the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None


def time_call(fn: Callable[[], None], device: str, reps: int, rounds: int = 5) -> float:
    """Seconds of one call: the best of `rounds` runs of `reps` calls each, after a warm-up."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def copy_gb_s(device: str, mb: int = 512) -> float:
    """Copy bandwidth (read + write) of the device, best of 5."""
    import torch
    a = torch.ones(mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / time_call(lambda: b.copy_(a), device, reps=3) / 1e9


def nominal_gb_s(card: str | None) -> float | None:
    """The card's data-sheet bandwidth, where this table knows it."""
    for key, value in NOMINAL_GB_S:
        if card and key.lower() in card.lower():
            return value
    return None


def measure(layers: dict[Layer, int], backends: list[str], device: str, dtype, reps: int,
            progress: bool = True) -> list[dict]:
    """One row per (layer, kernel, backend): time, traffic floor and achieved bandwidth."""
    from tqdm import tqdm
    rows = []
    jobs = [(layer, backend) for layer in layers for backend in backends]
    for layer, backend in tqdm(jobs, desc="kernels", disable=not progress, leave=False):
        calls = _kernels(layer, backend, device, dtype)
        itemsize = dtype.itemsize
        for kernel in KERNELS:
            seconds = time_call(calls[kernel], device, reps)
            moved = layer.traffic_bytes(kernel, itemsize)
            rows.append({"layer": layer.describe(), "count": layers[layer], "kernel": kernel,
                         "backend": backend, "ms": seconds * 1e3, "mb": moved / 1e6,
                         "gb_s": moved / seconds / 1e9})
    return rows


def totals(rows: list[dict]) -> list[dict]:
    """Per backend and kernel, over the model's layers (each as often as it occurs): time,
    traffic and the bandwidth those give."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        t = out.setdefault((r["backend"], r["kernel"]), {"backend": r["backend"],
                                                         "kernel": r["kernel"], "ms": 0.0,
                                                         "mb": 0.0})
        t["ms"] += r["ms"] * r["count"]
        t["mb"] += r["mb"] * r["count"]
    for t in out.values():
        t["gb_s"] = t["mb"] / t["ms"] if t["ms"] else float("nan")
    return list(out.values())


def _with_peaks(rows: list[dict], copy: float, nominal: float | None) -> list[dict]:
    out = []
    for r in rows:
        row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
        row["x_copy_bw"] = round(r["gb_s"] / copy, 3)
        if nominal:
            row["x_peak_bw"] = round(r["gb_s"] / nominal, 3)
        out.append(row)
    return out


def plot(result: dict, path: Path) -> None:
    """Bars of each backend's bandwidth per kernel (over the model), with the copy bandwidth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlnas.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(8, 4))
    backends = list(dict.fromkeys(t["backend"] for t in result["totals"]))
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        vals = [next((t["gb_s"] for t in result["totals"]
                      if t["backend"] == backend and t["kernel"] == k), 0.0) for k in KERNELS]
        ax.bar([x + (i - (len(backends) - 1) / 2) * width for x in range(len(KERNELS))], vals,
               width=width, label=backend)
    ax.axhline(result["copy_gb_s"], color="k", lw=0.8, ls="--", label="copy bandwidth")
    if result.get("nominal_gb_s"):
        ax.axhline(result["nominal_gb_s"], color="r", lw=0.8, label="nominal peak")
    ax.set_xticks(range(len(KERNELS)), KERNELS)
    ax.set_ylabel("GB/s (traffic floor / time)")
    ax.set_title(f"{result['model']}: {result['device_name']}, {result['resolution']} px, "
                 f"batch {result['batch']}, {result['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlnas bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qlnet50_eq3_softball_ds")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="default: reference and native on CPU, reference and triton on CUDA, "
                        "less those that do not run in --dtype")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--reps", type=int, default=3, help="calls per timed round (5 rounds)")
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=None,
                   help="folder for JSON and PNG (default: $OUT if set, else bench/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from qlnas.bench.metrics import machine
    from qlnas.bench.report import results_dir, write_result
    from qlnas.tables import format_rows

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("resolution", "batch", "threads", "reps"):
        if getattr(args, name) < 1:
            print(f"error: --{name} {getattr(args, name)}; expected >= 1", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    backends = args.backends or [  # the defaults that run here; an asked-for one must run
        b for b in (("reference", "native") if args.device == "cpu" else ("reference", "triton"))
        if _unavailable(b, args.device, dtype) is None]
    try:
        layers = model_layers(args.model, args.resolution, args.batch)
    except RuntimeError as exc:  # timm's unknown-model error
        print(f"error: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    if not layers:
        print(f"error: --model {args.model} has no depthwise conv with a channel multiplier",
              file=sys.stderr)
        return 2
    for backend in backends:  # before any timing, so a bad choice is one line
        problem = _unavailable(backend, args.device, dtype)
        if problem:
            print(f"error: --backends {backend}: {problem}", file=sys.stderr)
            return 2
    if args.device == "cpu":  # as `qlnas train` and the train-step table run (process-wide)
        from qlnas.allocator import keep_freed_memory
        keep_freed_memory()
    rows = measure(layers, backends, args.device, dtype, args.reps)
    info = machine()
    card = info.get("gpu") if args.device == "cuda" else info["cpu"]
    copy = copy_gb_s(args.device)
    nominal = nominal_gb_s(card) if args.device == "cuda" else None
    result = {"model": args.model, "resolution": args.resolution, "batch": args.batch,
              "dtype": args.dtype, "device": args.device, "device_name": card,
              "threads": args.threads, "machine": info, "copy_gb_s": copy,
              "nominal_gb_s": nominal, "rows": _with_peaks(rows, copy, nominal),
              "totals": _with_peaks(totals(rows), copy, nominal)}
    label = args.label or f"kernels-{args.device}-{args.resolution}px-b{args.batch}"
    out = results_dir(args.out)
    print(f"\n## {label}: {args.model} on {card}, {args.dtype}; copy bandwidth {copy:.0f} GB/s"
          + (f", nominal {nominal:.0f} GB/s" if nominal else ""))
    print(format_rows(result["rows"]))
    print("\n### over the model (each layer as often as it occurs)")
    print(format_rows(result["totals"]))
    write_result(result, out, label, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
