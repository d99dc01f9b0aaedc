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

from qlnas.fileio import atomic_write_json

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
    config = TrainConfig.from_dict(cfg["train"], source=f"trial {cfg['trial_id']}")
    extra = {"params_m": cfg["params_m"], "gmacs": cfg["gmacs"]}

    def report(metrics: dict) -> None:
        ray.train.report({**_jsonable(metrics), **extra})

    should_stop = stop_poller(cfg["board"], cfg["trial_id"])
    fit(config, dist=dist, report=report, resume=True, should_stop=should_stop,
        progress_bar=False)


def trial_driver(params: dict, settings: dict) -> None:
    """The Tune trainable: builds the trial's TorchTrainer, runs it, records the outcome.

    `params`: the sampled values; `settings` (via tune.with_parameters): the SearchSpace, the
    search folder and the stop board's name.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    space = settings["space"]
    out = Path(settings["out"]) / "trials" / trial_id
    train_cfg = space.train_config(params, out=str(out / "run"))
    spec, params_m, gmacs = _model_facts(train_cfg, space.resources.workers_per_trial)
    record = {"trial_id": trial_id, "params": params, "spec": spec, "model": train_cfg.model,
              "params_m": params_m, "gmacs": gmacs, "started": time.time(), "status": "running",
              "train_config": train_cfg.to_dict()}
    started_before = _previous_start(out)
    if started_before:
        record["started"] = started_before
    atomic_write_json(record, out / "trial.json")
    res = space.resources
    trainer = ray.train.torch.TorchTrainer(
        worker_loop,
        train_loop_config={"train": train_cfg.to_dict(), "trial_id": trial_id,
                           "board": settings["board"], "cpus_per_worker": res.cpus_per_worker,
                           "params_m": params_m, "gmacs": gmacs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=str(Path(settings["out"]) / "ray_train"),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures)),
    )
    status = "errored"
    try:
        trainer.fit()
        result_file = out / "run" / "result.json"
        status = json.loads(result_file.read_text())["status"] if result_file.is_file() \
            else "errored"
    finally:
        record.update(status=status, ended=time.time())
        atomic_write_json(record, out / "trial.json")


def _previous_start(out: Path) -> float | None:
    path = out / "trial.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()).get("started")
        except (OSError, ValueError):
            return None
    return None


def _model_facts(train_cfg, world_size: int) -> tuple[dict | None, float, float]:
    """Spec, parameters (M) and GMACs at 224 px of a trial's model (its config checked as
    `fit` checks it, before any worker starts)."""
    from qlnas.models.complexity import count_macs, count_params
    from qlnas.train.fit import validate

    *_, model = validate(train_cfg, world_size)
    spec = getattr(model, "spec", None)
    return (spec.to_dict() if spec is not None else None, count_params(model) / 1e6,
            count_macs(model, 224) / 1e9)
