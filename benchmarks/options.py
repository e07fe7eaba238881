"""The checks every benchmark command makes of its options before anything runs (shared by
`benchmarks`, `benchmarks.sampling`, `.generation` and `.parallel`), and the default batch."""

from __future__ import annotations

import os

MAX_SEED = 2 ** 32 - 1


def check_options(ap, a, counts=(), outputs=(), seed=None):
    """`ap.error` (one `error:` line, exit status 2) for an `XLA_FLAGS` JAX cannot start with, a
    count option below 1 (`counts`, dest names; a list checks each entry), a seed outside
    [0, 2**32 - 1], or an output file (`outputs`) that is a folder or lies in a folder this user
    cannot create or write: before anything runs."""
    from jax_models.xla_flags import check_env

    try:
        check_env()
    except ValueError as e:
        ap.error(str(e))
    for name in counts:
        value = getattr(a, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < 1:
                ap.error(f"--{name.replace('_', '-')} must be at least 1, not {v}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        ap.error(f"--seed must be an integer in [0, {MAX_SEED}], not {seed}")
    for name in outputs:
        path = getattr(a, name)
        if not path:
            continue
        if os.path.isdir(path):
            ap.error(f"--{name} {path} is a folder; give a file path")
        base = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(base) and os.path.dirname(base) != base:
            base = os.path.dirname(base)
        if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
            ap.error(f"--{name} {path}: cannot write there ({base} is not a writable folder)")


def default_batch(preset: str) -> int:
    """The preset's `bench_batch`: CPU-sized, to keep `--all` to about half an hour on 2 cores
    (the recipes', up to 32768, are for accelerators)."""
    from twin_models.presets import get_preset
    return get_preset(preset).bench_batch
