"""Several processes (hosts) as one run, on JAX's own runtime (`jax.distributed`).

`start(coordinator, num_processes, process_id, timeout)` joins the run before any other JAX call;
every process then sees every device (`jax.devices()`), reads its own share of each global batch
(`train.data.batches`) and runs the same program. A peer that never arrives makes JAX abort the
process after its timeout (SIGABRT, no message); a watchdog here turns that into a one-line error
and exit status 3 within `timeout` seconds.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from typing import Callable

import jax
from jax._src import distributed as jax_distributed

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
EXIT_NO_PEERS = 3
PEER_TIMEOUT = 20   # seconds a peer may not answer before it is lost (`PeerMonitor`)
PEER_POLL = 1.0


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


def start(coordinator: str, num_processes: int, process_id: int, timeout: float = 120.0,
          on_lost: Callable[[str], None] | None = None):
    """`jax.distributed.initialize`, bounded: when the peers have not all arrived after `timeout`
    seconds, print which and exit with status 3 (JAX itself would abort without a word). Later,
    a peer (or coordinator) that stops answering calls `on_lost(message naming it)` (`PeerMonitor`)."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            print(f"error: process {process_id} of {num_processes} waited {timeout:.0f} s at the "
                  f"coordinator {coordinator} and not every process arrived; start all "
                  f"{num_processes} with the same --coordinator and --num-processes and ids 0..."
                  f"{num_processes - 1}", file=sys.stderr, flush=True)
            os._exit(EXIT_NO_PEERS)

    threading.Thread(target=watchdog, daemon=True).start()
    if process_id == 0:
        _start_service(coordinator, num_processes)
    _connect(coordinator, num_processes, process_id, timeout)
    done.set()
    if on_lost is not None:
        return PeerMonitor(jax_distributed.global_state.client, process_id, num_processes, on_lost).start()
    return None


def _start_service(coordinator: str, num_processes: int):
    """JAX's coordination service in a process of its own (`train.coordinator`), which outlives
    this one by `2 * PEER_TIMEOUT` so that the other processes learn of its end."""
    port = coordinator.rpartition(":")[2]
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
    service = subprocess.Popen(
        [sys.executable, "-m", "train.coordinator", "--bind", bind, "--num-processes", str(num_processes),
         "--heartbeat-timeout", str(2 * PEER_TIMEOUT), "--parent", str(os.getpid()), "--grace",
         str(2 * PEER_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = service.stdout.readline().strip()
    if line != "ready":
        print(f"error: {line or f'the coordination service on {bind} did not start'}", file=sys.stderr,
              flush=True)
        os._exit(EXIT_NO_PEERS)
    atexit.register(service.terminate)


def _connect(coordinator: str, num_processes: int, process_id: int, timeout: float):
    """What `jax.distributed.initialize` does for a process that does not host the service."""
    state = jax_distributed.global_state
    if state.client is not None:
        raise RuntimeError("the distributed runtime was already started in this process")
    state.coordinator_address, state.process_id, state.num_processes = coordinator, process_id, num_processes
    state.client = jax_distributed._jax.get_distributed_runtime_client(
        coordinator, process_id, init_timeout=int(timeout) + 30, use_compression=True,
        heartbeat_timeout=2 * PEER_TIMEOUT)
    state.client.connect()
    state.initialize_preemption_sync_manager()


class PeerMonitor:
    """Each process bumps a counter of its own in the coordination service's key-value store
    every `PEER_POLL` seconds and watches the others' counters: a peer whose counter has not moved
    for `PEER_TIMEOUT` seconds, or a coordinator that no longer answers, is lost, and
    `on_lost(message naming it)` is called. JAX's own heartbeat (twice as patient) would abort
    the process with a C++ stack trace instead."""

    def __init__(self, client, process_id: int, num_processes: int, on_lost: Callable[[str], None]):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.on_lost = on_lost

    def start(self) -> "PeerMonitor":
        self.closed = threading.Event()
        threading.Thread(target=self._watch, name="train-peers", daemon=True).start()
        return self

    def close(self):
        """This process is done: its peers stop watching it (it may now exit before them)."""
        self.closed.set()
        try:
            self.client.key_value_set(f"twin_models/done/{self.process_id}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may be gone already; nothing to tell
            pass

    def _watch(self):
        me = f"twin_models/alive/{self.process_id}"
        seen = {}   # peer -> (its counter, when it last moved, by this process's clock)
        while not self.closed.is_set():
            now = time.monotonic()
            try:
                self.client.key_value_increment(me, 1)
                for peer in range(self.num_processes):
                    if peer == self.process_id:
                        continue
                    try:
                        count = self.client.key_value_try_get(f"twin_models/alive/{peer}")
                    except Exception:   # not written yet: the peer is still starting
                        count = None
                    if peer not in seen or seen[peer][0] != count:
                        seen[peer] = (count, now)
                    elif now - seen[peer][1] > PEER_TIMEOUT and not self._done(peer):
                        self.on_lost(f"process {self.process_id} of {self.num_processes}: lost "
                                     f"process {peer}{' (the coordinator)' if peer == 0 else ''}: it "
                                     f"has not answered for {now - seen[peer][1]:.0f} s")
                        return
            except Exception as e:   # the coordination service itself is gone
                if self.closed.is_set():
                    return
                first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                self.on_lost(f"process {self.process_id} of {self.num_processes}: lost the "
                             f"coordinator (process 0) at {jax_distributed.global_state.coordinator_address}: {first}")
                return
            self.closed.wait(PEER_POLL)

    def _done(self, peer: int) -> bool:
        try:
            return self.client.key_value_try_get(f"twin_models/done/{peer}") == "1"
        except Exception:  # noqa: BLE001 - not set: the peer has not finished
            return False


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
