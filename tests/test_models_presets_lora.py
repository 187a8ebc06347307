"""Presets (which leaves are sparse, full or frozen) and the LoRA baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax.masks import FROZEN, FULL, SPARSE, is_leaf_mask, path_str
from spra_jax.models import bert, lora, presets

CONFIG = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=12)


def _kinds(mask):
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)
  out = {FROZEN: set(), FULL: set(), SPARSE: set()}
  for p, m in flat:
    out[m.kind].add(path_str(p))
  return out


def _modules(prefix, names, layers=2, leaves=("kernel", "bias")):
  return {f"{prefix}{i}/{name}/{leaf}" for i in range(layers) for name in names for leaf in leaves}


BERT_V_O = ["attention/self/value", "attention/output/dense"]
BERT_Q_K = ["attention/self/query", "attention/self/key"]
BERT_MLP = ["intermediate/dense", "output/dense"]


@pytest.mark.parametrize("name, sparse_modules, pooler", [
    ("paper", BERT_V_O, False),
    ("attention", BERT_V_O + BERT_Q_K, False),
    ("mlp", BERT_MLP, False),
    ("all-linear", BERT_V_O + BERT_Q_K + BERT_MLP, True),
])
def test_bert_presets_select_exactly_their_leaves(name, sparse_modules, pooler):
  model = bert.build(CONFIG, task="sequence-classification", num_labels=3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  kinds = _kinds(spra.sample_mask(0, params, density=0.05, **presets.get(name, "bert")))
  expected_sparse = _modules("bert/encoder/layer/", sparse_modules)
  if pooler:
    expected_sparse |= {"bert/pooler/dense/kernel", "bert/pooler/dense/bias"}
  everything = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert kinds[SPARSE] == expected_sparse
  assert kinds[FULL] == {"classifier/kernel", "classifier/bias"}
  assert kinds[FROZEN] == everything - expected_sparse - kinds[FULL]
  assert {"bert/embeddings/word_embeddings/embedding", "bert/encoder/layer/0/output/LayerNorm/scale"} <= kinds[FROZEN]


def test_bert_base_model_preset_has_no_head():
  model = bert.build(CONFIG, task="base", rngs=nnx.Rngs(0))
  kwargs = presets.get("paper", "bert", task="base")
  assert kwargs["full"] is None
  kinds = _kinds(spra.sample_mask(0, nnx.state(model, nnx.Param), density=0.05, **kwargs))
  assert kinds[FULL] == set() and kinds[SPARSE] == _modules("encoder/layer/", BERT_V_O)
  with pytest.raises(ValueError, match="matches no leaf"):  # why task= exists
    spra.sample_mask(0, nnx.state(model, nnx.Param), density=0.05, **presets.get("paper", "bert"))


def _llama_tree(*, head, qkv_bias=False, layers=2, d=64, kv=16, ffn=96, vocab=128):
  """An abstract Llama-family parameter tree with the contract's path names."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  def proj(din, dout, bias=False):
    return {"kernel": s(din, dout), **({"bias": s(dout)} if bias else {})}
  layer = lambda: {
      "self_attn": {"q_proj": proj(d, d, qkv_bias), "k_proj": proj(d, kv, qkv_bias), "v_proj": proj(d, kv, qkv_bias),
                    "o_proj": proj(d, d)},
      "mlp": {"gate_proj": proj(d, ffn), "up_proj": proj(d, ffn), "down_proj": proj(ffn, d)},
      "input_layernorm": {"scale": s(d)}, "post_attention_layernorm": {"scale": s(d)},
  }
  tree = {"model": {"embed_tokens": {"embedding": s(vocab, d)}, "layers": [layer() for _ in range(layers)],
                    "norm": {"scale": s(d)}}}
  if head == "score":
    tree["score"] = {"kernel": s(d, 2)}
  elif head == "lm_head":
    tree["lm_head"] = {"kernel": s(d, vocab)}
  return tree


LLAMA_ATTN = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj"]
LLAMA_MLP = ["mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name, modules", [
    ("paper", ["self_attn/v_proj", "self_attn/o_proj"]),
    ("attention", LLAMA_ATTN),
    ("mlp", LLAMA_MLP),
    ("all-linear", LLAMA_ATTN + LLAMA_MLP),
])
def test_llama_family_presets_on_an_abstract_tree(model_type, name, modules):
  qkv_bias = model_type == "qwen2"
  tree = _llama_tree(head="score", qkv_bias=qkv_bias)
  kinds = _kinds(spra.sample_mask(0, tree, density=0.05, **presets.get(name, model_type)))
  expected = _modules("model/layers/", modules, leaves=("kernel",))
  if qkv_bias:  # Qwen2's q/k/v biases go with their projections
    with_bias = [m for m in modules if m.endswith(("q_proj", "k_proj", "v_proj"))]
    expected |= {f"model/layers/{i}/{m}/bias" for i in range(2) for m in with_bias}
  assert kinds[SPARSE] == expected
  assert kinds[FULL] == {"score/kernel"}
  assert {"model/embed_tokens/embedding", "model/norm/scale", "model/layers/1/input_layernorm/scale"} <= kinds[FROZEN]

  causal = _llama_tree(head="lm_head", qkv_bias=qkv_bias)
  kinds = _kinds(spra.sample_mask(0, causal, density=0.05, **presets.get(name, model_type, task="causal-lm")))
  assert kinds[SPARSE] == expected and kinds[FULL] == set() and "lm_head/kernel" in kinds[FROZEN]


def test_preset_drives_spra_masked_on_a_bert_classifier():
  model = bert.build(CONFIG, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = spra.masked(optax.sgd(1.0), density=0.05, key=0, **presets.get("paper", "bert"))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  moved = {path_str(p) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0] if bool(jnp.any(u != 0))}
  assert {"classifier/kernel", "classifier/bias", "bert/encoder/layer/1/attention/self/value/kernel"} <= moved
  assert moved <= _modules("bert/encoder/layer/", BERT_V_O) | {"classifier/kernel", "classifier/bias"}


def test_preset_errors():
  with pytest.raises(ValueError, match="unknown preset 'dense'.*'paper'"):
    presets.get("dense", "bert")
  with pytest.raises(ValueError, match="no presets for model_type='gpt2'"):
    presets.get("paper", "gpt2")
  with pytest.raises(ValueError, match="task must be"):
    presets.get("paper", "bert", task="generation")


# --------------------------------------------------------------------------
# LoRA.
# --------------------------------------------------------------------------


def _inputs():
  ids = jnp.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], jnp.int32)
  return ids, (ids != 0).astype(jnp.int32)


def test_lora_keeps_outputs_and_variables_and_counts_rank_times_in_plus_out():
  model = bert.build(CONFIG, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  ids, mask = _inputs()
  before = model(ids, mask)
  value_kernel = model.bert.encoder.layer[1].attention.self.value.kernel
  replaced = lora.apply_lora(model, rank=3, include=r"attention/self/(query|value)$|intermediate/dense$",
                             rngs=nnx.Rngs(1))
  assert replaced == [f"bert/encoder/layer/{i}/{m}" for i in range(2)
                      for m in ("attention/self/query", "attention/self/value", "intermediate/dense")]
  assert model.bert.encoder.layer[1].attention.self.value.kernel is value_kernel  # same pretrained variable
  np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(before))  # B = 0 at init
  per_layer = 3 * (16 + 16) + 3 * (16 + 16) + 3 * (16 + 24)
  assert lora.lora_param_count(model) == 2 * per_layer
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.LoRAParam))[0]}
  assert "bert/encoder/layer/0/attention/self/value/lora/lora_a" in paths and len(paths) == 12


def test_training_with_wrt_lora_param_changes_only_lora_params():
  model = bert.build(CONFIG, task="sequence-classification", num_labels=2, rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=2, include=r"attention/(self/value|output/dense)$", alpha=4.0, rngs=nnx.Rngs(1))
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  ids, mask = _inputs()
  labels = jnp.array([0, 1])

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(ids, mask), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(4)]
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam))),
               frozen_before)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b),
                                         nnx.state(model, nnx.LoRAParam), lora_before))
  assert all(changed) and len(changed) == 8


def test_lora_alpha_scales_the_low_rank_branch():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.v_proj = nnx.Linear(6, 4, rngs=rngs)

  x = jnp.arange(12.0).reshape(2, 6) / 10
  for alpha, rank in [(None, 2), (8.0, 2), (1.0, 4)]:
    block = Block(nnx.Rngs(0))
    base = block.v_proj(x)
    lora.apply_lora(block, rank=rank, include="v_proj", alpha=alpha, rngs=nnx.Rngs(1))
    layer = block.v_proj
    layer.lora.lora_b[...] = jnp.ones((rank, 4))
    scale = (alpha if alpha is not None else rank) / rank
    expected = base + scale * (x @ layer.lora.lora_a[...] @ layer.lora.lora_b[...])
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=1e-6)


def test_lora_errors():
  model = bert.build(CONFIG, task="base", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"matches no nnx.Linear layer; Linear paths look like 'encoder/layer/0/"):
    lora.apply_lora(model, rank=2, include="v_proj", rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lora.apply_lora(model, rank=0, include="value", rngs=nnx.Rngs(1))
