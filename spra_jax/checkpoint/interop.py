"""Interop with PyTorch: merged Hugging Face safetensors and the SpaRTA package's adapter format.

Two name and layout conventions meet here. Ours: '/'-joined pytree paths with
Flax leaf names, Linear kernels stored ``[in, out]``. PyTorch / Hugging Face:
'.'-joined module names ending in ``weight`` / ``bias``, Linear weights
``[out, in]``. Every function takes the mapping as two parameters, so a model
family with other conventions plugs in its own (``spra_jax.models`` modules
expose ``torch_name(path)`` and ``to_torch_layout(path, array)``):

* ``torch_name(path) -> str``, default :func:`default_torch_name`:
  ``model/layers/3/self_attn/v_proj/kernel`` -> ``model.layers.3.self_attn.v_proj.weight``
  (``kernel``, ``embedding`` and ``scale`` become ``weight``);
* ``to_torch_layout(path, array) -> np.ndarray``, default
  :func:`default_to_torch_layout`: 2-D ``kernel`` leaves are transposed, other
  leaves are kept. It must be a pure permutation of the entries (transpose,
  reshape, row reordering): adapter coordinates are mapped through it.

Both defaults, and the model families' stricter ``torch_name`` /
``to_torch_layout``, are one mapping, defined in :mod:`spra_jax._torch_names`.
With any of them, indices map arithmetically (O(k) per leaf); any other layout
function is pushed through with an index table per leaf (O(leaf size)).

The SpaRTA PyTorch package stores an adapter as ``sparse_deltas.safetensors``
with, for every named parameter, ``indices.<name>`` (int32 ``[k, ndim]``
coordinates in torch layout, row-major order; ``[0, ndim]`` for frozen
parameters) and ``deltas.<name>`` (float32 ``[k]``), next to the model's
``config.json`` with ``sparta_pretrained_model`` naming the base. Its loaders
apply an adapter as ``param[coords] = (param[coords].float() + delta).to(dtype)``.
A sequence classifier's adapter also holds ``head_init.safetensors`` (key
``head``: the randomly initialised ``score.weight`` the deltas start from, which
no base checkpoint has) and, in ``config.json``, ``problem_type`` and
``id2label``; the package's classifier loader rebuilds the head as
``head_init + delta`` (the whole head trains) on a headless decoder. Rows a
fine-tune added to the embeddings (new tokens) start from
``new_embeddings_init.safetensors`` (key ``new_embeddings``).

Which loader serves what: the package's ``SpaRTAforCausalLM`` loads any
causal LM that ``AutoModelForCausalLM`` can load from ``sparta_pretrained_model``;
``SpaRTAforSequenceClassification`` loads decoders whose head is named ``score``
(Llama, Mistral, Qwen, Gemma, ...) with single-label classification only.
Encoders (BERT's ``classifier``) and base models named by an alias of
:mod:`spra_jax.models` or by a ``.gguf`` file have no loader there: use
:func:`spra_jax.checkpoint.save_adapter` or :func:`export_merged` for them.

Example:

  >>> import tempfile, jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> params = {'layer': {'kernel': jnp.zeros((3, 2))}}          # [in, out]
  >>> mask = spra.masks.from_dense({'layer': {'kernel': jnp.array([[0, 1], [0, 0], [1, 0]], bool)}})
  >>> delta = spra.init_delta(mask).replace(values={'layer': {'kernel': jnp.array([1., 2.])}})
  >>> d = tempfile.mkdtemp()
  >>> _ = export_peft_sparta(d, delta, base_model='toy')
  >>> import safetensors.numpy
  >>> t = safetensors.numpy.load_file(f'{d}/sparse_deltas.safetensors')
  >>> t['indices.layer.weight'].tolist(), t['deltas.layer.weight'].tolist()   # [out, in] coordinates
  ([[0, 2], [1, 0]], [2.0, 1.0])
  >>> back = import_peft_sparta(d, params)
  >>> back.mask['layer']['kernel'].indices.tolist(), back.values['layer']['kernel'].tolist()
  ([1, 4], [1.0, 2.0])
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from spra_jax import _host, _torch_names
from spra_jax._torch_names import default_to_torch_layout, default_torch_name
from spra_jax.checkpoint import _files
from spra_jax.delta import SparseDelta, merge
from spra_jax.masks import FROZEN, FULL, LeafMask, is_leaf_mask, path_str

__all__ = [
  "HEAD_INIT_FILE",
  "NEW_EMBEDDINGS_INIT_FILE",
  "SPARSE_DELTAS_FILE",
  "default_to_torch_layout",
  "default_torch_name",
  "export_merged",
  "export_peft_sparta",
  "import_peft_sparta",
]

SPARSE_DELTAS_FILE = "sparse_deltas.safetensors"
HEAD_INIT_FILE = "head_init.safetensors"
NEW_EMBEDDINGS_INIT_FILE = "new_embeddings_init.safetensors"
# The names the package's classifier loader knows: the head, and the input embeddings that new tokens extend.
_HEAD = "score.weight"
_EMBEDDINGS_SUFFIX = "embed_tokens.weight"
_PROBLEM_TYPE = "single_label_classification"


# --------------------------------------------------------------------------
# Flat-index <-> torch-coordinate maps.
# --------------------------------------------------------------------------


class _Layout:
  """How one leaf's entries move between our layout and torch's."""

  def __init__(self, path: str, shape: tuple[int, ...], to_torch_layout: Callable[[str, Any], np.ndarray]):
    self.path, self.shape = path, tuple(shape)
    self.size = math.prod(self.shape)
    self._to_torch_layout = to_torch_layout
    self._cached_table = None
    if to_torch_layout is default_to_torch_layout or to_torch_layout is _torch_names.to_torch_layout:
      # A known permutation: indices map arithmetically, O(k); the strict one still refuses a kernel that is not 2-D.
      strict = to_torch_layout is _torch_names.to_torch_layout
      self.transposed = _torch_names.kernel_transposed(path, self.shape, strict=strict)
      self.torch_shape = self.shape[::-1] if self.transposed else self.shape
    else:
      self.transposed = None
      # A zero-strided view gives the torch shape without allocating the leaf.
      probe = np.asarray(to_torch_layout(path, np.broadcast_to(np.zeros((), np.int32), self.shape)))
      self.torch_shape = tuple(int(d) for d in probe.shape)

  @property
  def _table(self) -> np.ndarray | None:
    """torch flat position -> our flat index, for layout functions other than the default."""
    if self.transposed is not None:
      return None
    if self._cached_table is None:
      # Any permutation: push an iota through the layout function, O(leaf size), one leaf at a time.
      iota = np.arange(self.size, dtype=np.int32).reshape(self.shape)
      table = np.asarray(self._to_torch_layout(self.path, iota))
      if table.size != self.size or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            f"to_torch_layout({self.path!r}, ...) must permute the entries of its array; it returned "
            f"{table.dtype}{list(table.shape)} for an int32{list(self.shape)} input."
        )
      self._cached_table = table.reshape(-1)
    return self._cached_table

  def torch_flat(self, ours: np.ndarray) -> np.ndarray:
    """Torch flat positions of our flat indices."""
    ours = np.asarray(ours, np.int64)
    if self.transposed is not None:
      if not self.transposed:
        return ours
      rows, cols = np.divmod(ours, self.shape[1])  # ours is [in, out]
      return cols * self.shape[0] + rows
    inverse = np.empty(self.size, np.int32)
    inverse[self._table] = np.arange(self.size)
    return inverse[ours]

  def ours_flat(self, torch_flat: np.ndarray) -> np.ndarray:
    """Our flat indices of torch flat positions."""
    torch_flat = np.asarray(torch_flat, np.int64)
    if self.transposed is not None:
      if not self.transposed:
        return torch_flat
      rows, cols = np.divmod(torch_flat, self.shape[0])  # torch is [out, in]
      return cols * self.shape[1] + rows
    return self._table[torch_flat]

  def to_torch(self, array: np.ndarray) -> np.ndarray:
    """A whole leaf (our layout) in torch layout."""
    if self.transposed is not None:
      return array.T if self.transposed else array
    return np.asarray(array).reshape(-1)[self._table].reshape(self.torch_shape)


def _coords(torch_flat: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
  if not torch_shape:
    return np.zeros((torch_flat.size, 0), np.int32)
  return np.stack(np.unravel_index(torch_flat, torch_shape), axis=1).astype(np.int32)


# --------------------------------------------------------------------------
# The SpaRTA package's adapter format.
# --------------------------------------------------------------------------


# Fused torch tensors (Phi-3's qkv_proj / gate_up_proj): suffix -> [(part suffix, rows)], as
# ``spra.models.llama.fused_layout`` gives them.
Fused = Mapping[str, Sequence[tuple[str, int]]]


def _fuse_groups(names: Sequence[str], fused: Fused | None) -> dict[str, tuple[str, list[tuple[str, int, int]]]]:
  """For each torch name that is part of a fused tensor: (the fused name, [(part name, first row, rows)])."""
  out: dict[str, tuple[str, list[tuple[str, int, int]]]] = {}
  for suffix, parts in (fused or {}).items():
    first = parts[0][0]
    for name in names:
      if not name.endswith(first):
        continue
      prefix = name[: -len(first)]
      group, row = [], 0
      for part, rows in parts:
        group.append((prefix + part, row, int(rows)))
        row += int(rows)
      if all(n in names for n, _, _ in group):
        for n, _, _ in group:
          out[n] = (prefix + suffix, group)
  return out


def _fuse_sparse(tensors: dict[str, np.ndarray], fused: Fused | None) -> None:
  """``indices.<part>`` / ``deltas.<part>`` of each fused group replaced by one entry of the fused tensor."""
  names = [k[len("indices."):] for k in tensors if k.startswith("indices.")]
  done = set()
  for name, (fused_name, group) in _fuse_groups(names, fused).items():
    if fused_name in done:
      continue
    done.add(fused_name)
    coords, deltas = [], []
    for part, row, rows in group:
      c = tensors.pop(f"indices.{part}").astype(np.int64)
      if c.shape[0] and (c.ndim != 2 or c[:, 0].max() >= rows):
        raise ValueError(f"{part!r} has rows beyond the {rows} that fused_layout gives it in {fused_name!r}.")
      coords.append(c + np.asarray([row] + [0] * (c.shape[1] - 1)) if c.shape[0] else c.reshape(0, 2))
      deltas.append(tensors.pop(f"deltas.{part}"))
    # The parts' row ranges follow each other, so concatenated coordinates stay sorted row-major.
    tensors[f"indices.{fused_name}"] = np.ascontiguousarray(np.concatenate(coords).astype(np.int32))
    tensors[f"deltas.{fused_name}"] = np.ascontiguousarray(np.concatenate(deltas).astype(np.float32))


def _split_sparse(indices: dict[str, np.ndarray], deltas: dict[str, np.ndarray], fused: Fused | None) -> None:
  """The inverse of :func:`_fuse_sparse` on a file's ``indices`` / ``deltas`` (in place)."""
  for suffix, parts in (fused or {}).items():
    for name in [n for n in indices if n.endswith(suffix)]:
      prefix = name[: -len(suffix)]
      coords, vals = np.asarray(indices.pop(name), np.int64), np.asarray(deltas.pop(name)).reshape(-1)
      total = sum(int(r) for _, r in parts)
      if coords.shape[0] and (coords.ndim != 2 or coords[:, 0].max() >= total):
        raise ValueError(f"{name!r} has rows beyond the {total} of its fused parts.")
      row = 0
      for part, rows in parts:
        keep = (coords[:, 0] >= row) & (coords[:, 0] < row + int(rows)) if coords.shape[0] else np.zeros(0, bool)
        c = coords[keep].copy()
        if c.shape[0]:
          c[:, 0] -= row
        indices[prefix + part] = c.reshape(-1, 2).astype(np.int32)
        deltas[prefix + part] = vals[keep]
        row += int(rows)


def _check_names(names: dict[str, str]) -> None:
  seen: dict[str, str] = {}
  for path, name in names.items():
    if name in seen:
      raise ValueError(f"torch_name maps both {seen[name]!r} and {path!r} to {name!r}.")
    seen[name] = path


def _check_base_model(base_model: Any) -> str:
  """``base_model`` if the package's loaders can pass it to ``from_pretrained``, else a ValueError saying why not."""
  if base_model is None:
    raise ValueError("export_peft_sparta needs base_model: the package's loaders read the base model from "
                     "config.json's sparta_pretrained_model (a Hugging Face Hub id or a local HF directory).")
  text = os.fspath(base_model)
  if not isinstance(text, str) or not text:
    raise ValueError(f"base_model must be a Hub id or a local directory, got {base_model!r}.")
  if text.endswith(".gguf") or Path(text).is_file():
    raise ValueError(f"base_model={text!r} is a file; the package's loaders call from_pretrained on it, which "
                     "needs a Hugging Face Hub id or a directory with config.json (a .gguf file needs gguf_file=, "
                     "which they do not pass). Use save_adapter or export_merged for a GGUF base.")
  # Aliases belong to spra_jax.models (a higher layer): consult its table only when the caller already loaded it.
  hub = sys.modules.get("spra_jax.models.hub")
  if hub is not None and text in getattr(hub, "ALIASES", {}) and not Path(text).exists():
    raise ValueError(f"base_model={text!r} is an alias of spra_jax.models, which the package cannot resolve; pass "
                     "the base's Hub id or a local HF directory instead.")
  return text


def _head_config(cfg: dict[str, Any], num_labels: int, id2label: Mapping[Any, str] | None) -> None:
  """Sets the ``problem_type`` and ``id2label`` the package's classifier loader asserts on."""
  problem = cfg.get("problem_type") or _PROBLEM_TYPE
  if problem != _PROBLEM_TYPE:
    raise ValueError(f"the package's classifier loader handles problem_type={_PROBLEM_TYPE!r} only; the config "
                     f"says {problem!r}.")
  labels = id2label if id2label is not None else cfg.get("id2label")
  labels = {str(k): str(v) for k, v in dict(labels).items()} if labels else {
      str(i): f"LABEL_{i}" for i in range(num_labels)}
  if sorted(labels, key=int) != [str(i) for i in range(num_labels)]:
    raise ValueError(f"id2label must name the head's {num_labels} classes 0..{num_labels - 1}, got keys "
                     f"{sorted(labels)}.")
  cfg.update(problem_type=problem, id2label=labels, label2id={v: int(k) for k, v in labels.items()},
             num_labels=num_labels)


def _leaf_of(names: dict[str, str], wanted: Callable[[str], bool]) -> str | None:
  found = [path for path, name in names.items() if wanted(name)]
  return found[0] if found else None


def _save_one(path: Path, key: str, array: np.ndarray) -> None:
  with _files.atomic_output(path, overwrite=True, directory=False) as tmp:
    safetensors.numpy.save_file({key: np.ascontiguousarray(array, np.float32)}, str(tmp), metadata={"format": "pt"})


def export_peft_sparta(
    directory: str | os.PathLike,
    delta: SparseDelta,
    *,
    base_model: str | os.PathLike | None,
    config: Mapping[str, Any] | None = None,
    params: Any = None,
    id2label: Mapping[Any, str] | None = None,
    base_vocab_size: int | None = None,
    torch_name: Callable[[str], str] = default_torch_name,
    to_torch_layout: Callable[[str, Any], np.ndarray] = default_to_torch_layout,
    fused: Fused | None = None,
) -> Path:
  """Writes a delta in the SpaRTA PyTorch package's format (``sparse_deltas.safetensors`` + ``config.json``).

  Every leaf of the delta's mask gets ``indices.<torch name>`` (int32 ``[k, ndim]``
  torch-layout coordinates, sorted row-major as ``torch.nonzero`` gives them;
  every coordinate for a fully trained leaf; none for a frozen one) and
  ``deltas.<torch name>`` (float32 ``[k]``, in the same order).

  A sequence classifier (a leaf named ``score.weight``) also gets what the
  package's classifier loader needs: ``head_init.safetensors`` (the head in
  ``params``, where the delta starts), the head's delta over every entry
  (zeros where it did not train; that loader requires the whole head), and
  ``problem_type`` / ``id2label`` / ``num_labels`` in ``config.json``.

  Args:
    directory: the output directory (created; existing files of the same names
      are replaced, each atomically).
    delta: the delta to export.
    base_model: the base's Hugging Face Hub id or local HF directory, stored as
      ``sparta_pretrained_model`` (the package's loaders call
      ``from_pretrained`` on it). None, a file (``.gguf``) or an alias of
      :mod:`spra_jax.models` are refused: the package could not load them.
    config: the model's Hugging Face config as a dict (the package writes the
      model config there); ``{}`` if not given.
    params: the parameters the delta applies to (arrays); needed for a
      classifier's head and for ``base_vocab_size``.
    id2label: class names of a classifier (default: the config's, else ``LABEL_i``).
    base_vocab_size: the base checkpoint's vocabulary size, when the fine-tune
      added tokens: the embedding rows from it on are written to
      ``new_embeddings_init.safetensors`` (the package appends them to the base).
    torch_name: our path -> torch parameter name.
    to_torch_layout: our array -> torch layout (a permutation of the entries).
    fused: the target's fused tensors (``spra.models.llama.fused_layout(config)`` for Phi-3): the entries of
      the split projections are written as rows of ``qkv_proj`` / ``gate_up_proj``, the names transformers'
      Phi-3 (and so the package) loads.

  Returns:
    The path of the written ``sparse_deltas.safetensors``.

  Raises:
    ValueError: a base the package cannot load, a classifier without ``params``,
      labels that do not fit the head, a ``problem_type`` other than single-label.

  Example: see the module docstring.
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"export_peft_sparta expects a SparseDelta, got {type(delta).__name__}.")
  base = _check_base_model(base_model)
  flat, mask_def = jax.tree_util.tree_flatten_with_path(delta.mask, is_leaf=is_leaf_mask)
  values = mask_def.flatten_up_to(delta.values)
  names = {path_str(p): torch_name(path_str(p)) for p, _ in flat}
  _check_names(names)
  head_path = _leaf_of(names, lambda n: n == _HEAD)
  embed_path = _leaf_of(names, lambda n: n.endswith(_EMBEDDINGS_SUFFIX)) if base_vocab_size is not None else None
  initial: dict[str, np.ndarray] = {}
  if head_path is not None or embed_path is not None:
    if params is None:
      what = "a sequence classifier's starting head (head_init)" if head_path else "the new embedding rows"
      raise ValueError(f"export_peft_sparta needs params= (the parameters the delta applies to) to write {what}; "
                       "the package's loader cannot rebuild it otherwise.")
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in (head_path, embed_path):
      if path is not None:
        if path not in leaves:
          raise ValueError(f"params has no leaf {path!r} (the delta's {names[path]!r}).")
        initial[path] = _host.to_host(leaves[path]).astype(np.float32)
  if base_vocab_size is not None and embed_path is None:
    raise ValueError(f"base_vocab_size is set, but the delta has no leaf named '*{_EMBEDDINGS_SUFFIX}'.")

  # Everything is checked before the directory is made: a refused export writes nothing.
  cfg = dict(config or {})
  starts: dict[str, tuple[str, str, np.ndarray]] = {}  # path -> (file, key, array in torch layout)
  if head_path is not None:
    head = _Layout(head_path, initial[head_path].shape, to_torch_layout).to_torch(initial[head_path])
    _head_config(cfg, int(head.shape[0]), id2label)
    starts[head_path] = (HEAD_INIT_FILE, "head", head)
  if embed_path is not None:
    rows = _Layout(embed_path, initial[embed_path].shape, to_torch_layout).to_torch(initial[embed_path])
    if not 0 < base_vocab_size <= rows.shape[0]:
      raise ValueError(f"base_vocab_size={base_vocab_size} does not fit the {rows.shape[0]} embedding rows.")
    if base_vocab_size < rows.shape[0]:
      starts[embed_path] = (NEW_EMBEDDINGS_INIT_FILE, "new_embeddings", rows[base_vocab_size:])

  out_dir = _files.absolute(directory)
  tensors: dict[str, np.ndarray] = {}
  for (p, m), v in zip(flat, values):
    path = path_str(p)
    # On a cluster, the indices and values gathered to every process (collective), where they span several.
    m = m if m.kind != "sparse" else LeafMask.sparse(m.shape, _host.to_host(m.indices), blocks=m.blocks)
    v = None if v is None else _host.to_host(v)
    layout = _Layout(path, m.shape, to_torch_layout)
    name = names[path]
    if path == head_path and m.kind != FULL:
      # The classifier loader adds the delta to head_init as a whole [labels, hidden] matrix.
      dense = np.zeros(m.size, np.float32)
      if m.kind != FROZEN:
        dense[np.asarray(m.indices)] = np.asarray(v, np.float32)
      deltas = layout.to_torch(dense.reshape(m.shape)).reshape(-1)
      coords = _coords(np.arange(m.size), layout.torch_shape)
    elif m.kind == FROZEN:
      coords = np.zeros((0, len(layout.torch_shape)), np.int32)
      deltas = np.zeros((0,), np.float32)
    elif m.kind == FULL:
      deltas = layout.to_torch(np.asarray(v, np.float32)).reshape(-1)
      coords = _coords(np.arange(m.size), layout.torch_shape)
    else:
      torch_flat = layout.torch_flat(np.asarray(m.indices))
      order = np.argsort(torch_flat, kind="stable")
      coords = _coords(torch_flat[order], layout.torch_shape)
      deltas = np.asarray(v, np.float32)[order]
    tensors[f"indices.{name}"] = np.ascontiguousarray(coords)
    tensors[f"deltas.{name}"] = np.ascontiguousarray(deltas)
  _fuse_sparse(tensors, fused)
  cfg["sparta_pretrained_model"] = base
  target = out_dir / SPARSE_DELTAS_FILE

  def write() -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, key, array in starts.values():
      _save_one(out_dir / name, key, array)
    with _files.atomic_output(target, overwrite=True, directory=False) as tmp:
      safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
    with _files.atomic_output(out_dir / "config.json", overwrite=True, directory=False) as tmp:
      _files.write_json(tmp, json.loads(json.dumps(cfg, default=str)))

  _files.on_primary(write, what="export_peft_sparta")  # the files once, whichever processes export
  return target


def import_peft_sparta(
    directory: str | os.PathLike,
    like_params: Any,
    *,
    torch_name: Callable[[str], str] = default_torch_name,
    to_torch_layout: Callable[[str, Any], np.ndarray] = default_to_torch_layout,
    path_of_torch_name: Callable[[str], str] | None = None,
    fused: Fused | None = None,
) -> SparseDelta:
  """Reads the SpaRTA PyTorch package's ``sparse_deltas.safetensors`` as a :class:`~spra_jax.SparseDelta`.

  Args:
    directory: the adapter directory (or the ``.safetensors`` file itself).
    like_params: our parameter tree (arrays or ``jax.ShapeDtypeStruct``); it
      gives the delta's structure and each leaf's shape.
    torch_name: our path -> torch name; its inverse over ``like_params``'s
      leaves maps the file's names back.
    to_torch_layout: our array -> torch layout, as for export.
    path_of_torch_name: an explicit inverse (torch name -> our path), used
      instead of inverting ``torch_name``.
    fused: the file's fused tensors (``spra.models.llama.fused_layout(config)`` for Phi-3): their entries are
      split back into the projections our model holds.

  Returns:
    The delta: leaves with every coordinate become full leaves, leaves with none
    or missing from the file frozen, the rest sparse (indices sorted, values
    float32 reordered to match).

    Where the adapter says what a leaf started from (``head_init.safetensors``
    for ``score.weight``, ``new_embeddings_init.safetensors`` for the rows
    added to ``*embed_tokens.weight``), the delta is re-based onto
    ``like_params``' own values of those entries: ``merge(like_params, delta)``
    then holds ``start + the file's delta`` there (to float32 rounding),
    whatever seed ``like_params``' head was drawn with. The new rows become
    trained entries of the embedding leaf.

  Raises:
    FileNotFoundError: no ``sparse_deltas.safetensors``.
    ValueError: a torch name that maps to no leaf while carrying entries,
      coordinates out of range or repeated, indices/deltas of different
      lengths, or an init file that does not fit its leaf (or ``like_params``
      holding shapes only for a leaf that has one: re-basing needs its values).
  """
  path_in = _files.absolute(directory)
  file = path_in if path_in.is_file() else path_in / SPARSE_DELTAS_FILE
  if not file.is_file():
    raise FileNotFoundError(f"no {SPARSE_DELTAS_FILE} in {path_in}.")
  try:
    tensors = safetensors.numpy.load_file(str(file))
  except Exception as e:  # safetensors raises its own error type for truncated files.
    raise ValueError(f"{file} is truncated or corrupted: {e}") from e
  indices, deltas = {}, {}
  for key, t in tensors.items():
    if key.startswith("indices."):
      indices[key[len("indices."):]] = t
    elif key.startswith("deltas."):
      deltas[key[len("deltas."):]] = t
    else:
      raise ValueError(f"{file} has the key {key!r}; expected 'indices.<name>' and 'deltas.<name>' only.")
  if set(indices) != set(deltas):
    unpaired = sorted(set(indices) ^ set(deltas))
    raise ValueError(f"{file}: names with indices but no deltas or the reverse: {unpaired[:6]}.")
  _split_sparse(indices, deltas, fused)

  flat, treedef = jax.tree_util.tree_flatten_with_path(like_params)
  paths = [path_str(p) for p, _ in flat]
  shapes = {path_str(p): tuple(int(d) for d in np.shape(x)) for p, x in flat}
  if path_of_torch_name is None:
    forward = {path: torch_name(path) for path in paths}
    _check_names(forward)
    lookup = {name: path for path, name in forward.items()}
  else:
    lookup = {}
    for name in indices:
      lookup[name] = path_of_torch_name(name)
  unknown = [n for n in indices if lookup.get(n) not in shapes and indices[n].shape[0] > 0]
  if unknown:
    raise ValueError(f"{file} has entries for torch names that match no parameter leaf: {unknown[:6]}.")

  masks, values = {}, {}
  for name, coords in indices.items():
    path = lookup.get(name)
    if path not in shapes:
      continue  # an empty entry for a parameter we do not have (e.g. a buffer)
    shape = shapes[path]
    layout = _Layout(path, shape, to_torch_layout)
    coords = np.asarray(coords)
    vals = np.asarray(deltas[name], np.float32).reshape(-1)
    if coords.ndim != 2 or coords.shape[0] != vals.shape[0] or coords.shape[1] != len(layout.torch_shape):
      raise ValueError(
          f"{file}: {name!r} has indices of shape {list(coords.shape)} and {vals.shape[0]} deltas; expected "
          f"[k, {len(layout.torch_shape)}] coordinates into torch shape {list(layout.torch_shape)} and k deltas."
      )
    k = coords.shape[0]
    if k == 0:
      masks[path], values[path] = LeafMask.frozen(shape), None
      continue
    if np.any(coords < 0) or np.any(coords >= np.asarray(layout.torch_shape)):
      raise ValueError(f"{file}: {name!r} has coordinates outside the torch shape {list(layout.torch_shape)}.")
    if coords.shape[1]:
      torch_flat = np.ravel_multi_index(tuple(coords.T.astype(np.int64)), layout.torch_shape)
    else:  # a scalar parameter
      torch_flat = np.zeros(k, np.int64)
    ours = layout.ours_flat(torch_flat)
    order = np.argsort(ours, kind="stable")
    ours, vals = ours[order], vals[order]
    if np.any(np.diff(ours) == 0):
      raise ValueError(f"{file}: {name!r} lists a coordinate more than once.")
    size = math.prod(shape)
    if k == size:
      masks[path], values[path] = LeafMask.full(shape), jnp.asarray(vals.reshape(shape))
    else:
      masks[path], values[path] = LeafMask.sparse(shape, jnp.asarray(ours.astype(np.int32))), jnp.asarray(vals)
  leaves = {path_str(p): x for p, x in flat}
  folder = file.parent
  for init_file, key, wanted in [(HEAD_INIT_FILE, "head", lambda n: n == _HEAD),
                                 (NEW_EMBEDDINGS_INIT_FILE, "new_embeddings", lambda n: n.endswith(_EMBEDDINGS_SUFFIX))]:
    if not (folder / init_file).is_file():
      continue
    start = _read_init(folder / init_file, key)
    path = next((lookup[n] for n in lookup if wanted(n) and lookup[n] in shapes), None)
    if path is None:
      raise ValueError(f"{folder / init_file} gives a starting {key!r}, but like_params has no leaf for it.")
    masks[path], values[path] = _rebased(path, leaves[path], masks.get(path), values.get(path), start,
                                         _Layout(path, shapes[path], to_torch_layout), folder / init_file)
  mask_leaves = [masks.get(p, LeafMask.frozen(shapes[p])) for p in paths]
  value_leaves = [values.get(p) for p in paths]
  return SparseDelta(treedef.unflatten(mask_leaves), treedef.unflatten(value_leaves))


def _read_init(file: Path, key: str) -> np.ndarray:
  try:
    tensors = safetensors.numpy.load_file(str(file))
  except Exception as e:  # safetensors raises its own error type for truncated files.
    raise ValueError(f"{file} is truncated or corrupted: {e}") from e
  if key not in tensors:
    raise ValueError(f"{file} has the keys {sorted(tensors)}; expected {key!r}.")
  return np.asarray(tensors[key], np.float64)


def _rebased(path: str, current: Any, mask: LeafMask | None, vals: Any, start: np.ndarray, layout: _Layout,
             file: Path) -> tuple[LeafMask, Any]:
  """A leaf's mask and values such that merging onto ``current`` gives ``start + delta`` on ``start``'s rows."""
  if isinstance(current, jax.ShapeDtypeStruct) or not hasattr(current, "dtype"):
    raise ValueError(f"{file} gives the starting value of {path!r}; like_params must hold that leaf's values "
                     "(not only its shape) to re-base the delta onto them.")
  rows_total = layout.torch_shape[0]
  if start.ndim != len(layout.torch_shape) or start.shape[1:] != layout.torch_shape[1:] or       start.shape[0] > rows_total:
    raise ValueError(f"{file}: a starting value of shape {list(start.shape)} does not fit {path!r} "
                     f"(torch shape {list(layout.torch_shape)}).")
  first = (rows_total - start.shape[0]) * math.prod(layout.torch_shape[1:])  # init rows are the last ones
  torch_flat = np.arange(first, layout.size, dtype=np.int64)
  ours = layout.ours_flat(torch_flat)
  dense_now = np.asarray(jax.device_get(current), np.float64).reshape(-1)
  offset = start.reshape(-1) - dense_now[ours]  # start - current, on the entries the file initialises
  if mask is None or mask.kind == FROZEN:
    file_idx, file_vals = np.zeros(0, np.int64), np.zeros(0, np.float64)
  elif mask.kind == FULL:
    file_idx, file_vals = np.arange(layout.size), np.asarray(vals, np.float64).reshape(-1)
  else:
    file_idx, file_vals = np.asarray(mask.indices, np.int64), np.asarray(vals, np.float64)
  union = np.union1d(file_idx, ours)
  out = np.zeros(union.size, np.float64)
  out[np.searchsorted(union, file_idx)] += file_vals
  out[np.searchsorted(union, ours)] += offset
  shape = tuple(int(d) for d in np.shape(current))
  if union.size == layout.size:
    return LeafMask.full(shape), jnp.asarray(out.astype(np.float32).reshape(shape))
  return LeafMask.sparse(shape, jnp.asarray(union.astype(np.int32))), jnp.asarray(out.astype(np.float32))


# --------------------------------------------------------------------------
# Merged export.
# --------------------------------------------------------------------------


def _merged_leaf(x: Any, m: LeafMask | None, v: Any) -> Any:
  if m is None or m.kind == FROZEN:
    return x
  return merge({"x": x}, SparseDelta({"x": m}, {"x": v}))["x"]


def export_merged(
    directory: str | os.PathLike,
    params: Any,
    delta: SparseDelta | None = None,
    *,
    config: Mapping[str, Any],
    torch_name: Callable[[str], str] = default_torch_name,
    to_torch_layout: Callable[[str, Any], np.ndarray] = default_to_torch_layout,
    exclude: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    fused: Fused | None = None,
) -> Path:
  """Writes ``params`` (plus ``delta``, merged) as a Hugging Face checkpoint loadable by transformers.

  The directory gets ``config.json`` and ``model.safetensors`` in torch names
  and layout, each leaf in its own dtype; above ``max_shard_bytes`` the weights
  are split into ``model-0000i-of-0000n.safetensors`` files with a
  ``model.safetensors.index.json``, as ``save_pretrained`` does. Leaves are
  merged and converted one at a time, so host memory peaks at about one shard.

  Args:
    directory: the output directory; it must not exist unless ``overwrite``.
    params: the base parameters (or already merged ones with ``delta=None``).
    delta: a delta to merge into ``params`` first (exactly as :func:`spra.merge`).
    config: the model's Hugging Face config as a dict (``config.to_dict()``).
    torch_name: our path -> torch name.
    to_torch_layout: our array -> torch layout.
    exclude: regex of paths not to write (e.g. integer buffers).
    max_shard_bytes: the largest shard.
    overwrite: replace an existing directory (atomically, as :func:`save_adapter`).
    fused: the target's fused tensors (``spra.models.llama.fused_layout(config)`` for Phi-3): the split
      projections are written concatenated as ``qkv_proj`` / ``gate_up_proj`` (in the shard of their last part).

  Returns:
    The absolute output path.

  Example:

    >>> import tempfile, os, json, jax.numpy as jnp
    >>> d = os.path.join(tempfile.mkdtemp(), 'merged')
    >>> _ = export_merged(d, {'lm': {'kernel': jnp.ones((4, 2))}}, config={'model_type': 'toy'})
    >>> sorted(os.listdir(d))
    ['config.json', 'model.safetensors']
    >>> import safetensors.numpy; safetensors.numpy.load_file(f'{d}/model.safetensors')['lm.weight'].shape
    (2, 4)
  """
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a dict (e.g. hf_config.to_dict()), got {type(config).__name__}.")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
  final = _files.absolute(directory)
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if delta is not None:
    if not isinstance(delta, SparseDelta):
      raise TypeError(f"delta must be a SparseDelta or None, got {type(delta).__name__}.")
    if jax.tree.structure(delta.mask, is_leaf=is_leaf_mask) != treedef:
      raise ValueError("delta's mask does not have the structure of params.")
    leaf_masks = treedef.flatten_up_to(delta.mask)
    leaf_values = treedef.flatten_up_to(delta.values)
  else:
    leaf_masks = leaf_values = [None] * len(flat)
  skip = re.compile(exclude) if exclude else None
  items = []
  for (p, x), m, v in zip(flat, leaf_masks, leaf_values):
    path = path_str(p)
    if skip is not None and skip.search(path):
      continue
    nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
    items.append((path, torch_name(path), x, m, v, nbytes))
  _check_names({it[0]: it[1] for it in items})

  shards: list[list[tuple]] = [[]]
  size = 0
  for it in items:
    if shards[-1] and size + it[5] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(it)
    size += it[5]

  # On a cluster every process merges and gathers each leaf (collectives), and process 0 writes the files.
  with _files.shared_output(final, overwrite=overwrite, what="export_merged") as tmp:
    n = len(shards)
    weight_map = {}
    groups = _fuse_groups([it[1] for it in items], fused)
    pending: dict[str, dict[str, np.ndarray]] = {}
    for i, shard in enumerate(shards, start=1):
      fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
      tensors = {}
      for path, name, x, m, v, _ in shard:
        host = _host.to_host(_merged_leaf(x, m, v))  # (collective on a cluster: every process gathers)
        if tmp is None:
          continue  # not the writing process
        torch_layout = np.ascontiguousarray(_Layout(path, host.shape, to_torch_layout).to_torch(host))
        if name in groups:  # a part of a fused tensor: written once all its parts are here
          fused_name, group = groups[name]
          pending.setdefault(fused_name, {})[name] = torch_layout
          if len(pending[fused_name]) < len(group):
            continue
          parts = pending.pop(fused_name)
          name, torch_layout = fused_name, np.concatenate([parts[p] for p, _, _ in group], axis=0)
        tensors[name] = torch_layout
        weight_map[name] = fname
      if tmp is not None:
        safetensors.numpy.save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
      del tensors
    if tmp is not None:
      if n > 1:
        index = {"metadata": {"total_size": sum(it[5] for it in items)},
                 "weight_map": dict(sorted(weight_map.items()))}
        _files.write_json(tmp / "model.safetensors.index.json", index)
      _files.write_json(tmp / "config.json", json.loads(json.dumps(dict(config), default=str)))
  return final
