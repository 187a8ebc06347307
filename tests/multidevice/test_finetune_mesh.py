"""The fine-tuning job's --mesh: a run on 2x4 and 1x8 meshes equals the one-device run."""

import json
import pathlib

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import spra_jax as spra
from spra_jax import data
from spra_jax.finetune import FinetuneConfig, finetune
from spra_jax.models import bert, presets

CONFIG = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
  ds = data.load("rotten-tomatoes", seed=0)["train"].select(range(240))
  path = tmp_path_factory.mktemp("data") / "reviews.csv"
  ds.to_pandas()[["text", "label"]].to_csv(path, index=False)
  return path


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(data._minilm_dir())


_RUNS = {}


def run(tmp_path, csv, tokenizer, method, mesh):
  """One job run per (method, mesh) in this module (each compiles its steps: the runs are shared)."""
  if (method, mesh) not in _RUNS:
    _RUNS[method, mesh] = _run(tmp_path, csv, tokenizer, method, mesh)
  return _RUNS[method, mesh]


def _run(tmp_path, csv, tokenizer, method, mesh):
  cfg = FinetuneConfig(model="tiny-bert", dataset=str(csv), method=method, density=0.1, lr=1e-2, steps=4,
                       batch_size=16, max_length=16, eval_every=4, checkpoint_every=100, seed=0, mesh=mesh,
                       output=str(tmp_path / f"{method}-{mesh}"))
  model = bert.build(CONFIG, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  rules = presets.get("paper", "bert", task="sequence-classification")
  results = finetune(cfg, model=model, tokenizer=tokenizer, preset_rules=rules, progress=False)
  rows = [json.loads(line) for line in (pathlib.Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  return results, losses, model


def value_kernel(model):
  return model.bert.encoder.layer[0].attention.self.value.kernel.get_value()


@pytest.mark.parametrize("method", ["spra", "full"])
def test_job_on_a_mesh_matches_one_device(method, tmp_path, reviews_csv, tokenizer):
  """Full fine-tuning on a 2x4 mesh, and SpaRTA on a data-parallel one (same mask), equal the one-device run."""
  ref, ref_losses, ref_model = run(tmp_path, reviews_csv, tokenizer, method, None)
  assert ref["mesh"] is None
  meshes = {"auto": (8, 1, 1), "data=2,tensor=4": (2, 1, 4)}
  for mesh in (["auto"] if method == "spra" else ["data=2,tensor=4"]):
    results, losses, model = run(tmp_path, reviews_csv, tokenizer, method, mesh)
    assert results["mesh"] == dict(zip(("data", "fsdp", "tensor"), meshes[mesh]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert results["test"]["accuracy"] == ref["test"]["accuracy"]
    assert results["trainable"] == ref["trainable"]
    if mesh != "auto":  # laid out by the partition rules, not replicated
      assert not value_kernel(model).sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(value_kernel(model)), np.asarray(value_kernel(ref_model)), atol=1e-5)


def test_sparta_job_on_a_tensor_mesh_samples_shard_local_masks(tmp_path, reviews_csv, tokenizer):
  ref, _, _ = run(tmp_path, reviews_csv, tokenizer, "spra", None)
  results, losses, model = run(tmp_path, reviews_csv, tokenizer, "spra", "data=2,tensor=4")
  assert not value_kernel(model).sharding.is_fully_replicated
  assert all(np.isfinite(losses)) and 0.0 <= results["test"]["accuracy"] <= 1.0
  # Each sharded leaf trains n * round(k / n) entries: within n / 2 of the one-device budget per leaf.
  delta = spra.load_adapter(pathlib.Path(results["adapter"]))
  leaves = [m for m in jax.tree.leaves(delta.mask, is_leaf=spra.masks.is_leaf_mask) if m.kind == "sparse"]
  assert any(m.blocks is not None for m in leaves)
  assert abs(results["trainable"] - ref["trainable"]) <= sum(m.num_blocks / 2 for m in leaves)


def test_bad_mesh_specs_are_named(tmp_path, reviews_csv):
  with pytest.raises(ValueError, match=r"mesh spec 'model=2'.*data, fsdp, tensor"):
    FinetuneConfig(dataset=str(reviews_csv), mesh="model=2", output=str(tmp_path / "x"))
  with pytest.raises(ValueError, match=r"batch_size 12 must be a multiple of data x fsdp = 8"):
    run_cfg = FinetuneConfig(model="tiny-bert", dataset=str(reviews_csv), batch_size=12, steps=2, mesh="auto",
                             output=str(tmp_path / "y"))
    from spra_jax.finetune import Job

    Job(run_cfg, model=bert.build(CONFIG, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0)),
        tokenizer=transformers.AutoTokenizer.from_pretrained(data._minilm_dir()))
