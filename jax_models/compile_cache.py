"""JAX's persistent compilation cache for the command-line tools (`python -m train`, `bridge`,
`benchmarks`): compiled programs are kept on disk and reused by the next process, which then
skips XLA's compile. On by default in a user cache directory; `enable(None)` leaves it off.

Where: `$TWIN_MODELS_COMPILE_CACHE`, else `$JAX_COMPILATION_CACHE_DIR`, else
`$XDG_CACHE_HOME/twin-models/jax` (`~/.cache/twin-models/jax`). Set `TWIN_MODELS_COMPILE_CACHE=off`
(or pass the tools' `--no-compile-cache`) to turn it off.
"""

from __future__ import annotations

import os

_events = {"hits": 0, "misses": 0}
_listening = False


def default_dir() -> str | None:
    """The cache directory already configured in this process (`jax_compilation_cache_dir`), else
    from the environment, else the user cache directory; None when turned off."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("TWIN_MODELS_COMPILE_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path and path.lower() in ("off", "0", "none", "false"):
        return None
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "twin-models", "jax")


def enable(path: str | None, min_compile_seconds: float = 0.5) -> str | None:
    """Turn the cache on at `path` (a directory, made if missing) for programs that took at least
    `min_compile_seconds` to compile, and count hits and misses; None: leave it off. Returns the
    directory in use."""
    global _listening
    import jax
    from jax._src import monitoring

    if not _listening:
        def count(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                _events["hits"] += 1
            elif event == "/jax/compilation_cache/cache_misses":
                _events["misses"] += 1
        monitoring.register_event_listener(count)
        _listening = True
    if path is None:
        return None
    path = prepare(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


class CacheDirError(ValueError):
    """The compile cache's directory cannot be made or written; the message says how to choose."""


def _source() -> str:
    for var in ("TWIN_MODELS_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return f"${var}"
    return "$HOME"


def prepare(path: str, source: str | None = None) -> str:
    """`path` made if missing and checked writable (absolute, returned); a `CacheDirError` in one
    line otherwise, naming where the directory came from (`source`, else the environment)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        ok = os.access(path, os.W_OK | os.X_OK)
        reason = "not writable"
    except OSError as e:
        ok, reason = False, e.strerror or type(e).__name__
    if not ok:
        raise CacheDirError(f"the compile cache {path} (from {source or _source()}) cannot be used ({reason}); "
                            "pass --compile-cache DIR with a writable DIR, or --no-compile-cache")
    return path


def dir_from_args(args) -> str | None:
    """The directory `enable_from_args` will use, made and checked (`prepare`); None: off."""
    if args.no_compile_cache:
        return None
    if args.compile_cache:
        return prepare(args.compile_cache, "--compile-cache")
    path = default_dir()
    return None if path is None else prepare(path)


def stats() -> dict:
    """Cache hits and misses seen so far in this process."""
    return dict(_events)


def add_arguments(parser):
    """`--compile-cache DIR` and `--no-compile-cache`, the same in every command-line tool."""
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="JAX's persistent compilation cache (default: ~/.cache/twin-models/jax, or "
                             "$TWIN_MODELS_COMPILE_CACHE)")
    parser.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")


def enable_from_args(args) -> str | None:
    """`enable` as the options of `add_arguments` ask; returns the directory in use (None: off)."""
    return enable(dir_from_args(args))
