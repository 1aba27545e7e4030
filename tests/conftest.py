"""Test-wide setup: fake CPU devices, no model hub, derived markers, no processes left behind."""

import functools
import os
import sys
import types
from pathlib import Path

# Set before jax is imported anywhere: 4 fake CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import psutil
import pytest
from fixtures_models import tiny_models  # noqa: F401
from fixtures_s3 import s3_env, s3_server  # noqa: F401

TESTS = Path(__file__).resolve().parent
# Importing any of these needs the `data` extra (the PyTorch half).
TORCH_SIDE = ("torch", "transformers", "diffusers", "safetensors.torch", "data_prep")
S3_FIXTURES = {"s3_server", "s3_env"}


def _origin(value) -> str | None:
    """Dotted name of the module a module-level global comes from."""
    if isinstance(value, types.ModuleType):
        return value.__name__
    name = getattr(value, "__module__", None)
    return name if isinstance(name, str) else None


def _module_imports(module: types.ModuleType, seen: set[str]) -> bool:
    """Whether ``module``, or a tests/ helper it imports from, imports the PyTorch side."""
    seen.add(module.__name__)
    for value in list(vars(module).values()):
        name = _origin(value)
        if name is None or name in seen:
            continue
        if any(name == m or name.startswith(m + ".") for m in TORCH_SIDE):
            return True
        helper = sys.modules.get(name)
        path = getattr(helper, "__file__", None)
        if path and Path(path).resolve().parent == TESTS and _module_imports(helper, seen):
            return True
    return False


@functools.cache
def _imports_torch_side(module: types.ModuleType) -> bool:
    """Cached ``_module_imports`` for a test module."""
    return _module_imports(module, set())


def pytest_collection_modifyitems(config, items):
    """Mark s3 and torch tests from the fixtures they use and the modules they import."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)
        module = getattr(item, "module", None)
        if "tiny_models" in fixtures or (module is not None and _imports_torch_side(module)):
            item.add_marker(pytest.mark.torch)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """SIGKILL the processes a failed or timed-out test started (JAX ignores SIGTERM)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        return (yield)
    except BaseException:
        left = [p for p in me.children(recursive=True) if p.pid not in before]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        raise
