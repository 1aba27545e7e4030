"""`python -m at1_jax.serve`."""

import sys

from at1_jax.serve.cli import main

sys.exit(main())
