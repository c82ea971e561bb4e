"""Shared test fixtures. Everything here is built from files in tests/assets (no network, no
../shared), so the suite runs from a plain clone."""

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
OFFICIAL_TINY = ASSETS / "bagel_official_tiny"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return OFFICIAL_TINY


@pytest.fixture(scope="session")
def reference():
    from bagel.cli.parity_cases import Fixture

    return Fixture(OFFICIAL_TINY)


@pytest.fixture(scope="session")
def official_model():
    from bagel.checkpoint.official import load_official_model

    return load_official_model(OFFICIAL_TINY)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
