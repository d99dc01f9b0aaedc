"""Search spaces: the typed schema of `search_spaces/*.yaml` and sampling from it.

A space says what Optuna may choose (architecture fields, named models, recipe values, with
conditions), what stays fixed (model size, data, resolution, epochs, batch), the resources of a
trial, the objective(s) and the pruning. Sampling is define-by-run, so conditional parameters
are only sampled where they apply; a space produces `TrainConfig`s, never modules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from qlnas.errors import UserError
from qlnas.models.spec import ACT_AT, ACTS, FORMS
from qlnas.search.plugins import Plugin, import_modules, parse_plugin
from qlnas.train.config import TrainConfig, load_yaml

ARCH_CHOICES: dict[str, tuple] = {
    "form": FORMS, "act": ACTS, "act_at": ACT_AT, "weight_sharing": (True, False),
    "expansion": None,  # any integer >= 1
}
SEARCHERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "asha")
METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "params_m", "gmacs",
           "img_per_sec")
DISTRIBUTIONS = ("uniform", "loguniform", "int")
# Known from a configuration before any training (trial.py's model facts).
CONSTRAINT_METRICS = ("params_m", "gmacs", "gmacs_224")


@dataclass(frozen=True)
class Param:
    """One sampled value: categorical `choices`, or a `kind` range [low, high]."""

    name: str
    choices: tuple | None = None
    kind: str | None = None
    low: float | None = None
    high: float | None = None

    def suggest(self, trial) -> object:
        """Ask an Optuna trial (define-by-run) for this parameter."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")

    def distribution(self):
        """The Optuna distribution `suggest` samples from."""
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(self.low, self.high,
                                                      log=self.kind == "loguniform")

    def contains(self, value: object) -> bool:
        if self.choices is not None:
            return any(type(value) is type(c) and value == c for c in self.choices) \
                or (isinstance(value, float) and value in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Condition:
    """When every `when` parameter has one of its listed values, `set` fixes others."""

    when: dict
    set: dict

    def holds(self, values: dict) -> bool:
        return all(values.get(k) in v for k, v in self.when.items())


@dataclass(frozen=True)
class Objective:
    metric: str = "val_top1"
    """Reported metric to optimise."""
    mode: str = "max"
    """max or min."""


@dataclass(frozen=True)
class Constraint:
    """A bound on a metric known before training (`CONSTRAINT_METRICS`)."""

    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, value: float) -> float:
        """Optuna's constraint value: how far outside the bound (<= 0: feasible)."""
        over = [value - self.max] if self.max is not None else []
        under = [self.min - value] if self.min is not None else []
        return max(over + under)

    def describe(self, value: float) -> str:
        if self.max is not None and value > self.max:
            return f"{self.metric} {value:.4g} > max {self.max:g}"
        return f"{self.metric} {value:.4g} < min {self.min:g}"


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 2
    """DDP workers (Ray Train workers) per trial."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    gpus_per_worker: int = 0
    """GPUs per worker (0: CPU training with gloo)."""
    max_concurrent_trials: int = 0
    """Upper bound on trials at once (0: as many as the cluster's resources allow)."""
    max_failures: int = 1
    """Restarts of a trial's workers after a worker crashed (Ray Train, from the last
    checkpoint)."""
    trial_retries: int = 0
    """Restarts of a trial that errored as a whole (Tune's FailureConfig.max_failures): its
    trainable runs again and its run resumes from its last checkpoint."""


@dataclass(frozen=True)
class Pruning:
    pruner: str = "none"
    """Early stopping of poor trials: none, median, hyperband (Optuna pruners) or asha."""
    grace_epochs: int = 1
    """No trial is pruned before it has run this many epochs."""
    reduction_factor: int = 3
    """Hyperband/ASHA reduction factor."""


@dataclass(frozen=True)
class SearchSpace:
    path: str
    name: str
    num_trials: int
    searcher: str
    seed: int
    objectives: tuple[Objective, ...]
    params: tuple[Param, ...]
    """Sampled parameters in sampling order (architecture, models, then recipe)."""
    fixed: dict
    """TrainConfig fields shared by every trial."""
    fixed_arch: dict
    """ArchSpec fields shared by every trial."""
    conditions: tuple[Condition, ...]
    arch_params: tuple[str, ...] = ()
    """The sampled parameters that are model arguments (ArchSpec fields for qlnet models)."""
    resources: Resources = field(default_factory=Resources)
    pruning: Pruning = field(default_factory=Pruning)
    sampler: Plugin | None = None
    """A sampler class of the user's (`search.sampler: {class, kwargs}`; searcher 'custom')."""
    pruner: Plugin | None = None
    """A pruner class of the user's (`pruning.pruner: {class, kwargs}`; pruner 'custom')."""
    storage: str | None = None
    """Optuna storage URL of the study (None: a journal file in the search folder)."""
    study_name: str = ""
    """The study's name in its storage (default: the space's name)."""
    enqueue: tuple[dict, ...] = ()
    """Configurations evaluated first, in order (`search.enqueue`)."""
    warm_start: tuple[str, ...] = ()
    """Earlier search folders whose completed trials seed the new study."""
    constraints: tuple[Constraint, ...] = ()
    """Bounds checked when a configuration is sampled; an infeasible one is never trained."""
    imports: tuple[str, ...] = ()
    """Modules imported in the driver and in every worker before anything is built."""

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def sample(self, trial) -> dict:
        """Define-by-run: the parameters of one trial (conditional ones only where they apply).

        Built-in condition: act none <-> act_at none.
        """
        values: dict = {}
        for param in self.params:
            fixed = self._fixed_by_condition(param.name, values)
            if fixed is not _UNSET:
                values[param.name] = fixed
                continue
            values[param.name] = param.suggest(trial)
        return values

    def _fixed_by_condition(self, name: str, values: dict) -> object:
        for cond in self.conditions:
            if name in cond.set and cond.holds(values):
                return cond.set[name]
        act = values.get("act", self.fixed_arch.get("act"))
        if name == "act_at" and act == "none":
            return "none"
        return _UNSET

    def train_config(self, values: dict, out: str) -> TrainConfig:
        """The TrainConfig of one trial."""
        data = dict(self.fixed)
        arch = dict(self.fixed_arch)
        for key, value in values.items():
            if key == "model":
                data["model"] = value
            elif key in self.arch_params or key.split(".")[0] in self.arch_params:
                arch[key] = value
            else:
                data[key] = value
        for key in [k for k in arch if k.endswith(".stages")]:  # per-stage dimensions
            name = key[:-len(".stages")]
            arch[name] = tuple(values.get(f"{name}.{i}", arch.get(f"{name}.{i}"))
                               for i in range(arch.pop(key)))
            for i in range(len(arch[name])):
                arch.pop(f"{name}.{i}", None)
        if arch.get("act") is not None and arch.get("act") != "none" \
                and arch.get("act_at") in (None, "none"):
            arch["act_at"] = "ds"
        if arch.get("act") == "none":
            arch["act_at"] = "none"
        data["arch"] = arch
        data["out"] = out
        return TrainConfig.from_dict(data, source=self.path)

    def grid(self) -> dict[str, list]:
        """The categorical grid of a `grid` searcher."""
        return {p.name: list(p.choices) for p in self.params}


_UNSET = object()
_TOP_KEYS = ("name", "data", "fixed", "arch", "models", "recipe", "conditions", "search",
             "pruning", "resources", "constraints", "imports")
_SEARCH_KEYS = ("num_trials", "searcher", "sampler", "seed", "objectives", "storage",
                "study_name", "enqueue", "warm_start")


class _Checker:
    """Error messages that name the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, msg: str) -> UserError:
        return UserError(f"{self.path}: {key}: {msg}")

    def mapping(self, value: object, key: str, allowed: tuple | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for k in value:
                if k not in allowed:
                    raise self.fail(f"{key}.{k}", f"unknown key (known: {', '.join(allowed)})")
        return value

    def dataclass(self, cls: type, value: object, key: str):
        data = self.mapping(value, key, tuple(f.name for f in dataclasses.fields(cls)))
        for f in dataclasses.fields(cls):
            if f.name in data:
                expected = type(getattr(cls(), f.name))
                v = data[f.name]
                if type(v) is not expected:
                    raise self.fail(f"{key}.{f.name}", f"{v!r} has the wrong type; expected "
                                    f"{expected.__name__}")
        return cls(**data)

    def choices(self, value: object, key: str, allowed: tuple | None) -> tuple:
        if not isinstance(value, list):
            value = [value]
        if not value:
            raise self.fail(key, "empty list of choices")
        for v in value:
            if allowed is not None and v not in allowed:
                raise self.fail(key, f"{v!r} is not allowed (allowed: "
                                f"{', '.join(map(str, allowed))})")
            if allowed is None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise self.fail(key, f"{v!r}: expected an integer >= 1")
        if len(set(map(repr, value))) != len(value):
            raise self.fail(key, "duplicate choices")
        return tuple(value)

    def distribution(self, value: object, key: str) -> Param:
        name = key.split(".")[-1]
        if isinstance(value, list):
            return Param(name, choices=self.choices(value, key, tuple(value) or None))
        spec = self.mapping(value, key, DISTRIBUTIONS)
        if len(spec) != 1:
            raise self.fail(key, f"expected a list of choices or one of {DISTRIBUTIONS}")
        kind, bounds = next(iter(spec.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)):
            raise self.fail(f"{key}.{kind}", "expected [low, high]")
        low, high = float(bounds[0]), float(bounds[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise self.fail(f"{key}.{kind}", f"expected low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise self.fail(f"{key}.{kind}", "loguniform needs low > 0")
        return Param(name, kind=kind, low=low, high=high)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML (errors name the file and the key)."""
    path = Path(path)
    raw = load_yaml(path)
    c = _Checker(str(path))
    c.mapping(raw, "(top level)", _TOP_KEYS)
    imports = _imports(c, raw.get("imports"))
    fixed = dict(c.mapping(raw.get("fixed"), "fixed"))
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k in fixed:
        if k not in train_fields or k in ("arch", "out"):
            raise c.fail(f"fixed.{k}", "unknown training setting")
    data = c.mapping(raw.get("data"), "data", ("train", "val"))
    if data.get("train") is not None:
        fixed["train_data"] = str(data["train"])
    if data.get("val") is not None:
        fixed["val_data"] = str(data["val"])

    params: list[Param] = []
    fixed_arch: dict = {}
    names: tuple = ()
    if raw.get("models") is not None:
        import timm

        models = raw["models"] if isinstance(raw["models"], list) else [raw["models"]]
        names = c.choices(models, "models", tuple(models))
        for n in names:
            if not timm.is_model(n):
                raise c.fail("models", f"unknown model {n!r}")
    # A model family of the user's (`imports:`) takes its own keyword arguments in `arch`.
    qlnet = all(str(n).startswith("qlnet") for n in names or (fixed.get("model", "qlnet"),))
    for k, v in c.mapping(raw.get("arch"), "arch", tuple(arch_fields()) if qlnet else None
                          ).items():
        if qlnet:
            _arch_dimension(c, k, v, params, fixed_arch)
            continue
        allowed = tuple(v if isinstance(v, list) else [v])
        if isinstance(v, dict):
            params.append(c.distribution(v, f"arch.{k}"))
        elif isinstance(v, list):
            params.append(Param(k, choices=c.choices(v, f"arch.{k}", allowed)))
        else:
            fixed_arch[k] = v
    arch_names = {p.name.split(".")[0] for p in params}
    if names:
        params.append(Param("model", choices=names))
    for k, v in c.mapping(raw.get("recipe"), "recipe").items():
        if k not in train_fields or k in ("arch", "out", "model"):
            raise c.fail(f"recipe.{k}", "unknown training setting")
        if k == "epochs":  # the pruners' max_t and Optuna's last step are fixed.epochs
            raise c.fail("recipe.epochs", "a trial's length is not searched; set fixed.epochs")
        params.append(c.distribution(v, f"recipe.{k}"))

    conditions = []
    raw_conditions = raw.get("conditions") or []
    if not isinstance(raw_conditions, list):
        raise c.fail("conditions", "expected a list of {when, set}")
    by_name = {p.name: p for p in params}
    for i, cond in enumerate(raw_conditions):
        cond = c.mapping(cond, f"conditions[{i}]", ("when", "set"))
        when = c.mapping(cond.get("when"), f"conditions[{i}].when")
        sets = c.mapping(cond.get("set"), f"conditions[{i}].set")
        if not when or not sets:
            raise c.fail(f"conditions[{i}]", "needs a non-empty when and a non-empty set")
        for k in list(when) + list(sets):
            if k not in by_name:
                raise c.fail(f"conditions[{i}]", f"{k!r} is not a sampled parameter")
        both = set(when) & set(sets)
        if both:
            raise c.fail(f"conditions[{i}]", f"{sorted(both)[0]!r} is both in when and in set")
        when = {k: v if isinstance(v, list) else [v] for k, v in when.items()}
        for k, listed in when.items():
            for v in listed:
                if not by_name[k].contains(v):  # a typo would make the condition never hold
                    raise c.fail(f"conditions[{i}].when.{k}",
                                 f"{v!r} is not among the values {k} is sampled from")
        conditions.append(Condition(when, sets))
    params = _condition_order(c, params, conditions)

    search = c.mapping(raw.get("search"), "search", _SEARCH_KEYS)
    num_trials = search.get("num_trials", 8)
    if not isinstance(num_trials, int) or num_trials < 1:
        raise c.fail("search.num_trials", f"{num_trials!r}: expected an integer >= 1")
    searcher, sampler = _sampler(c, search)
    seed = search.get("seed", 0)
    if not isinstance(seed, int):
        raise c.fail("search.seed", f"{seed!r}: expected an integer")
    objectives = []
    for i, o in enumerate(search.get("objectives") or [{"metric": "val_top1", "mode": "max"}]):
        obj = c.dataclass(Objective, o, f"search.objectives[{i}]")
        if obj.metric not in METRICS:
            raise c.fail(f"search.objectives[{i}].metric",
                         f"{obj.metric!r}: expected one of {', '.join(METRICS)}")
        if obj.mode not in ("max", "min"):
            raise c.fail(f"search.objectives[{i}].mode", f"{obj.mode!r}: expected max or min")
        objectives.append(obj)
    if not 1 <= len(objectives) <= 2:
        raise c.fail("search.objectives", "expected one or two objectives")
    if not params:
        raise c.fail("arch", "nothing to search: no list of choices in arch, models or recipe")
    if searcher == "grid" and any(p.choices is None for p in params):
        raise c.fail("search.searcher", "grid needs categorical choices only")
    resources = c.dataclass(Resources, raw.get("resources"), "resources")
    if resources.workers_per_trial < 1 or resources.cpus_per_worker < 0 \
            or resources.gpus_per_worker < 0:
        raise c.fail("resources", "workers_per_trial >= 1 and non-negative CPUs/GPUs expected")
    for name in ("max_failures", "trial_retries", "max_concurrent_trials"):
        if getattr(resources, name) < 0:
            raise c.fail(f"resources.{name}", f"{getattr(resources, name)}: expected >= 0")
    raw_pruning = dict(c.mapping(raw.get("pruning"), "pruning"))
    pruner = None
    if isinstance(raw_pruning.get("pruner"), dict):
        pruner = _plugin(c, raw_pruning["pruner"], "pruning.pruner", "optuna.pruners.BasePruner")
        raw_pruning["pruner"] = "custom"
    pruning = c.dataclass(Pruning, raw_pruning, "pruning")
    if pruning.pruner not in PRUNERS + ("custom",) or (pruning.pruner == "custom"
                                                        and pruner is None):
        raise c.fail("pruning.pruner", f"{pruning.pruner!r}: expected one of "
                     f"{', '.join(PRUNERS)}, or {{class: package.module.Pruner, kwargs: ...}}")
    if pruning.grace_epochs < 0:
        raise c.fail("pruning.grace_epochs", f"{pruning.grace_epochs}: expected >= 0")
    if pruning.reduction_factor < 2:
        raise c.fail("pruning.reduction_factor", f"{pruning.reduction_factor}: expected >= 2 "
                     "(the share of trials each rung keeps is 1 / reduction_factor)")
    epochs = fixed.get("epochs", 5)  # as run.py reads it (a bad value: TrainConfig's error)
    if pruning.pruner != "none" and isinstance(epochs, int) and pruning.grace_epochs >= epochs:
        raise c.fail("pruning.grace_epochs", f"{pruning.grace_epochs} is not below fixed.epochs "
                     f"{epochs}: no trial could be pruned")
    if len(objectives) > 1 and pruning.pruner in ("median", "hyperband", "custom"):
        raise c.fail("pruning.pruner", "Optuna pruners need a single objective; use asha")
    name = str(raw.get("name") or path.stem)
    storage = search.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise c.fail("search.storage", f"{storage!r}: expected an Optuna storage URL such as "
                     "sqlite:///runs/search.db, or a journal file's path")
    study_name = search.get("study_name", name)
    if not isinstance(study_name, str) or not study_name:
        raise c.fail("search.study_name", f"{study_name!r}: expected a non-empty string")
    warm = search.get("warm_start") or []
    if not isinstance(warm, list) or not all(isinstance(w, str) and w for w in warm):
        raise c.fail("search.warm_start", "expected a list of search folders")
    space = SearchSpace(path=str(path), name=name,
                        num_trials=num_trials, searcher=searcher, seed=seed,
                        objectives=tuple(objectives), params=tuple(params), fixed=fixed,
                        fixed_arch=fixed_arch, conditions=tuple(conditions),
                        arch_params=tuple(sorted(arch_names)), resources=resources,
                        pruning=pruning, sampler=sampler, pruner=pruner,
                        storage=storage, study_name=study_name,
                        enqueue=_enqueue(c, search.get("enqueue"), params),
                        warm_start=tuple(str(Path(w).resolve()) for w in warm),
                        constraints=_constraints(c, raw.get("constraints")), imports=imports)
    space.train_config({p.name: (p.choices[0] if p.choices else
                                 int(p.low) if p.kind == "int" else p.low) for p in params},
                       out="check")  # fixed settings must make a valid TrainConfig
    return space


def arch_fields() -> dict[str, object]:
    """The ArchSpec fields a space may fix or search, with their defaults."""
    from qlnas.models.spec import ArchSpec

    default = ArchSpec()
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(ArchSpec)
            if f.name != "num_classes"}


def _check_arch_value(c: _Checker, key: str, name: str, value: object) -> None:
    """One value of ArchSpec field `name`, as ArchSpec itself validates it."""
    from qlnas.models.spec import ArchSpec

    allowed = ARCH_CHOICES.get(name)
    if allowed is not None and value not in allowed:
        raise c.fail(key, f"{value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")
    change = {name: tuple(value) if isinstance(value, list) else value}
    if name in ("act", "act_at") and value == "none":  # the two are none together
        change = {"act": "none", "act_at": "none"}
    try:
        ArchSpec().replace(**change)
    except (TypeError, ValueError) as exc:
        raise c.fail(key, str(exc)) from None


def _arch_dimension(c: _Checker, name: str, value: object, params: list, fixed: dict) -> None:
    """An ArchSpec field: fixed (a value; a list for a per-stage field), searched (a list of
    choices, or a distribution for a number), or searched per stage for a per-stage field
    (``{per_stage: [choices of stage 1, ...]}``: parameters ``NAME.0``, ``NAME.1``, ...)."""
    key = f"arch.{name}"
    staged = isinstance(arch_fields()[name], tuple) or name == "expansion"
    if isinstance(value, dict) and "per_stage" in value:
        c.mapping(value, key, ("per_stage",))
        stages = value["per_stage"]
        if not staged or not isinstance(stages, list) or not stages:
            raise c.fail(f"{key}.per_stage", "expected a list with one entry per stage, for a "
                         "per-stage field (depths, widths, expansion)")
        for i, stage in enumerate(stages):
            if isinstance(stage, list):
                choices = c.choices(stage, f"{key}.per_stage[{i}]", tuple(stage))
                for v in choices:
                    _check_arch_value(c, f"{key}.per_stage[{i}]", name,
                                      [v] * len(stages))
                params.append(Param(f"{name}.{i}", choices=choices))
            else:
                _check_arch_value(c, f"{key}.per_stage[{i}]", name, [stage] * len(stages))
                fixed[f"{name}.{i}"] = stage
        fixed[f"{name}.stages"] = len(stages)
        return
    if isinstance(value, dict):
        param = c.distribution(value, key)
        for bound in (param.low, param.high):
            _check_arch_value(c, key, name, int(bound) if param.kind == "int" else bound)
        params.append(param)
    elif isinstance(value, list) and not (staged and name != "expansion"):
        choices = c.choices(value, key, tuple(value))
        for v in choices:
            _check_arch_value(c, key, name, v)
        params.append(Param(name, choices=choices))
    else:
        _check_arch_value(c, key, name, value)
        fixed[name] = tuple(value) if isinstance(value, list) else value


def _imports(c: _Checker, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise c.fail("imports", "expected a list of module names, e.g. [my_package.models]")
    import_modules(tuple(value), f"{c.path}: imports")
    return tuple(value)


def _plugin(c: _Checker, value: object, key: str, base: str) -> Plugin:
    """A class the user names, checked now: importable, of the right base, built."""
    import optuna

    plugin = parse_plugin(value, f"{c.path}: {key}", ())
    base_cls = optuna.samplers.BaseSampler if base.endswith("Sampler") \
        else optuna.pruners.BasePruner
    plugin.build(base_cls, f"{c.path}: {key}")
    return plugin


def _sampler(c: _Checker, search: dict) -> tuple[str, Plugin | None]:
    """`search.sampler` (a name or a class) or its older spelling `search.searcher`."""
    if "sampler" in search and "searcher" in search:
        raise c.fail("search.sampler", "give search.sampler or search.searcher, not both")
    key = "search.sampler" if "sampler" in search else "search.searcher"
    value = search.get("sampler", search.get("searcher", "tpe"))
    if isinstance(value, dict):
        return "custom", _plugin(c, value, key, "optuna.samplers.BaseSampler")
    if value not in SEARCHERS:
        raise c.fail(key, f"{value!r}: expected one of {', '.join(SEARCHERS)}, or "
                     "{class: package.module.Sampler, kwargs: {...}}")
    return value, None


def _constraints(c: _Checker, value: object) -> tuple[Constraint, ...]:
    out = []
    for metric, bounds in c.mapping(value, "constraints").items():
        key = f"constraints.{metric}"
        if metric not in CONSTRAINT_METRICS:
            raise c.fail(key, f"unknown constraint metric (known before training: "
                         f"{', '.join(CONSTRAINT_METRICS)})")
        bounds = c.mapping(bounds, key, ("min", "max"))
        if not bounds:
            raise c.fail(key, "expected {max: VALUE} and/or {min: VALUE}")
        for k, v in bounds.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise c.fail(f"{key}.{k}", f"{v!r}: expected a number")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise c.fail(key, f"min {bounds['min']} is above max {bounds['max']}")
        out.append(Constraint(metric, *(None if bounds.get(k) is None else float(bounds[k])
                                        for k in ("min", "max"))))
    return tuple(out)


def _condition_order(c: _Checker, params: list, conditions: list) -> list:
    """Params reordered, stably, so each one a condition sets is sampled after its `when` ones.

    `sample` is define-by-run in this order; a set parameter sampled first never saw its
    condition hold. The built-in act -> act_at counts as a condition.
    """
    after: dict[str, set] = {p.name: set() for p in params}
    for cond in conditions:
        for name in cond.set:
            after[name] |= set(cond.when)
    if "act" in after and "act_at" in after:
        after["act_at"].add("act")
    ordered, done, left = [], set(), list(params)
    while left:
        ready = next((p for p in left if after[p.name] <= done), None)
        if ready is None:
            raise c.fail("conditions", "they depend on each other in a cycle among "
                         + ", ".join(p.name for p in left))
        ordered.append(ready)
        done.add(ready.name)
        left.remove(ready)
    return ordered


def _enqueue(c: _Checker, value: object, params: list[Param]) -> tuple[dict, ...]:
    """Configurations to evaluate first: each a mapping of sampled parameters to values in
    their choices or ranges (parameters left out are sampled)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise c.fail("search.enqueue", "expected a list of {parameter: value} mappings")
    by_name = {p.name: p for p in params}
    out = []
    for i, entry in enumerate(value):
        entry = c.mapping(entry, f"search.enqueue[{i}]")
        for k, v in entry.items():
            if k not in by_name:
                raise c.fail(f"search.enqueue[{i}].{k}", "not a sampled parameter (sampled: "
                             f"{', '.join(by_name)})")
            if not by_name[k].contains(v):
                p = by_name[k]
                where = f"{list(p.choices)}" if p.choices is not None \
                    else f"[{p.low:g}, {p.high:g}]"
                raise c.fail(f"search.enqueue[{i}].{k}", f"{v!r} is outside {where}")
        out.append(dict(entry))
    return tuple(out)
