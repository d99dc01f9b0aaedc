"""What a search space may plug in without editing qlnas: any Optuna sampler or pruner class,
and modules (`imports:`) that register model families with timm before anything is built."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

from qlnas.errors import UserError


@dataclass(frozen=True)
class Plugin:
    """An importable class (``package.module.Class``) and the keyword arguments it is built
    with."""

    cls: str
    kwargs: dict = field(default_factory=dict)

    def build(self, base: type, where: str, seed: int | None = None):
        """An instance; `seed` is passed when the class takes one and kwargs do not set it."""
        klass = resolve_class(self.cls, base, where)
        kwargs = dict(self.kwargs)
        if seed is not None and "seed" not in kwargs \
                and "seed" in inspect.signature(klass).parameters:
            kwargs["seed"] = seed
        try:
            return klass(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}.kwargs: {self.cls} refused them ({exc})") from None


def resolve_class(path: str, base: type, where: str) -> type:
    """The class at `path`, which must subclass `base` (UserError naming `where` otherwise)."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise UserError(f"{where}.class: {path!r}: expected package.module.ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{where}.class: cannot import {module_name!r} ({exc})") from None
    klass = getattr(module, name, None)
    if klass is None:
        raise UserError(f"{where}.class: module {module_name!r} has no {name!r}")
    if not (isinstance(klass, type) and issubclass(klass, base)):
        public = f"{base.__module__.split('._')[0]}.{base.__name__}"  # optuna.samplers.X
        raise UserError(f"{where}.class: {path} is not a subclass of {public}")
    return klass


def parse_plugin(value: object, where: str, names: tuple[str, ...]) -> str | Plugin:
    """A built-in name from `names`, or ``{class: ..., kwargs: {...}}``."""
    if isinstance(value, str):
        if value not in names:
            raise UserError(f"{where}: {value!r}: expected one of {', '.join(names)}, or "
                            "{class: package.module.Class, kwargs: {...}}")
        return value
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a name or {{class: ..., kwargs: {{...}}}}, got "
                        f"{type(value).__name__}")
    for key in value:
        if key not in ("class", "kwargs"):
            raise UserError(f"{where}.{key}: unknown key (known: class, kwargs)")
    cls, kwargs = value.get("class"), value.get("kwargs") or {}
    if not isinstance(cls, str):
        raise UserError(f"{where}.class: expected package.module.ClassName")
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}.kwargs: expected a mapping")
    return Plugin(cls, dict(kwargs))


def import_modules(modules: tuple[str, ...], where: str = "imports") -> None:
    """Import each module (a model family registers itself with timm on import)."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (any failure of a user's module: one line)
            raise UserError(f"{where}[{i}]: cannot import {name!r} "
                            f"({type(exc).__name__}: {exc})") from None
