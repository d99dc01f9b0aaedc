"""Search spaces: every shipped YAML loads; bad ones give one clear error naming file and key."""

import re
from pathlib import Path

import optuna
import pytest

from qlnas.errors import UserError
from qlnas.search.space import load_space

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_spaces_are_shipped():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "paper.yaml", "imagenet100.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_space_loads_and_samples(path):
    assert path.read_text().startswith("# "), "a space starts with its command and time"
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = space.sample(study.ask())
        config = space.train_config(values, out="/tmp/x")
        assert config.out == "/tmp/x"
        if config.arch.get("act") == "none":
            assert config.arch["act_at"] == "none"


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


BASE = "fixed: {epochs: 1, warmup_epochs: 0}\narch:\n  form: [eq3, eq4]\n"


@pytest.mark.parametrize("text,message", [
    (BASE + "colour: red\n", "(top level).colour: unknown key"),
    (BASE + "search: {num_trial: 3}\n", "search.num_trial: unknown key"),
    ("arch:\n  form: []\n", "arch.form: empty list of choices"),
    ("arch:\n  form: [eq3, eq9]\n", "arch.form: 'eq9' is not allowed"),
    (BASE + "search: {num_trials: three}\n", "search.num_trials: 'three': expected an integer"),
    (BASE + "resources: {workers_per_trial: two}\n",
     "resources.workers_per_trial: 'two' has the wrong type"),
    (BASE + "recipe:\n  lr: {loguniform: [0, 1]}\n", "recipe.lr.loguniform: loguniform needs"),
    (BASE + "recipe:\n  learning_rate: [0.1]\n", "recipe.learning_rate: unknown training"),
    (BASE + "fixed: {epochs: -1}\n", "epochs=-1: expected a positive integer"),
    (BASE + "search:\n  objectives: [{metric: accuracy}]\n",
     "search.objectives[0].metric: 'accuracy'"),
    (BASE + "pruning: {pruner: sometimes}\n", "pruning.pruner: 'sometimes'"),
    ("fixed: {epochs: 1, warmup_epochs: 0}\n", "arch: nothing to search"),
    (BASE + "resources: {trial_retries: -1}\n", "resources.trial_retries: -1: expected >= 0"),
    (BASE + "search:\n  sampler: {class: optuna.samplers.NoSuchSampler}\n",
     "search.sampler.class: module 'optuna.samplers' has no 'NoSuchSampler'"),
    (BASE + "search:\n  sampler: {class: no_such_package.Sampler}\n",
     "search.sampler.class: cannot import 'no_such_package'"),
    (BASE + "search:\n  sampler: {class: optuna.pruners.MedianPruner}\n",
     "search.sampler.class: optuna.pruners.MedianPruner is not a subclass of "
     "optuna.samplers.BaseSampler"),
    (BASE + "search:\n  sampler: {class: optuna.samplers.TPESampler, kwargs: {colour: 1}}\n",
     "search.sampler.kwargs: optuna.samplers.TPESampler refused them"),
    (BASE + "search: {sampler: tpe, searcher: grid}\n", "search.sampler: give search.sampler"),
    (BASE + "pruning:\n  pruner: {class: optuna.samplers.TPESampler}\n",
     "pruning.pruner.class: optuna.samplers.TPESampler is not a subclass of "
     "optuna.pruners.BasePruner"),
    (BASE + "constraints:\n  latency_ms: {max: 3}\n",
     "constraints.latency_ms: unknown constraint metric (known before training: params_m"),
    (BASE + "constraints:\n  params_m: {most: 3}\n", "constraints.params_m.most: unknown key"),
    (BASE + "search:\n  enqueue: [{form: eq5}]\n",
     "search.enqueue[0].form: 'eq5' is outside ['eq3', 'eq4']"),
    (BASE + "search:\n  enqueue: [{act: relu}]\n",
     "search.enqueue[0].act: not a sampled parameter"),
    (BASE + "  colour: [red]\n", "arch.colour: unknown key (known: form, act"),
    (BASE + "  depths: {per_stage: [[1, 2], [0, 2], 2, 2]}\n",
     "arch.depths.per_stage[1]: ArchSpec.depths=(0, 0, 0, 0); expected positive integers"),
    (BASE + "  act_radius: {uniform: [-1.0, 4.0]}\n", "arch.act_radius: ArchSpec.act_radius"),
    (BASE + "  expansion: [4, 0]\n", "arch.expansion: ArchSpec.expansion=0; expected an"),
    (BASE + "  form: {per_stage: [eq3, eq4]}\n", "arch.form.per_stage: expected a list with"),
    (BASE + "recipe:\n  epochs: [2, 4]\n", "recipe.epochs: a trial's length is not searched"),
    (BASE + "pruning: {pruner: asha, reduction_factor: 1}\n",
     "pruning.reduction_factor: 1: expected >= 2"),
    (BASE + "pruning: {pruner: median, grace_epochs: -3}\n", "pruning.grace_epochs: -3: expected"),
    (BASE.replace("epochs: 1", "epochs: 4") + "pruning: {pruner: asha, grace_epochs: 4}\n",
     "pruning.grace_epochs: 4 is not below fixed.epochs 4: no trial could be pruned"),
    (BASE + "resources: {max_concurrent_trials: -1}\n",
     "resources.max_concurrent_trials: -1: expected >= 0"),
    (BASE + "imports: [no_such_module_here]\n",
     "imports[0]: cannot import 'no_such_module_here' (ModuleNotFoundError"),
])
def test_invalid_space_names_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_space(path)
    assert str(err.value).startswith(str(path)), err.value
    assert message in str(err.value), err.value


def test_an_integer_recipe_range_loads_and_samples_integers(tmp_path):
    # The load check passed the range's low end as a float, which TrainConfig refused.
    space = load_space(_write(tmp_path, BASE + "recipe:\n  batch_size: {int: [32, 64]}\n"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = [space.train_config(space.sample(study.ask()), out="x").batch_size for _ in range(5)]
    assert all(type(b) is int and 32 <= b <= 64 for b in sizes)


def test_conditions_fix_parameters(tmp_path):
    path = _write(tmp_path, BASE + "  expansion: [4, 6]\nconditions:\n"
                  "  - when: {form: eq4}\n    set: {expansion: 4}\n")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        values = space.sample(trial)
        if values["form"] == "eq4":
            assert values["expansion"] == 4 and "expansion" not in trial.params


def test_a_condition_on_a_later_parameter_still_applies(tmp_path):
    # arch parameters were sampled before recipe ones, so a condition on lr never held.
    path = _write(tmp_path, BASE + "recipe:\n  lr: [0.1, 0.4]\nconditions:\n"
                  "  - when: {lr: 0.4}\n    set: {form: eq3}\n")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [space.sample(study.ask()) for _ in range(30)]
    assert any(v["lr"] == 0.4 for v in seen) and any(v["form"] == "eq4" for v in seen)
    assert all(v["form"] == "eq3" for v in seen if v["lr"] == 0.4)


def test_act_at_listed_before_act_still_follows_act_none(tmp_path):
    path = _write(tmp_path, "fixed: {epochs: 1, warmup_epochs: 0}\n"
                  "arch:\n  act_at: [ds, all]\n  act: [none, softball]\n")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [space.sample(study.ask()) for _ in range(20)]
    assert any(v["act"] == "none" for v in seen)
    assert all(v["act_at"] == "none" for v in seen if v["act"] == "none")


@pytest.mark.parametrize("conditions,message", [
    ("  - when: {form: eq9}\n    set: {expansion: 4}\n",
     "conditions[0].when.form: 'eq9' is not among the values form is sampled from"),
    ("  - when: {expansion: 5}\n    set: {form: eq3}\n",
     "conditions[0].when.expansion: 5 is not among"),
    ("  - when: {form: eq3}\n    set: {form: eq4}\n", "'form' is both in when and in set"),
    ("  - when: {}\n    set: {form: eq4}\n", "needs a non-empty when and a non-empty set"),
    ("  - when: {form: eq3}\n    set: {expansion: 4}\n"
     "  - when: {expansion: 6}\n    set: {form: eq4}\n", "conditions: they depend on each other"),
])
def test_a_condition_that_could_never_apply_is_refused(tmp_path, conditions, message):
    path = _write(tmp_path, BASE + "  expansion: [4, 6]\nconditions:\n" + conditions)
    with pytest.raises(UserError, match=re.escape(message)):
        load_space(path)


def test_trial_retries_default_to_none(tmp_path):
    assert load_space(_write(tmp_path, BASE)).resources.trial_retries == 0
    path = _write(tmp_path, BASE + "resources: {trial_retries: 2}\n")
    assert load_space(path).resources.trial_retries == 2


def test_plugged_in_sampler_and_pruner_classes_are_built(tmp_path):
    from qlnas.search.run import _pruner, _sampler

    path = _write(tmp_path, BASE.replace("epochs: 1", "epochs: 2")
                  + "search:\n  seed: 3\n  sampler:\n"
                  "    class: optuna.samplers.QMCSampler\n    kwargs: {scramble: true}\n"
                  "pruning:\n  pruner:\n    class: optuna.pruners.PercentilePruner\n"
                  "    kwargs: {percentile: 25.0}\n")
    space = load_space(path)
    sampler, pruner = _sampler(space), _pruner(space)
    assert isinstance(sampler, optuna.samplers.QMCSampler) and sampler._seed == 3
    assert isinstance(pruner, optuna.pruners.PercentilePruner) and pruner._percentile == 25.0


def test_every_archspec_field_is_a_dimension_per_stage_where_it_is_a_tuple(tmp_path):
    path = _write(tmp_path, "fixed: {model: qlnet26n, epochs: 1, warmup_epochs: 0}\narch:\n"
                  "  depths: {per_stage: [[1, 2], 2, [2, 3], 1]}\n"
                  "  widths: [32, 64, 128, 256]\n  stem_width: [16, 32]\n"
                  "  act_radius: {uniform: [1.0, 8.0]}\n  stem_linear: [true, false]\n")
    space = load_space(path)
    assert {p.name for p in space.params} == {"depths.0", "depths.2", "stem_width",
                                              "act_radius", "stem_linear"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        values = space.sample(study.ask())
        arch = space.train_config(values, out="x").arch
        assert arch["depths"] == (values["depths.0"], 2, values["depths.2"], 1)
        assert arch["widths"] == (32, 64, 128, 256) and 1.0 <= arch["act_radius"] <= 8.0
        assert not any("." in k for k in arch)
        seen.add(arch["depths"])
    assert len(seen) == 4


TABLE1 = ["qlnet50_eq3_relu_all", "qlnet50_eq3_hardtanh_ds", "qlnet50_eq3_hardball_ds",
          "qlnet50_eq3_softball_ds", "qlnet50_eq3_nows_softball_ds",
          "qlnet50_eq3_nows_x6_softball_ds", "qlnet50_eq4_softball_ds",
          "qlnet50_eq5_softball_ds", "qlnet50_eq6_softball_ds",
          "qlnet50_eq7_nows_x6_softball_ds"]


def test_the_paper_space_evaluates_table1_first(tmp_path):
    """paper.yaml's enqueued rows are Table 1's models, and its study asks them first, in
    order, before TPE samples anything."""
    import timm

    from qlnas.search.searcher import QLOptunaSearch

    space = load_space(ROOT / "search_spaces" / "paper.yaml")
    searcher = QLOptunaSearch(space=lambda t: space.sample(t), metric="val_top1", mode="max",
                              sampler=optuna.samplers.TPESampler(seed=0), max_epochs=50)
    for params in space.enqueue:
        searcher._ot_study.enqueue_trial(params)
    names = []
    for i in range(len(TABLE1)):
        config = space.train_config(searcher.suggest(f"t{i}"), out="x")
        model = timm.create_model(config.model, num_classes=100, **config.arch)
        names.append(model.spec)
    expected = [timm.create_model(n, num_classes=100).spec for n in TABLE1]
    assert names == expected


def test_the_authors_design_is_reachable_from_arch_choices(tmp_path):
    """A search can compare qlnet50_liu2023 with the paper's forms: by name in `models:`, and
    as a point of the arch space (its coefficient BN, per-stage expansion, hardball placement),
    which builds exactly the preset's spec."""
    import timm

    from qlnas.models.spec import PRESETS

    path = _write(tmp_path, """\
fixed: {model: qlnet50, epochs: 1, warmup_epochs: 0}
arch:
  form: [eq3, glb]
  act: [softball, hardball]
  act_at: [ds, proj]
  weight_sharing: [true, false]
  coef_bn: [false, true]
  act_last: [false, true]
  stem_linear: false
  expansion: {per_stage: [[4, 8], [4, 8], 4, 4]}
search:
  enqueue:
    - {form: glb, act: hardball, act_at: proj, weight_sharing: false, coef_bn: true,
       act_last: true, expansion.0: 8, expansion.1: 8}
""")
    space = load_space(path)
    study = optuna.create_study()
    study.enqueue_trial(space.enqueue[0])
    config = space.train_config(space.sample(study.ask()), out="x")
    model = timm.create_model(config.model, num_classes=100, **config.arch)
    assert model.spec == PRESETS["qlnet50_liu2023"].spec.replace(num_classes=100)
    named = _write(tmp_path, "fixed: {epochs: 1, warmup_epochs: 0}\n"
                   "models: [qlnet50_liu2023, qlnet50_eq3_softball_ds]\n")
    assert load_space(named).params[0].choices == ("qlnet50_liu2023", "qlnet50_eq3_softball_ds")
