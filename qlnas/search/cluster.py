"""How many trials the cluster can run: now, and once its autoscaler has added every node.

A trial needs `workers_per_trial` bundles of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs
(Ray Train's placement group, packed onto as few nodes as fit). `ClusterLimiter` lets Tune start
as many trials as the largest cluster the autoscaler may build can run, so that the waiting
ones' placement groups are the demand that makes it add nodes; a limit read once at launch
would keep a cluster whose GPU workers start at zero at one trial for the whole search.

Where the autoscaler's node types come from, in this order: the cluster config Ray's GCS holds
(autoscaler v2), else the YAML the running autoscaler was started with (`--autoscaling-config`
of Ray's monitor on this machine: what `ray up` starts on the head, and what `ray submit` runs
next to). A cluster without an autoscaler is the nodes it has.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.tune.search import ConcurrencyLimiter, Searcher

from qlnas.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeType:
    """`count` nodes (at most) of `resources` each; `resources` None: unknown (a cloud type
    whose CPUs and GPUs Ray reads from the instance type)."""

    name: str
    resources: dict | None
    count: int


def bundle_of(resources) -> dict[str, float]:
    """One trial worker's resource request (search `resources`)."""
    bundle = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker:
        bundle["GPU"] = float(resources.gpus_per_worker)
    return bundle


def bundles_per_node(node: dict, bundle: dict[str, float]) -> int:
    fits = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 1 << 20


def trials_that_fit(nodes: list[NodeType], bundle: dict[str, float], workers: int) -> int:
    """Trials that `nodes` can run at once (each trial's workers packed onto whole bundles; a
    node of unknown size counted as one trial)."""
    workers = max(workers, 1)
    total = 0
    for node in nodes:
        per_node = workers if node.resources is None \
            else bundles_per_node(node.resources, bundle)
        total += node.count * per_node
    return total // workers


def alive_nodes() -> list[NodeType]:
    return [NodeType(f"node {n['NodeManagerAddress']}",
                     {k: float(v) for k, v in n["Resources"].items()}, 1)
            for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the autoscaler may add (head excluded), None without an autoscaler."""
    from_gcs = _gcs_node_types()
    if from_gcs is not None:
        return from_gcs
    config = _monitor_config()
    return None if config is None else node_types_from_config(config)


def node_types_from_config(config: dict) -> list[NodeType]:
    """The worker node types of a cluster-launcher YAML, with their maximum counts."""
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", 1 << 20))
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        count = min(int(spec.get("max_workers", cap)), cap)
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        types.append(NodeType(name, res if {"CPU", "GPU"} & set(res) else None, count))
    return types


def _gcs_node_types() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 (a private API that may change: fall back to the YAML)
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                     g.max_count if g.max_count >= 0 else 1 << 20)
            for g in config.node_group_configs if g.max_count != 0]


def _monitor_config() -> dict | None:
    """The YAML of this cluster's autoscaler (Ray's monitor process, on this machine), if any."""
    import psutil
    import yaml

    gcs = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not any(part.endswith("autoscaler/_private/monitor.py") for part in cmdline) \
                or gcs not in cmdline:
            continue
        for part in cmdline:
            if part.startswith("--autoscaling-config="):
                path = Path(part.split("=", 1)[1]).expanduser()
                try:
                    text = path.read_text()
                except OSError:
                    return None
                try:
                    return json.loads(text)
                except ValueError:
                    return yaml.safe_load(text)
    return None


def largest_cluster() -> tuple[list[NodeType], list[NodeType]]:
    """(The nodes alive, the nodes of the largest cluster): the head plus every node the
    autoscaler may add, or the nodes alive when that is more (or there is no autoscaler)."""
    nodes = alive_nodes()
    types = autoscaler_node_types()
    if not types:
        return nodes, nodes
    head = [n for n in nodes if n.resources and "node:__internal_head__" in n.resources]
    return nodes, head + types


def check_feasible(resources) -> None:
    """Refuse, with one line, a trial that no node of the cluster, now or after scale-up, can
    hold a worker of (or whose workers the largest cluster cannot hold together)."""
    bundle = bundle_of(resources)
    nodes, largest = largest_cluster()
    candidates = nodes + largest
    if any(t.resources is None for t in candidates):
        return  # a node type of unknown size: the autoscaler knows, we do not
    want = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    if not any(bundles_per_node(n.resources, bundle) >= 1 for n in candidates):
        have = "; ".join(dict.fromkeys(f"{n.name}: {_describe(n.resources)}"
                                       for n in candidates))
        raise UserError(f"resources: a trial worker needs {want} (cpus_per_worker, "
                        f"gpus_per_worker) but no node of the cluster has that ({have})")
    workers = resources.workers_per_trial
    if max(trials_that_fit(nodes, bundle, workers),
           trials_that_fit(largest, bundle, workers)) < 1:
        raise UserError(f"resources: a trial needs {workers} workers of {want} "
                        "(workers_per_trial), more than the whole cluster holds at its largest")


def _describe(res: dict) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def trial_slots(resources) -> int:
    """Trials at once: what the largest cluster can run, at least 1."""
    bundle = bundle_of(resources)
    nodes, largest = largest_cluster()
    workers = resources.workers_per_trial
    return max(1, trials_that_fit(nodes, bundle, workers),
               trials_that_fit(largest, bundle, workers))


class ClusterLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter with a limit that follows the cluster (read again each time
    Tune asks for a trial; Tune's own limit is a number fixed at launch, and pickled)."""

    REFRESH_S = 10.0  # Tune asks often; the cluster's shape changes in minutes

    def __init__(self, searcher: Searcher, resources) -> None:
        self.resources = resources
        self._read_at = 0.0
        super().__init__(searcher, max_concurrent=self._limit())

    def _limit(self) -> int:
        cap = self.resources.max_concurrent_trials
        slots = trial_slots(self.resources)
        self._read_at = time.monotonic()
        return min(slots, cap) if cap else slots

    def suggest(self, trial_id: str):
        if time.monotonic() - self._read_at > self.REFRESH_S:
            limit = self._limit()
            if limit != self.max_concurrent:
                log.info("trials at once: %d (was %d)", limit, self.max_concurrent)
                self.max_concurrent = limit
        return super().suggest(trial_id)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._read_at = 0.0  # a restored limit is another driver's: read the cluster again

    def reopen(self, trial_id: str) -> None:
        """An errored trial a resume runs again is live again: Tune's limiter dropped it when
        it errored, and would drop its completion (and not count it against the limit)."""
        if self.searcher.reopen(trial_id):
            self.live_trials.add(trial_id)
