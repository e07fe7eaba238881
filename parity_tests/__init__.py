"""The parity suite (`make test`; `make test-all` adds the `slow` tests).

`SUITE_XLA_FLAGS` is how every JAX program of the suite is compiled, in the test processes and in
the processes they start: LLVM at optimisation level 1 instead of XLA's default 3. Compiling is
most of the suite's time on a CPU, and level 1 compiles faster: the tests' one-block vit-digits
step in 7.5 s instead of 22, the presets' own steps 12-36% faster (docs/benchmarks.md). The
HLO programs are the same; their float results differ from level 3's by rounding only (a vit-digits
gradient by 3e-7 relative), inside every tolerance the suite holds. The bit-for-bit claims
(resume, kill, one process against several) compare runs compiled alike. The parity figures the
docs quote come from `python -m bridge verify`, which compiles at XLA's default.
"""

SUITE_XLA_FLAGS = "--xla_backend_optimization_level=1"
