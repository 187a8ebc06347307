"""Every notebook under colab/ runs top to bottom on this machine (offline, CPU)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def run_notebook(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS if p.name == "quickstart.ipynb"], "colab/quickstart.ipynb is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  text = run_notebook(path, tmp_path)
  if path.stem == "quickstart":
    assert "merged == trained weights: True" in text
    assert "SpaRTA 2 % + head: rotated test accuracy" in text
