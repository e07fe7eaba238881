"""`python -m bridge verify --all`: every preset's forward, the gradient of every parameter and an
AdamW trajectory of both twins, written as a Markdown table, a JSON file and one loss-curve
picture per preset.

Each preset runs in one process, from the same weights in both frameworks (torch's initialisation
carried into Flax by the bridge, dropout off), with the losses and batches of its task's `parity`
role (`train.tasks.ParityCase`): the forward and its first diverging layer (`bridge.verify`), every
parameter's gradient in float32, `steps` AdamW steps at the recipe's rate and weight decay with
the loss of every step in float32, and the same steps in float64 for the final weights
(`bridge.parity.adamw_trajectories` says why).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time

import numpy as np

from .verify import REPORT_FORWARD_TOL, REPORT_GRAD_TOL, REPORT_LOSS_TOL, TRAJECTORY_TOL

# Full-size presets: `--full` adds them (the parity suite's `make test-all`), with batches of 2.
FULL_SIZE = {
    "vit-ti16": "ViT-Ti/16 at 224 (5.7M parameters)",
    "vit-s16": "ViT-S/16 at 224 (22M)",
    "vit-b16": "ViT-B/16 at 224 (86M)",
    "encoder-vit-b16": "the second source's ViT-B/16 at 224 (86M)",
    "swin-[tsb]": "Swin-T/S/B at 224 (28-88M)",
    "clip-b16": "CLIP ViT-B/16 (150M)",
    "ddpm-cifar10": "the source's U-Net 64-128-256-512 at 32x32x3 (~34M)",
}

def trajectory_lr(name: str, steps: int) -> float:
    """The constant learning rate of a `steps`-step parity trajectory: the recipe's peak rate, or,
    for a full-size preset whose recipe warms up over more steps than that, the rate its warm-up
    reaches at the trajectory's last step (peak x steps / warmup_steps; `vit-b16`: 3e-4 x 100 /
    10,000 = 3e-6), held from the first step.

    At their peak rates from step 0, on batches of 2 and without the warm-up, the large models'
    training amplifies float32 rounding step after step: `vit-b16` at 3e-4, its losses swinging
    from 5.7 to 9.1 (chance is ln 1000 = 6.9), had its float32 twins 1e-7 apart at step 10, 6e-6 at
    step 70 and 1.1e-4 at step 93, their float64 runs 1.5e-13; `clip-b16` at 5e-4 diverged (loss
    0.7 -> 5.7, in float64 too). Their recipes never run at those rates that early."""
    from twin_models.presets import get_preset

    train = get_preset(name).train
    warmup = train.get("warmup_steps", 0) or 0
    if full_size([name]) and warmup > steps:
        return train["lr"] * steps / warmup
    return train["lr"]


STEPS = 100
CONTROL_SEEDS = 4  # runs of each twin, every weight nudged 1 ulp, for a preset over the loss tolerance
CONTROL_SEEDS_FULL = 2  # at full size (a 100-step float32 run of ViT-B/16 takes 3-4 minutes a framework)


def full_size(names) -> list[str]:
    """The full-size presets among `names` (`FULL_SIZE`'s globs)."""
    return [n for n in names if any(fnmatch.fnmatch(n, glob) for glob in FULL_SIZE)]


def select(pattern: str | None = None, full: bool = False) -> list[str]:
    """The presets `--all` runs: the small ones (with `full`, every one), narrowed by globs
    (`pattern`: one or several, comma-separated)."""
    from twin_models.presets import PRESETS

    large = set(full_size(PRESETS))
    names = [n for n in PRESETS if full or n not in large]
    if pattern is not None:
        globs = pattern.split(",")
        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
    return names


@dataclasses.dataclass
class PresetResult:
    preset: str
    forward: float
    first_divergent: str | None       # the first layer over the forward tolerance
    gradient: float
    gradient_param: str               # the parameter with the worst gradient
    loss: float                       # worst |torch - flax| loss over the steps, over the largest loss
    loss_step: int                    # where it was worst (1-based)
    weights: float                    # worst final weight, float64
    loss_float64: float               # the worst loss difference of the float64 trajectories
    weights_param: str
    seconds: float
    steps: int
    lr: float
    batch_size: int
    losses_torch: list[float]
    losses_flax: list[float]
    tolerances: dict
    error: str | None = None          # what a preset that could not be measured raised
    loss_control: float | None = None  # over the loss tolerance: torch against itself 1 ulp apart (`rounding_control`)
    loss_control_flax: float | None = None  # and Flax against itself (`flax_rounding_control`)
    losses_torch_f64: list[float] | None = None   # the float64 trajectories' losses (the float32 runs' drift)
    losses_flax_f64: list[float] | None = None

    @classmethod
    def broken(cls, name: str, steps: int, error: BaseException, seconds: float) -> "PresetResult":
        nan = float("nan")
        return cls(name, nan, None, nan, "", nan, 0, nan, nan, "", seconds, steps, nan, 0, [], [], tolerances(),
                   f"{type(error).__name__}: {error}".splitlines()[0])

    @property
    def failures(self) -> list[str]:
        if self.error:
            return ["error"]
        t = self.tolerances
        checks = [("forward", self.forward), ("gradient", self.gradient), ("loss", self.loss),
                  ("weights", self.weights)]
        return [name for name, value in checks if not value <= t[name]]

    @property
    def ok(self) -> bool:
        return not self.failures

    def loss_differences(self) -> np.ndarray:
        """Per step: |torch - flax| over the largest torch loss (the tolerance's scale)."""
        t, f = np.asarray(self.losses_torch, np.float64), np.asarray(self.losses_flax, np.float64)
        return np.abs(t - f) / (np.max(np.abs(t)) or 1.0)

    def drift(self, framework: str) -> np.ndarray | None:
        """Per step: that framework's float32 loss against its own float64 loss, over the largest
        torch loss: how far float32 rounding alone carries each twin (None without float64 losses)."""
        f32, f64 = ((self.losses_torch, self.losses_torch_f64) if framework == "torch"
                    else (self.losses_flax, self.losses_flax_f64))
        if not f64:
            return None
        scale = np.max(np.abs(np.asarray(self.losses_torch, np.float64))) or 1.0
        return np.abs(np.asarray(f32, np.float64) - np.asarray(f64, np.float64)) / scale

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok, "failures": self.failures}


def tolerances() -> dict:
    return {"forward": REPORT_FORWARD_TOL, "gradient": REPORT_GRAD_TOL, "loss": REPORT_LOSS_TOL,
            "weights": TRAJECTORY_TOL}


def check_preset(name: str, steps: int = STEPS, batch_size: int | None = None, seed: int = 0,
                 log=None) -> PresetResult:
    """Forward, every parameter's gradient and a `steps`-step AdamW trajectory of one preset."""
    import jax
    import torch

    import torch_reference
    from train.tasks import get_task
    from twin_models.presets import get_preset, without_dropout

    from .parity import adamw_trajectories, flax_rounding_control, gradient_errors, rounding_control, worst_leaf
    from .verify import build_twins, compare_layers

    start = time.perf_counter()
    say = log or (lambda message: None)

    def log(message):
        say(f"[{time.perf_counter() - start:5.0f} s] {message}")

    large = bool(full_size([name]))
    batch_size = batch_size or (2 if large else 8)
    preset = without_dropout(get_preset(name))
    task = get_task(preset)
    torch_model, flax_model, variables, t_in, f_in = build_twins(preset, seed, batch_size=2 if large else 4)
    state_dict = {k: v.clone() for k, v in torch_model.state_dict().items()}

    def fresh():
        model = torch_reference.create_model(preset)
        model.load_state_dict(state_dict, strict=True)
        return model

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    if not large:   # a small twin gains nothing from more threads; on a busy CPU they wait for each other
        torch.set_num_threads(1)
    with jax.default_matmul_precision("highest"):
        try:
            forward = compare_layers(torch_model, flax_model, variables, t_in, f_in, REPORT_FORWARD_TOL)
            first = forward.first_divergent
            log(f"{name}: forward {forward.output.rel:.2e}" + (f", first over tolerance: {first.path}" if first else ""))
            losses = task.parity.losses(flax_model)
            (tb,), (fb,) = task.parity.batches(preset, 1, 2 if large else 4, seed=0)
            errs, _, _ = gradient_errors(fresh(), flax_model, variables, losses[0], losses[1], tb, fb)
            param = max(errs, key=errs.get)
            log(f"{name}: worst gradient {param} {errs[param]:.2e}")

            lr = trajectory_lr(name, steps)
            tbs, fbs = task.parity.batches(preset, steps, batch_size, seed=1)
            kwargs = dict(lr=lr, weight_decay=preset.train["weight_decay"])
            losses_t, losses_f, _, _ = adamw_trajectories(fresh(), flax_model, variables, losses[0],
                                                          losses[1], tbs, fbs, **kwargs)
            log(f"{name}: {steps} steps in float32, losses {losses_t[0]:.4f} -> {losses_t[-1]:.4f}")
            control = control_flax = None
            if np.max(np.abs(losses_t - losses_f)) > REPORT_LOSS_TOL * (np.max(np.abs(losses_t)) or 1.0):
                seeds = CONTROL_SEEDS_FULL if large else CONTROL_SEEDS
                control = rounding_control(fresh, losses[0], tbs, seeds=seeds, **kwargs)
                control_flax = flax_rounding_control(fresh, flax_model, f_in, losses[1], fbs, seeds=seeds, **kwargs)
                log(f"{name}: over the loss tolerance; each against itself, weights 1 ulp apart: "
                    f"torch {control:.2e}, Flax {control_flax:.2e}")
            l64_t, l64_f, w_t, w_f = adamw_trajectories(fresh(), flax_model, variables, losses[0], losses[1],
                                                tbs, fbs, float64=True, **kwargs)
            weights_param, weights = worst_leaf(w_t, w_f)
            log(f"{name}: {steps} steps in float64, worst final weight {weights_param} {weights:.2e}")
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            torch.set_num_threads(threads)
    result = PresetResult(
        preset=name, forward=forward.output.rel, first_divergent=first.path if first else None,
        gradient=errs[param], gradient_param=param, loss=0.0, loss_step=0, weights=weights,
        loss_float64=float(np.max(np.abs(l64_t - l64_f)) / (np.max(np.abs(l64_t)) or 1.0)),
        weights_param=weights_param, seconds=0.0, steps=steps, lr=lr, batch_size=batch_size,
        losses_torch=[float(x) for x in losses_t], losses_flax=[float(x) for x in losses_f],
        tolerances=tolerances(), loss_control=control, loss_control_flax=control_flax,
        losses_torch_f64=[float(x) for x in l64_t], losses_flax_f64=[float(x) for x in l64_f])
    diffs = result.loss_differences()
    result.loss, result.loss_step = float(np.max(diffs)), int(np.argmax(diffs)) + 1
    result.seconds = time.perf_counter() - start
    return result


def _e(x: float) -> str:
    return f"{x:.1e}" if np.isfinite(x) else "non-finite"


def markdown(results: list[PresetResult], header: str = "") -> str:
    """The table: preset, forward, worst gradient and its parameter, worst loss difference and its
    step, final weights, verdict, time."""
    t = tolerances()
    lines = [header, ""] if header else []
    lines += [f"Tolerances: forward {t['forward']:g}, gradient of each parameter {t['gradient']:g}, "
              f"losses {t['loss']:g} (relative to the largest loss), final weights in float64 {t['weights']:g}.",
              "",
              "| preset | forward | worst gradient (parameter) | worst loss difference (step) "
              "| final weights (f64) | verdict | time |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        named = r.first_divergent and "forward" in r.failures
        forward = _e(r.forward) + (f" (first over: `{r.first_divergent}`)" if named else "")
        verdict = "pass" if r.ok else "FAIL: " + (r.error or ", ".join(r.failures))
        if "loss" in r.failures and r.loss_control is not None:
            flax = "" if r.loss_control_flax is None else f", Flax {_e(r.loss_control_flax)}"
            drift = ""
            if r.losses_torch_f64 and r.losses_flax_f64:
                drift = (f"; float32 against its own float64: torch {_e(float(np.max(r.drift('torch'))))}, "
                         f"Flax {_e(float(np.max(r.drift('flax'))))}")
            verdict += (f" (in float64 {_e(r.loss_float64)}{drift}; each against itself, every weight 1 ulp "
                        f"apart: torch {_e(r.loss_control)}{flax})")
        lines.append(f"| `{r.preset}` | {forward} | {_e(r.gradient)} (`{r.gradient_param}`) "
                     f"| {_e(r.loss)} (step {r.loss_step} of {r.steps}) | {_e(r.weights)} | {verdict} "
                     f"| {r.seconds:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(result: PresetResult, path: str) -> str:
    """Both backends' losses overlaid, and their difference per step on a log axis below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(result.losses_torch) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    try:
        top.plot(steps, result.losses_torch, label="PyTorch", lw=2.2, color="tab:orange")
        top.plot(steps, result.losses_flax, label="JAX/Flax", lw=1.2, ls="--", color="tab:blue")
        top.set_ylabel("loss")
        top.set_title(f"{result.preset}: {result.steps} AdamW steps, lr {result.lr:g}, batch {result.batch_size}")
        top.legend()
        diffs = result.loss_differences()
        shown = diffs > 0
        bottom.semilogy(steps[shown], diffs[shown], ".-", ms=3, color="tab:purple", label="|torch - flax| / max loss")
        for framework, color in (("torch", "tab:orange"), ("flax", "tab:blue")):
            drift = result.drift(framework)
            if drift is not None and (drift > 0).any():
                bottom.semilogy(steps[drift > 0], drift[drift > 0], lw=0.8, alpha=0.7, color=color,
                                label=f"{'PyTorch' if framework == 'torch' else 'JAX/Flax'} float32 vs its float64")
        bottom.axhline(result.tolerances["loss"], color="tab:red", ls=":", label="tolerance")
        bottom.set_xlabel("step")
        bottom.set_ylabel("relative difference")
        bottom.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def earlier(out: str, steps: int) -> dict[str, PresetResult]:
    """The presets OUT/report.json holds that were measured with `steps` steps at the current
    `trajectory_lr`, the current tolerances and no error (what `--resume` keeps); {} without a
    readable report."""
    try:
        with open(os.path.join(out, "report.json")) as f:
            rows = json.load(f)["presets"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    fields = {f.name for f in dataclasses.fields(PresetResult)}
    optional = {"first_divergent", "error", "loss_control", "loss_control_flax", "losses_torch_f64",
                "losses_flax_f64"}   # None in the JSON is None; elsewhere not finite
    kept = {}
    for row in rows:
        try:
            r = PresetResult(**{k: float("nan") if v is None and k not in optional else v
                                for k, v in row.items() if k in fields})
        except TypeError:
            continue
        try:
            same_rate = r.lr == trajectory_lr(r.preset, steps)
        except KeyError:    # a preset no longer defined
            continue
        if r.steps == steps and r.error is None and r.tolerances == tolerances() and same_rate:
            kept[r.preset] = r
    return kept


def run_all(names: list[str], out: str, steps: int = STEPS, log=print, resume: bool = False) -> list[PresetResult]:
    """Every preset of `names`, in order: OUT/report.md, OUT/report.json, OUT/PRESET.png. The
    Markdown and JSON are rewritten after each preset, so a long run shows its progress; with
    `resume`, a preset OUT/report.json already holds (`earlier`) is kept, not run again."""
    os.makedirs(out, exist_ok=True)
    where = machine()
    start = time.perf_counter()
    done = earlier(out, steps) if resume else {}
    results = []
    for name in names:
        began = time.perf_counter()
        if name in done:
            log(f"{name}: kept from {out}/report.json ({done[name].seconds:.0f} s then)")
            results.append(done[name])
        else:
            try:
                results.append(check_preset(name, steps, log=log))
                plot(results[-1], os.path.join(out, f"{name}.png"))
            except Exception as e:   # noqa: BLE001 (one broken preset is a failure in the table; the others run)
                import traceback

                log(traceback.format_exc())
                results.append(PresetResult.broken(name, steps, e, time.perf_counter() - began))
        write(results, out, time.perf_counter() - start, where, kept=sum(r.preset in done for r in results))
    return results


def machine() -> str:
    """The CPU's model name (as `lscpu` gives it) and the number of cores."""
    import platform

    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def write(results: list[PresetResult], out: str, seconds: float, machine: str, kept: int = 0):
    """OUT/report.md and OUT/report.json (strict JSON: null where a value is not finite). `seconds`:
    this run's wall time; `kept`: how many presets came from an earlier run (`--resume`)."""
    resumed = (f" ({kept} kept from an earlier run; the presets' own times add up to "
               f"{sum(r.seconds for r in results):.0f} s)") if kept else ""
    header = (f"`python -m bridge verify --all`: {len(results)} presets, {results[0].steps if results else 0} "
              f"AdamW steps each, {seconds:.0f} s in all on {machine}{resumed}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(results, header))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(_finite({"seconds": seconds, "machine": machine, "tolerances": tolerances(),
                           "ok": all(r.ok for r in results), "presets": [r.as_json() for r in results]}),
                  f, indent=1, allow_nan=False)
