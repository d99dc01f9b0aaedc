"""The trial budget of a search, which a resumed search may grow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune.search import Searcher, SearchGenerator

log = logging.getLogger(__name__)


def trial_budget(num_trials: int, grid_size: int | None) -> int:
    """`num_trials`, or the grid's size when a grid has fewer points (Optuna's GridSampler
    would otherwise sample its points again)."""
    if grid_size is not None and num_trials > grid_size:
        log.warning("search.num_trials %d is more than the %d points of the grid; the search "
                    "ends with the grid", num_trials, grid_size)
        return grid_size
    return num_trials


class BudgetedSearch(SearchGenerator):
    """Tune's SearchGenerator whose budget a restore reads again from the search's stored
    space (`space_file`), so that `--resume` with a larger search.num_trials runs the new
    trials; Tune would restore its launch-time num_samples, and its "finished" flag."""

    def __init__(self, searcher: Searcher, space_file: str, grid_size: int | None) -> None:
        super().__init__(searcher)
        self.space_file = space_file
        self.grid_size = grid_size

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        try:
            stored = json.loads(Path(self.space_file).read_text())["num_trials"]
        except (OSError, ValueError, KeyError):
            return  # keeps the budget it was launched with
        budget = trial_budget(int(stored), self.grid_size)
        if budget > self._total_samples:
            log.info("trial budget: %d (was %d)", budget, self._total_samples)
            self._total_samples = budget
            self._finished = False
