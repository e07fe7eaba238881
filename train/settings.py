"""The settings of a training run (`Config`), each defined once, with its default, choices and
help; the command line made from them (`add_arguments`, `config_from_args`) and their validation
(`check_config`), all before anything heavy is imported or built. Imports no framework."""

from __future__ import annotations

import argparse
import dataclasses
import math

from twin_models.presets import ATTENTION_IMPLS, RECIPE_KEYS, parse_assignments

BACKENDS = ("jax", "torch")
PARALLEL = ("jit", "pmap", "mesh")
PRECISIONS = ("fp32", "bf16")


def setting(default=None, help: str = "", *, choices=None, flag: str | None = None, metavar=None,
            cli: bool = True, group: str | None = None):
    """A `Config` field with everything the CLI needs to offer it (`add_arguments`): its one default,
    its choices, its help. `flag`: the option's name when it is not the field's (`--no-progress`)."""
    meta = dict(help=help, choices=choices, flag=flag, metavar=metavar, cli=cli, group=group)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Config:
    """One training run's settings: each defined here once, with its default, choices and help;
    `python -m train`'s options are made from these fields (`add_arguments`), and `check_config`
    validates them before anything is built. A recipe flag left None takes the preset's value."""
    preset: str = setting(None, "preset name, e.g. vit-digits")
    data: str | None = setting(None, "digits (default) | imagefolder:DIR | cifar10:DIR; captioning "
                               "presets: scenes (default) | coco:DIR; vqa presets: scenes")
    backend: str = setting("jax", "the framework that trains", choices=BACKENDS)
    parallel: str = setting("jit", "jax only: jit on one device, pmap over the local devices, or jit over "
                            "a mesh of every device (the batch split over it)", choices=PARALLEL)
    attention_impl: str = setting("xla", "jax only: the attention kernel (cudnn: a GPU's fused kernel, "
                                  "sequences padded to a multiple of 16)", choices=ATTENTION_IMPLS)
    fsdp: bool = setting(False, "with --parallel mesh: shard parameters and optimizer state over the devices")
    steps: int | None = setting(None, "total optimizer steps (or --epochs)")
    epochs: int | None = setting(None, "epochs (whole global batches of the train set; or --steps)")
    batch_size: int | None = setting(None, "global batch size, over all devices and hosts")
    lr: float | None = setting(None, "peak learning rate")
    weight_decay: float | None = setting(None, "AdamW's weight decay (weight matrices only)")
    warmup_steps: int | None = setting(None, "linear warm-up steps before the cosine")
    label_smoothing: float | None = setting(None, "label smoothing of the classification losses")
    grad_clip: float | None = setting(None, "global gradient norm clip (0: off)")
    dropout: float | None = setting(None, "the model's dropout rate")
    precision: str = setting("fp32", "bf16: bfloat16 compute over float32 master weights", choices=PRECISIONS)
    seed: int = setting(0, "initial weights, data order and dropout")
    workdir: str | None = setting(None, "default: runs/PRESET")
    checkpoint_every: int | None = setting(None, "steps between checkpoints (default: one epoch; 0: only "
                                           "at the end)")
    keep: int = setting(3, "checkpoints kept")
    resume: bool = setting(False, "continue from the latest checkpoint in WORKDIR")
    export: str | None = setting(None, "write the final weights as a safetensors state_dict for "
                                 "torch_reference", metavar="PATH")
    log_every: int = setting(10, "steps between metrics lines")
    eval_every: int | None = setting(None, "steps between evaluations (default: epoch for classification "
                                     "and CLIP, none for DDPM; 0: only at the end)")
    max_bad_steps: int = setting(5, "stop (exit status 4) after this many steps in a row whose loss or "
                                 "gradients are not finite; each is skipped, the weights untouched")
    model_overrides: dict = setting({}, "override a model constructor argument, e.g. --set depth=2",
                                    flag="--set", metavar="KEY=VALUE")
    recipe_overrides: dict = setting({}, "override another key of the preset's recipe, e.g. --recipe "
                                     "num_samples=16", flag="--recipe", metavar="KEY=VALUE")
    progress: bool = setting(True, "no progress bar", flag="--no-progress")
    tensorboard: bool = setting(False, "also write the metrics as TensorBoard event files in "
                                "WORKDIR/tensorboard (needs tensorboardX)")
    stall_timeout: float = setting(300.0, "seconds a step may make no progress (or 50x the run's median "
                                   "step, if longer) before the run is ended as stalled: every thread's "
                                   "stack to WORKDIR/stall-stacks.txt, exit status 6 (0: off)")


RECIPE_FLAGS = RECIPE_KEYS   # the recipe keys with a flag (and a Config field) of their own
SEED_RANGE = (0, 2 ** 32 - 1)   # what numpy's, JAX's and torch's generators all take
COUNT_LIMIT = 2 ** 31 - 1       # the largest step, batch or example count (an int32 on device)


def _count(lo):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= COUNT_LIMIT,
            f"an integer in [{lo}, {COUNT_LIMIT}]")


def _rate(lo_open):
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and (0 < v < 1 if lo_open else 0 <= v < 1)  # noqa: E731
    return ok, "a number in (0, 1)" if lo_open else "a number in [0, 1)"


def _family_weights(v):
    from train.scenes import FAMILIES  # numpy only
    number = lambda w: isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0  # noqa: E731
    return v is None or (isinstance(v, dict) and set(v) <= set(FAMILIES) and all(number(w) for w in v.values())
                         and any(v.get(f, 1) > 0 for f in FAMILIES))


def _objects(v):
    pair = isinstance(v, (list, tuple)) and len(v) == 2 and all(_count(1)[0](x) for x in v) and v[0] <= v[1]
    return pair or _count(1)[0](v)


# Recipe keys every preset has, with the value a preset's recipe that does not name them gets.
SCHEDULE_DEFAULTS = {"decay_fraction": 1.0}   # the cosine over every step after the warm-up
# How the JAX step is compiled on CPU (`jax_models.xla_flags.train_compiler_options`); not a
# hyperparameter: the same run either way, to rounding.
COMPILE_DEFAULTS = {"cpu_dot_fusion": False}

# The --recipe keys of the tasks: what each value must be (the preset's default gives its type).
RECIPE_RULES = {
    "steps": _count(1), "epochs": _count(1), "checkpoint_every": _count(0), "timesteps": _count(1),
    "ddim_steps": _count(0), "num_samples": _count(1), "max_length": _count(1), "num_beams": _count(1),
    "num_train": _count(1), "num_test": _count(1), "num_scenes": _count(1), "num_test_scenes": _count(1),
    "nonrelational_steps": _count(0), "cell": _count(1),
    "object_size": (lambda v: v is None or _count(1)[0](v), "null or a positive integer"),
    "questions_per_scene": (lambda v: v is None or _count(1)[0](v), "null or a positive integer"),
    "num_objects": (_objects, "a positive integer or a pair [lo, hi] of them"),
    "train_num_objects": (lambda v: v is None or _objects(v), "null (num_objects) or a positive integer or a pair [lo, hi] of them"),
    "decay_fraction": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                       "a number in (0, 1]"),
    "family_weights": (_family_weights, "null or a mapping of question families (shape, horizontal, vertical, "
                       "closest_shape, furthest_shape, count_same_shape) to weights >= 0, not all 0"),
    "ema_decay": _rate(False), "beta_start": _rate(True), "beta_end": _rate(True),
    "clip_denoised": (lambda v: isinstance(v, bool), "true or false"),
    "cpu_dot_fusion": (lambda v: isinstance(v, bool), "true or false"),
}


def check_recipe_overrides(overrides: dict):
    """Each --recipe value within what its key allows (`RECIPE_RULES`); one ValueError naming the
    key, the value and what is allowed."""
    for key, value in overrides.items():
        ok, want = RECIPE_RULES.get(key, (lambda v: True, ""))
        if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"--recipe {key}={value!r}: {key} must be {want or 'a finite value'}")

EXCLUSIVE = (("steps", "epochs"),)


def _option(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser):
    """The options of every `Config` field: the preset positional, a flag per setting, with the
    field's default, choices and help (defaults stay None here, so `config_from_args` can tell
    what was given)."""
    groups = {pair: parser.add_mutually_exclusive_group() for pair in EXCLUSIVE}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if f.name == "preset":
            parser.add_argument("preset", help=meta["help"])
            continue
        exclusive = next((g for g in EXCLUSIVE if f.name in g), None)
        target = groups[exclusive] if exclusive else parser
        kwargs = dict(dest=f.name, help=meta["help"])
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
            kwargs["default"] = f.default
        elif f.default_factory is dict:
            kwargs.update(action="append", default=[], metavar=meta["metavar"])
        else:
            base = {"int": int, "float": float}.get(str(f.type).split(" ")[0].split("|")[0].strip(), str)
            kwargs.update(type=base, default=f.default, choices=meta["choices"], metavar=meta["metavar"])
            if f.default is not None:
                kwargs["help"] = f"{meta['help']} (default: {f.default})"
        target.add_argument(_option(f), **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    """The `Config` of parsed options (`add_arguments`); --set and --recipe KEY=VALUE pairs become
    dicts (`twin_models.presets.parse_assignments`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    values["model_overrides"] = parse_assignments(values["model_overrides"], "--set")
    values["recipe_overrides"] = parse_assignments(values["recipe_overrides"], "--recipe")
    return Config(**values)


def check_config(config: Config):
    """Every setting that can be checked from the settings alone, before anything is built; one
    ValueError naming the setting, what it must be and what came."""
    def need(ok, flag, want, got):
        if not ok:
            raise ValueError(f"{flag} must be {want}, not {got!r}")

    for f in dataclasses.fields(Config):
        choices = f.metadata["choices"]
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{_option(f)} must be one of {', '.join(choices)}, not {value!r}")
    if config.backend == "torch" and config.parallel != "jit":
        raise ValueError(f"--parallel {config.parallel} is for --backend jax")
    if config.fsdp and config.parallel != "mesh":
        raise ValueError("--fsdp shards over a mesh: pass --parallel mesh")
    for a, b in EXCLUSIVE:
        if getattr(config, a) is not None and getattr(config, b) is not None:
            raise ValueError(f"give --{a} or --{b}, not both")
    if config.tensorboard:
        from train.curves import check_tensorboard
        check_tensorboard()
    need(config.log_every >= 1, "--log-every", "at least 1", config.log_every)
    need(math.isfinite(config.stall_timeout) and config.stall_timeout >= 0, "--stall-timeout",
         "0 (off) or a positive number of seconds", config.stall_timeout)
    need(config.keep >= 1, "--keep", "at least 1 (checkpoints kept)", config.keep)
    need(config.max_bad_steps >= 1, "--max-bad-steps", "at least 1", config.max_bad_steps)
    need(config.checkpoint_every is None or config.checkpoint_every >= 0, "--checkpoint-every",
         "0 (only at the end) or more", config.checkpoint_every)
    need(config.eval_every is None or config.eval_every >= 0, "--eval-every", "0 (only at the end) or more",
         config.eval_every)
    need(config.steps is None or config.steps >= 1, "--steps", "at least 1", config.steps)
    need(config.epochs is None or config.epochs >= 1, "--epochs", "at least 1", config.epochs)
    need(config.batch_size is None or config.batch_size >= 1, "--batch-size", "positive", config.batch_size)
    need(config.lr is None or (math.isfinite(config.lr) and config.lr > 0), "--lr", "a positive finite number",
         config.lr)
    need(config.weight_decay is None or (math.isfinite(config.weight_decay) and config.weight_decay >= 0),
         "--weight-decay", "a finite number >= 0", config.weight_decay)
    need(config.warmup_steps is None or config.warmup_steps >= 0, "--warmup-steps", "0 or more", config.warmup_steps)
    need(config.label_smoothing is None or 0 <= config.label_smoothing < 1, "--label-smoothing", "in [0, 1)",
         config.label_smoothing)
    need(config.grad_clip is None or (math.isfinite(config.grad_clip) and config.grad_clip >= 0), "--grad-clip",
         "0 (off) or a positive number", config.grad_clip)
    need(config.dropout is None or 0 <= config.dropout < 1, "--dropout", "in [0, 1)", config.dropout)
    need(SEED_RANGE[0] <= config.seed <= SEED_RANGE[1], "--seed", f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
         config.seed)
    for flag, value in (("--steps", config.steps), ("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--warmup-steps", config.warmup_steps), ("--checkpoint-every", config.checkpoint_every),
                        ("--eval-every", config.eval_every), ("--log-every", config.log_every),
                        ("--keep", config.keep), ("--max-bad-steps", config.max_bad_steps)):
        need(value is None or value <= COUNT_LIMIT, flag, f"at most {COUNT_LIMIT}", value)
    check_recipe_overrides(config.recipe_overrides)
