"""Pruning where Ray and Optuna fall short together.

- Ray's `OptunaSearch` never asks Optuna's pruner, and ASHA never stops a NaN trial.
  `PruningScheduler` (a Tune scheduler) asks both, and also catches non-finite or diverged
  reports at the very report.
- A trial stopped by Tune from outside leaves its nested TorchTrainer and worker group holding
  their resources (Ray 2.60). So the scheduler never returns STOP: it posts the decision on a
  `StopBoard` actor, the trial's workers poll it and end `fit` from inside, the trainer finishes
  and the trial frees its workers at once.
- `QLOptunaSearch` tells Optuna a diverged or pruned trial as PRUNED (with its intermediate
  values), so TPE ranks that region below every completed trial instead of ignoring it.
"""

from __future__ import annotations

import logging
import math

import optuna
import ray
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)

NAMESPACE = "qlnas"


@ray.remote(num_cpus=0)
class StopBoard:
    """Trial id -> reason to stop ('pruned' or 'diverged'), posted by the scheduler."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def post(self, trial_id: str, reason: str) -> None:
        self._reasons.setdefault(trial_id, reason)

    def reason(self, trial_id: str) -> str | None:
        return self._reasons.get(trial_id)

    def all(self) -> dict[str, str]:
        return dict(self._reasons)


def create_board(name: str):
    """The search's board (a named actor, so trial workers can find it)."""
    return StopBoard.options(name=name, namespace=NAMESPACE, lifetime=None).remote()


def stop_poller(board_name: str, trial_id: str):
    """For a trial's worker: a function that says whether the trial must stop now."""
    board = ray.get_actor(board_name, namespace=NAMESPACE)

    def should_stop() -> bool:
        try:
            return ray.get(board.reason.remote(trial_id), timeout=10) is not None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False

    return should_stop


def nonfinite_or_diverged(result: dict, metrics: list[str]) -> bool:
    if result.get("diverged"):
        return True
    for key in ("train_loss", *metrics):
        value = result.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return True
    return False


class QLOptunaSearch(OptunaSearch):
    """OptunaSearch that reports to a pruner and tells stopped trials as PRUNED."""

    def __init__(self, *args, pruner: optuna.pruners.BasePruner | None = None, **kwargs):
        self._pruner = pruner  # read by _setup_study, which the base __init__ calls
        self.stopped: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._pruner is not None:
            self._ot_study.pruner = self._pruner

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # the scheduler reports intermediate values (see report_and_ask)

    def report_and_ask(self, trial_id: str, result: dict, step: int) -> bool:
        """Report the objective at `step` to Optuna; True when its pruner says prune."""
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return False
        value = result.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        trial = self._ot_trials[trial_id]
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(value), step)
        return self._pruner is not None and trial.should_prune()

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        reason = self.stopped.get(trial_id)
        if reason is None and result and result.get("diverged"):
            reason = "diverged"
        if reason is None or trial_id not in self._ot_trials \
                or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except (ValueError, RuntimeError) as exc:
            log.warning("optuna: %s", exc)
        self._completed_trials.add(trial_id)


class PruningScheduler(FIFOScheduler):
    """Stops diverged trials at once and poor ones by an Optuna pruner or ASHA, from inside."""

    def __init__(self, board_name: str, searcher: QLOptunaSearch, metrics: list[str],
                 modes: list[str], pruner: str, grace_epochs: int, reduction_factor: int,
                 max_epochs: int) -> None:
        super().__init__()
        self.board_name, self.searcher = board_name, searcher
        self.metrics = metrics
        self.pruner = pruner
        self.grace = grace_epochs
        self.asha = None
        if pruner == "asha":
            self.asha = ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0],
                                      max_t=max(max_epochs, 1), grace_period=max(grace_epochs, 1),
                                      reduction_factor=reduction_factor)

    def _stop(self, trial, reason: str) -> None:
        if trial.trial_id in self.searcher.stopped:
            return
        log.info("trial %s: %s; stopping it from inside", trial.trial_id, reason)
        self.searcher.stopped[trial.trial_id] = reason
        # Looked up by name: a restored search pickles this scheduler, not the actor handle.
        ray.get_actor(self.board_name, namespace=NAMESPACE).post.remote(trial.trial_id, reason)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if nonfinite_or_diverged(result, self.metrics):
            self._stop(trial, "diverged")
            return TrialScheduler.CONTINUE
        epoch = int(result.get("epoch", 0))
        if self.asha is not None:
            if self.asha.on_trial_result(tune_controller, trial, result) == TrialScheduler.STOP:
                self._stop(trial, "pruned")
        elif self.pruner != "none":
            if self.searcher.report_and_ask(trial.trial_id, result, epoch) \
                    and epoch >= self.grace:
                self._stop(trial, "pruned")
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self.asha is not None:
            self.asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_add(self, tune_controller, trial) -> None:
        if self.asha is not None:
            self.asha.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
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
