"""One search trial: a Tune function that runs a `TorchTrainer` whose workers call `fit`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json
from qlnas.search.plugins import import_modules
from qlnas.search.pruning import StopRecords
from qlnas.search.report import read_record

log = logging.getLogger(__name__)


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | bool | str)}


def worker_loop(cfg: dict) -> None:
    """Runs in every Ray Train worker: the same `fit` as the CLI, fed by Ray's process group."""
    import torch

    from qlnas.search.pruning import stop_poller
    from qlnas.train.config import TrainConfig
    from qlnas.train.distributed import DistInfo
    from qlnas.train.fit import fit

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    dist = DistInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                    local_rank=ctx.get_local_rank(), local_world_size=ctx.get_local_world_size(),
                    device=device, owns_group=False)
    import_modules(tuple(cfg["imports"]), "imports")  # model families a space plugs in
    config = TrainConfig.from_dict(cfg["train"], source=f"trial {cfg['trial_id']}")
    extra = cfg["facts"]

    should_stop = stop_poller(cfg["board"], cfg["trial_id"])

    def report(metrics: dict) -> None:
        if not metrics.get("diverged") and metrics.get("epoch", 0) >= config.epochs:
            should_stop.finished = True  # trained all its epochs: completed, never pruned
        ray.train.report({**_jsonable(metrics), **extra})

    fit(config, dist=dist, report=report, resume=True, should_stop=should_stop,
        progress_bar=False)


def trial_driver(params: dict, settings: dict) -> None:
    """The Tune trainable: builds the trial's TorchTrainer, runs it, records the outcome.

    `params`: the sampled values; `settings` (via tune.with_parameters): the SearchSpace, the
    search folder and the stop board's name. ``trials/<id>/trial.json`` is written before
    anything can fail and again at the end with the status (and, for an errored trial, its
    error in one line); an error is raised again so that Tune and Optuna see it too.

    Not trained: a trial stopped before a driver restart (it keeps its outcome), and one whose
    configuration another trial of this search trains or has trained (its result is reused).
    """
    trial_id = ray.tune.get_context().get_trial_id()
    space = settings["space"]
    import_modules(space.imports, f"{space.path}: imports")
    root = Path(settings["out"])
    out = root / "trials" / trial_id
    previous = read_record(out)
    record = {"trial_id": trial_id, "params": params, "spec": None, "model": None,
              "params_m": None, "gmacs": None, "started": previous.get("started", time.time()),
              "status": "running", "attempts": previous.get("attempts", 0) + 1,
              "objectives": [{"metric": o.metric, "mode": o.mode} for o in space.objectives]}
    atomic_write_json(record, out / "trial.json")
    status, error = "errored", None
    try:
        train_cfg = space.train_config(params, out=str(out / "run"))
        spec, facts = _model_facts(train_cfg, space.resources.workers_per_trial)
        key = config_key(train_cfg)
        record.update(spec=spec, model=train_cfg.model, **facts, config_key=key,
                      train_config=train_cfg.to_dict())
        atomic_write_json(record, out / "trial.json")
        stopped = StopRecords(str(root)).get(trial_id)
        if stopped:  # before a driver restart: it stays stopped
            status = _run_status(out / "run") or stopped
        elif (owner := _claim(root, key, trial_id)) != trial_id \
                and (status := _reuse(root, key, owner, trial_id, facts)):
            record["reused_from"] = owner
        else:
            _build_trainer(train_cfg, trial_id, settings, facts).fit()
            status = _run_status(out / "run")
            if status is None:
                raise RuntimeError(f"the trial's training ended without {out / 'run'}"
                                   "/result.json")
    except BaseException as exc:
        error = error_line(exc)
        raise
    finally:
        record.update(status=status, ended=time.time(), error=error)
        atomic_write_json(record, out / "trial.json")


def config_key(train_cfg) -> str:
    """Identifies a trial's training: its whole resolved config but the run folder."""
    import hashlib

    config = {k: v for k, v in train_cfg.to_dict().items() if k != "out"}
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _claim(root: Path, key: str, trial_id: str) -> str:
    """The trial that trains configuration `key` in this search: the first to claim it."""
    import os

    path = _claim_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            return json.loads(path.read_text())["trial_id"]
        except (OSError, ValueError, KeyError):
            return trial_id  # a claim cut short by a crash: train it here
    with os.fdopen(fd, "w") as f:
        json.dump({"trial_id": trial_id}, f)
    return trial_id


def _claim_path(root: Path, key: str) -> Path:
    return root / "configs" / f"{key}.json"


REUSABLE = ("completed", "pruned", "diverged")


def _reuse(root: Path, key: str, owner: str, trial_id: str, facts: dict) -> str | None:
    """Wait for the trial that trains the same configuration; report its epochs as this
    trial's (so Tune, the pruner and Optuna see them) and return its status. None when it
    errored: this trial then trains the configuration itself."""
    log.info("trial %s: the same configuration as trial %s; reusing its result", trial_id,
             owner)
    while True:
        other = read_record(root / "trials" / owner)
        if other.get("status") not in (None, "running"):
            break
        time.sleep(2)
    if other["status"] not in REUSABLE:
        atomic_write_json({"trial_id": trial_id}, _claim_path(root, key))  # it trains it now
        return None
    from qlnas.search.report import read_history

    if other["status"] != "completed":
        StopRecords(str(root)).post(trial_id, other["status"])
    for row in read_history(root / "trials" / owner / "run", typed=True):
        ray.tune.report({**row, **facts, "reused_from": owner})
    return other["status"]


def _run_status(run: Path) -> str | None:
    path = run / "result.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def _build_trainer(train_cfg, trial_id: str, settings: dict, facts: dict):
    res = settings["space"].resources
    return ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={"train": train_cfg.to_dict(), "trial_id": trial_id,
                           "board": settings["board"], "cpus_per_worker": res.cpus_per_worker,
                           "facts": facts, "imports": list(settings["space"].imports)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=str(Path(settings["out"]) / "ray_train"),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures)),
    )


def error_line(exc: BaseException) -> str:
    """One line for the leaderboard: a worker's own error rather than Ray's wrapping."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"rank {rank}: {error_line(failures[rank])}"
    for attr in ("controller_failure", "cause"):
        inner = getattr(exc, attr, None)
        if isinstance(inner, BaseException) and inner is not exc:
            return error_line(inner)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, UserError):
        text = lines[0] if lines else ""
    elif len(lines) > 1:
        text = lines[-1]  # a traceback's last line names the exception and its message
    else:
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _model_facts(train_cfg, world_size: int) -> tuple[dict | None, dict]:
    """Spec and facts (parameters in M, GMACs at the trial's resolution and at 224 px) of a
    trial's model, its config checked as `fit` checks it, before any worker starts."""
    from qlnas.train.fit import validate

    *_, model = validate(train_cfg, world_size)
    return _facts(model, train_cfg.resolution)


def _facts(model, resolution: int) -> tuple[dict | None, dict]:
    from qlnas.models.complexity import count_macs, count_params

    spec = getattr(model, "spec", None)
    facts = {"params_m": count_params(model) / 1e6,
             "gmacs": count_macs(model, resolution) / 1e9,
             "gmacs_224": count_macs(model, 224) / 1e9}
    return (spec.to_dict() if spec is not None else None), facts


class ConfigFacts:
    """For the driver's searcher: the model name, spec and facts of a sampled configuration,
    known before anything trains (what search constraints bound). UserError when the
    configuration is invalid."""

    def __init__(self, space) -> None:
        self.space = space
        self._classes: dict[str, int] = {}

    def __call__(self, params: dict) -> tuple[str, dict | None, dict]:
        from qlnas.data import read_classes
        from qlnas.train.fit import build_model, resolve_data

        config = self.space.train_config(params, out="facts")
        train, _ = resolve_data(config)
        if str(train) not in self._classes:
            self._classes[str(train)] = len(read_classes(train))
        model = build_model(config, self._classes[str(train)])
        return (config.model, *_facts(model, config.resolution))

    def __getstate__(self) -> dict:
        return {"space": self.space, "_classes": {}}


def record_failure(root: Path, trial) -> None:
    """The end of a failed trial's record when its trainable could not write it (its actor
    died, or it failed before its first line), so no errored trial goes missing.

    Called from the scheduler's on_trial_error, which Tune calls before it tells the searcher:
    Optuna's copy of the record (user attrs) then says errored too, with the error.
    """
    out = root / "trials" / trial.trial_id
    record = read_record(out)
    if record.get("status") not in (None, "running"):
        return
    try:
        exc = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 (an unreadable error file must not hide the record)
        exc = None
    now = time.time()
    record = {"trial_id": trial.trial_id, "params": dict(trial.config), "spec": None,
              "model": None, "params_m": None, "gmacs": None, "started": now,
              "attempts": 1, **record, "status": "errored", "ended": now,
              "error": error_line(exc) if exc is not None else "the trial's actor failed"}
    atomic_write_json(record, out / "trial.json")
