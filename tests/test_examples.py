"""The examples run end to end and do what they say."""

import importlib.util
import json
import re
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relative):
  path = ROOT / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
