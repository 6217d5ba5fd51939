"""Shared test fixtures: where the golden data lives, and the TensorFlow environment ``trainval_model.py`` sets as a
script (quiet C++ logs, the BFC host allocator: ``util.tf_env``), for this process and the ones it starts."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util import tf_env  # noqa: E402 (before anything imports TensorFlow)

tf_env.configure()

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


SAMPLE_TRAIN_SIZE = 64


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The generated sample dataset with ``unc`` train batches at 64×64 and ``unc`` val batches (original sizes)."""
    root = tmp_path_factory.mktemp("sample")
    for args in (["--make-sample", str(root)],
                 ["-d", "unc", "-t", "train", "--data-root", str(root), "--output-dir", str(root),
                  "--img-size", str(SAMPLE_TRAIN_SIZE)],
                 ["-d", "unc", "-t", "val", "--data-root", str(root), "--output-dir", str(root)]):
        subprocess.run([sys.executable, str(REPO / "build_batches.py"), *args], check=True, capture_output=True,
                       cwd=REPO)
    return root
