"""Pruning where Ray and Optuna fall short together.

- Ray's `OptunaSearch` never asks Optuna's pruner, and ASHA never stops a NaN trial.
  `PruningScheduler` (a Tune scheduler) asks both, and also catches non-finite or diverged
  reports at the very report.
- A trial stopped by Tune from outside leaves its nested TorchTrainer and worker group holding
  their resources (Ray 2.60). So the scheduler never returns STOP: it posts the decision on a
  `StopBoard` actor, the trial's workers poll it and end `fit` from inside, the trainer finishes
  and the trial frees its workers at once.
- `QLOptunaSearch` (searcher.py) tells Optuna a diverged or pruned trial as PRUNED (with its
  intermediate values), so TPE ranks that region below every completed trial.

- Ray's ASHA ranks by one metric; with two or more objectives `ParetoASHA` ranks each rung
  by Pareto front, so the small end of the front is not stopped for being less accurate.

A trial's objective value is its metric at its last epoch (`report.objective_values`); every
epoch's value reaches Optuna as an intermediate value, whatever the pruner. A trial that has
trained all its epochs is never pruned: it is completed, exported and COMPLETE in Optuna.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import optuna
import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from qlnas.fileio import atomic_write_json
from qlnas.search.report import read_history, read_record

log = logging.getLogger(__name__)

NAMESPACE = "qlnas"


class StopRecords:
    """The stop decisions of a search, one file per trial (``trials/<id>/stop.json``), so that
    they survive a driver restart: a trial stopped before the crash stays stopped, and Optuna
    is told PRUNED for it. `out` None: in memory only (unit tests)."""

    def __init__(self, out: str | None = None) -> None:
        self.out = Path(out) if out is not None else None
        self._reasons: dict[str, str] = {}

    def _path(self, trial_id: str) -> Path:
        return self.out / "trials" / trial_id / "stop.json"

    def post(self, trial_id: str, reason: str) -> None:
        if trial_id in self._reasons:
            return
        self._reasons[trial_id] = reason
        if self.out is not None:
            atomic_write_json({"trial_id": trial_id, "reason": reason, "time": time.time()},
                              self._path(trial_id))

    def get(self, trial_id: str) -> str | None:
        if trial_id not in self._reasons and self.out is not None:
            path = self._path(trial_id)
            if path.is_file():
                self._reasons[trial_id] = json.loads(path.read_text())["reason"]
        return self._reasons.get(trial_id)

    def all(self) -> dict[str, str]:
        if self.out is not None:
            for path in self.out.glob("trials/*/stop.json"):
                self.get(path.parent.name)
        return dict(self._reasons)

    def __getstate__(self) -> dict:
        return {"out": self.out, "_reasons": {}}  # the files are the state


@ray.remote(num_cpus=0)
class StopBoard:
    """Trial id -> reason to stop ('pruned' or 'diverged'), posted by the scheduler."""

    def __init__(self, reasons: dict[str, str] | None = None) -> None:
        self._reasons: dict[str, str] = dict(reasons or {})

    def post(self, trial_id: str, reason: str) -> None:
        self._reasons.setdefault(trial_id, reason)

    def reason(self, trial_id: str) -> str | None:
        return self._reasons.get(trial_id)

    def all(self) -> dict[str, str]:
        return dict(self._reasons)


def create_board(name: str, reasons: dict[str, str] | None = None):
    """The search's board (a named actor, so trial workers can find it), holding the decisions
    already taken (`reasons`, from the stop records of a resumed search)."""
    return StopBoard.options(name=name, namespace=NAMESPACE, lifetime=None).remote(reasons)


class StopPoller:
    """For a trial's workers: says whether the trial must stop, without ever blocking.

    One request to the board is always outstanding; a call only looks whether it has resolved
    (`ray.wait` with a zero timeout) and, if so, reads it and sends the next one. So a decision
    reaches the trial within two polls of its posting, and a slow or dead GCS never stalls a
    training step. A lost board is logged once; the trial then keeps its last decision.
    Once the last epoch is reported (`finished`), the answer is False: a trial that has
    trained all its epochs is completed, whatever was posted meanwhile.
    """

    def __init__(self, board_name: str, trial_id: str) -> None:
        self.trial_id = trial_id
        self.finished = False
        self._stop = False
        self._pending = None
        try:
            self._board = ray.get_actor(board_name, namespace=NAMESPACE)
        except ValueError:
            log.warning("trial %s: no stop board %r; this trial cannot be pruned", trial_id,
                        board_name)
            self._board = None
        else:
            self._ask()

    def _ask(self) -> None:
        try:
            self._pending = self._board.reason.remote(self.trial_id)
        except ray.exceptions.RayError as exc:
            self._lose(exc)

    def _lose(self, exc: Exception) -> None:
        log.warning("trial %s: stop board lost (%s); keeping the last decision (%s)",
                    self.trial_id, type(exc).__name__, "stop" if self._stop else "continue")
        self._board = self._pending = None

    def __call__(self) -> bool:
        if self._board is not None and not self._stop:
            if self._pending is None:
                self._ask()
            if self._pending is not None:
                ready, _ = ray.wait([self._pending], timeout=0)
                if ready:
                    try:
                        self._stop = ray.get(ready[0]) is not None
                        self._pending = None
                        if not self._stop:
                            self._ask()
                    except ray.exceptions.RayError as exc:
                        self._lose(exc)
        return self._stop and not self.finished


def stop_poller(board_name: str, trial_id: str) -> StopPoller:
    """For a trial's worker: a callable that says whether the trial must stop now."""
    return StopPoller(board_name, trial_id)


def nonfinite_or_diverged(result: dict, metrics: list[str]) -> bool:
    if result.get("diverged"):
        return True
    for key in ("train_loss", *metrics):
        value = result.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return True
    return False


def trained_all_epochs(result: dict | None, max_epochs: int) -> bool:
    """The trial's last report closes its last epoch (so it must not be pruned)."""
    return bool(result) and not result.get("diverged") \
        and int(result.get("epoch", 0)) >= max_epochs


class ParetoASHA:
    """ASHA's rungs for two or more objectives (Ray's ASHA ranks by one metric: with accuracy
    and parameters, it would stop every small model that is not also among the most accurate,
    and the search's Pareto front would lose its small end).

    Rungs at grace, grace*rf, grace*rf^2 ... epochs, as Ray's one-bracket ASHA. When a trial
    reaches a rung, its objectives there are ranked with those the rung recorded before
    (itself included) by Pareto front, then by the first objective: it continues when no
    recorded trial dominates it, or when it ranks within the top ceil(n / rf), n the trials
    recorded; it is stopped otherwise. So one trial alone on a rung continues, as in ASHA.
    """

    def __init__(self, metrics: list[str], modes: list[str], grace_epochs: int,
                 reduction_factor: int, max_epochs: int) -> None:
        self.metrics, self.rf = list(metrics), reduction_factor
        self.signs = [1.0 if m == "max" else -1.0 for m in modes]  # oriented: larger is better
        milestones, t = [], max(grace_epochs, 1)
        while t <= max_epochs:
            milestones.append(t)
            t *= reduction_factor
        self.rungs: dict[int, dict[str, tuple]] = {m: {} for m in milestones}

    def on_result(self, trial_id: str, result: dict) -> bool:
        """Record the trial at the rung it has reached, if any: True when it should stop."""
        epoch = int(result.get("epoch", 0))
        rung = next((m for m in reversed(self.rungs) if epoch >= m
                     and trial_id not in self.rungs[m]), None)
        values = [result.get(k) for k in self.metrics]
        if rung is None or not all(isinstance(v, int | float) and math.isfinite(v)
                                   for v in values):
            return False
        recorded = self.rungs[rung]
        recorded[trial_id] = tuple(s * float(v) for s, v in zip(self.signs, values, strict=True))
        fronts = _pareto_fronts(recorded)
        order = sorted(recorded, key=lambda t: (fronts[t], -recorded[t][0]))
        return fronts[trial_id] > 0 and order.index(trial_id) >= math.ceil(len(order) / self.rf)


def _pareto_fronts(points: dict[str, tuple]) -> dict[str, int]:
    """Each point's non-dominated front (0: no other point dominates it), larger is better."""
    def dominates(a: tuple, b: tuple) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    fronts, left, k = {}, dict(points), 0
    while left:
        front = [t for t, p in left.items() if not any(dominates(q, p) for q in left.values())]
        for t in front:
            fronts[t] = k
            del left[t]
        k += 1
    return fronts


class PruningScheduler(FIFOScheduler):
    """Stops diverged trials at once and poor ones by an Optuna pruner or ASHA, from inside.

    Every epoch's objective goes to Optuna first, whatever the pruner. No trial is pruned at
    or after its last epoch (ASHA returns STOP at `max_t`, and an Optuna pruner may judge the
    last step): a trial that got there has trained all its epochs.

    Tune does not checkpoint a scheduler: a resumed search starts from the one it was launched
    with. So each trial added (restored ones included) has its epochs replayed from its
    metrics.csv (`out`): ASHA's rungs and Optuna's intermediate values are rebuilt as they were,
    and the stop decisions are read from the search's stop records.
    """

    def __init__(self, board_name: str, searcher, metrics: list[str],
                 modes: list[str], pruner: str, grace_epochs: int, reduction_factor: int,
                 max_epochs: int, out: str | None = None, limiter=None) -> None:
        super().__init__()
        self.board_name, self.searcher = board_name, searcher
        self.limiter = limiter  # the ClusterLimiter over `searcher`, if any
        self.out = Path(out) if out is not None else None
        self.metrics = metrics
        self.pruner = pruner
        self.grace = grace_epochs
        self.max_epochs = max(max_epochs, 1)
        self.asha = self.pareto = None
        if pruner == "asha" and len(metrics) > 1:
            self.pareto = ParetoASHA(metrics, modes, grace_epochs, reduction_factor,
                                     self.max_epochs)
        elif pruner == "asha":
            self.asha = ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                                      max_t=self.max_epochs,
                                      grace_period=min(max(grace_epochs, 1), self.max_epochs),
                                      reduction_factor=reduction_factor, stop_last_trials=False)

    def _stop(self, trial, reason: str) -> None:
        if self.searcher.stops.get(trial.trial_id):
            return
        log.info("trial %s: %s; stopping it from inside", trial.trial_id, reason)
        self.searcher.stops.post(trial.trial_id, reason)
        # Looked up by name: a restored search pickles this scheduler, not the actor handle.
        try:
            ray.get_actor(self.board_name, namespace=NAMESPACE).post.remote(trial.trial_id,
                                                                            reason)
        except ValueError:
            log.error("stop board %s is gone: trial %s cannot be stopped", self.board_name,
                      trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if nonfinite_or_diverged(result, self.metrics):
            self._stop(trial, "diverged")
            return TrialScheduler.CONTINUE
        epoch = int(result.get("epoch", 0))
        # First report (every pruner), then ask Optuna's pruner (median, hyperband) if any.
        prune = self.searcher.report_and_ask(trial.trial_id, result, epoch) \
            and epoch >= self.grace
        if self.asha is not None:
            prune = self.asha.on_trial_result(tune_controller, trial, result) \
                == TrialScheduler.STOP
        elif self.pareto is not None:
            prune = self.pareto.on_result(trial.trial_id, result)
        if prune and epoch < self.max_epochs:
            self._stop(trial, "pruned")
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self.asha is not None:
            self.asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.status == Trial.PENDING:  # an errored trial a resume runs again, for one
            (self.limiter if self.limiter is not None else self.searcher).reopen(trial.trial_id)
        if self.asha is not None:
            self.asha.on_trial_add(tune_controller, trial)
        for result in self._history(trial.trial_id):
            epoch = int(result["epoch"])
            self.searcher.report_and_ask(trial.trial_id, result, epoch)
            if self.asha is not None:
                self.asha.on_trial_result(tune_controller, trial, result)
            elif self.pareto is not None:
                self.pareto.on_result(trial.trial_id, result)

    def _history(self, trial_id: str) -> list[dict]:
        """The epochs a trial reported before this driver started (its metrics.csv), with
        the model's facts that each report carried (its trial.json: params_m, gmacs)."""
        if self.out is None:
            return []
        folder = self.out / "trials" / trial_id
        record = read_record(folder)
        facts = {k: record[k] for k in ("params_m", "gmacs", "gmacs_224")
                 if isinstance(record.get(k), int | float)}
        return [{**facts, **row} for row in read_history(folder / "run", typed=True)]

    def on_trial_error(self, tune_controller, trial) -> None:
        if self.out is not None:  # before Tune tells the searcher, which copies the record
            from qlnas.search.trial import record_failure  # (trial.py imports this module)

            record_failure(self.out, trial)
        if self.asha is not None:
            self.asha.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if self.asha is not None:
            self.asha.on_trial_remove(tune_controller, trial)


def make_pruner(kind: str, grace_epochs: int, reduction_factor: int, max_epochs: int):
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=grace_epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(grace_epochs, 1),
                                              max_resource=max(max_epochs, 1),
                                              reduction_factor=reduction_factor)
    return None
