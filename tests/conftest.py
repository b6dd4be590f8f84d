"""Shared pytest set-up: deterministic, small, CPU-friendly."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


DEMO_CACHE = Path(__file__).resolve().parents[1] / ".tpp_cache" / "demo_ct"


@pytest.fixture(scope="session")
def cache() -> Path:
    """The real demo data cache (pyradiomics + invesalius CT slices), built once and reused."""
    from tpp_monai.data import demo_data as dd

    try:
        return dd.build_demo_cache(DEMO_CACHE, size=96, verbose=False)
    except dd.RegistryUnreachable as e:
        pytest.skip(f"package registry unreachable, demo data not built: {e}")
