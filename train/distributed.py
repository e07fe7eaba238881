"""Several processes (hosts) as one run, on JAX's own runtime (`jax.distributed`).

`start(coordinator, num_processes, process_id, timeout)` joins the run before any other JAX call;
every process then sees every device (`jax.devices()`), reads its own share of each global batch
(`train.data.batches`) and runs the same program. A peer that never arrives makes JAX abort the
process after its timeout (SIGABRT, no message); a watchdog here turns that into a one-line error
and exit status 3 within `timeout` seconds.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
from jax._src import distributed as jax_distributed

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
EXIT_NO_PEERS = 3


def from_env() -> dict:
    """The coordinator, process count and id from the environment variables `jax.distributed`
    reads (all three, or none)."""
    values = {k: os.environ.get(k) for k in ENV}
    if not any(values.values()):
        return {}
    missing = [k for k, v in values.items() if not v]
    if missing:
        raise ValueError(f"set all of {', '.join(ENV)} or none; missing {', '.join(missing)}")
    return dict(coordinator=values["JAX_COORDINATOR_ADDRESS"], num_processes=int(values["JAX_NUM_PROCESSES"]),
                process_id=int(values["JAX_PROCESS_ID"]))


def check(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """A ValueError naming what is wrong with the three settings (all given, or none)."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if not any(given):
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator wants HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}); got {process_id}")


def start(coordinator: str, num_processes: int, process_id: int, timeout: float = 120.0):
    """`jax.distributed.initialize`, bounded: when the peers have not all arrived after `timeout`
    seconds, print which and exit with status 3 (JAX itself would abort without a word)."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            print(f"error: process {process_id} of {num_processes} waited {timeout:.0f} s at the "
                  f"coordinator {coordinator} and not every process arrived; start all "
                  f"{num_processes} with the same --coordinator and --num-processes and ids 0..."
                  f"{num_processes - 1}", file=sys.stderr, flush=True)
            os._exit(EXIT_NO_PEERS)

    threading.Thread(target=watchdog, daemon=True).start()
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=int(timeout) + 30)
    done.set()


def barrier(name: str, timeout: float = 1800.0):
    """Wait until every process reaches `name` (the coordination service's barrier, no device
    collective). Before a run's first collective: XLA:CPU's gloo gives its peers 30 s to meet, and
    a process still compiling or restoring on a loaded machine can be later than that."""
    if jax.process_count() > 1 and jax_distributed.global_state.client is not None:
        jax_distributed.global_state.client.wait_at_barrier(name, int(timeout * 1000))


def is_primary() -> bool:
    """True on the process that writes logs, the summary and the export (process 0; the only
    process of a torch run or a single-process JAX run)."""
    return jax.process_index() == 0
