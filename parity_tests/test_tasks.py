"""Tasks hold no per-run state and settings are defined once: what lets a user run two trainers of
one task side by side, and trust that the CLI, the Python `Config` and the checks agree."""

import dataclasses

import numpy as np
import pytest
import torch

from train import config as config_lib
from train import settings
from train.__main__ import parse_args
from train.tasks import TASKS, JaxTraining, ParityCase, TorchTraining, get_task
from train.tasks import diffusion
from train.torch_backend import TorchTrainer
from twin_models.presets import PRESETS, get_preset, parse_assignments, with_overrides


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_its_three_roles(name):
    task = get_task(name)
    assert isinstance(task.jax_training, JaxTraining)
    assert isinstance(task.torch_training, TorchTraining)
    assert isinstance(task.parity, ParityCase)
    assert callable(task.jax_training.step), f"{name}: JaxTraining.step is not set"


@pytest.mark.parametrize("preset", ["clip-digits", "caption-scenes", "vqa-scenes"])
def test_setup_leaves_the_task_as_it_was(tmp_path, preset):
    """What a run needs beyond its config (a tokenizer, references) is the run's context, not an
    attribute of the task: the same task object can serve two runs."""
    r = config_lib.resolve(config_lib.Config(preset=preset, steps=1, batch_size=8, progress=False,
                                             workdir=str(tmp_path), recipe_overrides=_small_data(preset)))
    before = dict(vars(r.task))
    r2, entries = r.set_up()
    assert vars(r.task) == before
    assert r.context == {} and r2.task is r.task
    _, batch = next(iter(r2.batches_from(0)))
    assert set(r2.task.batch(batch, 0, r2)) >= {"image"}


def _small_data(preset: str) -> dict:
    task = get_preset(preset).task
    if task == "captioning":
        return {"num_train": 64, "num_test": 8}
    if task == "vqa":
        return {"num_scenes": 16, "num_test_scenes": 4}
    return {}


def test_two_torch_trainers_of_one_task_keep_their_own_ema():
    """The EMA lives in each trainer (`TorchTrainer.extra`), so a second trainer built around the
    same task (as the benchmarks do) neither replaces nor moves the first one's."""
    preset = with_overrides(get_preset("ddpm-digits"), features=(8, 16), time_emb_dim=16, num_res_blocks=1)
    task = diffusion.Diffusion()
    recipe = dict(preset.train, weight_decay=0.0, grad_clip=0.0)
    trainers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = task.torch_training.model(preset)
        trainers.append(TorchTrainer(model, task, recipe, lambda step: 0.1, set(),
                                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    first, second = trainers
    assert first.extra["ema"] is not second.extra["ema"]
    ema_before = [p.detach().clone() for p in first.extra["ema"].parameters()]
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (2, *preset.input_shape_nhwc)).astype(np.float32)
    second.train_step({"image": x, "t": np.array([3, 500], np.int32),
                       "noise": rs.standard_normal(x.shape).astype(np.float32)})
    assert all(torch.equal(a, b) for a, b in zip(ema_before, first.extra["ema"].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(ema_before, second.extra["ema"].parameters()))


def test_the_command_line_and_config_share_every_default():
    """`python -m train PRESET` with no options is `Config(preset=PRESET)`: the options are made
    from the dataclass, so there is no second default to drift."""
    args = parse_args(["vit-digits"])
    assert settings.config_from_args(args) == config_lib.Config(preset="vit-digits")


def test_every_config_field_is_an_option_of_the_cli(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(config_lib.Config):
        if field.name != "preset":
            option = field.metadata["flag"] or "--" + field.name.replace("_", "-")
            assert option in help_text, option
    assert set(settings.RECIPE_FLAGS) <= {f.name for f in dataclasses.fields(config_lib.Config)}


@pytest.mark.parametrize("overrides, message", [
    (dict(model_overrides={"depth": "two"}), r"--set depth='two'"),
    (dict(model_overrides={"no_such_argument": 1}), "has no constructor argument"),
    (dict(recipe_overrides={"no_such_key": 1}), "has no recipe key"),
    (dict(parallel="sideways"), "--parallel must be one of"),
])
def test_settings_are_checked_before_the_data_is_loaded(tmp_path, monkeypatch, overrides, message):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr(get_task("classification").__class__, "load_data", no_data)
    with pytest.raises(ValueError, match=message):
        config_lib.resolve(config_lib.Config(preset="vit-digits", workdir=str(tmp_path), **overrides))


def test_an_unwritable_workdir_is_named_before_the_data_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(get_task("classification").__class__, "load_data",
                        lambda *a, **k: pytest.fail("the data was loaded first"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--workdir: cannot create"):
        config_lib.resolve(config_lib.Config(preset="vit-digits", workdir=str(blocker / "run")))


@pytest.mark.parametrize("text, value", [("2", 2), ("1e-6", 1e-6), ("true", True), ("True", True),
                                         ("[2, 2]", [2, 2]), ("(2, 2)", (2, 2)), ("null", None),
                                         ("gelu", "gelu"), ('"x"', "x")])
def test_one_key_value_syntax_for_every_tool(text, value):
    """`--set`/`--recipe` of the trainer and `--set` of `bridge import` read values alike."""
    from bridge.imports import parse_overrides

    assert parse_assignments([f"k={text}"]) == {"k": value}
    assert parse_overrides([f"k={text}"]) == {"k": value}
    with pytest.raises(ValueError, match="wants KEY=VALUE"):
        parse_assignments(["novalue"], "--recipe")


def test_every_preset_names_a_known_task():
    assert {p.task for p in PRESETS.values()} <= set(TASKS)
