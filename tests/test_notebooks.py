"""Every notebook under colab/ runs top to bottom on this machine (offline, CPU)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


# Small CI configurations, read by each notebook's parameter cell (the kernel inherits the environment).
SMALL = {
    "mask_ablations": {"SPRA_NB_DISTRIBUTIONS": "uniform,rows,magnitude", "SPRA_NB_SEEDS": "0", "SPRA_NB_STEPS": "3",
                       "SPRA_NB_BATCH_SIZE": "8", "SPRA_NB_MAX_LENGTH": "16", "SPRA_NB_EVAL_EXAMPLES": "32"},
}


def run_notebook(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
  return "".join(out.get("text", "") for out in outputs), sum("image/png" in out.get("data", {}) for out in outputs)


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS if p.name == "quickstart.ipynb"], "colab/quickstart.ipynb is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  for name, value in SMALL.get(path.stem, {}).items():
    monkeypatch.setenv(name, value)
  # The kernel imports this checkout's spra_jax (as the tests do), whatever the environment installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  text, images = run_notebook(path, tmp_path)
  if path.stem == "quickstart":
    assert "merged == trained weights: True" in text
    assert "SpaRTA 2 % + head: rotated test accuracy" in text
  if path.stem == "mask_ablations":
    assert "3 distributions x 1 seeds, density 0.01, 3 steps of 8" in text
    assert "trainable entries, uniform: 18,518 (+0.0% vs uniform)" in text
    assert "trainable entries, rows: 19,250 (+4.0% vs uniform)" in text  # whole rows of 384
    assert "trainable counts within 5 % of each other: True" in text and "runs: 3" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| uniform", "| rows", "| magnitude", "| majority class"]
    assert "best mean test accuracy:" in text and images == 2  # the masks and the results
