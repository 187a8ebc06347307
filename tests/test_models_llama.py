"""Llama-family decoders: parity with transformers' PyTorch models, loading, generation, errors."""

import json

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

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, size=(3, 9)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  ids[mask == 0] = 0
  return ids, mask


def _torch_model(cls_name, config_cls, seed=0, **overrides):
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**{**BASE, **overrides})
  config._attn_implementation = "eager"
  model = getattr(transformers, cls_name)(config).eval()
  with torch.no_grad():  # non-trivial norm scales and biases, so that loading them is tested
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model, config


def _ours(torch_model, config, *, task, num_labels=None):
  cfg = llama.config_from_hf(config.to_dict())
  model = nnx.eval_shape(lambda: llama.build(cfg, task=task, num_labels=num_labels, rngs=nnx.Rngs(0)))
  tensors = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  assert llama.load_weights(model, tensors) == []
  return model


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, attention_mask=mask)


def _max_diff_on_tokens(a, b, mask):
  keep = mask.astype(bool)
  return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


CASES = {
    "llama-untied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-bias-llama3-rope": ("LlamaForCausalLM", "LlamaConfig", dict(
        attention_bias=True, mlp_bias=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8))),
    "llama-linear-rope": ("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(head_dim=24, sliding_window=None)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_causal_lm_logits_match_pytorch(case):
  cls_name, config_cls, overrides = CASES[case]
  reference, config = _torch_model(cls_name, config_cls, **overrides)
  model = _ours(reference, config, task="causal-lm")
  ids, mask = _inputs()
  expected = _torch_logits(reference, ids, mask)
  got = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert got.shape == (3, 9, VOCAB) and got.dtype == jnp.float32
  diff = _max_diff_on_tokens(got, expected, mask)
  print(f"{case}: logits max abs diff vs PyTorch {diff:.2e}")
  assert diff < 1e-4, f"{case}: max abs diff {diff}"
  assert hasattr(model, "lm_head") != bool(config.tie_word_embeddings)
  if case == "qwen2":
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (64,)
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_sequence_classification_matches_pytorch_and_pools_the_last_token():
  reference, config = _torch_model("LlamaForSequenceClassification", "LlamaConfig", num_labels=3)
  model = _ours(reference, config, task="sequence-classification", num_labels=3)
  assert "score/bias" not in {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  ids, mask = _inputs()
  expected = _torch_logits(reference, ids, mask)  # HF pools the rightmost non-pad token
  got = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert got.shape == (3, 3)
  print(f"sequence classification: max abs diff vs PyTorch {np.abs(np.asarray(got) - expected).max():.2e}")
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
  # Without a mask, the pad token id decides (as in HF).
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))[:2]), expected[:2], atol=1e-4, rtol=0)


def test_bf16_compute_stays_close_to_f32():
  reference, config = _torch_model("LlamaForCausalLM", "LlamaConfig")
  cfg = llama.config_from_hf(config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  f32 = nnx.eval_shape(lambda: llama.build(cfg, task="causal-lm", rngs=nnx.Rngs(0)))
  bf16 = nnx.eval_shape(lambda: llama.build(cfg, task="causal-lm", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                            rngs=nnx.Rngs(0)))
  llama.load_weights(f32, tensors)
  llama.load_weights(bf16, tensors)
  assert bf16.model.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16
  ids, mask = _inputs()
  a = _forward(f32, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  b = _forward(bf16, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert b.dtype == jnp.float32 and _max_diff_on_tokens(a, b, mask) < 0.05


def test_parameter_paths_follow_the_preset_contract():
  cfg = llama.LlamaConfig(**{**BASE, "attention_bias": True, "model_type": "qwen2"})
  model = nnx.eval_shape(lambda: llama.build(cfg, task="causal-lm", rngs=nnx.Rngs(0)))
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  layer = "model/layers/1/"
  assert {"model/embed_tokens/embedding", "model/norm/scale", "lm_head/kernel", layer + "self_attn/q_proj/bias",
          layer + "self_attn/k_proj/kernel", layer + "mlp/down_proj/kernel", layer + "input_layernorm/scale",
          layer + "post_attention_layernorm/scale"} <= paths
  assert layer + "self_attn/o_proj/bias" not in paths
  assert model.model.layers[1].self_attn.k_proj.kernel.shape == (64, 32)  # (in, out)
  assert len(paths) == 3 + 2 * (4 + 3 + 3 + 2)


# --------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
  reference, config = _torch_model("LlamaForCausalLM", "LlamaConfig", seed=3)
  return _ours(reference, config, task="causal-lm"), reference


def _left_padded():
  ids = np.array([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]], np.int32)
  return ids, (ids != 0).astype(np.int32)


def test_greedy_with_cache_equals_greedy_without_and_pytorch(lm):
  model, reference = lm
  ids, mask = _left_padded()
  cached = gen.generate(model, ids, attention_mask=mask, max_new_tokens=6)
  uncached = gen.generate_uncached(model, ids, attention_mask=mask, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  # HF's generate derives positions from the mask as well, so the left-padded row decodes as it would alone.
  with torch.no_grad():
    expected = reference.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                  max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(np.asarray(cached), expected[:, ids.shape[1]:].numpy())


def test_cached_logits_equal_the_full_forward(lm):
  model, _ = lm
  ids, mask = _left_padded()
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  call = nnx.jit(lambda m, i, a, p, c: m(i, a, positions=p, cache=c))
  full = nnx.jit(lambda m, i, a, p: m(i, a, positions=p))(model, jnp.asarray(ids), jnp.asarray(mask),
                                                          jnp.asarray(positions))
  cache = model.init_cache(batch=2, max_length=8)
  head, cache = call(model, jnp.asarray(ids[:, :4]), jnp.asarray(mask[:, :4]), jnp.asarray(positions[:, :4]), cache)
  tail, cache = call(model, jnp.asarray(ids[:, 4:]), jnp.asarray(mask[:, 4:]), jnp.asarray(positions[:, 4:]), cache)
  assert int(cache.index) == 6
  got = jnp.concatenate([head, tail], axis=1)
  assert _max_diff_on_tokens(got, full, mask) < 1e-5


def test_eos_ends_rows_and_sampling_arguments_are_checked(lm):
  model, _ = lm
  ids, mask = _left_padded()
  greedy = np.asarray(gen.generate(model, ids, attention_mask=mask, max_new_tokens=6))
  eos = int(greedy[0, 1])
  out = np.asarray(gen.generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos,
                                pad_token_id=0))
  for row in range(2):  # each row follows greedy decoding up to its first eos, then pads
    hits = np.flatnonzero(greedy[row] == eos)
    end = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
    assert (out[row, end:] == 0).all()
  sampled = gen.generate(model, ids, attention_mask=mask, max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9,
                         key=jax.random.key(1))
  assert sampled.shape == (2, 3) and bool(((sampled >= 0) & (sampled < VOCAB)).all())
  with pytest.raises(ValueError, match="needs a PRNG key"):
    gen.generate(model, ids, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="left-padded"):
    gen.generate(model, ids[::-1, ::-1], attention_mask=mask[::-1, ::-1], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p must be in"):
    gen.generate(model, ids, max_new_tokens=2, temperature=1.0, top_p=1.5, key=jax.random.key(0))


def test_top_k_and_top_p_restrict_the_candidates():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.key(0)
  top2 = np.asarray(gen.sample_logits(logits, temperature=1.0, top_k=2, key=keys))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(gen.sample_logits(logits, temperature=1.0, top_p=0.8, key=keys))
  assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
  assert set(np.asarray(gen.sample_logits(logits, temperature=1.0, top_p=0.81, key=keys)).tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------
# Loading through from_pretrained, and errors.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  reference, _ = _torch_model("MistralForCausalLM", "MistralConfig", seed=5, head_dim=24, sliding_window=None)
  folder = tmp_path_factory.mktemp("tiny-mistral")
  reference.save_pretrained(folder)
  return folder, reference


def test_from_pretrained_reads_a_saved_transformers_directory(hf_dir):
  folder, reference = hf_dir
  model, tokenizer = spra.models.from_pretrained(folder)
  assert type(model).__name__ == "LlamaForCausalLM" and tokenizer is None
  assert spra.models.model_type(model) == "mistral"
  ids, mask = _inputs()
  diff = _max_diff_on_tokens(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)),
                             _torch_logits(reference, ids, mask), mask)
  assert diff < 1e-4
  classifier, _ = spra.models.from_pretrained(folder, task="sequence-classification", num_labels=4)
  assert classifier.score.kernel.shape == (64, 4)
  np.testing.assert_array_equal(np.asarray(classifier.model.norm.scale[...]), np.asarray(model.model.norm.scale[...]))


def test_unknown_architecture_lists_the_supported_ones(hf_dir, tmp_path):
  folder, _ = hf_dir
  config = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="falcon")))
  (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
  with pytest.raises(ValueError, match=r"unsupported architecture: model_type='falcon'. Supported model types: "
                                       r".*gemma, gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
    spra.models.from_pretrained(tmp_path)


def test_shape_mismatch_and_missing_tensors_are_named(hf_dir, tmp_path):
  folder, _ = hf_dir
  config = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
  (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
  with pytest.raises(ValueError, match=r"checkpoint tensor 'model.layers.\d+.mlp.(gate|up|down)_proj.weight' has shape "
                                       r"\(\d+, \d+\), but the model expects \(\d+, \d+\)"):
    spra.models.from_pretrained(tmp_path)
  cfg = llama.config_from_hf(config)
  model = nnx.eval_shape(lambda: llama.build(cfg, task="causal-lm", rngs=nnx.Rngs(0)))
  tensors = dict(spra.models.open_safetensors(folder))
  del tensors["lm_head.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
  with pytest.raises(ValueError, match=r"2 parameter\(s\) have no tensor.*lm_head.weight.*tie_word_embeddings"):
    llama.load_weights(model, tensors)
  assert llama.load_weights(model, tensors, strict=False) == ["lm_head/kernel", "model/layers/1/self_attn/k_proj/kernel"]


def test_missing_files_and_bad_configs_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    spra.models.from_pretrained(tmp_path / "absent.gguf")
  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    spra.models.gguf.read_gguf(tmp_path / "absent.gguf")
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
    llama.config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="handles model types .*got 'gpt2'"):
    llama.config_from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="tasks .*got task='generation'"):
    llama.build(llama.LlamaConfig(**BASE), task="generation", rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# SpaRTA masks and LoRA on a Llama model.
# --------------------------------------------------------------------------


def test_lora_and_paper_preset_masks_work_on_llama(lm):
  model, _ = lm
  ids, mask = _inputs()
  before = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  mask_tree = spra.sample_mask(jax.random.key(0), nnx.state(model, nnx.Param), density=0.05,
                               **spra.models.presets.get("paper", "llama", task="causal-lm"))
  flat = jax.tree_util.tree_flatten_with_path(mask_tree, is_leaf=spra.masks.is_leaf_mask)[0]
  sparse = {path_str(p) for p, m in flat if m.kind == "sparse"}
  assert sparse == {f"model/layers/{i}/self_attn/{m}/kernel" for i in range(2) for m in ("v_proj", "o_proj")}

  lora_model = nnx.clone(model)
  replaced = spra.models.apply_lora(lora_model, rank=4, include=r"self_attn/(q_proj|v_proj)$", rngs=nnx.Rngs(1))
  assert replaced == [f"model/layers/{i}/self_attn/{m}" for i in range(2) for m in ("q_proj", "v_proj")]
  after = _forward(lora_model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-6)
  assert spra.models.lora_param_count(lora_model) == 2 * 4 * ((64 + 64) + (64 + 32))
