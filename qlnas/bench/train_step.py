"""`qlnas bench train-step`: train-step and inference speed of the Table 1 models, side by side.

Every model runs in a fresh subprocess (so peak memory is its own, and one model's allocator
state cannot slow the next) at the same resolution, batch and thread count; the parent prints
images/s, peak memory and ratios to resnet50, and writes JSON (and a PNG of the ratios). What
peak memory counts: `qlnas.bench.metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlnas.bench.metrics import PeakMemory, bandwidth_gb_s, machine, op_traffic_bytes
from qlnas.bench.report import add_ratios, plot, print_result, results_dir, targets, write_result

log = logging.getLogger(__name__)

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

        with PeakMemory(cfg.device) as mem:
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

        with PeakMemory(cfg.device) as mem:
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
    cmd = [sys.executable, "-m", "qlnas.bench.train_step", "--worker", name,
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
    out = results_dir(args.out)
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
    result["targets"] = targets(result["rows"], cfg.device)
    result["wall_s"] = time.perf_counter() - t0
    result["complete"] = True
    print_result(result)
    print(f"\ntargets: {json.dumps(result['targets'])}")
    write_result(result, out, label, plot, note=f" ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
