"""python -m train PRESET [options]: train any preset (classification, contrastive, diffusion,
captioning, VQA) with JAX (jit, pmap or a mesh) or eager PyTorch."""

from __future__ import annotations

import argparse
import math
import sys

from jax_models import compile_cache, xla_flags
from train.settings import add_arguments, check_config, config_from_args
from train.watchdog import Interrupted, StopSignals, peer_lost



def collective_flags(stall_timeout: float) -> tuple[str, ...]:
    """XLA:CPU aborts the process when a device waits 40 s in an all-reduce, and fake CPU devices
    on a busy machine can lag that much behind each other: wait as long as the stall watchdog
    lets a step run and a minute more, so that a real stall ends with the watchdog's message
    (10 minutes with the watchdog off)."""
    seconds = int(2 * stall_timeout + 60) if stall_timeout > 0 else 600
    return (f"--xla_cpu_collective_call_terminate_timeout_seconds={seconds}",
            f"--xla_cpu_collective_timeout_seconds={seconds}")


def parse_args(argv=None) -> argparse.Namespace:
    """The run's settings (every field of `train.config.Config`, generated from it) and the
    process's own: compile cache and the several-process runtime."""
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a preset: ViT and Swin classify, CLIP learns from captions, DDPM "
                    "learns to denoise, the captioner learns to describe scenes, the VQA models "
                    "answer questions about scenes. Defaults come from the preset's recipe.")
    add_arguments(p)
    compile_cache.add_arguments(p)
    g = p.add_argument_group("several processes (jax.distributed; or JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for all")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's id, 0 .. N-1")
    g.add_argument("--distributed-timeout", type=float, default=120.0,
                   help="seconds to wait for every process to arrive (then exit status 3)")
    return p.parse_args(argv)


def _apply_xla_flags(stall_timeout: float):
    """The flags the trainer is measured with (`jax_models.xla_flags`), and patient CPU
    collectives; before JAX starts its backend (importing jax does not start it)."""
    from jax_models import xla_flags

    xla_flags.apply_cpu_flags()
    xla_flags.add_flags(collective_flags(stall_timeout))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:   # python -m train plot RUN [RUN ...]
        from train.curves import main as plot
        return plot(argv[1:])
    args = parse_args(argv)
    stop = StopSignals()
    try:
        return _main(args, stop)
    finally:
        stop.close()


def _main(args: argparse.Namespace, stop: StopSignals) -> int:
    # jax, torch and the tasks after argparse and the settings' checks: --help and a mistyped
    # flag answer at once
    from train import distributed
    try:
        config = config_from_args(args)
        check_config(config)
        compile_cache.dir_from_args(args)
        xla_flags.check_env()
        if not (math.isfinite(args.distributed_timeout) and args.distributed_timeout > 0):
            raise ValueError(f"--distributed-timeout must be a positive number of seconds, not "
                             f"{args.distributed_timeout}")
        peers = (dict(coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
                 if (args.coordinator, args.num_processes, args.process_id) != (None, None, None)
                 else distributed.from_env())
        distributed.check(**{k: peers.get(k) for k in ("coordinator", "num_processes", "process_id")})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _apply_xla_flags(config.stall_timeout)
    monitor = None
    if peers:
        monitor = distributed.start(**peers, timeout=args.distributed_timeout,
                                    on_lost=lambda message: peer_lost(message, stop.checkpoints))
    compile_cache.enable_from_args(args)
    try:
        return _train(config, stop)
    finally:
        if monitor is not None:
            monitor.close()


def _train(config, stop: StopSignals) -> int:
    from train import distributed
    from train.checkpoint import CheckpointError
    from train.loop import ExportError, NonFiniteError, run

    try:
        s = run(config, stop)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
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
