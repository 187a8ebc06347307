"""The fine-tuning job: every method trains, writes its outputs, resumes exactly and guards its directory."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import spra_jax as spra
from spra_jax import data
from spra_jax.finetune import FinetuneConfig, finetune

ROOT = pathlib.Path(__file__).resolve().parents[1]


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from finetune_worker import BagOfWords  # noqa: E402  (a small real classifier, shared with the worker)


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
  """600 real Rotten Tomatoes snippets as a local CSV (the job's local-file path)."""
  ds = data.load("rotten-tomatoes", seed=0)["train"].select(range(600))
  path = tmp_path_factory.mktemp("data") / "reviews.csv"
  ds.to_pandas()[["text", "label"]].assign(label=lambda d: d.label.map({0: "rotten", 1: "fresh"})).to_csv(path, index=False)
  return path


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(data._minilm_dir())


def config(tmp_path, csv, **kw):
  base = dict(model="bag-of-words", dataset=str(csv), method="spra", density=0.05, preset=None, lr=3e-2,
              steps=24, batch_size=16, max_length=24, eval_every=12, checkpoint_every=8, seed=0,
              output=str(tmp_path / "run"))
  return FinetuneConfig(**{**base, **kw})


def run(cfg, tokenizer, **kw):
  model = BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0))
  return finetune(cfg, model=model, tokenizer=tokenizer, progress=False, **kw), model


@pytest.mark.parametrize("method", ["spra", "head", "full"])
def test_each_method_trains_and_writes_its_outputs(method, tmp_path, reviews_csv, tokenizer):
  cfg = config(tmp_path, reviews_csv, method=method)
  results, model = run(cfg, tokenizer)
  out = pathlib.Path(cfg.output)
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 25))
  assert [r["step"] for r in rows if r["split"] == "validation"] == [12, 24]
  assert set(results["test"]) == {"accuracy", "mcc", "f1"} and 0 <= results["test"]["accuracy"] <= 1
  assert np.mean([r["loss"] for r in train[-6:]]) < np.mean([r["loss"] for r in train[:6]])  # it learns
  assert (out / "curves.png").stat().st_size > 5_000
  assert json.loads((out / "results.json").read_text())["test"] == results["test"]
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  head = 32 * 2 + 2
  if method == "spra":
    assert (out / "adapter" / "adapter_config.json").exists()
    delta = spra.load_adapter(out / "adapter")
    assert spra.num_trainable(delta.mask) == results["trainable"]
    assert head < results["trainable"] < 0.1 * params
    # The adapter carries the base's fingerprint (taken before training moved the weights in place) and its name.
    base = nnx.state(BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0)), nnx.Param)
    assert spra.load_adapter_config(out / "adapter")["base_model"] == "bag-of-words"
    merged = spra.merge(base, spra.load_adapter(out / "adapter", base_params=base))
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(nnx.state(model, nnx.Param))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # the model holds the trained weights
    with pytest.raises(ValueError, match="fingerprint|base"):
      spra.load_adapter(out / "adapter", base_params=nnx.state(BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(1)),
                                                               nnx.Param))
  elif method == "head":
    assert results["trainable"] == head
  else:
    assert results["trainable"] == params
    assert (out / "adapter" / "adapter_config.json").exists()


def test_output_directory_is_guarded(tmp_path, reviews_csv, tokenizer):
  cfg = config(tmp_path, reviews_csv, steps=8, eval_every=8)
  run(cfg, tokenizer)
  with pytest.raises(ValueError, match="already holds this run; pass --resume"):
    run(cfg, tokenizer)
  with pytest.raises(ValueError, match=r"different run \(fields that differ: \['density'\]\)"):
    run(config(tmp_path, reviews_csv, steps=8, eval_every=8, density=0.1), tokenizer)
  results, _ = run(config(tmp_path, reviews_csv, steps=8, eval_every=8, density=0.1), tokenizer, overwrite=True)
  assert results["steps"] == 8


def test_bad_inputs_name_what_was_expected(tmp_path, reviews_csv, tokenizer):
  with pytest.raises(ValueError, match="method must be one of"):
    FinetuneConfig(method="prefix")
  with pytest.raises(ValueError, match="unknown dataset 'no-such-data'.*rotten-tomatoes"):
    run(config(tmp_path, "no-such-data"), tokenizer)
  with pytest.raises(ValueError, match="label column 'sentiment'"):
    run(config(tmp_path, reviews_csv, label_column="sentiment"), tokenizer)


class _Worker:
  """The worker script in a subprocess, its output in a log file."""

  def __init__(self, cfg, *flags):
    self.log = pathlib.Path(cfg.output + ".log")
    self.log.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(dict(cfg.__dict__))
    with open(self.log, "ab") as log:
      self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "finetune_worker.py"), payload, *flags],
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=str(ROOT), stdout=log,
                                   stderr=subprocess.STDOUT)

  def output(self):
    return self.log.read_text()[-3000:]


@pytest.mark.parametrize("method", ["spra", "full"])
def test_resume_after_sigkill_is_exact(method, tmp_path, reviews_csv):
  common = dict(method=method, steps=30, eval_every=30, checkpoint_every=6)
  straight = config(tmp_path / "a", reviews_csv, **common)
  worker = _Worker(straight)
  assert worker.proc.wait(timeout=300) == 0, worker.output()

  killed = config(tmp_path / "b", reviews_csv, **common)
  worker = _Worker(killed)
  ckpt_dir = pathlib.Path(killed.output) / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (ckpt_dir.exists() and any(p.name == "12" for p in ckpt_dir.iterdir())):
    assert worker.proc.poll() is None, "the run ended before it could be killed: " + worker.output()
    time.sleep(0.05)
  worker.proc.send_signal(signal.SIGKILL)
  worker.proc.wait()
  assert not (pathlib.Path(killed.output) / "results.json").exists()  # it really was cut short
  worker = _Worker(killed, "--resume")
  assert worker.proc.wait(timeout=300) == 0, worker.output()

  a, b = (json.loads((pathlib.Path(c.output) / "results.json").read_text()) for c in (straight, killed))
  assert a["test"] == b["test"] and a["validation"] == b["validation"]
  lines = [[json.loads(x) for x in (pathlib.Path(c.output) / "metrics.jsonl").read_text().splitlines()]
           for c in (straight, killed)]
  assert [r["loss"] for r in lines[0] if r["split"] == "train"] == [r["loss"] for r in lines[1] if r["split"] == "train"]
  if method == "spra":
    da, db = (spra.load_adapter(pathlib.Path(c.output) / "adapter") for c in (straight, killed))
    for x, y in zip(jax.tree.leaves(da), jax.tree.leaves(db)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
