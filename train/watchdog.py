"""A run either makes progress or ends with one line, an exit status and its last good checkpoint.

`Watchdog` ends a run in which no step has completed for far longer than the run's own steps
take: it writes every thread's stack (Python's, and the native ones through gdb when it is
installed) to WORKDIR/stall-stacks[-pN].txt, prints one `error:` line and exits with status 6.
`StopSignals` turns Ctrl-C (SIGINT) and SIGTERM into a stop at the end of the current step, with
a checkpoint there; a second signal stops at once. `peer_lost` is the one-line end of a run whose
peer process was lost (status 7). The statuses of `python -m train`:

    0 done, 2 bad settings or data, 3 peers never arrived, 4 non-finite loss, 5 export failed,
    6 stalled (watchdog), 7 a peer process was lost, 130 SIGINT, 143 SIGTERM
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings

EXIT_STALL = 6
EXIT_PEER_LOST = 7
STEP_FACTOR = 50      # a step this many times slower than the run's median is a stall
FIRST_FACTOR = 4      # the first compile, evaluation or finish may take this many stall timeouts
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def last_checkpoint(directory: str | None) -> str | None:
    """The newest finished checkpoint folder under `directory` (orbax renames a save's temporary
    folder to the bare step number only once it is complete)."""
    if not directory or not os.path.isdir(directory):
        return None
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    return os.path.join(directory, str(max(steps))) if steps else None


def where_to_resume(directory: str | None) -> str:
    """The sentence an `error:` line ends with: where the last checkpoint is, or that none is."""
    latest = last_checkpoint(directory)
    if latest is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {latest} (--resume continues from it)"


def dump_stacks(path: str, native: bool = True) -> str:
    """Every thread's Python stack, then (with gdb) every native thread's, into `path`."""
    with open(path, "w") as f:
        f.write(f"# python -m train, process {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.write("# Python threads\n")
        f.flush()
        faulthandler.dump_traceback(f, all_threads=True)
        if native and shutil.which("gdb"):
            f.write("\n# native threads (gdb)\n")
            f.flush()
            try:
                with warnings.catch_warnings():   # JAX's warning about fork: gdb is exec'd at once
                    warnings.simplefilter("ignore", RuntimeWarning)
                    subprocess.run(["gdb", "-p", str(os.getpid()), "-batch", "-nx", "-ex",
                                    "thread apply all bt"], stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                f.write(f"gdb failed: {e}\n")
    return path


def _exit(message: str, status: int):
    """One `error:` line, then leave at once: the main thread may be blocked for good."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(status)


class Watchdog:
    """Watches that steps complete. A step may take `STEP_FACTOR` times the median of the run's
    steps so far, and never less than `timeout` seconds; a phase (compile, evaluate, save, finish,
    export) may take three times its longest earlier run, or `FIRST_FACTOR * timeout` the first
    time. `timeout` 0 turns it off."""

    def __init__(self, timeout: float, workdir: str, checkpoints: str | None = None, process: int = 0,
                 processes: int = 1, poll: float | None = None):
        self.timeout, self.workdir, self.checkpoints = timeout, workdir, checkpoints
        self.process, self.processes = process, processes
        self.poll = poll if poll is not None else min(5.0, max(timeout / 10, 0.05))
        self.step_times: list[float] = []
        self.longest: dict[str, float] = {}
        self.current = ("compile", 0, time.monotonic())   # (phase, step, since)
        self.stepped = False   # until a step completes, the next one compiles
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = None

    def start(self) -> "Watchdog":
        if self.timeout > 0:
            self.thread = threading.Thread(target=self._watch, name="train-watchdog", daemon=True)
            self.thread.start()
        return self

    def stop(self):
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def step_done(self, step: int):
        """The step at index `step` completed (`step + 1` steps done); the next one starts now."""
        now = time.monotonic()
        with self.lock:
            phase, _, since = self.current
            if phase == "step":
                self.step_times = (self.step_times + [now - since])[-200:]
            else:
                self.longest[phase] = max(self.longest.get(phase, 0.0), now - since)
            self.current = ("step", step + 1, now)
            self.stepped = True

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        """Work other than a step (evaluate, save, finish, export) after `step` steps."""
        with self.lock:
            self.current = (name, step, time.monotonic())
        try:
            yield
        finally:
            now = time.monotonic()
            with self.lock:
                since = self.current[2]
                self.longest[name] = max(self.longest.get(name, 0.0), now - since)
                self.current = ("step" if self.stepped else "compile", step, now)

    def limit(self, phase: str) -> float:
        if phase == "step" and self.step_times:
            return max(self.timeout, STEP_FACTOR * statistics.median(self.step_times))
        if phase in self.longest:
            return max(self.timeout, 3 * self.longest[phase])
        return FIRST_FACTOR * self.timeout if phase != "save" else self.timeout

    def _watch(self):
        while not self.done.wait(self.poll):
            with self.lock:
                phase, step, since = self.current
                waited, limit = time.monotonic() - since, self.limit(phase)
            if waited > limit:
                self._stalled(phase, step, waited)

    def _stalled(self, phase: str, step: int, waited: float):
        name = "stall-stacks.txt" if self.processes == 1 else f"stall-stacks-p{self.process}.txt"
        path = os.path.join(self.workdir, name)
        try:
            dump_stacks(path)
        except OSError as e:
            path = f"(not written: {e})"
        what = f"step {step + 1}" if phase in ("step", "compile") else f"{phase} at step {step}"
        median = (f", {statistics.median(self.step_times):.2g} s per step before" if self.step_times else "")
        who = f"process {self.process}: " if self.processes > 1 else ""
        _exit(f"{who}stalled: {what} made no progress for {waited:.0f} s (--stall-timeout "
              f"{self.timeout:g}{median}); {where_to_resume(self.checkpoints)}; every thread's stack "
              f"is in {path}", EXIT_STALL)


class Interrupted(Exception):
    """The run stopped at a signal, after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, checkpoints: str | None):
        super().__init__(signum, step, checkpoints)
        self.signum, self.step, self.checkpoints = signum, step, checkpoints
        self.status = 128 + signum

    def __str__(self):   # read when printed: the checkpoint's save has finished by then
        return (f"{signal.Signals(self.signum).name} at step {self.step}: stopped after saving a "
                f"checkpoint; {where_to_resume(self.checkpoints)}")


class StopSignals:
    """SIGINT and SIGTERM received by a thread of their own (`sigwait`), so they are seen even
    while the main thread waits in XLA. The first asks the loop to stop after the current step
    and save; the second ends the process at once (status 128 + signal) with the last checkpoint
    named. Blocks both signals in the calling thread (and the threads it starts) until `close`."""

    def __init__(self):
        self.received: int | None = None
        self.checkpoints: str | None = None
        self.closing = threading.Event()
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        # a thread started before this one may still take the signal: the same answer there
        self.old_handlers = ({s: signal.signal(s, lambda signo, frame: self._on(signo)) for s in SIGNALS}
                             if threading.current_thread() is threading.main_thread() else {})
        self.thread = threading.Thread(target=self._wait, name="train-signals", daemon=True)
        self.thread.start()

    def _wait(self):
        while not self.closing.is_set():
            info = signal.sigtimedwait(SIGNALS, 0.2)
            if info is not None and info.si_signo in SIGNALS:   # (a debugger's attach wakes it too)
                self._on(info.si_signo)

    def _on(self, signo: int):
        name = signal.Signals(signo).name
        if self.received is None:
            self.received = signo
            again = "Ctrl-C" if signo == signal.SIGINT else "the signal"
            print(f"\n{name}: stopping after this step and saving a checkpoint ({again} again stops "
                  "at once)", file=sys.stderr, flush=True)
        else:
            _exit(f"{name}: stopped at once; {where_to_resume(self.checkpoints)}", 128 + signo)

    def close(self):
        self.closing.set()
        self.thread.join()
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)


def peer_lost(message: str, checkpoints: str | None):
    """The end of a run whose peer process was lost: one line, status 7."""
    _exit(f"{message}; {where_to_resume(checkpoints)}; start every process again with --resume",
          EXIT_PEER_LOST)
