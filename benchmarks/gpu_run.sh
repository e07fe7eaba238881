#!/usr/bin/env bash
# The GPU run, as one script that ends in under 10 minutes on one H100/H200: the parity suite's
# fast tests at the highest matmul precision, then ViT-B/16 training in bf16 at batch 256 with
# XLA's and cuDNN's attention, JAX against eager torch and torch.compile, MFU against the GPU's
# bf16 peak. Results go to $OUT (default ./gpu_results): the pytest log, JSON and markdown rows.
#
#   bash benchmarks/gpu_run.sh            # from the repository root, with jax[cuda] and torch+cuda
#
# It needs a JAX that sees the GPU (jax[cuda12] or the image's own) and a CUDA torch; it checks
# both first and stops with a message if either is missing.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python}

echo "== versions" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/versions.txt"
$PY - <<'PY' 2>&1 | tee -a "$OUT/versions.txt"
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
assert jax.default_backend() == "gpu", "JAX does not see a GPU: install jax[cuda12]"
assert torch.cuda.is_available(), "torch has no CUDA: install a CUDA build of torch"
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "stopping: no GPU for one of the frameworks"; exit 2; }

echo "== parity suite (fast tests, highest matmul precision, TF32 off: parity_tests/conftest.py)"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider parity_tests/test_presets.py parity_tests/test_layers.py \
    parity_tests/test_fast_paths.py -k "not slow" 2>&1 | tail -20 | tee "$OUT/parity.txt"

echo "== ViT-B/16 training, bf16, batch 256"
for impl in xla cudnn; do
    frameworks=jax,torch,torch-compile
    [ "$impl" = cudnn ] && frameworks=jax
    timeout 150 $PY -m benchmarks --preset vit-b16 --mode train --precision bf16 --batch-size 256 \
        --frameworks "$frameworks" --attention-impl "$impl" --peak-flops 989e12 --repeats 10 --warmup 3 --no-progress \
        --json "$OUT/vit-b16-bf16-$impl.json" --markdown "$OUT/vit-b16-bf16-$impl.md" 2>&1 | tail -8
done
echo "== fp32 (TF32 off) at batch 64, for the record"
timeout 120 $PY -m benchmarks --preset vit-b16 --mode train --precision fp32 --batch-size 64 \
    --frameworks jax,torch --repeats 5 --warmup 2 --no-progress --json "$OUT/vit-b16-fp32.json" 2>&1 | tail -5
