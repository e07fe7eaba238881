"""`python -m bridge verify PRESET [--batch-size B] [--seed S] [--tol T] [--weights FILE]
[--precision fp32|bf16]`. Exit status: 0 pass, 1 over the tolerance (or a non-finite output),
2 a usage error, 3 a weights file that cannot be used (missing, damaged, wrong keys or shapes)."""

from __future__ import annotations

import argparse
import sys


EXIT_BAD_WEIGHTS = 3   # distinct from a parity FAIL (1) and a usage error (2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="carry torch weights into the Flax twin and diff every layer")
    v.add_argument("preset")
    v.add_argument("--batch-size", type=int, default=2)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tol", type=float, default=None, help="relative tolerance (default 1e-5)")
    v.add_argument("--weights", help="a .safetensors or .pt state_dict to verify instead of a fresh init")
    v.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: what bfloat16 costs per layer, each backend against its own fp32 and "
                        "against the other (torch under autocast, Flax with bf16 params, as the trainer)")
    v.add_argument("--compile-cache", metavar="DIR", help="JAX's persistent compilation cache "
                   "(default: ~/.cache/twin-models/jax, or $TWIN_MODELS_COMPILE_CACHE)")
    v.add_argument("--no-compile-cache", action="store_true")
    args = parser.parse_args(argv)

    from jax_models import compile_cache
    compile_cache.enable(None if args.no_compile_cache else (args.compile_cache or compile_cache.default_dir()))

    from presets import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known presets: {', '.join(PRESETS)}")
    from .convert import WeightMismatchError
    from .io import WeightsFileError, load_state_dict
    from .verify import FORWARD_TOL, verify

    try:
        state_dict = load_state_dict(args.weights) if args.weights else None
        report = verify(args.preset, args.batch_size, args.seed, args.tol or FORWARD_TOL, state_dict,
                        args.precision)
    except (WeightsFileError, WeightMismatchError) as e:
        print(f"error: --weights {args.weights}: {e}", file=sys.stderr)
        return EXIT_BAD_WEIGHTS
    print(report.table())
    if args.precision == "bf16":
        return 0 if report.finite else 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
