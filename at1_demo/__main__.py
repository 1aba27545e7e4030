"""`python -m at1_demo`."""

import sys

from at1_demo.demo import main

sys.exit(main())
