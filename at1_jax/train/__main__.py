"""`python -m at1_jax.train`."""

import sys

from at1_jax.train.trainer import main

sys.exit(main())
