"""`QLOptunaSearch`: Ray's OptunaSearch over a study kept in Optuna storage.

On top of Ray's searcher it
- reports every epoch and asks a pruner (`PruningScheduler` calls `report_and_ask`), and tells
  each trial's outcome: COMPLETE for one that trained all its epochs, PRUNED for one stopped
  earlier (pruned or diverged: TPE ranks that region below every completed trial), FAIL for an
  errored one;
- writes what a user of the study wants on each Optuna trial (`ATTRS`: its Tune trial id, our
  status, spec, parameters, GMACs and learning curve);
- checks the space's constraints when a configuration is sampled: an infeasible one never
  reaches Tune (no worker starts); it is told PRUNED with its constraint values, which TPE and
  NSGA-II read, and listed on the leaderboard as `infeasible`;
- on a resumed search, gives the trials the study holds as RUNNING but the restored searcher
  does not know (asked after Tune's last checkpoint) to the next trials Tune asks for, so the
  study has neither duplicated nor abandoned trials; and gives an errored trial that the
  resume runs again a new Optuna trial with its parameters (`retry_of` names the one told
  FAIL, which Optuna keeps), so its result reaches the study.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json
from qlnas.search.pruning import StopRecords, trained_all_epochs
from qlnas.search.report import objective_values, read_history, read_record

log = logging.getLogger(__name__)

ATTRS = ("tune_trial_id", "status", "spec", "model", "params_m", "gmacs", "curve")
# Consecutive infeasible samples after which the search ends (its constraints exclude the
# space, or nearly).
MAX_INFEASIBLE = 500


class QLOptunaSearch(OptunaSearch):
    """OptunaSearch that reports every epoch, asks a pruner and tells each trial's outcome.

    COMPLETE (with `objective_values`) for a trial that trained all its epochs; PRUNED for one
    stopped earlier (by a pruner, or diverged); FAIL for one that errored.
    """

    def __init__(self, *args, pruner: optuna.pruners.BasePruner | None = None,
                 max_epochs: int = 1, stops: StopRecords | None = None, out: str | None = None,
                 constraints: tuple = (), facts_of=None, grid_size: int | None = None,
                 **kwargs):
        self._pruner = pruner  # read by _setup_study, which the base __init__ calls
        self.max_epochs = max_epochs
        self.stops = stops if stops is not None else StopRecords()
        self.out = Path(out) if out is not None else None
        self.constraints = tuple(constraints)
        self.facts_of = facts_of  # params -> (model name, spec, facts); see trial.ConfigFacts
        self.grid_size = grid_size
        self._orphans: list[int] = []
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._pruner is not None:
            self._ot_study.pruner = self._pruner

    def suggest(self, trial_id: str) -> dict | None:
        """The next configuration; infeasible ones are told and skipped, never returned."""
        for _ in range(MAX_INFEASIBLE):
            self._adopt_orphan(trial_id)
            if trial_id not in self._ot_trials and self._grid_started():
                return Searcher.FINISHED  # the grid is done (its other points infeasible)
            params = super().suggest(trial_id)
            if not isinstance(params, dict):
                return params
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            if not self.constraints or self._feasible(ot_trial, params):
                return params
            del self._ot_trials[trial_id]
        log.error("constraints: the last %d configurations sampled were all infeasible; the "
                  "search ends here", MAX_INFEASIBLE)
        return Searcher.FINISHED

    def _grid_started(self) -> bool:
        """Every point of a grid has been started (Optuna's GridSampler would repeat one)."""
        if not self.grid_size:
            return False
        started = {t.system_attrs.get("grid_id") for t in self._ot_study.get_trials(
            deepcopy=False) if t.state != optuna.trial.TrialState.WAITING}
        return len(started - {None}) >= self.grid_size

    def _feasible(self, ot_trial, params: dict) -> bool:
        """Sets the trial's constraint values; False (trial told PRUNED, and recorded) when
        one is violated. A configuration whose model cannot be built is left to its trial,
        which fails with the reason."""
        try:
            model, spec, facts = self.facts_of(params)
        except UserError:
            return True
        for key, value in (("model", model), ("spec", spec), ("params_m", facts["params_m"]),
                           ("gmacs", facts["gmacs"])):
            ot_trial.set_user_attr(key, value)
        broken = []
        for c in self.constraints:
            violation = c.violation(facts[c.metric])
            ot_trial.set_constraint(c.metric, violation)
            if violation > 0:
                broken.append(c.describe(facts[c.metric]))
        if not broken:
            return True
        why = "infeasible: " + "; ".join(broken)
        ot_trial.set_user_attr("status", "infeasible")
        ot_trial.set_user_attr("error", why)
        self._tell(ot_trial, None, optuna.trial.TrialState.PRUNED)
        if self.out is not None:
            now = time.time()
            name = f"infeasible-{ot_trial.number:05d}"
            atomic_write_json({"trial_id": name, "params": params, "spec": spec, "model": model,
                               **facts, "started": now, "ended": now, "status": "infeasible",
                               "error": why, "optuna_trial": ot_trial.number},
                              self.out / "trials" / name / "trial.json")
        log.info("optuna trial %d: %s; not trained", ot_trial.number, why)
        return False

    def _tell(self, ot_trial, values, state) -> None:
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except RuntimeError as exc:
            # Optuna's GridSampler stops the study once every grid point is done: told already
            # (the state is set before), and the grid is over.
            if "Study.stop" not in str(exc):
                raise
            log.info("optuna: every point of the grid has been tried")

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = [t._trial_id for t in running if t._trial_id not in known]
        if self._orphans:
            log.info("optuna: %d trials were asked after the search's last checkpoint; the "
                     "next trials continue them", len(self._orphans))

    def _adopt_orphan(self, trial_id: str) -> None:
        """Continue an Optuna trial left RUNNING by the last driver (same parameters), so the
        study neither duplicates it nor keeps it running for ever."""
        if trial_id in self._ot_trials or not self._orphans:
            return
        storage_id = self._orphans.pop(0)
        trial = optuna.trial.Trial(self._ot_study, storage_id)
        old = trial.user_attrs.get("tune_trial_id")
        self._ot_trials[trial_id] = trial
        if old and self.out is not None:
            record = self.out / "trials" / old / "trial.json"
            if record.is_file():  # its folder is no search trial any more: see trial_id's
                data = json.loads(record.read_text())
                data.update(status="continued", continued_as=trial_id)
                atomic_write_json(data, record)
        log.info("optuna trial %d (was Tune trial %s) continues as %s", trial.number, old,
                 trial_id)

    def reopen(self, trial_id: str) -> bool:
        """Tune runs the errored trial `trial_id` again (a resumed search): a new Optuna trial
        with its parameters takes its result, since the one told FAIL cannot. True if so."""
        told = self._ot_trials.get(trial_id)
        if told is None:
            return False
        frozen = self._ot_study._storage.get_trial(told._trial_id)
        if frozen.state != optuna.trial.TrialState.FAIL:
            return False
        attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("status", "error")}
        template = optuna.trial.FrozenTrial(
            number=-1, state=optuna.trial.TrialState.RUNNING, value=None,
            datetime_start=datetime.now(), datetime_complete=None, params=frozen.params,
            distributions=frozen.distributions, user_attrs={**attrs, "retry_of": frozen.number},
            system_attrs=frozen.system_attrs, intermediate_values={}, trial_id=-1)
        storage_id = self._ot_study._storage.create_new_trial(self._ot_study._study_id,
                                                              template_trial=template)
        self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, storage_id)
        self._completed_trials.discard(trial_id)
        log.info("optuna trial %d (told FAIL) runs again as trial %d", frozen.number,
                 self._ot_trials[trial_id].number)
        return True

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # the scheduler reports intermediate values (see report_and_ask)

    def report_and_ask(self, trial_id: str, result: dict, step: int) -> bool:
        """Report the objective at epoch `step` to Optuna; True when its pruner says prune.

        Optuna keeps no intermediate values for two objectives; their curves stay in each
        trial's metrics.csv.
        """
        if isinstance(self.metric, list) or trial_id not in self._ot_trials \
                or trial_id in self._completed_trials or result.get("diverged"):
            return False
        value = result.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        trial = self._ot_trials[trial_id]
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
            trial.report(float(value), step)
        return self._pruner is not None and trial.should_prune()

    def outcome(self, trial_id: str, result: dict | None, error: bool
                ) -> tuple[optuna.trial.TrialState, list[float] | None]:
        """The Optuna state and values of a finished trial."""
        state = optuna.trial.TrialState
        if error:
            return state.FAIL, None
        if trained_all_epochs(result, self.max_epochs):
            values = objective_values(result, self.metrics)
            return (state.COMPLETE, values) if values is not None else (state.FAIL, None)
        if self.stops.get(trial_id) or (result and result.get("diverged")):
            return state.PRUNED, None
        return state.FAIL, None  # ended early, neither stopped nor diverged

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        state, values = self.outcome(trial_id, result, error)
        values = values if values is None or isinstance(self.metric, list) else values[0]
        ot_trial = self._ot_trials[trial_id]
        try:
            self._annotate(ot_trial, trial_id)
            self._tell(ot_trial, values, state)
        except (ValueError, RuntimeError) as exc:  # e.g. told before a driver restart
            log.warning("optuna: trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _annotate(self, ot_trial, trial_id: str) -> None:
        """The trial's record (trials/<id>/trial.json) and learning curve as user attrs."""
        if self.out is None:
            return
        record = read_record(self.out / "trials" / trial_id)
        if not record:
            return
        source = record.get("reused_from") or trial_id
        curve = [row.get("val_top1") for row in
                 read_history(self.out / "trials" / source / "run", typed=True)]
        attrs = {"status": record.get("status"), "spec": record.get("spec"),
                 "model": record.get("model"), "params_m": record.get("params_m"),
                 "gmacs": record.get("gmacs"),
                 "curve": [v if isinstance(v, float) and math.isfinite(v) else None
                           for v in curve]}
        if record.get("error"):
            attrs["error"] = record["error"]
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)


