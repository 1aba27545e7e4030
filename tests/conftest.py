"""Test-wide setup: several fake CPU devices and no model hub."""

import os

# Set before jax is imported anywhere: 4 fake CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from fixtures_models import tiny_models  # noqa: F401
from fixtures_s3 import s3_env, s3_server  # noqa: F401
