"""The same recipe in eager PyTorch: the JAX run's initial weights, data order, schedule,
weight-decay mask, clipping and AdamW, so the two frameworks can be trained side by side."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from train import data as data_lib
from train import steps
from train.checkpoint import CheckpointError
from train.train import MetricsLog, Run, Throughput, export_weights, summary

EVAL_BATCH = 512


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class TorchTrainer:
    """AdamW with the optax recipe of `train.steps`: rate from `schedule(step)`, decay only on
    the parameters in `decay`, the global gradient norm clipped as optax does."""

    def __init__(self, model: torch.nn.Module, schedule, weight_decay: float,
                 grad_clip: float | None, label_smoothing: float, decay: set[str]):
        self.model, self.schedule = model, schedule
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        named = list(model.named_parameters())
        unknown = decay - {n for n, _ in named}
        if unknown:
            raise ValueError(f"weight-decay mask names unknown parameters: {sorted(unknown)}")
        self.names = [n for n, _ in named]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]],
                                           lr=float(schedule(0)), betas=(0.9, 0.999), eps=1e-8)
        self.step = 0

    def train_step(self, batch: dict) -> dict:
        """One update on batch = {'image': (B, H, W, C) numpy, 'label': (B,)}."""
        lr = float(self.schedule(self.step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        logits = self.model(to_nchw(batch["image"]))
        labels = torch.from_numpy(np.asarray(batch["label"], np.int64))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
        if self.grad_clip and norm >= self.grad_clip:
            for g in grads:
                g.div_(norm).mul_(self.grad_clip)
        self.optimizer.step()
        self.step += 1
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item(), "grad_norm": norm.item(),
                "lr": lr}

    @torch.no_grad()
    def evaluate(self, dataset: data_lib.ArrayDataset) -> dict:
        self.model.eval()
        loss_sum, correct = 0.0, 0.0
        for start in range(0, len(dataset), EVAL_BATCH):
            x = to_nchw(dataset.images[start:start + EVAL_BATCH])
            y = torch.from_numpy(dataset.labels[start:start + EVAL_BATCH].astype(np.int64))
            logits = self.model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        n = max(len(dataset), 1)
        return {"loss": loss_sum / n, "accuracy": correct / n, "count": len(dataset)}

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
                "torch_rng": torch.get_rng_state().numpy().copy()}

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

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.model.state_dict().items()}


def build(r: Run) -> TorchTrainer:
    """The torch twin of `r.preset` holding the JAX backend's initial weights, and its trainer."""
    import jax
    import torch_reference
    from bridge import flax_to_torch

    from train.jax_backend import init_variables

    _, variables, _ = init_variables(r)
    model = torch_reference.create_model(r.preset)
    model.load_state_dict({k: torch.from_numpy(np.array(v))
                           for k, v in flax_to_torch(jax.device_get(variables)).items()},
                          strict=True)
    mask = steps.decay_mask(variables["params"])
    mask_values = jax.tree_util.tree_map(lambda p, m: np.full(np.shape(p), float(m), np.float32),
                                         variables["params"], mask)
    decay = {k for k, v in flax_to_torch({"params": mask_values}).items() if v.all()}
    schedule = steps.warmup_cosine(r.recipe["lr"], r.recipe["warmup_steps"], r.total_steps)
    torch.manual_seed(r.config.seed)
    return TorchTrainer(model, schedule, r.recipe["weight_decay"], r.recipe["grad_clip"],
                        r.recipe["label_smoothing"], decay)


def train(r: Run) -> dict:
    from train.jax_backend import check_fresh, open_checkpoints

    cfg = r.config
    t_start = time.perf_counter()
    trainer = build(r)
    ckpt = open_checkpoints(r)
    start_step = 0
    if cfg.resume:
        tree, meta = ckpt.restore(trainer.state_tree(), r.record())
        trainer.load_state_tree(tree)
        start_step = trainer.step
        if meta.get("position") != r.position(start_step):
            raise CheckpointError(f"checkpoint at step {start_step} records data position "
                                  f"{meta.get('position')}, expected {r.position(start_step)}")
    else:
        check_fresh(r, ckpt)
    eval_every = cfg.eval_every or r.steps_per_epoch

    def save(step, force=False):
        if force or (ckpt.every and step % ckpt.every == 0):
            ckpt.save(step, trainer.state_tree(), {**r.record(), "position": r.position(step)},
                      force=True)

    log = MetricsLog(r.workdir, r.total_steps, start_step, cfg.progress)
    speed = Throughput()
    step, metrics, last_eval = start_step, None, None
    try:
        for step, batch in r.batches_from(start_step):
            metrics = trainer.train_step(batch)
            speed.tick(r.recipe["batch_size"])
            done = step + 1
            if done % cfg.log_every == 0 or done == r.total_steps:
                log.write({"step": done, "epoch": done / r.steps_per_epoch, **metrics,
                           "examples_per_second": speed.window_rate()})
            if done % eval_every == 0 and done != r.total_steps:
                last_eval = trainer.evaluate(r.test_data)
                log.write({"step": done, "eval_loss": last_eval["loss"],
                           "eval_accuracy": last_eval["accuracy"]})
            save(done)
            step = done
        last_eval = trainer.evaluate(r.test_data)
        log.write({"step": step, "eval_loss": last_eval["loss"],
                   "eval_accuracy": last_eval["accuracy"]})
        save(step, force=True)
    finally:
        ckpt.close()
        log.close(step)

    export = None
    if cfg.export:
        export = export_weights(cfg.export, trainer.state_dict_numpy())
    return summary(
        r, final_loss=metrics["loss"] if metrics else None,
        final_accuracy=metrics["accuracy"] if metrics else None, eval_metrics=last_eval,
        step=step, throughput=speed.rate(), devices=1, parallel="eager",
        wall=time.perf_counter() - t_start, checkpoint_dir=ckpt.directory, export=export,
        start_step=start_step)
