"""`python -m at1_jax.bench`."""

import sys

from at1_jax.bench.benchmarks import main

sys.exit(main())
