"""Shared test fixtures: where the golden data lives, and a TensorFlow that stays quiet."""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REFSEG_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir():
    """`../shared` beside the checkout (golden data, spec, vocabularies).

    CI sets REFSEG_REQUIRE_SHARED=1 so that a missing folder fails instead of skipping the golden tests.
    """
    if not SHARED.is_dir():
        if os.environ.get("REFSEG_REQUIRE_SHARED") == "1":
            pytest.fail(f"golden data folder {SHARED} is missing (set REFSEG_SHARED)")
        pytest.skip(f"golden data folder {SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir):
    return shared_dir / "golden"
