"""`python -m at1_jax.sample`: prompts → PNG files (see at1_jax.generate.cli)."""

import sys

from at1_jax.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
