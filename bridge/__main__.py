"""`python -m bridge verify PRESET [--batch-size B] [--seed S] [--tol T] [--weights FILE]
[--precision fp32|bf16]`; `python -m bridge verify --all [--full] [--preset GLOB] [--steps N]
[--out DIR]`; `python -m bridge import --from timm|open_clip|hf --arch NAME CHECKPOINT
--out DIR`. Exit status: 0 pass, 1 over the tolerance (or a non-finite output), 2 a usage error,
3 a weights file that cannot be used (missing, damaged, wrong keys or shapes)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from jax_models import compile_cache


EXIT_BAD_WEIGHTS = 3   # distinct from a parity FAIL (1) and a usage error (2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="carry torch weights into the Flax twin and diff every layer")
    v.add_argument("preset", nargs="?", help="the preset to diff layer by layer (or --all)")
    v.add_argument("--batch-size", type=int, default=2)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tol", type=float, default=None, help="relative tolerance (default 1e-5)")
    v.add_argument("--weights", help="a .safetensors or .pt state_dict to verify instead of a fresh init")
    v.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: what bfloat16 costs per layer, each backend against its own fp32 and "
                        "against the other (torch under autocast, Flax with bf16 params, as the trainer)")
    r = v.add_argument_group("every preset (bridge.report): forward, each parameter's gradient, an AdamW trajectory")
    r.add_argument("--all", action="store_true", help="every small preset; writes a table, a JSON file and "
                   "loss curves to --out; exit status 1 if any preset fails")
    r.add_argument("--full", action="store_true", help="with --all: the full-size presets too")
    r.add_argument("--preset", dest="preset_glob", metavar="GLOB", help="with --all: only the presets matching "
                   "GLOB (several: comma-separated)")
    r.add_argument("--steps", type=int, default=None, help="with --all: AdamW steps of each trajectory (default 100)")
    r.add_argument("--out", default=None, help="with --all: the folder to write to (default runs/parity)")
    r.add_argument("--resume", action="store_true",
                   help="with --all: keep the presets OUT/report.json already holds (same steps, measured "
                        "without an error) and run the rest; a long --full run goes on where it stopped")
    compile_cache.add_arguments(v)
    i = sub.add_parser("import", help="a timm, open_clip or Hugging Face checkpoint as this project's model",
                       description="Writes OUT/model.safetensors (this project's torch key names) and "
                                   "OUT/config.json (family, class, constructor arguments); "
                                   "torch_reference.from_config / jax_models.from_config build the model.")
    i.add_argument("--from", dest="library", required=True, choices=("timm", "open_clip", "hf"))
    i.add_argument("--arch", required=True, help="the library's architecture name: timm vit_*_patch16_224, "
                   "swin_*_patch4_window7_224; open_clip ViT-B-16; hf CLIPModel, ViTModel, "
                   "ViTForImageClassification, GPT2LMHeadModel, VisionEncoderDecoderModel")
    i.add_argument("checkpoint", help="a .safetensors, a .pt/.bin state_dict (torch.load(weights_only=True)) "
                   "or a Hugging Face model folder")
    i.add_argument("--out", required=True, help="the folder to write model.safetensors and config.json to")
    i.add_argument("--config", help="the library's config file (default: the one beside the checkpoint: "
                   "config.json, open_clip_config.json)")
    i.add_argument("--set", dest="overrides", action="append", metavar="NAME=VALUE", default=[],
                   help="an architecture fact by the library's name (e.g. num_heads=12), over the config's")
    i.add_argument("--check", action="store_true", help="then load both backends and compare them on one input")
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jax_models.xla_flags import apply_cpu_flags
    apply_cpu_flags()
    if args.command == "import":
        return _import(args)

    compile_cache.enable_from_args(args)

    from twin_models.presets import PRESETS

    if args.all or args.full or args.preset_glob or args.steps is not None or args.out is not None or args.resume:
        return _verify_all(parser, args)
    if args.preset is None:
        parser.error("verify needs a PRESET, or --all for every preset")
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


def _verify_all(parser, args) -> int:
    """`verify --all`: every selected preset through `bridge.report`; 1 if any fails."""
    from .report import STEPS, run_all, select

    if not args.all:
        parser.error("--full, --preset, --steps, --out and --resume go with --all")
    if args.preset is not None:
        parser.error(f"give either a PRESET ({args.preset}) or --all, not both")
    if args.weights or args.precision != "fp32" or args.tol is not None:
        parser.error("--weights, --precision and --tol are for one preset; --all holds every preset to "
                     "bridge.verify's REPORT_* tolerances")
    steps = STEPS if args.steps is None else args.steps
    if steps < 1:
        parser.error(f"--steps must be a positive integer, not {steps}")
    names = select(args.preset_glob, args.full)
    if not names:
        parser.error(f"--preset {args.preset_glob!r} matches no {'' if args.full else 'small '}preset")
    out = args.out or "runs/parity"
    results = run_all(names, out, steps, resume=args.resume)
    failed = [r for r in results if not r.ok]
    for r in failed:
        where = f"; first layer over tolerance: {r.first_divergent}" if r.first_divergent else ""
        print(f"FAIL {r.preset}: {r.error or ', '.join(r.failures)}{where}")
    print(f"{len(results) - len(failed)} of {len(results)} presets pass; "
          f"{out}/report.md, report.json and one PNG per preset")
    return 1 if failed else 0


MAX_SEED = 2 ** 32 - 1   # torch.manual_seed and numpy's RandomState both take it


def check_args(args):
    """The options that can be checked before anything is built or written (sizes, seed,
    tolerance, the compile cache, import's --out); a ValueError naming the option, the value and
    what is allowed."""
    from jax_models.xla_flags import check_env

    check_env()
    if args.command == "verify":
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
        if not 0 <= args.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, {MAX_SEED}], not {args.seed}")
        if args.tol is not None and not (math.isfinite(args.tol) and args.tol > 0):
            raise ValueError(f"--tol must be a positive finite number, not {args.tol}")
        compile_cache.dir_from_args(args)
        return
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {args.out} is a file; give a folder (it receives model.safetensors and "
                         "config.json)")
    inputs = {os.path.realpath(p) for p in (args.checkpoint, args.config) if p}
    inputs |= {os.path.realpath(os.path.join(args.checkpoint, n)) for n in ("model.safetensors", "config.json")}
    clash = [w for w in (os.path.realpath(os.path.join(out, n)) for n in ("model.safetensors", "config.json"))
             if w in inputs]
    if clash:
        raise ValueError(f"--out {args.out} would overwrite the input {clash[0]}; give another folder")
    base = out
    while not os.path.exists(base) and os.path.dirname(base) != base:
        base = os.path.dirname(base)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: cannot create or write it ({base} is not a writable folder)")


def _import(args) -> int:
    from .imports import ImportMismatchError, describe, import_checkpoint
    from .io import WeightsFileError

    try:
        imported = import_checkpoint(args.library, args.arch, args.checkpoint, args.config, args.overrides)
    except (ImportMismatchError, WeightsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_WEIGHTS
    except ValueError as e:   # an unknown --arch, a malformed --set
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights, config = imported.save(args.out)
    print(describe(imported))
    print(f"wrote {weights} and {config}")
    if args.check:
        import numpy as np
        import torch

        from .imports import example_inputs, load
        from .verify import FORWARD_TOL

        torch_model, flax_model, variables = load(args.out)
        t_in, f_in = example_inputs(imported.config, 2)
        with torch.no_grad():
            ref = torch_model(*t_in)
        import jax

        got = jax.jit(flax_model.apply)(variables, *f_in)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = got[0] if isinstance(got, tuple) else got
        ref = getattr(ref, "logits", ref).numpy().astype(np.float64)
        got = np.asarray(getattr(got, "logits", got), np.float64)
        err = float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))
        print(f"torch vs Flax on one batch: output rel err {err:.2e} (tolerance {FORWARD_TOL:g})")
        return 0 if err <= FORWARD_TOL else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
