"""python -m train PRESET [options]: train any preset (classification, contrastive, diffusion,
captioning) with JAX (jit or pmap) or eager PyTorch."""

from __future__ import annotations

import argparse
import ast
import sys

# XLA:CPU aborts the process when a device waits 40 s in an all-reduce; fake CPU devices on a
# busy machine can lag that much behind each other under pmap. Wait longer (JAX has not started
# its backend here, so the flags still take effect).
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800",
                        "--xla_cpu_collective_timeout_seconds=1800")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a preset: ViT and Swin classify, CLIP learns from captions, DDPM "
                    "learns to denoise, the captioner learns to describe scenes. Defaults come from "
                    "the preset's recipe.")
    p.add_argument("preset", help="preset name, e.g. vit-digits")
    p.add_argument("--data", help="digits (default) | imagefolder:DIR | cifar10:DIR; captioning "
                   "presets: scenes (default) | coco:DIR")
    p.add_argument("--backend", choices=("jax", "torch"), default="jax")
    p.add_argument("--parallel", choices=("jit", "pmap", "mesh"), default="jit",
                   help="jax only: jit on one device, pmap over the local devices, or jit over a "
                        "mesh of every device (the batch split over it)")
    p.add_argument("--attention-impl", choices=("xla", "fused", "cudnn"), default="xla",
                   help="jax only: the attention kernel (cudnn: a GPU's fused kernel, sequences padded "
                        "to a multiple of 16)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --parallel mesh: shard parameters and optimizer state over the devices")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="total optimizer steps")
    g.add_argument("--epochs", type=int, help="epochs (whole global batches of the train set)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-clip", type=float, help="global gradient norm clip (0: off)")
    p.add_argument("--dropout", type=float, help="the model's dropout rate")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bfloat16 compute over float32 master weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="default: runs/PRESET")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints "
                   "(default: one epoch; 0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in WORKDIR")
    p.add_argument("--export", metavar="PATH",
                   help="write the final weights as a safetensors state_dict for torch_reference")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: epoch "
                   "for classification and CLIP, none for DDPM; 0: only at the end)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model constructor argument, e.g. --set depth=2")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="override another key of the preset's recipe, e.g. --recipe num_samples=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop (exit status 4) after this many steps in a row whose loss or gradients "
                        "are not finite; each is skipped, the weights untouched")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache (default: ~/.cache/twin-models/jax, or "
                        "$TWIN_MODELS_COMPILE_CACHE)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")
    g = p.add_argument_group("several processes (jax.distributed; or JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for all")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's id, 0 .. N-1")
    g.add_argument("--distributed-timeout", type=float, default=120.0,
                   help="seconds to wait for every process to arrive (then exit status 3)")
    return p.parse_args(argv)


def _overrides(pairs: list[str], flag: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _apply_xla_flags():
    """The flags the trainer is measured with, and patient CPU collectives."""
    from jax_models import xla_flags
    xla_flags.apply_cpu_flags()
    xla_flags.add_flags(CPU_COLLECTIVE_FLAGS)


def main(argv=None) -> int:
    args = parse_args(argv)
    _apply_xla_flags()
    from train import distributed
    try:
        peers = (dict(coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
                 if args.coordinator or args.num_processes or args.process_id is not None
                 else distributed.from_env())
        distributed.check(**{k: peers.get(k) for k in ("coordinator", "num_processes", "process_id")})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if peers:
        distributed.start(**peers, timeout=args.distributed_timeout)
    from jax_models import compile_cache
    cache = None if args.no_compile_cache else (args.compile_cache or compile_cache.default_dir())
    compile_cache.enable(cache)
    from train.config import Config
    from train.loop import run

    config = Config(
        preset=args.preset, data=args.data, backend=args.backend, parallel=args.parallel,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        label_smoothing=args.label_smoothing, grad_clip=args.grad_clip, dropout=args.dropout,
        seed=args.seed, workdir=args.workdir, checkpoint_every=args.checkpoint_every,
        keep=args.keep, resume=args.resume, export=args.export, log_every=args.log_every,
        eval_every=args.eval_every, model_overrides=_overrides(args.set, "--set"),
        recipe_overrides=_overrides(args.recipe, "--recipe"),
        progress=not args.no_progress, precision=args.precision, fsdp=args.fsdp,
        attention_impl=args.attention_impl, max_bad_steps=args.max_bad_steps)
    from train.checkpoint import CheckpointError
    from train.loop import ExportError, NonFiniteError
    try:
        s = run(config)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_primary():
        return 0
    _print_results(s)
    print(f"checkpoints: {s['checkpoint_dir']}")
    print(f"metrics:     {s['metrics']}")
    print(f"summary:     {s['workdir']}/summary.json")
    if s["export"]:
        print(f"exported:    {s['export']}")
    return 0


def _print_results(s: dict):
    from train.tasks import get_task

    for key in get_task(s["task"]).report:
        value = s.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        name = "test accuracy" if key == "eval_accuracy" else key
        print(f"{name} {value}" + (f" ({s['eval_examples']} images)" if "eval_examples" in s
                                    and key == "eval_accuracy" else ""))
    loss = s["final_loss"]
    rate = s["examples_per_second"]
    print(f"final train loss {loss if loss is None else round(loss, 4)}, {s['steps']} steps, "
          f"{'n/a' if rate is None else f'{rate:.0f}'} examples/s, {s['backend']} {s['parallel']} "
          f"{s['precision']} on {s['devices']} device(s), {s['wall_seconds']:.1f} s")
    for key in ("samples", "grid", "tokenizer"):
        if key in s:
            print(f"{key + ':':12s} {s[key]}")


if __name__ == "__main__":
    sys.exit(main())
