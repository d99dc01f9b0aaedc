"""The search's Optuna study in Optuna storage: where it lives, and how to open it again.

A search's study lives in storage from its first trial: by default a journal file in the
search folder (`JOURNAL`; it works on the shared filesystem a cluster already needs), or the
RDB URL of `search.storage` (SQLite, PostgreSQL, ...). ``study.json`` in the search folder
records the study's name and storage, so `--resume`, `qlnas report`, `qlnas dashboard` and a
notebook (`optuna.load_study`) all open the same study.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json

STUDY_JSON = "study.json"
JOURNAL = "optuna.journal"


@dataclass(frozen=True)
class StudyRef:
    """A study's name and storage: an RDB URL (``scheme://...``) or a journal file's path."""

    name: str
    storage: str

    @property
    def is_journal(self) -> bool:
        return "://" not in self.storage

    def open_storage(self):
        """The Optuna storage object (RDB storages are created if missing)."""
        return open_storage(self.storage)

    def load(self):
        """The study (UserError when the storage holds no study of this name)."""
        import optuna

        try:
            return optuna.load_study(study_name=self.name, storage=self.open_storage())
        except KeyError:
            raise UserError(f"{self.storage}: holds no Optuna study named {self.name!r}") \
                from None

    def exists(self) -> bool:
        import optuna

        if self.is_journal and not Path(self.storage).is_file():
            return False
        names = optuna.study.get_all_study_names(storage=self.open_storage())
        return self.name in names

    def snippet(self) -> str:
        """Python that opens this study from a notebook."""
        if self.is_journal:
            storage = ("optuna.storages.JournalStorage(optuna.storages.journal."
                       f"JournalFileBackend({self.storage!r}))")
        else:
            storage = repr(self.storage)
        return f"optuna.load_study(study_name={self.name!r}, storage={storage})"

    def to_dict(self) -> dict:
        return {"study_name": self.name, "storage": self.storage}


def open_storage(storage: str):
    """An Optuna storage from a URL (RDB) or a path (journal file)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except Exception as exc:  # noqa: BLE001 (SQLAlchemy's many errors: one line)
            raise UserError(f"search.storage {storage!r}: cannot open it "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def absolute_storage(storage: str | None, out: Path) -> str:
    """The storage a search uses: its journal file by default; a relative SQLite path made
    absolute (a resumed search, the report and a notebook may start elsewhere)."""
    if storage is None:
        return str(out / JOURNAL)
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(storage[len("sqlite:///"):]).resolve())
    if "://" not in storage:
        return str(Path(storage).resolve())
    return storage


def study_ref(out: str | Path) -> StudyRef:
    """The study of the search in `out` (UserError when it has none)."""
    path = Path(out) / STUDY_JSON
    if not path.is_file():
        raise UserError(f"{out}: no Optuna study recorded here (no {STUDY_JSON}; a search from "
                        "before studies were kept in storage)")
    try:
        data = json.loads(path.read_text())
        return StudyRef(str(data["study_name"]), str(data["storage"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); expected "
                        '{"study_name": ..., "storage": ...}') from None


def find_study_ref(out: str | Path) -> StudyRef | None:
    path = Path(out) / STUDY_JSON
    return study_ref(out) if path.is_file() else None


def prepare_study(name: str, storage: str | None, out: Path) -> StudyRef:
    """The study of a new search, recorded in `out`; refused when its storage already holds a
    study of that name in which a trial of its own ran (one where none did, left by a search
    that failed to start after its enqueued and warm-start trials went in, is replaced)."""
    import optuna

    ref = StudyRef(name, absolute_storage(storage, out))
    if ref.exists():
        if any(not _never_ran(t) for t in ref.load().get_trials(deepcopy=False)):
            raise UserError(f"search.storage {ref.storage}: already holds a study named "
                            f"{name!r}; set search.study_name to another name, or --resume "
                            "the search that made it")
        optuna.delete_study(study_name=name, storage=ref.open_storage())
    atomic_write_json(ref.to_dict(), out / STUDY_JSON)
    return ref


def _never_ran(trial) -> bool:
    """A trial the search put in before any ran: enqueued and still waiting, or a completed
    trial copied from an earlier search (`search.warm_start`)."""
    import optuna

    state = optuna.trial.TrialState
    return (trial.state == state.WAITING and trial.user_attrs.get("enqueued")) \
        or (trial.state == state.COMPLETE and "warm_start_from" in trial.user_attrs)


def tune_trials(study) -> dict[str, object]:
    """Tune trial id -> the Optuna trial (FrozenTrial) that carries it."""
    return {t.user_attrs["tune_trial_id"]: t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("tune_trial_id")}


def warm_start_trials(space) -> list:
    """The completed trials of the earlier searches of `space.warm_start`, made trials of
    this space (its distributions and constraint values), to seed a new study so its sampler
    starts informed. Their spaces must be compatible: the same objectives, and each of their
    parameters sampled here too, of the same kind (one line naming the first difference
    otherwise). Trials with a value outside this space's choices or ranges are left out."""
    import optuna

    ours = {p.name: p for p in space.params}
    objectives = [[o.metric, o.mode] for o in space.objectives]
    made = []
    for folder in space.warm_start:
        where = f"{space.path}: search.warm_start: {folder}"
        try:
            earlier = json.loads((Path(folder) / "space.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{where}: not a search folder (no readable space.json)") from None
        theirs = [[o["metric"], o["mode"]] for o in earlier.get("objectives", [])]
        if theirs != objectives:
            raise UserError(f"{where}: its objectives {theirs} are not this search's "
                            f"{objectives}")
        for name, param in earlier.get("params", {}).items():
            if name not in ours:
                raise UserError(f"{where}: its parameter {name!r} is not sampled here")
            if (param.get("choices") is None) != (ours[name].choices is None) \
                    or param.get("kind") != ours[name].kind:
                raise UserError(f"{where}: its parameter {name!r} is of another kind here")
        try:
            ref = study_ref(folder)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        skipped = 0
        for trial in ref.load().get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.COMPLETE,)):
            params = {k: v for k, v in trial.params.items() if k in ours}
            facts = trial.user_attrs
            if not all(ours[k].contains(v) for k, v in params.items()) or any(
                    not isinstance(facts.get(c.metric), int | float) for c in space.constraints):
                skipped += 1
                continue
            attrs = {k: v for k, v in facts.items() if k != "tune_trial_id"}
            attrs["warm_start_from"] = f"{folder} (trial {trial.number})"
            system = {f"constraints:{c.metric}": c.violation(facts[c.metric])
                      for c in space.constraints}
            made.append(optuna.trial.create_trial(
                params=params, distributions={k: ours[k].distribution() for k in params},
                values=trial.values, user_attrs=attrs, system_attrs=system,
                intermediate_values=trial.intermediate_values))
        if skipped:
            logging.getLogger(__name__).warning(
                "warm start: %d completed trials of %s are outside this space (or lack a "
                "constrained metric); left out", skipped, folder)
    return made
