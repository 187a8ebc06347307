"""The decoder families beyond Llama (Gemma 1/2/3, Qwen3, Phi-3) and sliding windows, against transformers' PyTorch.

One tiny random model per family (module-scoped), checked for: causal-LM logits
on a batch with right and left padding, the sliding window (shorter than the
sequence) and soft-capping actually changing transformers' output, KV-cache
greedy = uncached greedy = HF ``generate``, and the classification head.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax.masks import path_str
from spra_jax.models import generate as gen
from spra_jax.models import llama

torch = pytest.importorskip("torch", reason="the parity tests compare against PyTorch: pip install 'spra_jax[torch]'")
transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)
WINDOW = 4  # shorter than the 10-token batch and the 8 + 6 tokens of generation

# family -> (transformers class prefix, config overrides). Every windowed family uses WINDOW. Qwen2's window
# follows the same rule as Qwen3's (layers from max_window_layers), so its model is left to test_models_llama.
FAMILIES = {
    "mistral": ("Mistral", dict(head_dim=12, sliding_window=WINDOW)),
    "qwen3": ("Qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    # Phi-4-mini style: the rotary embedding turns half of each head (partial_rotary_factor).
    "phi3": ("Phi3", dict(sliding_window=WINDOW, eos_token_id=2, bos_token_id=1, pad_token_id=0,
                          partial_rotary_factor=0.5)),
    "gemma": ("Gemma", dict(head_dim=24)),
    "gemma2": ("Gemma2", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=20,
                              final_logit_softcapping=3.0, attn_logit_softcapping=0.05)),
    "gemma3_text": ("Gemma3Text", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})),
}
# Changes, one at a time, that must change transformers' logits (so that the parity check covers those fields).
# Gemma's sliding layers need a window, so theirs is widened past the sequence instead of removed.
MATTERS = {"mistral": [dict(sliding_window=None)],
           "qwen3": [dict(use_sliding_window=False)],
           "phi3": [dict(sliding_window=None), dict(partial_rotary_factor=1.0)],
           "gemma2": [dict(sliding_window=64), dict(final_logit_softcapping=None), dict(attn_logit_softcapping=None)],
           "gemma3_text": [dict(sliding_window=64)]}


def _hf_class(prefix, head):
  if prefix == "Gemma3Text" and head == "ForCausalLM":
    return transformers.Gemma3ForCausalLM
  return getattr(transformers, prefix + head)


def _hf_config(prefix, overrides):
  config = getattr(transformers, prefix + "Config")(**{**BASE, **overrides})
  config._attn_implementation = "eager"
  return config


def _torch_model(prefix, overrides, head="ForCausalLM", state=None):
  torch.manual_seed(0)
  model = _hf_class(prefix, head)(_hf_config(prefix, overrides)).eval()
  with torch.no_grad():
    if state is not None:
      model.load_state_dict(state, strict=False)
      return model
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):  # non-trivial norm scales and biases, so loading them is tested
        p.add_(0.3 * torch.randn_like(p))
      elif "embed" in name and prefix.startswith("Gemma"):
        p.mul_(20.0)  # larger logits and scores, so that Gemma 2's soft-capping bites
  return model


PROMPT, NEW = 8, 6  # generation: 8 prompt slots, 6 new tokens; the parity batch has the same shape [3, 14]


def _inputs():
  """A [3, 14] batch: a full row, a right-padded row and a left-padded row."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, size=(3, PROMPT + NEW)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  ids[mask == 0] = 0
  return ids, mask


def _prompts():
  """Left-padded prompts [3, 8] (generate's convention)."""
  ids = np.array([[0, 0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28], [0, 31, 32, 33, 34, 35, 36, 37]])
  return ids, (ids != 0).astype(np.int64)


def _torch_logits(model, ids, mask, positions=None):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False,
                 position_ids=None if positions is None else torch.from_numpy(positions)).logits.float().numpy()


def _ours(reference, *, task, num_labels=None):
  cfg = llama.config_from_hf(reference.config.to_dict())
  model = nnx.eval_shape(lambda: llama.build(cfg, task=task, num_labels=num_labels, rngs=nnx.Rngs(0)))
  assert llama.load_weights(model, {k: v.detach().numpy() for k, v in reference.state_dict().items()}) == []
  return model


@nnx.jit
def _forward(model, ids, mask, positions):
  return model(ids, attention_mask=mask, positions=positions)


def _run(model, ids, mask, positions=None):
  """Our forward on [3, 14] batches: one compilation per model serves every check."""
  if positions is None:
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                             jnp.asarray(positions, jnp.int32)))


def _on_tokens(a, b, mask):
  keep = mask.astype(bool)
  return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


def _greedy_matches_hf_generate(model, reference):
  """Our KV-cache greedy decoding of the left-padded prompts equals HF ``generate``'s; returns the new tokens."""
  prompt, prompt_mask = _prompts()
  cached = np.asarray(gen.generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=NEW))
  with torch.no_grad():
    hf = reference.generate(torch.from_numpy(prompt), attention_mask=torch.from_numpy(prompt_mask),
                            max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(cached, hf[:, PROMPT:].numpy())
  return cached


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
  name = request.param
  prefix, overrides = FAMILIES[name]
  reference = _torch_model(prefix, overrides)
  return name, prefix, overrides, reference, _ours(reference, task="causal-lm")


def test_causal_lm_logits_and_greedy_decoding_match_transformers(family):
  name, prefix, overrides, reference, model = family
  ids, mask = _inputs()
  expected = _torch_logits(reference, ids, mask)
  got = _run(model, ids, mask)
  assert got.shape == (3, PROMPT + NEW, VOCAB) and got.dtype == np.float32
  diff = _on_tokens(got, expected, mask)
  print(f"{name}: logits max abs diff vs PyTorch {diff:.2e} (padded right and left)")
  assert diff < 1e-4, f"{name}: max abs diff {diff}"
  for change in MATTERS.get(name, []):  # the window (and Gemma 2's caps) change transformers' own logits here,
    # by at least 10x the parity tolerance (the tiny Phi-3's logits are ~0.2, so its partial rotary moves them less)
    other = _torch_model(prefix, {**overrides, **change}, state=reference.state_dict())
    assert _on_tokens(_torch_logits(other, ids, mask), expected, mask) > 1e-3, (name, change)

  prompt, prompt_mask = _prompts()
  cached = _greedy_matches_hf_generate(model, reference)
  # Uncached greedy decoding, in one pass: the full forward over prompt + generated tokens (with generate's
  # positions) must predict each generated token from the ones before it.
  full_ids = np.concatenate([prompt, cached], axis=1)
  full_mask = np.concatenate([prompt_mask, np.ones_like(cached)], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  uncached = _run(model, full_ids, full_mask, positions).argmax(-1)[:, PROMPT - 1:-1]
  np.testing.assert_array_equal(cached, uncached)
  hf_full = _torch_logits(reference, full_ids, full_mask, positions)
  assert _on_tokens(_run(model, full_ids, full_mask, positions), hf_full, full_mask) < 1e-4


def test_family_structure(family):
  name, _, _, reference, model = family
  cfg = model.config
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  attn = "model/layers/1/self_attn/"
  assert {attn + f"{m}_proj/kernel" for m in "qkvo"} <= paths  # Phi-3's fused projections come apart
  assert ("lm_head/kernel" in paths) != cfg.tie_word_embeddings
  assert (attn + "q_norm/scale" in paths) == (name in ("qwen3", "gemma3_text"))
  assert ("model/layers/0/pre_feedforward_layernorm/scale" in paths) == (name in ("gemma2", "gemma3_text"))
  assert not any(p.endswith("/bias") for p in paths)
  if name in ("mistral", "phi3"):  # every layer: their HF attention reads config.sliding_window
    sliding = [True, True]
  elif name == "gemma":  # no window at all
    sliding = [False, False]
  else:
    sliding = [layer.self_attn.sliding_window is not None for layer in reference.model.layers]
  assert list(cfg.sliding_layers) == sliding, (name, cfg.sliding_layers, sliding)
  assert spra.models.model_type(model) == name
  assert spra.models.partition.rules_for(name) is spra.models.partition.LLAMA_RULES


@pytest.mark.parametrize("name", ["gemma3_text", "phi3"])
def test_sequence_classification_matches_transformers(name):
  prefix, overrides = FAMILIES[name]
  reference = _torch_model(prefix, {**overrides, "num_labels": 3}, head="ForSequenceClassification")
  model = _ours(reference, task="sequence-classification", num_labels=3)
  ids, mask = _inputs()
  expected = _torch_logits(reference, ids, mask)  # HF pools the rightmost non-pad token
  got = _run(model, ids, mask)
  print(f"{name} sequence classification: max abs diff vs PyTorch {np.abs(got - expected).max():.2e}")
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert model.score.kernel.shape == (32, 3) and model.score.bias is None


def test_phi3_longrope_matches_transformers_on_both_sides_of_the_original_context():
  # Phi-3-128k style: per-frequency short and long factors, switched once a call's positions pass the original
  # context (8 here), and cos/sin scaled by the attention factor from max_position_embeddings / 8.
  prefix, overrides = FAMILIES["phi3"]
  rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5], "long_factor": [2.0, 7.0],
          "original_max_position_embeddings": 8, "partial_rotary_factor": 0.5}
  reference = _torch_model(prefix, {**overrides, "rope_parameters": rope, "original_max_position_embeddings": 8})
  model = _ours(reference, task="causal-lm")
  assert model.config.rope_type == "longrope" and llama.rope_attention_scaling(model.config) > 1.0
  ids, mask = _inputs()
  plain = _torch_model(prefix, overrides, state=reference.state_dict())
  for n in (6, PROMPT + NEW):  # 6 positions: the short factors; 14: past the original context, the long ones
    expected = _torch_logits(reference, ids[:, :n], mask[:, :n])
    diff = _on_tokens(_run(model, ids[:, :n], mask[:, :n]), expected, mask[:, :n])
    print(f"phi3 longrope, {n} tokens: max abs diff vs PyTorch {diff:.2e}")
    assert diff < 1e-4
    assert _on_tokens(_torch_logits(plain, ids[:, :n], mask[:, :n]), expected, mask[:, :n]) > 1e-3  # it matters
  _greedy_matches_hf_generate(model, reference)


# --------------------------------------------------------------------------
# Configs: HF defaults, windows, and the fields that are refused.
# --------------------------------------------------------------------------


def test_config_json_defaults_follow_the_hf_config_classes():
  g2 = llama.config_from_hf({"model_type": "gemma2", "num_hidden_layers": 4})
  assert (g2.sliding_window, g2.query_pre_attn_scalar, g2.final_logit_softcapping, g2.attn_logit_softcapping) == (
      4096, 256, 30.0, 50.0)
  assert g2.head_dim == 256 and g2.tie_word_embeddings and g2.sandwich_norms and not g2.qk_norm
  assert llama.config_from_hf({"model_type": "gemma2", "final_logit_softcapping": None}).final_logit_softcapping is None
  # Gemma 3's older keys: one RoPE base per layer kind, scaling on the global layers only.
  g3 = llama.config_from_hf({"model_type": "gemma3_text", "num_hidden_layers": 7, "rope_theta": 1e6,
                             "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert g3.sliding_layers == (True,) * 5 + (False, True) and g3.qk_norm and g3.local_rope_theta == 1e4
  assert g3.rope_theta == 1e6 and g3.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}
  assert llama.config_from_hf({"model_type": "gemma", "hidden_act": "gelu"}).hidden_act == "gelu_pytorch_tanh"
  assert llama.config_from_hf({"model_type": "gemma", "sliding_window": 8}).sliding_window is None
  # Qwen checkpoints ship a sliding_window that is off unless use_sliding_window.
  assert llama.config_from_hf({"model_type": "qwen2", "sliding_window": 32768}).sliding_window is None
  q = llama.config_from_hf({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True,
                            "num_hidden_layers": 3, "max_window_layers": 2})
  assert q.sliding_layers == (False, False, True)
  assert llama.config_from_hf({"model_type": "mistral", "sliding_window": 8}).sliding_layers == (True,) * 32
  assert llama.config_from_hf({"model_type": "qwen3"}).head_dim == 128


@pytest.mark.parametrize("raw, field", [
    ({"model_type": "mistral", "partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
    ({"model_type": "qwen3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "phi3 only"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "lacks"),
    ({"model_type": "qwen3", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["chunked_attention"] * 2}, "layer_types"),
    ({"model_type": "gemma3_text", "rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "sliding_attention"),
])
def test_unsupported_fields_raise_naming_the_field(raw, field):
  with pytest.raises(ValueError, match=field.replace("[", r"\[")):
    llama.config_from_hf(raw)


# --------------------------------------------------------------------------
# Loading, presets, LoRA and the job's family table.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
  prefix, overrides = FAMILIES["phi3"]
  reference = _torch_model(prefix, overrides)
  folder = tmp_path_factory.mktemp("tiny-phi3")
  reference.save_pretrained(folder)
  return folder, reference


def test_phi3_from_pretrained_splits_the_fused_projections(phi3_dir):
  folder, reference = phi3_dir
  names = json.loads((folder / "config.json").read_text())
  assert names["model_type"] == "phi3"
  stored = dict(spra.models.open_safetensors(folder))
  assert "model.layers.0.self_attn.qkv_proj.weight" in stored and "model.layers.0.mlp.gate_up_proj.weight" in stored
  model, _ = spra.models.from_pretrained(folder)
  fused = reference.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
  v = model.model.layers[0].self_attn.v_proj.kernel[...]
  np.testing.assert_array_equal(np.asarray(v).T, fused[-v.shape[1]:])
  # Back to the fused names, for a checkpoint that transformers' Phi3 classes read.
  ours = {llama.torch_name(path_str(p)): llama.to_torch_layout(path_str(p), x)
          for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  back = llama.fuse_split(ours, model.config)
  assert set(back) == set(stored)
  for key in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
    np.testing.assert_array_equal(back[key], stored[key]())

  # The paper's preset puts SpaRTA on the V part and on O; LoRA targets the same modules.
  assert _preset_leaves(model, "paper", "phi3", task="causal-lm") == {
      f"model/layers/{i}/self_attn/{m}/kernel" for i in range(2) for m in ("v_proj", "o_proj")}
  from spra_jax.recipes.methods import module_pattern
  include = module_pattern(spra.models.presets.get("paper", "phi3")["include"])
  replaced = spra.models.apply_lora(nnx.clone(model), rank=2, include=include, rngs=nnx.Rngs(1))
  assert sorted(replaced) == [f"model/layers/{i}/self_attn/{m}" for i in range(2) for m in ("o_proj", "v_proj")]


def test_phi3_adapters_and_merged_exports_name_the_fused_tensors(phi3_dir, tmp_path):
  import safetensors.numpy

  folder, reference = phi3_dir
  model, _ = spra.models.from_pretrained(folder)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  mask = spra.sample_mask(jax.random.key(0), params, density=0.1, include=r"(q_proj|v_proj|up_proj)/kernel$")
  rng = np.random.default_rng(0)
  zero = spra.init_delta(mask)
  delta = spra.SparseDelta(zero.mask, jax.tree.map(lambda v: 0.5 * rng.normal(size=v.shape).astype(np.float32),
                                                    zero.values))
  fused = llama.fused_layout(model.config)
  spra.checkpoint.export_peft_sparta(tmp_path / "sparta", delta, base_model=str(folder), fused=fused)
  sparse = safetensors.numpy.load_file(str(tmp_path / "sparta" / "sparse_deltas.safetensors"))
  assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) for k in sparse)
  assert "indices.model.layers.0.self_attn.qkv_proj.weight" in sparse
  back = spra.checkpoint.import_peft_sparta(tmp_path / "sparta", params, fused=fused)
  for a, b in zip(jax.tree.leaves(spra.merge(params, back)), jax.tree.leaves(spra.merge(params, delta))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)

  # The merged model in transformers' own names and layout: its Phi3 class loads it and agrees with ours,
  # and the sparse file's fused coordinates added to transformers' base weights give the same tensors.
  spra.checkpoint.export_merged(tmp_path / "merged", params, delta, config=reference.config.to_dict(), fused=fused)
  merged = safetensors.numpy.load_file(str(tmp_path / "merged" / "model.safetensors"))
  base = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  assert set(merged) <= set(base) and "model.layers.1.mlp.gate_up_proj.weight" in merged
  for key in [k for k in sparse if k.startswith("indices.")]:
    name = key[len("indices."):]
    expected = base[name].copy()
    expected[tuple(sparse[key].T)] += sparse["deltas." + name]
    np.testing.assert_allclose(merged[name], expected, atol=1e-6, err_msg=name)
  loaded = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, spra.merge(params, delta)))
  nnx.update(model, state)
  ids, attention = _inputs()
  np.testing.assert_allclose(_run(model, ids, attention)[attention == 1],
                             _torch_logits(loaded, ids, attention)[attention == 1], atol=1e-4)


def _preset_leaves(model, preset, model_type, task=None):
  """The leaves a preset trains (sparse or full), by its regexes (as ``spra.sample_mask`` reads them)."""
  rules = spra.models.presets.get(preset, model_type, task=task)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]]
  sparse = {p for p in paths if re.search(rules["include"], p) and not re.search(rules["exclude"], p)}
  return sparse | {p for p in paths if rules["full"] and re.search(rules["full"], p)}


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "qwen3", "phi3"])
def test_presets_name_each_family_and_leave_its_norms_frozen(name):
  cfg = llama.config_from_hf(_hf_config(*FAMILIES[name]).to_dict())
  model = nnx.eval_shape(lambda: llama.build(cfg, task="sequence-classification", rngs=nnx.Rngs(0)))
  for preset in spra.models.presets.PRESETS:
    trained = _preset_leaves(model, preset, name)
    assert len(trained) > 1 and not any("norm" in p or "embed" in p for p in trained), (name, preset)
    assert "score/kernel" in trained
  exclude = spra.models.presets.get("paper", name)["exclude"]
  for path in (p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]):
    assert bool(re.search(exclude, path_str(path))) == ("norm" in path_str(path) or "embed" in path_str(path))


def test_the_job_reads_a_gemma_directory_as_a_decoder(tmp_path):
  from spra_jax.finetune.checks import _family_of_name

  prefix, overrides = FAMILIES["gemma3_text"]
  _hf_config(prefix, overrides).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3_text"
  assert _family_of_name(str(tmp_path)) == "decoder"
