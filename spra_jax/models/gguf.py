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

Supported: architectures ``llama``, ``qwen2`` and ``gemma3`` (:data:`ARCHITECTURES`;
Gemma 3's norm weights are stored as ``1 + w`` and read back as ``w``);
byte-level BPE tokenizers (``tokenizer.ggml.model = gpt2``) with the
pre-tokenizers in :data:`PRE_TOKENIZERS`, and SentencePiece vocabularies
(``tokenizer.ggml.model = llama``: pieces with ``▁`` for spaces, merges
implied by the pieces' ranks, byte fallback to ``<0xNN>``). For another
tokenizer kind the tokenizer is None (a log message says why) and the model
still loads. The metadata is read by a small reader of the GGUF layout (the
``gguf`` package's own takes about 20 s on a 262k-token vocabulary); the
``gguf`` package dequantises.

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
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spra_jax.models._io import aligned_empty

__all__ = ["ARCHITECTURES", "PRE_TOKENIZERS", "GGUFTensor", "GGUFSource", "read_gguf", "hf_name", "unpermute"]

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` -> HF model_type.
ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}

# Architectures whose Q/K rows llama.cpp's converter permuted (interleaved RoPE); Qwen2 and Gemma 3 use NeoX
# (rotate-half) RoPE, so their rows are stored as Hugging Face has them.
_PERMUTED = {"llama"}
# Architectures whose RMSNorm weights the converter stored as ``1 + w`` (ggml's norm multiplies by the weight
# alone, Gemma's by ``1 + w``): the reader subtracts the 1 again, so the weights fit HF's (and our) Gemma norm.
_NORM_SHIFTED = {"gemma3"}

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
# Gemma 3 has norms around both sub-blocks: its ``ffn_norm`` is the norm *before* the MLP, and the norms after
# attention and MLP have names of their own.
_ARCH_BLOCK_NAMES = {
    "gemma3": {**_BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
  """The HF torch name of a GGUF tensor name in a file of architecture ``arch``, or None for tensors without one.

  Example:

    >>> hf_name('blk.3.attn_output.weight'), hf_name('output_norm.weight'), hf_name('blk.0.attn_q.bias')
    ('model.layers.3.self_attn.o_proj.weight', 'model.norm.weight', 'model.layers.0.self_attn.q_proj.bias')
    >>> hf_name('blk.0.ffn_norm.weight'), hf_name('blk.0.ffn_norm.weight', 'gemma3')
    ('model.layers.0.post_attention_layernorm.weight', 'model.layers.0.pre_feedforward_layernorm.weight')
    >>> hf_name('rope_freqs.weight') is None
    True
  """
  blocks = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
  m = _BLOCK.match(gguf_name)
  if m and m.group(2) in blocks:
    return f"model.layers.{m.group(1)}.{blocks[m.group(2)]}.{m.group(3)}"
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
  """One GGUF tensor, dequantised to float32 (torch layout, Q/K un-permuted, norm shift undone) on each call.

  ``shape`` and ``dtype`` (always float32) are known without reading data.
  ``shift`` is subtracted from every entry (1.0 for Gemma's norm weights).
  """

  __slots__ = ("name", "gguf_name", "shape", "dtype", "_tensor", "_heads", "_shift")

  def __init__(self, name: str, tensor: Any, heads: int | None, shift: float = 0.0):
    self.name = name
    self.gguf_name = tensor.name
    self.shape = tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))  # ggml lists the fastest axis first
    self.dtype = np.dtype(np.float32)
    self._tensor = tensor
    self._heads = heads
    self._shift = float(shift)

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
    if self._shift:
      out -= np.float32(self._shift)
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


# --------------------------------------------------------------------------
# The file: header, metadata and tensor table (the data stays memory-mapped).
# --------------------------------------------------------------------------

# GGUF metadata value types -> struct format (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _TensorInfo:
  """One entry of the tensor table: ``shape`` in ggml order (fastest axis first) and the raw bytes as rows."""

  __slots__ = ("name", "shape", "tensor_type", "data")

  def __init__(self, name: str, shape: tuple[int, ...], tensor_type: Any, data: np.ndarray):
    self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data


class _GGUFFile:
  """A GGUF file's metadata (``fields``: key -> Python value) and tensors, read without copying the data.

  The ``gguf`` package's own reader turns every element of the metadata
  arrays into a numpy view, which takes about 20 s for Gemma 3's 262k-token
  vocabulary; this reads the same layout (GGUF v2/v3, little-endian) in well
  under a second and leaves dequantisation to ``gguf.quants``.
  """

  def __init__(self, path: Path):
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if len(buf) < 24 or buf[:4] != b"GGUF":
      raise ValueError(f"no GGUF magic (the file starts with {bytes(buf[:4])!r}).")
    version, = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} is not supported (supported: 2, 3).")
    n_tensors, n_fields = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string() -> str:
      nonlocal pos
      n, = struct.unpack_from("<Q", buf, pos)
      text = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace")
      pos += 8 + n
      return text

    def value(kind: int) -> Any:
      nonlocal pos
      if kind == 8:
        return string()
      if kind in _SCALARS:
        out, = struct.unpack_from(_SCALARS[kind], buf, pos)
        pos += struct.calcsize(_SCALARS[kind])
        return out
      if kind == 9:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _NUMPY:  # numbers: one numpy read for the whole array
          array = np.frombuffer(buf, _NUMPY[item], count, pos)
          pos += array.nbytes
          return array.tolist()
        return [value(item) for _ in range(count)]
      raise ValueError(f"unknown GGUF metadata value type {kind} at byte {pos}.")

    self.fields: dict[str, Any] = {}
    for _ in range(n_fields):
      key = string()
      kind, = struct.unpack_from("<I", buf, pos)
      pos += 4
      self.fields[key] = value(kind)
    table = []
    for _ in range(n_tensors):
      name = string()
      n_dims, = struct.unpack_from("<I", buf, pos)
      dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
      kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
      pos += 4 + 8 * n_dims + 12
      table.append((name, tuple(int(d) for d in dims) or (1,), kind, offset))
    alignment = int(self.fields.get("general.alignment", 32))
    start = -(-pos // alignment) * alignment
    data = np.memmap(path, np.uint8, "r")
    self.tensors: list[_TensorInfo] = []
    for name, dims, kind, offset in table:
      try:
        qtype = GGMLQuantizationType(kind)
      except ValueError:
        raise ValueError(f"GGUF tensor {name!r} has ggml type {kind}, which the gguf package does not know.") from None
      block, size = GGML_QUANT_SIZES[qtype]
      count = int(np.prod(dims)) if dims else 1
      if dims[0] % block:
        raise ValueError(f"GGUF tensor {name!r}: rows of {dims[0]} entries do not fill {qtype.name} blocks of {block}.")
      row_bytes = dims[0] // block * size
      first = start + offset
      if first + count // dims[0] * row_bytes > len(data):
        raise ValueError(f"GGUF tensor {name!r} runs past the end of the file (truncated?).")
      rows = data[first:first + count // dims[0] * row_bytes].reshape(-1, row_bytes)
      self.tensors.append(_TensorInfo(name, dims, qtype, rows))


def _field(reader: _GGUFFile, key: str, default: Any = None) -> Any:
  return reader.fields.get(key, default)


_CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _gemma3_config(get: Any, head_dim: int) -> dict[str, Any]:
  """The Gemma 3 fields of the config; those the metadata does not hold take the values llama.cpp assumes.

  llama.cpp (and transformers' config class) put a global layer after every five sliding ones and give the
  sliding layers RoPE base 10000; llama.cpp scales the scores by ``1 / sqrt(head_dim)`` (all sizes but 27B,
  whose files are refused below), which is ``query_pre_attn_scalar = head_dim``.
  """
  window = get("attention.sliding_window")
  if window is None:
    raise ValueError("the GGUF metadata lacks gemma3.attention.sliding_window, needed for Gemma 3's local layers.")
  if int(get("block_count")) == 62:
    # Gemma 3 27B scales its queries by 1/sqrt(hidden / heads), which the metadata does not say either.
    raise ValueError("Gemma 3 27B GGUF files are not supported: their query scaling is not in the metadata.")
  return {
      "sliding_window": int(window),
      "sliding_window_pattern": 6,
      "rope_local_base_freq": 10000.0,
      "query_pre_attn_scalar": head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "final_logit_softcapping": get("final_logit_softcapping"),
      "attn_logit_softcapping": None,
  }


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
      "architectures": [_CAUSAL_LM_CLASSES[arch]],
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
  if arch == "gemma3":
    config.update(_gemma3_config(get, config["head_dim"]))
  scaling = get("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ValueError(f"GGUF rope scaling type {scaling!r} is not supported (supported: none, linear).")
    config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
  return config


_SPACE_MARKER = "\u2581"  # SentencePiece's visible space


def sentencepiece_merges(tokens: list[str], ranks: list[float]) -> list[tuple[str, str]]:
  """The BPE merges a SentencePiece-BPE vocabulary implies: every split of a token into two tokens.

  GGUF files of SentencePiece models store tokens and scores but no merges.
  SentencePiece's BPE joins, at each step, the adjacent pair whose joined
  token ranks best; a BPE merge list that orders each token's splits by that
  token's rank does the same. ``ranks``: smaller is better (one per token).
  Among one token's splits, the one with the longest left part comes first.

  Example:

    >>> sentencepiece_merges(['a', 'b', 'c', 'ab', 'abc', 'bc'], [0, 1, 2, 3, 4, 5])
    [('a', 'b'), ('ab', 'c'), ('a', 'bc'), ('b', 'c')]
  """
  vocab = set(tokens)
  merges = []
  for index in sorted(range(len(tokens)), key=lambda i: ranks[i]):  # stable: equal ranks keep file order
    token = tokens[index]
    for cut in range(len(token) - 1, 0, -1):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        merges.append((left, right))
  return merges


def _sentencepiece_model(reader: Any, arch: str, tokens: list[str]) -> tuple[Any, list[str]]:
  """A byte-fallback BPE over SentencePiece pieces (``tokenizer.ggml.model = llama``), and its token strings.

  Spaces become ``▁`` before BPE runs, so a text's spaces are part of its
  pieces; ``tokenizer.ggml.add_space_prefix`` (default true, as llama.cpp
  reads it) puts a ``▁`` before the text, as SentencePiece's dummy prefix. Bytes
  without a piece fall back to the ``<0xNN>`` tokens.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers

  if arch.startswith("gemma"):
    # Gemma files store the tokens of two or more spaces as real spaces, but the text reaches BPE with each
    # space as ▁; and Gemma's scores do not follow its merge order while the file's token order does.
    tokens = [_SPACE_MARKER * len(t) if " " in t and not t.strip() else t for t in tokens]
    ranks = list(range(len(tokens)))
  else:
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    ranks = [-float(x) for x in scores]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
  unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, ranks), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
  space = [normalizers.Replace(" ", _SPACE_MARKER)]
  decode = [decoders.Replace(_SPACE_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
  if _field(reader, "tokenizer.ggml.add_space_prefix", True):
    space.insert(0, normalizers.Prepend(_SPACE_MARKER))
    decode.append(decoders.Strip(" ", 1, 0))  # the dummy prefix's space is not part of the text
  tokenizer.normalizer = normalizers.Sequence(space)
  tokenizer.decoder = decoders.Sequence(decode)
  return tokenizer, tokens


def _byte_level_model(reader: Any, pre: str, tokens: list[str]) -> Any:
  """A byte-level BPE (``tokenizer.ggml.model = gpt2``) with the pre-tokenizer ``pre`` names."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

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
  return tokenizer


# Gemma's turn format, for Gemma files whose metadata carries no ``tokenizer.chat_template``: a system message
# is written at the start of the first user turn, the assistant's role is called ``model``.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'] | trim + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ns.prefix + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _tokenizer(reader: Any, path: Path, arch: str = "llama") -> Any:
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    return None
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if not (kind == "llama" or (kind == "gpt2" and pre in PRE_TOKENIZERS)):
    logger.warning("%s: no tokenizer built: tokenizer.ggml.model=%r, tokenizer.ggml.pre=%r; supported are "
                   "model 'llama' (SentencePiece) and model 'gpt2' (byte-level BPE) with pre-tokenizers %s.",
                   path, kind, pre, PRE_TOKENIZERS)
    return None
  from tokenizers import AddedToken, processors
  from transformers import PreTrainedTokenizerFast

  stored = list(_field(reader, "tokenizer.ggml.tokens"))
  types = _field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(stored)
  if kind == "llama":
    tokenizer, tokens = _sentencepiece_model(reader, arch, stored)
  else:
    tokenizer, tokens = _byte_level_model(reader, pre, stored), stored
  known = set(tokens)
  # Control tokens are special (matched whole, dropped by skip_special_tokens); user-defined ones are matched
  # whole too (llama.cpp does), but decode as text. A user-defined token respelled above (Gemma's runs of
  # spaces) is no longer spelled as in the text, so BPE builds it from the ▁ pieces instead.
  special = [t for t, k in zip(stored, types) if int(k) == _TOKEN_CONTROL]
  added = [t for t, k in zip(stored, types) if int(k) == _TOKEN_USER_DEFINED and t in known]
  tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])

  def token(key: str) -> str | None:
    index = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

  bos, eos = token("bos"), token("eos")
  # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
  if _field(reader, "tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
  template = _field(reader, "tokenizer.chat_template")
  if template is None and arch.startswith("gemma"):
    template = GEMMA_CHAT_TEMPLATE
  kwargs = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
            "chat_template": template}
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
  try:
    reader = _GGUFFile(path)
  except (ValueError, struct.error) as err:
    raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {', '.join(ARCHITECTURES)}.")
  heads = _field(reader, f"{arch}.attention.head_count")
  kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)

  tensors: dict[str, GGUFTensor] = {}
  unplaced = []
  for t in reader.tensors:
    name = hf_name(t.name, arch)
    if name is None:
      unplaced.append(t.name)
      continue
    permute = None
    if arch in _PERMUTED and ".self_attn.q_proj." in name:
      permute = int(heads)
    elif arch in _PERMUTED and ".self_attn.k_proj." in name:
      permute = int(kv_heads)
    shift = 1.0 if arch in _NORM_SHIFTED and t.name.endswith("norm.weight") else 0.0
    tensors[name] = GGUFTensor(name, t, permute, shift)
  if unplaced:
    raise ValueError(f"{path.name} holds tensors this reader cannot place: {unplaced[:8]} "
                     f"(e.g. rope_freqs, Llama 3.1's RoPE factors, is not supported).")
  embed = tensors.get("model.embed_tokens.weight")
  config = _config(reader, arch, set(tensors), embed.shape[0] if embed is not None else None)
  config["name_or_path"] = str(path)
  return config, GGUFSource(tensors, str(path)), _tokenizer(reader, path, arch)
