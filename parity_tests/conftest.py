"""Test-wide set-up: 8 fake CPU devices, the models' XLA:CPU flags and the suite's LLVM level
(`parity_tests.SUITE_XLA_FLAGS`) before JAX starts, highest matmul precision, no TF32."""

import ctypes
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jax_models.xla_flags import add_flags, apply_cpu_flags  # noqa: E402
from parity_tests import SUITE_XLA_FLAGS  # noqa: E402

apply_cpu_flags()   # the CLIs' XLA:CPU flags, before JAX starts its backend
add_flags([SUITE_XLA_FLAGS])   # LLVM level 1: faster compiles (parity_tests/__init__.py)

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# One torch thread per pytest-xdist worker (`make test` runs two on two cores), all otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _release_memory_after_full_size_tests(request):
    """After a `slow` (full-size) test, hand its memory back before the next one starts: the two
    clip-b16 trajectories once outgrew a 24 GB machine in one process (now 10.1 GB peak)."""
    yield
    if request.node.get_closest_marker("slow"):
        gc.collect()
        jax.clear_caches()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
