"""What the suite runs, in one place: the presets (read from the registry, `presets.PRESETS`), what
leaves the default run and why (named globs or names, each with its reason), and the tolerances.
Test modules read these lists; none imports another (timm's pattern: parametrize over the
registry, exclude by name with a reason).

A new preset is tested by its row in `twin_models/presets.py`; a full-size one also gets a glob in
`FULL_SIZE`. A check moved to `make test-all` (marker `slow`) names where the default run still
holds its claim.
"""

from __future__ import annotations

import pytest

from bridge.report import FULL_SIZE, trajectory_lr  # noqa: F401  (one definition, shared with verify --all)
from bridge.verify import FORWARD_TOL, GRAD_TOL, TRAJECTORY_TOL  # noqa: F401  (one definition)
from train.tasks import TASKS
from twin_models.presets import PRESETS, matching

# bfloat16 params and inputs against float32 (test_fast_paths.py).
BF16_TOL = 3e-2

# --- presets --------------------------------------------------------------------------------------

# Full-size presets (`bridge.report.FULL_SIZE`, {glob: reason}): run by `make test-all` (marker `slow`),
# with batches of 2.
SLOW = matching(PRESETS, FULL_SIZE)            # {full-size preset: reason}
SMALL = [name for name in PRESETS if name not in SLOW]


def _first_small(task: str) -> str:
    for name in SMALL:
        if PRESETS[name].task == task:
            return name
    raise ValueError(f"task {task!r} has presets but no small one: the default run cannot train it")


def first_small_of_each_model(family: str) -> list[str]:
    """The first small preset of each model class of `family` (vit: VisionTransformer, EncoderViT)."""
    first = {}
    for name in SMALL:
        if PRESETS[name].family == family:
            first.setdefault(PRESETS[name].model, name)
    return list(first.values())


# The first small preset of each task that has presets (the tasks' cases of the trainer, pmap and
# fail-safe tests).
TASK_PRESETS = {task: _first_small(task) for task in sorted(TASKS)
                if any(p.task == task for p in PRESETS.values())}

# --- checks of a small preset that run in `make test-all` only -------------------------------------

# test_fast_paths.py's checks: fused attention's forward and gradients, and bfloat16.
FAST_PATH_CHECKS = ("fused-forward", "fused-gradients", "bfloat16")
CHECKS = ("trajectory", *FAST_PATH_CHECKS)     # what `preset_cases(check)` takes

# (preset, check): reason. Each names where the default run still holds the same claim.
SLOW_CHECKS = {
    ("caption-scenes", "trajectory"): "both 20-step trajectories of the 5-block captioner; "
                                      "test_captioning.py holds the family's, float32 and float64, on its small twins",
    ("caption-scenes", "bfloat16"): "eager bf16 init, forward and gradient of both attention kernels; "
                                    "the fused kernel's forward stays in the default run",
    ("caption-scenes", "fused-gradients"): "every gradient leaf through the fused kernel; its forward, and "
                                           "every gradient leaf through the default kernel, stay in the default run",
    ("vqa-scenes", "trajectory"): "ViT, text tower and fusion (50 s a precision at load 12); test_fusion's "
                                  "CrossModalAttention trajectory runs by default",
    ("mmt-vqa-scenes", "trajectory"): "4 layers (45 s a precision at load 12); test_multimodal's 2-layer "
                                      "float64 trajectory runs by default",
    **{("vqa-scenes", check): "its attention is layers.attend and MultiheadAttention, as the ViT's and CLIP's, "
                              "whose cases run (a key padding mask reaches the fused kernel only here); "
                              "65-170 s a case at load 10" for check in FAST_PATH_CHECKS},
    **{("mmt-vqa-scenes", check): "nn.MultiheadAttention's twin, as encoder-vit-digits' (whose cases run); "
                                  "30-45 s a case" for check in FAST_PATH_CHECKS},
    **{(name, "bfloat16"): "the same attention, MLP, LayerNorm and patch embedding in bfloat16 as vit-digits' "
                           "case, which runs by default (with ddpm-digits' convolutions and GroupNorm, and "
                           "swin-digits' windows); 20-31 s a case"
       for name in ("vit-tiny-digits", "encoder-vit-digits", "clip-digits")},
}


def preset_cases(check: str | None = None, names=None):
    """pytest params over `names` (default: every preset), id the name; `slow` where full-size or
    named in `SLOW_CHECKS` for `check` (one of `CHECKS`)."""
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; known: {', '.join(CHECKS)}")
    return [pytest.param(name, id=name,
                         marks=[pytest.mark.slow] if name in SLOW or (name, check) in SLOW_CHECKS else [])
            for name in (PRESETS if names is None else names)]


def small_cases(check: str | None = None):
    """`preset_cases` over the small presets only."""
    return preset_cases(check, SMALL)


# --- test_presets.py ------------------------------------------------------------------------------

# trajectory_lr (`bridge.report`): a full-size trajectory steps at the rate its recipe's warm-up
# reaches by its last step, where the peak rate from step 0 makes the model diverge.

# ReLU feed-forward at full size: float32 rounding puts some pre-activations on opposite sides of
# the kink in the two frameworks; each flips a unit's derivative, so the float32 gradient and
# trajectory checks are xfail only when such flips exist. float64 (no ties) holds the tolerances.
RELU_TIES = matching(PRESETS, {"encoder-vit-b16": "2x197x3072 ReLU pre-activations per layer"})

# `verify --all`'s 100 float32 steps (test_report.py): ReLU ties part the two float32 trajectories
# after step 52 (5 pre-activations of opposite sign at steps 51-52, the loss gap then 10x every 4
# steps to 4.8e-4); the float64 losses of the same run hold the tolerance (2.9e-16 apart).
LONG_RUN_RELU_TIES = {"encoder-vit-digits": "ReLU ties at steps 51-52 part the float32 runs (docs/parity.md)"}

# --- the tasks' cases (test_parallel.py, test_fail_safe.py) ---------------------------------------

# Tasks whose cases in test_parallel and test_fail_safe run in `make test-all` only (the test-time
# budget), with the reason; a task's claim stays in the default run through a task with the same step.
SLOW_TASKS = {"vqa": "VQAModel's three towers compile for 1-4 min under pmap at load 10; its step "
                     "is classification's (gradient_step around a cross-entropy), whose cases run"}

# Mesh checks of a task that run in `make test-all` only, with the reason.
SLOW_MESH = {
    "captioning": "its step has no code of its own under a mesh (it runs as written for one device: no "
                  "axis name); its pmap step, whose loss divides by the global token count, stays in the "
                  "default run, as do the other tasks' mesh and FSDP steps",
}


def task_cases(slow=SLOW_TASKS):
    """pytest params over TASK_PRESETS (id: the task), `slow` for the tasks in `slow`."""
    return [pytest.param(name, id=task, marks=[pytest.mark.slow] if task in slow else [])
            for task, name in TASK_PRESETS.items()]


def mesh_cases():
    """`task_cases`, `slow` also for SLOW_MESH."""
    return task_cases({**SLOW_TASKS, **SLOW_MESH})


# --- the trainer (test_trainer.py) ----------------------------------------------------------------

# Smaller twins of the small presets, by family, and a shorter finish or less data, by task.
SHRINK = {"vit": dict(depth=1, embed_dim=16, num_heads=2), "clip": dict(vision_layers=1, text_layers=1),
          "swin": dict(depths=(1, 1)), "ddpm": dict(features=(8, 16), time_emb_dim=16, num_res_blocks=1),
          "captioning": dict(vision_layers=1, layers=1),
          "fusion": dict(vision_layers=1, fusion_layers=1), "multimodal": dict(num_layers=1)}
SHORT_FINISH = {"diffusion": dict(num_samples=4, ddim_steps=2), "captioning": dict(num_train=64, num_test=8),
                "vqa": dict(num_scenes=4, num_test_scenes=1)}


def trainer_cases():
    """The small presets that are not their task's TASK_PRESETS case (which also exports and
    resumes): with those, every small preset trains through the trainer in both backends."""
    return [pytest.param(name, id=name) for name in SMALL if name not in TASK_PRESETS.values()]
