"""`python -m benchmarks`: see benchmarks/harness.py."""

from benchmarks.harness import main

raise SystemExit(main())
