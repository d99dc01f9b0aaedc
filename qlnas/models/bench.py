"""`qlnas bench train-step`: train-step and inference speed of the Table 1 models, side by side.

Every model runs in a fresh subprocess (so peak memory is its own, and one model's allocator
state cannot slow the next) at the same resolution, batch and thread count; the parent prints
images/s, peak memory and ratios to resnet50, and writes JSON (and a PNG of the ratios).

Peak memory: on CPU the rise of the process's resident set (Linux VmHWM, reset before each
phase through /proc/self/clear_refs) above what it was before the phase, so it counts
activations, gradients, optimizer state and allocator slack, not the weights or the
interpreter; on CUDA ``torch.cuda.max_memory_allocated`` during the phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BASELINE = "resnet50"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
ALLOCATORS = ("keep", "system", "jemalloc")
# Models of the scaling sweep (a subset: each point is a full subprocess run).
SWEEP_MODELS = ("qlnet50_eq3_softball_ds", "resnet50", "mobilenetv3_large_100")


@dataclass
class BenchConfig:
    """One benchmark setting, shared by every model of a run."""

    resolution: int = 128
    """Input height and width in pixels."""
    batch: int = 32
    """Images per step."""
    threads: int = 2
    """Intra-op threads (torch.set_num_threads and OMP_NUM_THREADS)."""
    warmup: int = 2
    """Untimed steps before timing (per phase)."""
    steps: int = 5
    """Timed steps (per phase); images/s uses the fastest one (the least disturbed by other
    processes on a shared machine; the median is kept in the JSON too)."""
    device: str = "cpu"
    """cpu or cuda."""
    amp: str = "none"
    """Autocast dtype: none or bf16."""
    channels_last: bool = True
    """Model and input in channels_last memory format."""
    compile: bool = False
    """torch.compile the model (compilation is timed separately, in the first step)."""
    reference: bool = False
    """Use the reference (unoptimised) layer implementations: the "before" numbers."""
    fuse: bool = True
    """Fold BN into convs for the inference phase (qlnas.models.fuse; torch.fx for timm)."""
    allocator: str = "keep"
    """CPU memory allocator of every model's subprocess: keep (glibc keeping freed memory,
    `qlnas.allocator`, what `qlnas train` uses on CPU), system (glibc's defaults) or jemalloc
    (LD_PRELOAD)."""
    num_classes: int = 100
    """Classifier size (Table 1's ImageNet-100 heads)."""
    phases: tuple[str, ...] = field(default=("infer", "train"))
    """Which phases to time."""

    def __post_init__(self) -> None:
        for name in ("resolution", "batch", "threads", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name}={getattr(self, name)}; expected >= 1")
        if self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup={self.warmup}; expected >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"BenchConfig.device={self.device!r}; expected cpu or cuda")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"BenchConfig.amp={self.amp!r}; expected none or bf16")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"BenchConfig.allocator={self.allocator!r}; expected one of "
                             f"{', '.join(ALLOCATORS)}")
        bad = set(self.phases) - {"infer", "train"}
        if bad:
            raise ValueError(f"BenchConfig.phases has {sorted(bad)}; expected infer, train")
        self.phases = tuple(self.phases)


# ---------------------------------------------------------------- worker (one model) ----

def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_and_peak() -> tuple[int, int]:
    """Current and peak resident set in bytes (Linux /proc; else psutil and ru_maxrss)."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        import resource

        import psutil
        return psutil.Process().memory_info().rss, \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Memory:
    """Peak memory of one phase (see the module docstring for what is measured)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> _Memory:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            self.start = _rss_and_peak()[0]
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _rss_and_peak()[1] - self.start


def _time_steps(step, cfg: BenchConfig) -> tuple[float, float, list[float]]:
    """Run warm-up and timed steps; returns (first step s, fastest step s, all timed s)."""
    import torch

    def sync():
        if cfg.device == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(cfg.warmup - 1, 0)):
        step()
    sync()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return first, min(times), times


def op_traffic_bytes(fn) -> int:
    """Bytes that the aten ops of `fn()` read and write, each operand counted once per op.

    An estimate of DRAM traffic when no intermediate stays in cache (true for the MB-sized
    activations here); the time it needs at the machine's bandwidth bounds memory-bound ops.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    views = _view_ops()

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket not in views:
                flat = tree_flatten((args, kwargs, out))[0]
                Count.total += sum(t.numel() * t.element_size() for t in flat
                                   if isinstance(t, torch.Tensor))
            return out

    with Count():
        fn()
    return Count.total


def _view_ops() -> set:
    import torch
    a = torch.ops.aten
    return {a.view, a._unsafe_view, a.reshape, a.expand, a.t, a.transpose, a.permute,
            a.as_strided, a.detach, a.alias, a.unsqueeze, a.squeeze, a.slice, a.split,
            a.chunk, a.split_with_sizes, a.select, a.empty, a.empty_like, a.zeros_like,
            a.ones_like, a.empty_strided, a.lift_fresh, a.clone}


def bandwidth_gb_s(threads: int, mb: int = 256) -> float:
    """Copy bandwidth (read + write) of this process with `threads` threads, best of 5."""
    import torch
    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def _fuse_any(model):
    """BN folding for inference: ours for QLNets, torch.fx's conv-BN fusion for the rest."""
    from qlnas.models.fuse import fuse
    from qlnas.models.net import QLNet
    if isinstance(model, QLNet):
        return fuse(model)
    try:
        from torch.fx.experimental.optimization import fuse as fx_fuse
        return fx_fuse(model)
    except Exception as exc:  # noqa: BLE001 - any model fx cannot trace runs unfused
        log.warning("fx fusion failed for %s (%s); unfused", type(model).__name__, exc)
        return model


def measure(name: str, cfg: BenchConfig, macs: bool = True) -> dict:
    """Time inference and one training step of one model in this process."""
    import timm
    import torch

    import qlnas  # noqa: F401 - registers the QL-ConvNets
    from qlnas.allocator import keep_freed_memory
    from qlnas.models import layers
    from qlnas.models.complexity import count_macs, count_params

    if cfg.allocator == "keep" and cfg.device == "cpu":
        keep_freed_memory()
    torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    layers.set_reference(cfg.reference)
    device = torch.device(cfg.device)
    model = timm.create_model(name, num_classes=cfg.num_classes)
    row = {"model": name, "params_m": count_params(model) / 1e6,
           "load_avg_start": os.getloadavg()[0]}
    if macs:
        row["gmacs"] = count_macs(model, cfg.resolution) / 1e9
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = torch.randn(cfg.batch, 3, cfg.resolution, cfg.resolution, device=device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    amp = torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")

    if "infer" in cfg.phases:
        model.eval()
        net = _fuse_any(model) if cfg.fuse else model
        net = torch.compile(net) if cfg.compile else net

        def infer():
            with torch.inference_mode(), amp:
                net(x)

        with _Memory(cfg.device) as mem:
            first, best, times = _time_steps(infer, cfg)
        row.update(infer_img_s=cfg.batch / best, infer_peak_mb=mem.peak / 2**20,
                   infer_first_s=first, infer_step_s=times,
                   infer_median_img_s=cfg.batch / statistics.median(times))
        del net

    if "train" in cfg.phases:
        model.train()
        net = torch.compile(model) if cfg.compile else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)

        def train():
            with amp:
                loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with _Memory(cfg.device) as mem:
            first, best, times = _time_steps(train, cfg)
        row.update(train_img_s=cfg.batch / best, train_peak_mb=mem.peak / 2**20,
                   train_first_s=first, train_step_s=times,
                   train_median_img_s=cfg.batch / statistics.median(times))
    row["load_avg"] = [row.pop("load_avg_start"), os.getloadavg()[0]]
    if cfg.device == "cpu" and "train" in cfg.phases:
        row["train_traffic_gb"] = op_traffic_bytes(train) / 1e9
    return row


# ---------------------------------------------------------------- parent (the table) ----

def _worker_env(cfg: BenchConfig) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    if cfg.allocator == "jemalloc":
        env["LD_PRELOAD"] = (JEMALLOC + " " + env.get("LD_PRELOAD", "")).strip()
        env.setdefault("MALLOC_CONF", "background_thread:true,dirty_decay_ms:10000,"
                       "muzzy_decay_ms:10000")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_model(name: str, cfg: BenchConfig, timeout: float = 900) -> dict:
    """Measure one model in a fresh subprocess, on CPU one per phase (a process keeps the memory
    a phase freed, which would hide the next phase's peak); a failure becomes a row with an
    error."""
    if cfg.device == "cuda":  # CUDA's peak counter is reset per phase
        return _run_phase(name, cfg, timeout, macs=True)
    row: dict = {}
    for phase in cfg.phases:
        part = _run_phase(name, dataclasses.replace(cfg, phases=(phase,)), timeout,
                          macs="gmacs" not in row)
        if "error" in part:
            return part
        loads = row.get("load_avg", []) + part.pop("load_avg")
        row.update(part, load_avg=[loads[0], loads[-1]])
    return row


def _run_phase(name: str, cfg: BenchConfig, timeout: float, macs: bool) -> dict:
    cmd = [sys.executable, "-m", "qlnas.models.bench", "--worker", name,
           "--config", json.dumps(dataclasses.asdict(cfg))] + ([] if macs else ["--no-macs"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(cfg),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def add_ratios(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Ratios to the baseline: speed, and speed per MAC (MAC throughput)."""
    base = next((r for r in rows if r["model"] == baseline and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r:
            continue
        for phase in ("train", "infer"):
            key = f"{phase}_img_s"
            if key in r and key in base:
                r[f"{phase}_ratio"] = r[key] / base[key]
                r[f"{phase}_mac_ratio"] = r[key] * r["gmacs"] / (base[key] * base["gmacs"])
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed columns of each row."""
    out = []
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "error": r["error"]})
            continue
        row = {"model": r["model"], "params_m": round(r["params_m"], 2),
               "gmacs": round(r["gmacs"], 3)}
        for phase in ("train", "infer"):
            if f"{phase}_img_s" in r:
                row[f"{phase}_img_s"] = round(r[f"{phase}_img_s"], 1)
                row[f"{phase}_x_r50"] = round(r.get(f"{phase}_ratio", float("nan")), 2)
                row[f"{phase}_per_mac_x_r50"] = round(r.get(f"{phase}_mac_ratio", float("nan")), 2)
                row[f"{phase}_peak_mb"] = round(r[f"{phase}_peak_mb"])
        if r.get("train_first_s") is not None and "train_img_s" in r:
            row["train_first_s"] = round(r["train_first_s"], 1)
        row["load"] = "/".join(f"{v:.1f}" for v in r.get("load_avg", []))
        out.append(row)
    keys = list(dict.fromkeys(k for row in out for k in row))
    return [{k: row.get(k, "") for k in keys} for row in out]


def machine() -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": _cpu_name(), "cpus": os.cpu_count()}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_table(names: list[str], cfg: BenchConfig, progress: bool = True,
              on_row=None, timeout: float = 900) -> list[dict]:
    """Each model in its own subprocess; `on_row(rows)` after each (to save partial results)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU machine may lack it
        def tqdm(items, **_):
            return items
    rows = []
    for name in tqdm(names, desc="models", disable=not progress, leave=False):
        rows.append(run_model(name, cfg, timeout))
        if on_row is not None:
            on_row(add_ratios(rows))
    return add_ratios(rows)


def plot(result: dict, path: Path) -> None:
    """Bar chart of the train and inference ratios to resnet50 (one group per model)."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlnas.fileio import atomic_path

    rows = [r for r in result["rows"] if "train_ratio" in r or "infer_ratio" in r]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    for i, (phase, label) in enumerate((("train", "train step"), ("infer", "inference"))):
        vals = [r.get(f"{phase}_ratio", 0.0) for r in rows]
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], vals, width=0.4, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [r["model"].replace("qlnet50_", "") for r in rows], rotation=40,
                  ha="right", fontsize=8)
    ax.set_ylabel("images/s relative to resnet50")
    c = result["config"]
    ax.set_title(f"{result['label']}: {c['device']}, {c['resolution']} px, batch {c['batch']}, "
                 f"{c['threads']} threads", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI ----

def _parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="qlnas bench train-step", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", help="timm names (default: the Table 1 models)")
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--amp", choices=("none", "bf16"), default=d.amp)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   default=d.channels_last)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile)
    p.add_argument("--reference", action="store_true",
                   help="reference layer implementations (the 'before' numbers)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=d.fuse,
                   help="fold BN into convs for inference")
    p.add_argument("--allocator", choices=ALLOCATORS, default=d.allocator,
                   help="CPU allocator of every model's process (default: keep)")
    p.add_argument("--phases", nargs="+", choices=("infer", "train"), default=list(d.phases))
    p.add_argument("--before", action="store_true",
                   help="the 'before' setting: reference layers, NCHW, no BN folding")
    p.add_argument("--fast", action="store_true",
                   help="all speed options the device supports: channels_last, fuse (on CUDA "
                        "also bf16 and compile)")
    p.add_argument("--sweep", action="store_true",
                   help=f"also sweep resolution (64, 128, 224) and batch (16, 32, 64) for "
                        f"{', '.join(SWEEP_MODELS)}")
    p.add_argument("--model-timeout", type=float, default=900,
                   help="seconds one model may take before it is recorded as an error")
    p.add_argument("--label", default=None, help="name of the result (default: from options)")
    p.add_argument("--out", default=None,
                   help="folder for JSON and PNG (default: $OUT if set, else bench/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--no-macs", action="store_true", help=argparse.SUPPRESS)
    return p


def _config(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(
        resolution=args.resolution, batch=args.batch, threads=args.threads,
        warmup=args.warmup, steps=args.steps, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, reference=args.reference,
        fuse=args.fuse, allocator=args.allocator, phases=tuple(args.phases),
    )
    if args.before:
        cfg.reference, cfg.channels_last, cfg.fuse = True, False, False
        cfg.allocator = "system"
    if args.fast:
        cfg.channels_last, cfg.fuse = True, True
        if cfg.device == "cuda":
            cfg.amp, cfg.compile = "bf16", True
    if cfg.allocator == "jemalloc" and not Path(JEMALLOC).exists():
        raise ValueError(f"--allocator jemalloc: {JEMALLOC} not found "
                         "(apt-get install libjemalloc2)")
    return cfg


def _label(cfg: BenchConfig) -> str:
    parts = [cfg.device, "reference" if cfg.reference else "fast", f"{cfg.resolution}px",
             f"b{cfg.batch}"]
    parts += [t for t, on in (("cl", cfg.channels_last), ("fuse", cfg.fuse),
                              ("compile", cfg.compile), (cfg.amp, cfg.amp != "none"),
                              (cfg.allocator, cfg.allocator != "keep")) if on]
    return "-".join(parts)


def _print_result(result: dict) -> None:
    from qlnas.tables import format_rows
    c = result["config"]
    print(f"\n## {result['label']} ({result['machine'].get('gpu') or result['machine']['cpu']}, "
          f"{c['threads']} threads, {c['resolution']} px, batch {c['batch']})")
    print(format_rows(table_rows(result["rows"])))


def targets(rows: list[dict], model: str = "qlnet50_eq3_softball_ds") -> dict:
    """The issue's targets: Eq.(3) train >= 2.0x and inference >= 2.2x resnet50; no model
    more than 20% slower per MAC than resnet50."""
    eq3 = next((r for r in rows if r["model"] == model), {})
    per_mac = {r["model"]: r.get("train_mac_ratio") for r in rows if "train_mac_ratio" in r}
    per_mac_inf = {r["model"]: r.get("infer_mac_ratio") for r in rows if "infer_mac_ratio" in r}
    return {
        "eq3_train_ratio": eq3.get("train_ratio"),
        "eq3_train_met": (eq3.get("train_ratio") or 0) >= 2.0,
        "eq3_infer_ratio": eq3.get("infer_ratio"),
        "eq3_infer_met": (eq3.get("infer_ratio") or 0) >= 2.2,
        "per_mac_train_below_0.8": sorted(m for m, v in per_mac.items() if v < 0.8),
        "per_mac_infer_below_0.8": sorted(m for m, v in per_mac_inf.items() if v < 0.8),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        cfg = BenchConfig(**json.loads(args.config))
        print(json.dumps(measure(args.worker, cfg, macs=not args.no_macs)), flush=True)
        return 0
    from qlnas.fileio import atomic_write_json
    from qlnas.models.complexity import TABLE1

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = args.models or list(TABLE1)
    label = args.label or _label(cfg)
    out = Path(args.out or os.environ.get("OUT") or "bench/results")
    t0 = time.perf_counter()
    result = {"label": label, "machine": machine(), "config": dataclasses.asdict(cfg),
              "complete": False, "rows": []}
    if cfg.device == "cpu":
        result["machine"]["copy_gb_s"] = bandwidth_gb_s(cfg.threads)

    def save(rows: list[dict]) -> None:  # after every model, so a timeout keeps the rest
        result["rows"] = rows
        atomic_write_json(result, out / f"{label}.json")

    result["rows"] = run_table(names, cfg, on_row=save, timeout=args.model_timeout)
    if args.sweep:
        result["sweep"] = []
        points = [(res, cfg.batch) for res in (64, 128, 224)] + \
                 [(cfg.resolution, b) for b in (16, 64)]
        for res, batch in points:
            point = dataclasses.replace(cfg, resolution=res, batch=batch)
            result["sweep"].append({"resolution": res, "batch": batch,
                                    "rows": run_table(list(SWEEP_MODELS), point,
                                                      timeout=args.model_timeout)})
    result["targets"] = targets(result["rows"])
    result["wall_s"] = time.perf_counter() - t0
    result["complete"] = True
    _print_result(result)
    for point in result.get("sweep", []):
        print(f"\n### sweep: {point['resolution']} px, batch {point['batch']}")
        from qlnas.tables import format_rows
        print(format_rows(table_rows(point["rows"])))
    print(f"\ntargets: {json.dumps(result['targets'])}")
    atomic_write_json(result, out / f"{label}.json")
    plot(result, out / f"{label}.png")
    print(f"wrote {out / (label + '.json')} and .png ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
