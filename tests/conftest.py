"""Shared test set-up: 8 virtual CPU devices (set before jax is imported) and small helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One BLAS thread per test process: `make test` runs two xdist workers on two cores, and
# oversubscribed OpenBLAS makes the host SVDs 10-50x slower. This only works if numpy is not
# loaded yet: nothing in pyproject's pytest config may import svft_jax (see pytest_configure).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed, for random test matrices."""
    return np.random.default_rng(0)


def pytest_configure(config):
    # A fallback to a slower execution path fails the suite (a test that expects one catches it).
    # Added here, not in pyproject's filterwarnings: naming the class there imports svft_jax (and
    # numpy) while pytest reads its config, before the environment above is set.
    config.addinivalue_line("filterwarnings", "error::svft_jax.strategies.FallbackWarning")


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
