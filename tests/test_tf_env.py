"""``util.tf_env``: the TensorFlow environment the entry points set before importing it."""
import os
import subprocess
import sys

from tests.conftest import REPO
from util import tf_env

VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPU_ALLOCATOR_USE_BFC", "TF_CPU_BFC_MEM_LIMIT_IN_MB")


def test_configure_sets_the_defaults_and_keeps_what_the_user_set(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tf_env.configure()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "true"
    assert int(os.environ["TF_CPU_BFC_MEM_LIMIT_IN_MB"]) == max(1 << 16, tf_env.machine_memory_mb())
    monkeypatch.setenv("TF_CPU_ALLOCATOR_USE_BFC", "false")
    monkeypatch.setenv("TF_CPU_BFC_MEM_LIMIT_IN_MB", "1000")
    tf_env.configure()
    assert os.environ["TF_CPU_ALLOCATOR_USE_BFC"] == "false" and os.environ["TF_CPU_BFC_MEM_LIMIT_IN_MB"] == "1000"


def test_trainval_model_configures_as_a_script_and_not_on_import():
    """Run as a script it sets the defaults; imported (the tests, a user's code) it leaves the importer's
    environment, which its subprocesses inherit, alone."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    show = f"print('@@', os.environ.get({VARIABLES[1]!r}))"
    imported = f"import os, sys; sys.path.insert(0, {str(REPO)!r}); import trainval_model; {show}"
    script = ("import os, runpy, sys; sys.argv = ['trainval_model.py', '--help']\n"
              "try:\n    runpy.run_path('trainval_model.py', run_name='__main__')\nexcept SystemExit:\n    pass\n" + show)
    for code, expected in ((imported, "@@ None"), (script, "@@ true")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                             timeout=300, check=True).stdout
        assert out.splitlines()[-1] == expected, out[-500:]
