"""`python -m at1_jax.evaluate`."""

import sys

from at1_jax.evaluate.cli import main

sys.exit(main())
