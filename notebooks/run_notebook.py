"""Runs a notebook's code cells in order in one namespace and stores their outputs (text and
matplotlib figures) in the notebook: the executor the tests use, and how the committed outputs are
made (`python notebooks/run_notebook.py notebooks/sharded_prefill.ipynb [--write]`).

It needs no Jupyter kernel, so the tests can run notebooks wherever the package runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import sys


def run(path: str, write: bool = False) -> dict:
    with open(path) as f:
        nb = json.load(f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace = {"__name__": "__main__"}
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile("".join(cell["source"]), f"{path}:cell{count}", "exec"), namespace)
        outputs = []
        if stdout.getvalue():
            outputs.append({"output_type": "stream", "name": "stdout", "text": stdout.getvalue().splitlines(True)})
        for number in plt.get_fignums():
            png = io.BytesIO()
            plt.figure(number).savefig(png, format="png", dpi=100, bbox_inches="tight")
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"image/png": base64.b64encode(png.getvalue()).decode(), "text/plain": ["<Figure>"]}})
        plt.close("all")
        cell["outputs"], cell["execution_count"] = outputs, count
    if write:
        with open(path, "w") as f:
            json.dump(nb, f, indent=1)
            f.write("\n")
    return nb


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--write", action="store_true", help="store the outputs in the notebook")
    args = parser.parse_args()
    for cell in run(args.notebook, args.write)["cells"]:
        for out in cell.get("outputs", []):
            sys.stdout.write("".join(out.get("text", [])))
