"""GGUF files -> (HF-style config, lazy tensors under HF torch names, tokenizer), without torch.

:func:`read_gguf` reads a llama.cpp GGUF file with the ``gguf`` package:

* the metadata becomes a ``config.json``-style dict (``model_type``,
  ``hidden_size``, ``num_key_value_heads``, ``rope_theta``, ...);
* each tensor becomes a :class:`GGUFTensor` named as in the Hugging Face
  state dict (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``)
  that dequantises (``gguf.quants.dequantize``: F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, the K-quants, ...) to float32 only when called, in torch ``[out, in]``
  layout. llama.cpp's converter permutes the rows of Llama's Q and K
  projections for its interleaved RoPE; these tensors undo that, so they fit
  HF's rotate-half RoPE (:mod:`spra_jax.models.llama`);
* the tokenizer is rebuilt from the vocabulary and merges in the metadata with
  the ``tokenizers`` library and wrapped in ``transformers.PreTrainedTokenizerFast``
  (special tokens, bos/eos/pad, chat template).

Supported: architectures ``llama`` and ``qwen2`` (:data:`ARCHITECTURES`);
byte-level BPE tokenizers (``tokenizer.ggml.model = gpt2``) with the
pre-tokenizers in :data:`PRE_TOKENIZERS`. For another tokenizer kind the
tokenizer is None (a log message says why) and the model still loads.

Example (a tiny GGUF file written with ``gguf.GGUFWriter``):

  >>> import os, tempfile
  >>> import numpy as np
  >>> import gguf
  >>> from spra_jax.models.gguf import read_gguf
  >>> path = os.path.join(tempfile.mkdtemp(), 'tiny.gguf')
  >>> w = gguf.GGUFWriter(path, 'llama')
  >>> for key, value in [('block_count', 1), ('embedding_length', 8), ('feed_forward_length', 16),
  ...                    ('attention.head_count', 2), ('context_length', 32)]:
  ...   w.add_uint32(f'llama.{key}', value)
  >>> w.add_float32('llama.attention.layer_norm_rms_epsilon', 1e-5)
  >>> w.add_tensor('token_embd.weight', np.ones((10, 8), np.float32))
  >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  >>> config, tensors, tokenizer = read_gguf(path)
  >>> config['model_type'], config['num_key_value_heads'], config['tie_word_embeddings'], tokenizer
  ('llama', 2, True, None)
  >>> t = tensors['model.embed_tokens.weight']
  >>> t.shape, t.dtype, float(t().sum())
  ((10, 8), dtype('float32'), 80.0)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spra_jax.models._io import aligned_empty

__all__ = ["ARCHITECTURES", "PRE_TOKENIZERS", "GGUFTensor", "GGUFSource", "read_gguf", "hf_name", "unpermute"]

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` -> HF model_type.
ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2"}

# Architectures whose Q/K rows llama.cpp's converter permuted (interleaved RoPE); Qwen2 uses NeoX RoPE, unpermuted.
_PERMUTED = {"llama"}

# Pre-tokenizer regexes by ``tokenizer.ggml.pre`` (None: GPT-2's own byte-level regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: tuple[str, ...] = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")

_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
  """The HF torch name of a GGUF tensor name, or None for tensors without one.

  Example:

    >>> hf_name('blk.3.attn_output.weight'), hf_name('output_norm.weight'), hf_name('blk.0.attn_q.bias')
    ('model.layers.3.self_attn.o_proj.weight', 'model.norm.weight', 'model.layers.0.self_attn.q_proj.bias')
    >>> hf_name('rope_freqs.weight') is None
    True
  """
  m = _BLOCK.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  m = _GLOBAL.match(gguf_name)
  if m and m.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
  return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE -> HF rotate-half), rows = ``n_head * head_dim``.

  llama.cpp orders each head's rows as pairs ``(0, d/2), (1, d/2+1), ...``;
  HF orders them as the first half, then the second half.

  Example:

    >>> import numpy as np
    >>> rows = np.arange(8)  # one head of dim 8 as llama.cpp stores it: pairs (0,4) (1,5) (2,6) (3,7)
    >>> unpermute(np.array([0, 4, 1, 5, 2, 6, 3, 7]), 1).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
  """
  out = w.shape[0]
  if out % (2 * n_head):
    raise ValueError(f"cannot un-permute {out} rows into {n_head} heads of even size.")
  return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensor:
  """One GGUF tensor, dequantised to float32 (torch layout, Q/K un-permuted) on each call.

  ``shape`` and ``dtype`` (always float32) are known without reading data.
  """

  __slots__ = ("name", "gguf_name", "shape", "dtype", "_tensor", "_heads")

  def __init__(self, name: str, tensor: Any, heads: int | None):
    self.name = name
    self.gguf_name = tensor.name
    self.shape = tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))  # ggml lists the fastest axis first
    self.dtype = np.dtype(np.float32)
    self._tensor = tensor
    self._heads = heads

  def __call__(self) -> np.ndarray:
    from gguf import quants

    t = self._tensor
    try:
      array = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as err:
      raise ValueError(f"GGUF tensor {self.gguf_name!r} has type {t.tensor_type.name}, which the gguf package "
                       f"cannot dequantise: {err}") from err
    array = np.asarray(array).reshape(self.shape)
    if self._heads is not None:
      array = unpermute(array, self._heads)
    # A fresh aligned float32 copy: never a view of the file's memory map.
    out = aligned_empty(self.shape, np.float32)
    np.copyto(out, array, casting="unsafe")
    return out

  def __repr__(self) -> str:
    return f"GGUFTensor({self.name!r} <- {self.gguf_name!r}, {self._tensor.tensor_type.name}, shape={self.shape})"


class GGUFSource(Mapping):
  """A read-only mapping from HF torch names to :class:`GGUFTensor` (``path`` is the file)."""

  def __init__(self, tensors: dict[str, GGUFTensor], path: str):
    self._tensors = tensors
    self.path = path

  def __getitem__(self, name: str) -> GGUFTensor:
    return self._tensors[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def __repr__(self) -> str:
    return f"GGUFSource({len(self)} tensors from {self.path})"


def _field(reader: Any, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  if isinstance(value, np.generic):
    value = value.item()
  return value


def _config(reader: Any, arch: str, names: set[str], vocab_rows: int | None) -> dict[str, Any]:
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
             if get(k) is None]
  if missing:
    raise ValueError(f"the GGUF metadata lacks {[f'{arch}.{k}' for k in missing]}, needed to build the model.")
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = get("vocab_size") or vocab_rows or (len(tokens) if tokens else None)
  config: dict[str, Any] = {
      "model_type": ARCHITECTURES[arch],
      "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(get("attention.key_length", hidden // heads)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "lm_head.weight" not in names,
      "attention_bias": "model.layers.0.self_attn.q_proj.bias" in names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }
  scaling = get("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ValueError(f"GGUF rope scaling type {scaling!r} is not supported (supported: none, linear).")
    config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
  return config


def _tokenizer(reader: Any, path: Path) -> Any:
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    return None
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if kind != "gpt2" or pre not in PRE_TOKENIZERS:
    logger.warning("%s: no tokenizer built: tokenizer.ggml.model=%r, tokenizer.ggml.pre=%r; supported are "
                   "model 'gpt2' (byte-level BPE) with pre-tokenizers %s.", path, kind, pre, PRE_TOKENIZERS)
    return None
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  tokens = _field(reader, "tokenizer.ggml.tokens")
  types = _field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama-bpe", "llama3", "qwen2"):
    split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tokenizer.pre_tokenizer = byte_level
  tokenizer.decoder = decoders.ByteLevel()
  special = [t for t, k in zip(tokens, types) if int(k) == _TOKEN_CONTROL]
  added = [t for t, k in zip(tokens, types) if int(k) == _TOKEN_USER_DEFINED]
  tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])

  def token(key: str) -> str | None:
    index = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

  bos, eos = token("bos"), token("eos")
  if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
  kwargs = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
            "chat_template": _field(reader, "tokenizer.chat_template")}
  return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{k: v for k, v in kwargs.items() if v is not None})


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], GGUFSource, Any]:
  """Reads a GGUF file lazily: the config and tokenizer now, the weights when each tensor is called.

  Args:
    path: a ``.gguf`` file.

  Returns:
    ``(config, tensors, tokenizer)``: an HF ``config.json``-style dict, a
    mapping from HF torch names to :class:`GGUFTensor`, and a
    ``PreTrainedTokenizerFast`` (None when the file's tokenizer kind is not
    supported).

  Raises:
    FileNotFoundError: for a missing file.
    ValueError: for a file that is not GGUF, an architecture outside
      :data:`ARCHITECTURES` (the message lists them), tensors this reader cannot
      place (e.g. Llama 3.1's ``rope_freqs``), or missing metadata.

  Example: see the module docstring.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    folder = path.parent
    listing = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
    raise FileNotFoundError(f"no such GGUF file: {path} (its folder holds: {listing or 'nothing'}).")
  import gguf

  try:
    reader = gguf.GGUFReader(path, "r")
  except ValueError as err:
    raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {', '.join(ARCHITECTURES)}.")
  heads = _field(reader, f"{arch}.attention.head_count")
  kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)

  tensors: dict[str, GGUFTensor] = {}
  unplaced = []
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None:
      unplaced.append(t.name)
      continue
    permute = None
    if arch in _PERMUTED and ".self_attn.q_proj." in name:
      permute = int(heads)
    elif arch in _PERMUTED and ".self_attn.k_proj." in name:
      permute = int(kv_heads)
    tensors[name] = GGUFTensor(name, t, permute)
  if unplaced:
    raise ValueError(f"{path.name} holds tensors this reader cannot place: {unplaced[:8]} "
                     f"(e.g. rope_freqs, Llama 3.1's RoPE factors, is not supported).")
  embed = tensors.get("model.embed_tokens.weight")
  config = _config(reader, arch, set(tensors), embed.shape[0] if embed is not None else None)
  config["name_or_path"] = str(path)
  return config, GGUFSource(tensors, str(path)), _tokenizer(reader, path)
