"""`run_search`: Ray Tune + Optuna over a search space, one DDP TorchTrainer per trial."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json, atomic_write_text
from qlnas.search.space import SearchSpace, load_space

log = logging.getLogger(__name__)

TUNE_NAME = "tune"


def _sampler(space: SearchSpace):
    import optuna

    if space.sampler is not None:
        return space.sampler.build(optuna.samplers.BaseSampler, f"{space.path}: search.sampler",
                                   seed=space.seed)
    if space.searcher == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    if space.searcher == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=space.seed)
    if space.searcher == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.seed)
    # Random start-up trials first: TPE fitted on one or two points mostly repeats them.
    startup = min(10, max(2, space.num_trials // 2))
    # group=True: the space is conditional (act_at only where act is not none, and the space's
    # own conditions), so the multivariate model is fitted per group of co-occurring params.
    return optuna.samplers.TPESampler(seed=space.seed, multivariate=True, group=True,
                                      constant_liar=True, n_startup_trials=startup)


def _pruner(space: SearchSpace):
    import optuna

    from qlnas.search.pruning import make_pruner

    if space.pruner is not None:
        return space.pruner.build(optuna.pruners.BasePruner, f"{space.path}: pruning.pruner")
    pr = space.pruning
    return make_pruner(pr.pruner, pr.grace_epochs, pr.reduction_factor,
                       int(space.fixed.get("epochs", 5)))


def import_paths(modules: tuple[str, ...]) -> list[str]:
    """The folders a worker needs on its path to import `modules` as the driver did (on a
    cluster they must be on a filesystem every node shares)."""
    import importlib

    paths = []
    for name in modules:
        top = importlib.import_module(name.split(".")[0])
        origin = Path(getattr(top, "__file__", None) or next(iter(top.__path__)))
        root = origin.parent.parent if origin.name == "__init__.py" or origin.is_dir() \
            else origin.parent
        if str(root) not in paths:
            paths.append(str(root))
    return paths


def _connect(address: str | None, paths: list[str] = ()) -> None:
    """Join the cluster at `address` ("local": always a new local Ray), else a running one on
    this machine, else start one. `paths` go on the workers' PYTHONPATH (`imports:`)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}}
    if paths:
        env["env_vars"]["PYTHONPATH"] = os.pathsep.join(
            [*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    try:
        ray.init(address="auto", runtime_env=env)
        log.info("connected to the running Ray cluster")
    except ConnectionError:
        ray.init(runtime_env=env)
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def run_search(space_path: str | Path | None, out: str | Path, resume: bool = False,
               address: str | None = None, add_trials: int = 0) -> list[dict]:
    """Run (or resume) the search of `space_path` into `out`; returns the leaderboard rows.

    The resolved space is stored in `out` (space.json, and the YAML as space.yaml); a resume
    reads it (`space_path` None) or checks that `space_path` is the same space, where only
    `search.num_trials` may grow; `add_trials` grows it by that many (a finished search
    continues). The Optuna study lives in storage (study.py) from the first trial.
    """
    out = Path(out).resolve()
    tune_dir = out / TUNE_NAME
    if resume and not tune_dir.is_dir():
        raise UserError(f"--resume: {out} holds no search to resume")
    if not resume and tune_dir.exists():
        raise UserError(f"--out {out} already holds a search; pass --resume or another --out")
    if space_path is None:
        if not resume:
            raise UserError("--space is needed for a new search")
        space_path = out / SPACE_YAML
    if add_trials and not resume:
        raise UserError("--add-trials extends a search: pass --resume too")
    if add_trials < 0:
        raise UserError(f"--add-trials {add_trials}: expected a positive number")
    space = load_space(space_path)
    added = 0  # trials --add-trials gave beyond the file's search.num_trials, kept in space.json
    if resume:
        space, added = resumed_space(space, out, add_trials)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard logs only
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not space.fixed.get("train_data"):
        from qlnas.data import demo_dataset

        demo_dataset()  # build the embedded dataset once, before any trial starts

    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from qlnas.search.budget import BudgetedSearch, trial_budget
    from qlnas.search.cluster import ClusterLimiter, check_feasible
    from qlnas.search.pruning import PruningScheduler, StopRecords, create_board
    from qlnas.search.report import write_report
    from qlnas.search.searcher import QLOptunaSearch
    from qlnas.search.study import prepare_study, warm_start_trials
    from qlnas.search.trial import ConfigFacts, trial_driver

    warm = warm_start_trials(space) if not resume else []  # checked before anything is made
    _connect(address, import_paths(space.imports))
    check_feasible(space.resources)
    out.mkdir(parents=True, exist_ok=True)
    study = prepare_study(space.study_name, space.storage, out) if not resume else None
    store_space(space, out, added)
    board_name = "qlnas-board-" + hashlib.sha1(str(out).encode()).hexdigest()[:12]
    stops = StopRecords(str(out))
    board = create_board(board_name, stops.all())  # noqa: F841  (kept alive by this driver)
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
        grid = math.prod(len(v) for v in space.grid().values()) \
            if space.searcher == "grid" else None
        searcher = QLOptunaSearch(
            space=_DefineByRun(space),
            metric=metrics if space.multi_objective else metrics[0],
            mode=modes if space.multi_objective else modes[0],
            sampler=_sampler(space), pruner=_pruner(space), max_epochs=epochs, stops=stops,
            study_name=study.name, storage=study.open_storage(), out=str(out),
            constraints=space.constraints,
            facts_of=ConfigFacts(space) if space.constraints else None, grid_size=grid)
        for params in space.enqueue:
            searcher._ot_study.enqueue_trial(params, user_attrs={"enqueued": True})
        if space.warm_start:
            searcher._ot_study.add_trials(warm)
            log.info("warm start: %d completed trials of earlier searches", len(warm))
        # The limit follows the cluster (cluster.py); the budget may grow on resume (budget.py).
        limiter = ClusterLimiter(searcher, space.resources)
        search_alg = BudgetedSearch(limiter, str(out / SPACE_JSON), grid)
        scheduler = PruningScheduler(board_name, searcher, metrics, modes, pr.pruner,
                                     pr.grace_epochs, pr.reduction_factor, epochs, out=str(out),
                                     limiter=limiter)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                        num_samples=trial_budget(space.num_trials, grid)),
            run_config=tune.RunConfig(
                name=TUNE_NAME, storage_path=str(out), verbose=1,
                # A retried trial starts its trainable again; its run resumes from its last
                # checkpoint.
                failure_config=tune.FailureConfig(max_failures=space.resources.trial_retries),
                # Tune's own JSON/CSV results; its TensorBoard logger stays off so that
                # `tensorboard --logdir OUT` shows each trial's run once (from fit).
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]),
        )
    try:
        tuner.fit()
    finally:
        ray.kill(board)
    return write_report(out)


SPACE_JSON, SPACE_YAML = "space.json", "space.yaml"


def resumed_space(space: SearchSpace, out: Path, add_trials: int = 0) -> tuple[SearchSpace, int]:
    """The space a resume of the search in `out` runs, and the trials its budget holds beyond
    the file's search.num_trials: the stored budget (which earlier `--add-trials` grew; the
    file still says what it said), or the file's with those added when it says more, plus
    `add_trials`. UserError when the file is another space or would shrink the search."""
    stored = json.loads((out / SPACE_JSON).read_text()) \
        if (out / SPACE_JSON).is_file() else {"num_trials": space.num_trials}
    added = stored.get("added_trials", 0)
    check_same_space(space, out, added)
    budget = max(space.num_trials + added, stored["num_trials"]) + add_trials
    names = {k: stored[k] for k in ("name", "study_name") if k in stored}  # the search's own
    return dataclasses.replace(space, num_trials=budget, **names), budget - space.num_trials


def resolved(space: SearchSpace) -> dict:
    """The space as plain data, as a search runs it (its file's path left out)."""
    data = dataclasses.asdict(space)
    data.pop("path")
    data["params"] = {p.pop("name"): p for p in data["params"]}
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def store_space(space: SearchSpace, out: Path, added_trials: int = 0) -> None:
    """The search's own copy of its space: resolved (space.json, with its hash and the trials
    `--add-trials` added beyond the file's) and as given (space.yaml, which `--resume` without
    `--space` reads)."""
    data = resolved(space)
    digest = hashlib.sha256(json.dumps({k: v for k, v in data.items() if k != "num_trials"},
                                       sort_keys=True).encode()).hexdigest()
    atomic_write_json({**data, "added_trials": added_trials, "sha256": digest}, out / SPACE_JSON)
    source = Path(space.path).resolve()
    if source != (out / SPACE_YAML).resolve():
        atomic_write_text(source.read_text(), out / SPACE_YAML)


def check_same_space(space: SearchSpace, out: Path, added_trials: int = 0) -> None:
    """Refuse to resume with another space: one line naming the first difference. The file's
    search.num_trials with the `added_trials` of earlier `--add-trials` may not shrink the
    search."""
    path = out / SPACE_JSON
    if not path.is_file():
        return  # a search from before spaces were stored
    stored = json.loads(path.read_text())
    stored.pop("sha256", None)
    stored.pop("added_trials", None)
    given = resolved(space)
    if given["num_trials"] + added_trials < stored["num_trials"]:
        plus = f" (with the {added_trials} --add-trials added)" if added_trials else ""
        raise UserError(f"--resume: {space.path}: search.num_trials {given['num_trials']}{plus} "
                        f"is below the search's {stored['num_trials']} (it may only grow)")
    stored["num_trials"] = given["num_trials"]
    if given.get("study_name") == given["name"] and stored.get("study_name") == stored["name"]:
        stored["study_name"] = given["study_name"]  # both from the file's name by default
    stored["name"] = given["name"]  # a label (the file's name by default), not the search
    for key in [k for k in given if k not in stored]:  # a setting newer than the search
        if given[key] in (None, [], {}, "", given["name"]):  # at its default
            del given[key]
    where = _first_difference(stored, given, "")
    if where is not None:
        key, was, now = where
        raise UserError(f"--resume: {space.path} is not the space of the search in {out} "
                        f"({out / SPACE_YAML}): {key or '(top level)'} is {now!r} here but "
                        f"{was!r} in the search; only search.num_trials may change")


def _first_difference(a: object, b: object, key: str) -> tuple[str, object, object] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            name = f"{key}.{k}" if key else k
            if k not in a or k not in b:
                return name, a.get(k, "(absent)"), b.get(k, "(absent)")
            found = _first_difference(a[k], b[k], name)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (key, a, b)


class _DefineByRun:
    """Optuna define-by-run sampling of a space (picklable, so Tune can checkpoint it)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> dict:
        values = self.space.sample(trial)
        return {k: v for k, v in values.items() if k not in trial.params}
