"""The torch adapter of the training loop (`train.loop`): the same recipe in eager PyTorch (the
JAX run's initial weights, data order, schedule, weight-decay mask, clipping and AdamW), so the two
frameworks can be trained side by side. The task (`train.tasks`) gives the loss, evaluation and
final report, as it does for JAX."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import torch

from bridge import flax_to_torch
from train import steps
from train.config import Run
from train.tasks import init_variables, torch_inputs


def torch_batch(batch: dict) -> dict:
    """A host batch as tensors (`train.tasks.torch_inputs`): image-shaped float arrays (images,
    noise) NHWC -> NCHW, integers (labels, tokens, timesteps) int64."""
    return dict(zip(batch, torch_inputs(list(batch.values()))))


class TorchTrainer:
    """AdamW with the optax recipe of `train.steps`: rate from `schedule(step)`, decay only on
    the parameters in `decay`, the global gradient norm clipped as optax does; the loss and what
    follows each update come from the task's `torch_training` role, and the modules it keeps
    beside the model (an EMA, say) are the trainer's `extra` state, checkpointed with the rest.
    `optimizer` replaces AdamW (tests use SGD)."""

    def __init__(self, model: torch.nn.Module, task, recipe: dict, schedule, decay: set[str],
                 precision: str = "fp32", optimizer: torch.optim.Optimizer | None = None):
        self.model, self.role, self.recipe, self.schedule = model, task.torch_training, recipe, schedule
        self.grad_clip = recipe.get("grad_clip")
        self.precision = precision
        named = list(model.named_parameters())
        unknown = decay - {n for n, _ in named}
        if unknown:
            raise ValueError(f"weight-decay mask names unknown parameters: {sorted(unknown)}")
        self.names = [n for n, _ in named]
        wd = recipe["weight_decay"]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = optimizer or torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=float(schedule(0)), betas=(0.9, 0.999),
            eps=1e-8)
        self.set_lr = optimizer is None
        self.step = 0
        self.extra = self.role.extra_state(model)

    def autocast(self):
        if self.precision == "bf16":
            device = next(self.model.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> dict:
        """One update on a host batch (numpy, NHWC images) from `task.batch`."""
        return self.update(torch_batch(batch))

    def update(self, batch: dict) -> dict:
        """One update on a batch of tensors (NCHW images), already on the model's device."""
        lr = float(self.schedule(self.step))
        if self.set_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        with self.autocast():
            loss, metrics = self.role.loss(self.model, batch, self.recipe)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        zero_unused_grads(self.model)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            # as the JAX step: nothing changes (weights, moments, step count, moving averages)
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()},
                    "grad_norm": norm.item(), "nonfinite": 1, "lr": lr}
        if self.grad_clip and norm >= self.grad_clip:
            for g in grads:
                g.div_(norm).mul_(self.grad_clip)
        self.optimizer.step()
        metrics = {**metrics, **(self.role.after_step(self) or {})}
        self.step += 1
        return {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()},
                "grad_norm": norm.item(), "nonfinite": 0, "lr": lr}

    # Checkpoint trees: numpy only, parameters and moments listed in named_parameters order.
    def state_tree(self) -> dict:
        by_param = self.optimizer.state
        params = dict(self.model.named_parameters())
        moments = {k: [by_param[params[n]][k].numpy().copy() if params[n] in by_param
                       else np.zeros(tuple(params[n].shape), np.float32) for n in self.names]
                   for k in ("exp_avg", "exp_avg_sq")}
        return {"step": np.asarray(self.step, np.int64),
                "model": [v.detach().numpy().copy() for v in self.model.state_dict().values()],
                "optimizer": moments,
                "torch_rng": torch.get_rng_state().numpy().copy(),
                **{name: [p.detach().numpy().copy() for p in module.parameters()]
                   for name, module in self.extra.items()}}

    def load_state_tree(self, tree: dict):
        keys = list(self.model.state_dict())
        self.model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                    for k, v in zip(keys, tree["model"])}, strict=True)
        self.step = int(tree["step"])
        params = dict(self.model.named_parameters())
        for i, n in enumerate(self.names):
            self.optimizer.state[params[n]] = {
                "step": torch.tensor(float(self.step)),
                "exp_avg": torch.from_numpy(np.array(tree["optimizer"]["exp_avg"][i])),
                "exp_avg_sq": torch.from_numpy(np.array(tree["optimizer"]["exp_avg_sq"][i]))}
        torch.set_rng_state(torch.from_numpy(np.array(tree["torch_rng"], np.uint8)))
        with torch.no_grad():
            for name, module in self.extra.items():
                for p, v in zip(module.parameters(), tree[name]):
                    p.copy_(torch.from_numpy(np.asarray(v)))


def zero_unused_grads(model: torch.nn.Module):
    """A weight the forward did not use gets a zero gradient, as in JAX, so that AdamW decays it
    (and keeps its moments) in both backends."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def decayed_names(params) -> set[str]:
    """The torch names of the parameters `steps.decay_mask` decays (weight matrices)."""
    mask_values = jax.tree_util.tree_map(lambda p, m: np.full(np.shape(p), float(m), np.float32),
                                         params, steps.decay_mask(params))
    return {k for k, v in flax_to_torch({"params": mask_values}).items() if v.all()}


def trainer_from_variables(task, preset, variables, recipe: dict, schedule, precision="fp32",
                           device="cpu") -> TorchTrainer:
    """The torch twin of `task`'s model holding the Flax `variables`, on `device`, and its
    trainer."""
    model = task.torch_training.model(preset)
    model.load_state_dict({k: torch.from_numpy(np.array(v))
                           for k, v in flax_to_torch(jax.device_get(variables)).items()},
                          strict=True)
    return TorchTrainer(model.to(device), task, recipe, schedule,
                        decayed_names(variables["params"]), precision)


def build(r: Run) -> TorchTrainer:
    """The torch twin of the task's model holding the JAX backend's initial weights, and its
    trainer."""
    _, variables, _ = init_variables(r.task, r.preset, r.config.seed)
    torch.manual_seed(r.config.seed)
    return trainer_from_variables(r.task, r.preset, variables, r.recipe, r.lr, r.config.precision)


class TorchBackend:
    """Eager PyTorch on the CPU (or the one device torch picks), one process."""

    parallel = "eager"
    devices = 1

    def __init__(self, r: Run):
        self.r, self.role = r, r.task.torch_training
        self.trainer = build(r)

    def info(self) -> dict:
        return {}

    def state_tree(self) -> dict:
        return self.trainer.state_tree()

    def load_state_tree(self, tree: dict) -> int:
        self.trainer.load_state_tree(tree)
        return self.trainer.step

    def step(self, batch: dict) -> dict:
        return self.trainer.train_step(batch)

    def read(self, metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "lr"}

    def evaluate(self) -> dict:
        return self.role.evaluate(self.trainer, self.r)

    def finish(self) -> dict:
        return self.role.finish(self.trainer, self.r)

    def export(self) -> dict:
        return self.role.export(self.trainer)
