"""Test-wide setup: 8 forced CPU devices, set before jax is imported anywhere.

``XLA_FLAGS`` from the environment are kept (e.g. ``--xla_cpu_max_isa=AVX2``).
``LMOE_TEST_DEVICES`` changes the device count; only tests/test_equivalence.py is meant to run
with another one (scripts/stress_equivalence.sh does); every other test expects 8.
"""
import os
import shutil
import tempfile

DEVICES = int(os.environ.get("LMOE_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA cache per test worker (its subprocesses inherit it): the tiny models of many
# tests compile to the same programs. Per worker, because JAX writes cache files non-atomically.
_XLA_CACHE = os.path.join(
    tempfile.gettempdir(), f"lmoe_jax_test_xla_cache_{os.getuid()}",
    f"{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'run')}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == DEVICES, \
    f"tests expect {DEVICES} forced CPU devices; jax was imported before conftest"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
