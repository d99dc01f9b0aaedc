"""`run_search`: Ray Tune + Optuna over a search space, one DDP TorchTrainer per trial."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from qlnas.errors import UserError
from qlnas.search.space import SearchSpace, load_space

log = logging.getLogger(__name__)

TUNE_NAME = "tune"


def _sampler(space: SearchSpace):
    import optuna

    if space.searcher == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if space.searcher == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=space.seed)
    if space.searcher == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.seed)
    # Random start-up trials first: TPE fitted on one or two points mostly repeats them.
    startup = min(10, max(2, space.num_trials // 2))
    return optuna.samplers.TPESampler(seed=space.seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=startup)


def _connect(address: str | None) -> None:
    """Join the cluster at `address` ("local": always a new local Ray), else a running one on
    this machine, else start one."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    try:
        ray.init(address="auto", runtime_env=env)
        log.info("connected to the running Ray cluster")
    except ConnectionError:
        ray.init(runtime_env=env)
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def _max_concurrent(space: SearchSpace) -> int:
    import ray

    res = space.resources
    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // max(res.cpus_per_worker * res.workers_per_trial, 1e-9))]
    if res.gpus_per_worker:
        fits.append(int(total.get("GPU", 0) // (res.gpus_per_worker * res.workers_per_trial)))
    n = max(1, min(fits))
    if min(fits) < 1:
        log.warning("the cluster has fewer resources than one trial needs (%s per worker x "
                    "%d); trials wait for the autoscaler", res, res.workers_per_trial)
    return min(n, res.max_concurrent_trials) if res.max_concurrent_trials else n


def run_search(space_path: str | Path, out: str | Path, resume: bool = False,
               address: str | None = None) -> list[dict]:
    """Run (or resume) the search of `space_path` into `out`; returns the leaderboard rows."""
    space = load_space(space_path)
    out = Path(out).resolve()
    tune_dir = out / TUNE_NAME
    if resume and not tune_dir.is_dir():
        raise UserError(f"--resume: {out} holds no search to resume")
    if not resume and tune_dir.exists():
        raise UserError(f"--out {out} already holds a search; pass --resume or another --out")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard logs only
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not space.fixed.get("train_data"):
        from qlnas.data import demo_dataset

        demo_dataset()  # build the embedded dataset once, before any trial starts

    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from qlnas.search.pruning import (
        PruningScheduler,
        QLOptunaSearch,
        create_board,
        make_pruner,
    )
    from qlnas.search.report import write_report
    from qlnas.search.trial import TrialRecords, trial_driver

    _connect(address)
    out.mkdir(parents=True, exist_ok=True)
    board_name = "qlnas-board-" + hashlib.sha1(str(out).encode()).hexdigest()[:12]
    board = create_board(board_name)  # noqa: F841  (kept alive by this driver)
    settings = {"space": space, "out": str(out), "board": board_name}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, settings=settings),
                                    {"CPU": 0, "memory": 1})  # the driver only waits
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        metrics = [o.metric for o in space.objectives]
        modes = [o.mode for o in space.objectives]
        epochs = int(space.fixed.get("epochs", 5))
        pr = space.pruning
        searcher = QLOptunaSearch(
            space=_DefineByRun(space),
            metric=metrics if space.multi_objective else metrics[0],
            mode=modes if space.multi_objective else modes[0],
            sampler=_sampler(space),
            pruner=make_pruner(pr.pruner, pr.grace_epochs, pr.reduction_factor, epochs),
            max_epochs=epochs)
        scheduler = PruningScheduler(board_name, searcher, metrics, modes, pr.pruner,
                                     pr.grace_epochs, pr.reduction_factor, epochs)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=space.num_trials,
                                        max_concurrent_trials=_max_concurrent(space)),
            run_config=tune.RunConfig(
                name=TUNE_NAME, storage_path=str(out), verbose=1,
                # A retried trial starts its trainable again; its run resumes from its last
                # checkpoint.
                failure_config=tune.FailureConfig(max_failures=space.resources.trial_retries),
                # Tune's own JSON/CSV results; its TensorBoard logger stays off so that
                # `tensorboard --logdir OUT` shows each trial's run once (from fit).
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), TrialRecords(str(out))]),
        )
    try:
        tuner.fit()
    finally:
        ray.kill(board)
    return write_report(out)


class _DefineByRun:
    """Optuna define-by-run sampling of a space (picklable, so Tune can checkpoint it)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> dict:
        values = self.space.sample(trial)
        return {k: v for k, v in values.items() if k not in trial.params}
