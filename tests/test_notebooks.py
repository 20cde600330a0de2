"""The notebooks run top to bottom in a Jupyter kernel (on whatever backend the tests run), so they
cannot rot; the kernel imports the jax_kda of the directory the runner starts in."""

import os
import re
import shutil
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "notebooks", "run_notebook.py")


def run_notebook(path, cwd, env=None):
    out = subprocess.run([sys.executable, RUNNER, path], capture_output=True, text=True, timeout=1800, cwd=cwd,
                         env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_sharded_notebook():
    text = run_notebook(os.path.join(ROOT, "notebooks", "sharded_prefill.ipynb"), ROOT)
    errors = [float(e) for e in re.findall(r"rel\. difference o ([-+.e\d]+)", text)]
    assert errors and max(errors) < 5e-3, text


def test_kimi_linear_notebook():
    # The notebook itself asserts that decoding after a prefill matches one prefill within bf16 rounding.
    text = run_notebook(os.path.join(ROOT, "notebooks", "kimi_linear_prefill.ipynb"), ROOT)
    assert "decode after prefill vs one prefill" in text and "| prompt tokens | prefill ms |" in text, text


@pytest.mark.parametrize("installed", [False, True], ids=["source tree", "installed"])
def test_kernel_imports_the_jax_kda_of_the_current_directory(tmp_path, installed):
    # Where jax_kda is found (without running it): the kernel must find the one `python -c` finds where
    # the runner starts, although the kernel starts in the notebook's folder.
    locate = "import importlib.util\nprint(importlib.util.find_spec('jax_kda').origin)"
    probe = tmp_path / "probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(locate)]), probe)
    env = dict(os.environ)
    if installed:  # a pure-Python install: the package in a folder on the path, run from elsewhere
        site = tmp_path / "site"
        shutil.copytree(os.path.join(ROOT, "jax_kda"), site / "jax_kda", ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        cwd = tmp_path
    else:
        cwd = ROOT
    want = subprocess.run([sys.executable, "-c", locate], capture_output=True, text=True, cwd=cwd, env=env).stdout
    assert want.strip().endswith(os.path.join("jax_kda", "__init__.py")), want
    assert run_notebook(str(probe), cwd, env) == want
