"""Runs a notebook in a Jupyter kernel (nbclient with ipykernel) and prints its text outputs; `--write`
stores all its outputs in it. The tests run the notebooks this way, and the committed outputs come from
`benchmarks/gpu_session.sh notebook`, which calls it too:

    python notebooks/run_notebook.py notebooks/kimi_linear_prefill.ipynb [--write]

The kernel, a new process of this interpreter started in the notebook's folder, imports the jax_kda
that `import jax_kda` finds in the current directory: the source tree's when run from the repository
root, the installed one elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def kernel_env() -> dict:
    """This process's environment, with the folder of the jax_kda that `import jax_kda` finds in the
    current directory on PYTHONPATH (after the entries already there, whose packages keep precedence)."""
    sys.path.insert(0, os.getcwd())  # as for `python -c` or `python -m`, not a script (its own folder)
    spec = importlib.util.find_spec("jax_kda")
    if spec is None or spec.origin is None:
        raise SystemExit("jax_kda is not importable here: run from the repository root or install it")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), package_parent) if p)
    return env


def execute(nb: nbformat.NotebookNode, folder: str, cell_timeout_s: int = 1200) -> None:
    """Runs every cell of `nb` in order in a fresh kernel started in `folder`, storing the outputs in
    `nb`; raises CellExecutionError at the first failing cell (whose error is among the outputs)."""
    client = NotebookClient(nb, timeout=cell_timeout_s, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": folder}})
    client.execute(env=kernel_env())


def text_outputs(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--write", action="store_true", help="store the outputs in the notebook (also on failure)")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    try:
        execute(nb, os.path.dirname(os.path.abspath(args.notebook)))
    except CellExecutionError as error:
        failure = str(error)
    else:
        failure = None
    if args.write:
        nbformat.write(nb, args.notebook)
    sys.stdout.write(text_outputs(nb))
    if failure:
        sys.stderr.write(failure + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
