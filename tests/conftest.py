"""Test-wide setup: 8 forced CPU devices, set before jax is imported anywhere.

``XLA_FLAGS`` from the environment are kept (e.g. ``--xla_cpu_max_isa=AVX2``).
``LMOE_TEST_DEVICES`` changes the device count; only tests/test_equivalence.py is meant to run
with another one (scripts/stress_equivalence.sh does); every other test expects 8.
"""
import os

DEVICES = int(os.environ.get("LMOE_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == DEVICES, \
    f"tests expect {DEVICES} forced CPU devices; jax was imported before conftest"
