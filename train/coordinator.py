"""python -m train.coordinator: JAX's coordination service in a small process of its own.

Process 0 of a several-process run starts it (`train.distributed.start`) instead of hosting the
service itself, so that killing process 0 leaves the service up: the survivors then see process 0
fall silent and end with a one-line error, where JAX's client would abort them at once with a C++
stack trace. It exits `--grace` seconds after the process that started it is gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.coordinator", description=__doc__.split("\n\n")[0])
    p.add_argument("--bind", required=True, help="[::]:PORT or HOST:PORT")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--heartbeat-timeout", type=int, required=True)
    p.add_argument("--parent", type=int, required=True, help="the pid whose end starts the grace period")
    p.add_argument("--grace", type=float, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C meant for the trainers
    from jax._src.lib import _jax

    try:
        service = _jax.get_distributed_runtime_service(args.bind, args.num_processes,
                                                       heartbeat_timeout=args.heartbeat_timeout)
    except Exception as e:  # noqa: BLE001 - the service's own error, passed on in one line
        print(f"could not start the coordination service on {args.bind}: {e}", flush=True)
        return 3
    print("ready", flush=True)
    while _alive(args.parent):
        time.sleep(0.5)
    time.sleep(args.grace)
    os._exit(0)   # without waiting on clients that are gone: the service's shutdown would


def _alive(pid: int) -> bool:
    if os.getppid() != pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
