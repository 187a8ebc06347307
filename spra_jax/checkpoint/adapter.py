"""Sparse-delta adapters on disk: ``save_adapter`` / ``load_adapter``.

An adapter directory holds

* ``adapter_config.json``: the format and library versions, the base model's
  name, how the mask was drawn (density, distribution, seed, include / exclude /
  full rules, as far as the mask or the caller knows them), a table with one
  row per parameter leaf (path, kind, shape, k, value dtype), a fingerprint of
  the base weights, and a SHA-256 checksum of every stored array;
* ``arrays/``: an Orbax checkpoint of a few flat arrays: every sparse leaf's
  int32 indices concatenated into one vector (or, with
  ``index_encoding="gaps"``, their gaps in 1 or 2 bytes each, see
  :mod:`spra_jax.checkpoint.encoding`), and the values of every trained leaf
  concatenated per dtype. The leaf table says where each leaf's run starts.

Indices are always stored: JAX does not promise the same random bits across
releases, so a seed alone cannot rebuild a mask.

Why flat arrays rather than one Orbax array per leaf: a 7B Llama has 224 weight
matrices, and Orbax writes a metadata record per array (about 350 bytes each).
Four arrays keep that overhead constant, whatever the model, and give the gap
encoding long runs to work on.

Safety: a save writes into a hidden sibling directory and renames it into place
only when complete, so an interrupted save never touches the previous adapter.
Loading checks every array's checksum and the leaf table, so a truncated or
corrupted adapter raises instead of loading wrong numbers; loading with the
weights of another model (``base_params``) raises a fingerprint mismatch naming
the first leaf that differs.

Example:

  >>> import tempfile, os, jax, jax.numpy as jnp
  >>> import spra_jax as spra
  >>> base = {'w': jax.random.normal(jax.random.key(1), (64, 64)), 'b': jnp.zeros(64)}
  >>> mask = spra.sample_mask(jax.random.key(0), base, density=0.05, full='b')
  >>> delta = spra.init_delta(mask).replace(values={'w': jnp.ones(205), 'b': jnp.ones(64)})
  >>> d = os.path.join(tempfile.mkdtemp(), 'adapter')
  >>> path = spra.save_adapter(d, delta, base_params=base, metadata={'base_model': 'toy', 'seed': 0})
  >>> loaded = spra.load_adapter(d, base_params=base)
  >>> bool((spra.merge(base, loaded)['w'] == spra.merge(base, delta)['w']).all())
  True
  >>> spra.load_adapter_config(d)['mask']['trainable']
  269
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from spra_jax.checkpoint import _files
from spra_jax.checkpoint.encoding import WIDTH_DTYPES, decode_gaps, encode_gaps
from spra_jax.delta import SparseDelta, add_deltas, merge
from spra_jax.masks import FROZEN, FULL, SPARSE, Distribution, LeafMask, is_leaf_mask, path_str
from spra_jax.masks import validate_indices as _validate_indices

__all__ = [
  "CONFIG_NAME",
  "FORMAT",
  "FORMAT_VERSION",
  "AdapterOverlap",
  "LeafOverlap",
  "adapter_overlap",
  "base_fingerprint",
  "check_base",
  "load_adapter",
  "load_adapter_config",
  "merge_adapters",
  "save_adapter",
]

FORMAT = "spra_jax.sparse_adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
ARRAYS_DIR = "arrays"
INDEX_ENCODINGS = ("int32", "gaps")
_SAMPLING_KEYS = ("distribution", "density", "seed", "include", "exclude", "full", "allocation", "relative_to")
_FINGERPRINT_ALGORITHM = "blake2b-128 of the base values at the adapter's entries, rounded to bfloat16"


def _library_version() -> str:
  return importlib.import_module("spra_jax").__version__


# --------------------------------------------------------------------------
# JSON helpers.
# --------------------------------------------------------------------------


def _jsonable(x: Any, where: str) -> Any:
  """Turns metadata into JSON: Distributions become their spec, regexes their pattern."""
  if x is None or isinstance(x, (bool, str)):
    return x
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x)
  if isinstance(x, Distribution):
    return x.spec()
  if isinstance(x, re.Pattern):
    return x.pattern
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0 and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(x).item()
  raise TypeError(f"{where} is a {type(x).__name__}, which cannot be stored as JSON metadata.")


def _keypath_json(path: Sequence[Any]) -> list[list[Any]]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      if not isinstance(k.key, (str, int)):
        raise TypeError(f"dict key {k.key!r} at {path_str(path)!r} is neither str nor int; it cannot be stored.")
      out.append(["dict", k.key])
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(["seq", k.idx])
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(["attr", k.name])
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(["index", k.key])
    else:
      out.append(["dict", str(k)])
  if out and out[-1] == ["attr", "value"]:
    out = out[:-1]  # NNX Variable's value: path_str drops it too.
  return out


def _rebuild(entries: list[tuple[list[list[Any]], Any]]) -> Any:
  """Nested dicts and lists from (keypath, leaf) pairs (the tree of a delta loaded without a template)."""
  if len(entries) == 1 and not entries[0][0]:
    return entries[0][1]
  kinds = {kp[0][0] for kp, _ in entries}
  groups: dict[Any, list] = {}
  for kp, leaf in entries:
    groups.setdefault(kp[0][1], []).append((kp[1:], leaf))
  children = {key: _rebuild(sub) for key, sub in groups.items()}
  if kinds == {"seq"}:
    return [children[i] for i in sorted(children)]
  return children


# --------------------------------------------------------------------------
# The base-model fingerprint.
# --------------------------------------------------------------------------


@jax.jit
def _take_flat(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.reshape(x, (-1,))[idx]


def _base_values(leaf: Any, m: LeafMask) -> np.ndarray:
  """The base values an adapter's leaf touches, on the host (O(k))."""
  if m.kind == FULL:
    return np.asarray(leaf).reshape(-1)
  idx = np.asarray(m.indices)
  if isinstance(leaf, np.ndarray):
    return leaf.reshape(-1)[idx]
  return np.asarray(_take_flat(leaf, jnp.asarray(idx)))


def _digest(values: np.ndarray) -> str:
  # Rounded to bfloat16 so that a float32 base and its bfloat16 copy match.
  rounded = np.asarray(values).astype(np.float32).astype(ml_dtypes.bfloat16)
  return hashlib.blake2b(np.ascontiguousarray(rounded).tobytes(), digest_size=16).hexdigest()


def _flat_masks(mask: Any) -> list[tuple[Any, LeafMask]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)
  for p, m in flat:
    if not isinstance(m, LeafMask):
      raise TypeError(f"mask leaf at {path_str(p)!r} is a {type(m).__name__}, expected a LeafMask.")
  return flat


def _flat_params(params: Any) -> dict[str, Any]:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def base_fingerprint(base_params: Any, mask: Any) -> dict[str, dict[str, Any]]:
  """A cheap fingerprint of the base weights that an adapter was trained on.

  For every parameter leaf: its shape; for every trained leaf also a 128-bit
  hash of the base values at the adapter's entries, rounded to bfloat16 (so the
  float32 weights and their bfloat16 copy give the same fingerprint). The cost
  is O(k): only the adapter's entries are read.

  Args:
    base_params: the base model's parameter pytree.
    mask: the adapter's mask (``delta.mask``).

  Returns:
    ``{path: {'shape': [...], 'k': int, 'hash': str}}`` (``hash`` only for
    trained leaves).

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> fp = base_fingerprint({'w': jnp.arange(4.)}, {'w': LeafMask.sparse((4,), jnp.array([1], jnp.int32))})
    >>> fp['w']['shape'], fp['w']['k'], len(fp['w']['hash'])
    ([4], 1, 32)
  """
  params = _flat_params(base_params)
  out = {}
  for p, m in _flat_masks(mask):
    path = path_str(p)
    if path not in params:
      raise ValueError(f"base_params has no leaf {path!r}, which the adapter's mask has.")
    leaf = params[path]
    shape = tuple(int(d) for d in np.shape(leaf))
    if shape != m.shape:
      raise ValueError(f"base_params leaf {path!r} has shape {shape}, but the adapter's mask has {m.shape}.")
    entry = {"shape": list(shape), "k": m.num_trainable}
    if m.kind != FROZEN:
      entry["hash"] = _digest(_base_values(leaf, m))
    out[path] = entry
  return out


_fingerprint_of = base_fingerprint  # save_adapter's keyword of the same name shadows the function


def check_base(config: Mapping[str, Any], base_params: Any, mask: Any) -> None:
  """Raises ``ValueError`` if ``base_params`` is not the base an adapter was saved against.

  Checks every leaf's shape, and, where the adapter stored a fingerprint, the
  hash of the base values at the adapter's entries.

  Args:
    config: the adapter's config (:func:`load_adapter_config`).
    base_params: the candidate base weights.
    mask: the adapter's mask.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> mask = {'w': LeafMask.sparse((4,), jnp.array([1], jnp.int32))}
    >>> cfg = {'base_model': 'toy', 'base_fingerprint': {'leaves': base_fingerprint({'w': jnp.ones(4)}, mask)}}
    >>> check_base(cfg, {'w': jnp.zeros(4)}, mask)
    Traceback (most recent call last):
    ...
    ValueError: base_params do not match the adapter's base model 'toy': leaf 'w' differs at the adapter's 1 entries ...
  """
  stored = (config.get("base_fingerprint") or {}).get("leaves")
  params = _flat_params(base_params)
  name = config.get("base_model")
  what = f"the adapter's base model {name!r}" if name else "the adapter's base model"
  flat = _flat_masks(mask)
  missing = [path_str(p) for p, _ in flat if path_str(p) not in params]
  if missing:
    raise ValueError(f"base_params do not match {what}: they lack the leaves {missing[:6]}.")
  for p, m in flat:
    path = path_str(p)
    shape = tuple(int(d) for d in np.shape(params[path]))
    if shape != m.shape:
      raise ValueError(
          f"base_params do not match {what}: leaf {path!r} has shape {shape}, the adapter expects {m.shape}."
      )
  if stored is None:
    return
  current = base_fingerprint(base_params, mask)
  for path, entry in stored.items():
    if "hash" in entry and current.get(path, {}).get("hash") != entry["hash"]:
      raise ValueError(
          f"base_params do not match {what}: leaf {path!r} differs at the adapter's {entry['k']:,} entries "
          f"(fingerprint {current.get(path, {}).get('hash')} != {entry['hash']})."
      )


# --------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------


def _as_host(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _checksum(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _mask_stats(flat: list[tuple[Any, LeafMask]]) -> dict[str, Any]:
  entries = sum(m.size for _, m in flat)
  trainable = sum(m.num_trainable for _, m in flat)
  sparse = [m for _, m in flat if m.kind == SPARSE]
  sparse_size = sum(m.size for m in sparse)
  return {
      "trainable": trainable,
      "entries": entries,
      "density": trainable / entries if entries else 0.0,
      "sparse_density": sum(m.num_trainable for m in sparse) / sparse_size if sparse_size else 0.0,
      "leaves": {kind: sum(m.kind == kind for _, m in flat) for kind in (SPARSE, FULL, FROZEN)},
      "full_paths": [path_str(p) for p, m in flat if m.kind == FULL],
  }


def save_adapter(
    directory: str | os.PathLike,
    delta: SparseDelta,
    *,
    metadata: Mapping[str, Any] | None = None,
    base_params: Any = None,
    base_fingerprint: Mapping[str, Any] | None = None,
    index_encoding: str = "int32",
    overwrite: bool = False,
) -> Path:
  """Saves a sparse delta as an adapter directory (indices, values, config).

  Args:
    directory: where the adapter goes. It must not exist unless ``overwrite``.
    delta: the :class:`~spra_jax.SparseDelta` to save.
    metadata: JSON-able provenance. These keys are recognised and stored in the
      config's ``mask`` section: ``distribution`` (a ``spra.masks.Distribution``
      or its name), ``density``, ``seed``, ``include``, ``exclude``, ``full``,
      ``allocation``, ``relative_to``; ``base_model`` (e.g. a Hub name) goes to
      the top level; all other keys are kept under ``metadata``.
    base_params: the base weights the delta applies to. When given, their
      fingerprint is stored and every leaf's shape is checked against the mask;
      :func:`load_adapter` then refuses other weights. Only the k entries are read.
    base_fingerprint: instead of ``base_params``, their fingerprint taken
      earlier with :func:`base_fingerprint` (e.g. before a training step
      updated the weights in place, as the lean path does).
    index_encoding: ``"int32"`` (4 bytes per index) or ``"gaps"`` (sorted gaps in
      1 or 2 bytes, per leaf whichever is smaller, with uint32 escapes).
    overwrite: replace an existing adapter at ``directory`` (atomically).

  Returns:
    The absolute path of the adapter.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is False.
    ValueError: an unknown ``index_encoding``, or ``base_params`` that do not
      fit the mask.

  IMPORTANT: the adapter is written into a hidden sibling of ``directory`` and
  renamed into place only when complete. An interrupted save leaves the previous
  adapter (if any) untouched, plus a ``.<name>.tmp-*`` directory to delete.

  Example:

    >>> import tempfile, os, jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> mask = spra.sample_mask(0, {'w': jnp.zeros((100, 100))}, density=0.01)
    >>> d = os.path.join(tempfile.mkdtemp(), 'a')
    >>> path = spra.save_adapter(d, spra.init_delta(mask), index_encoding='gaps')
    >>> spra.load_adapter_config(d)['index_encoding'], spra.load_adapter(d).mask['w'].num_trainable
    ('gaps', 100)
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"save_adapter expects a SparseDelta, got {type(delta).__name__}.")
  if index_encoding not in INDEX_ENCODINGS:
    raise ValueError(f"index_encoding must be one of {INDEX_ENCODINGS}, got {index_encoding!r}.")
  final = _files.absolute(directory)
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")

  meta = dict(_jsonable(dict(metadata or {}), "metadata"))
  base_model = meta.pop("base_model", None)
  sampling = {k: meta.pop(k) for k in _SAMPLING_KEYS if k in meta}

  flat = _flat_masks(delta.mask)
  mask_def = jax.tree.structure(delta.mask, is_leaf=is_leaf_mask)
  values = mask_def.flatten_up_to(delta.values)
  if base_params is not None and base_fingerprint is not None:
    raise ValueError("give base_params or base_fingerprint, not both.")
  fingerprint = None
  if base_params is not None:
    base_fingerprint = _fingerprint_of(base_params, delta.mask)
  if base_fingerprint is not None:
    fingerprint = {"algorithm": _FINGERPRINT_ALGORITHM, "leaves": dict(base_fingerprint)}

  leaves, index_parts, value_parts = [], {}, {}
  for (p, m), v in zip(flat, values):
    record: dict[str, Any] = {"path": path_str(p), "keypath": _keypath_json(p), "kind": m.kind, "shape": list(m.shape)}
    if m.kind != FROZEN:
      host = _as_host(v)
      expected = (m.num_trainable,) if m.kind == SPARSE else m.shape
      if host.shape != expected:
        raise ValueError(f"delta leaf {record['path']!r} has values of shape {host.shape}, expected {expected}.")
      record["k"] = m.num_trainable
      record["value_dtype"] = host.dtype.name
      value_parts.setdefault(f"values_{host.dtype.name}", []).append(host.reshape(-1))
    if m.kind == SPARSE:
      idx = _as_host(m.indices).astype(np.int32, copy=False)
      if m.blocks is not None:
        # A shard-local mask: its indices are block-major (see LeafMask); keep the grid.
        record["blocks"] = list(m.blocks)
        if index_encoding != "int32" and not m.indices_sorted:
          raise ValueError(
              f"index_encoding={index_encoding!r} needs globally sorted indices, but leaf {record['path']!r} has a "
              f"shard-local mask whose indices are ordered block by block (blocks {m.blocks}); use 'int32'.")
      if index_encoding == "int32":
        index_parts.setdefault("indices", []).append(idx)
      else:
        enc = encode_gaps(idx)
        record["index_width"] = enc.width
        record["escapes"] = int(enc.escapes.size)
        index_parts.setdefault(f"gaps_u{8 * enc.width}", []).append(enc.gaps)
        index_parts.setdefault("escapes", []).append(enc.escapes)
    leaves.append(record)

  arrays = {name: np.concatenate(parts) for name, parts in {**index_parts, **value_parts}.items()}
  arrays = {name: a for name, a in arrays.items() if a.size}  # Orbax refuses zero-size arrays.
  if not arrays:
    raise ValueError("the delta trains no entry; there is nothing to save.")

  config = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "library_version": _library_version(),
      "base_model": base_model,
      "mask": {**sampling, **_mask_stats(flat)},
      "index_encoding": index_encoding,
      "nbytes": {"indices": sum(arrays[n].nbytes for n in arrays if not n.startswith("values_")),
                 "values": sum(arrays[n].nbytes for n in arrays if n.startswith("values_"))},
      "arrays": {n: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": _checksum(a)} for n, a in arrays.items()},
      "leaves": leaves,
      "base_fingerprint": fingerprint,
      "metadata": meta,
  }

  tmp = _files.temporary_sibling(final, "tmp")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / ARRAYS_DIR, arrays)
      ckptr.wait_until_finished()
    _files.write_json(tmp / CONFIG_NAME, config)
    _files.fsync_path(tmp)
    _files.publish(tmp, final, overwrite=overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def _missing(final: Path, what: str) -> FileNotFoundError:
  hint = ""
  left = _files.leftovers(final)
  if left:
    hint = f" (an interrupted save or replace left {', '.join(p.name for p in left)} next to it)"
  return FileNotFoundError(f"{what}{hint}.")


def load_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The ``adapter_config.json`` of an adapter, checked for format and version.

  Raises:
    FileNotFoundError: no adapter (or no config file) at ``directory``.
    ValueError: the config is truncated, not JSON, or of another format or a
      newer format version.

  Example:

    >>> import tempfile
    >>> load_adapter_config(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    FileNotFoundError: .../adapter_config.json is missing: not a spra_jax adapter directory, or an incomplete one.
  """
  final = _files.absolute(directory)
  if not final.is_dir():
    raise _missing(final, f"no adapter directory at {final}")
  path = final / CONFIG_NAME
  if not path.is_file():
    raise _missing(final, f"{path} is missing: not a spra_jax adapter directory, or an incomplete one")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is truncated or corrupted (not valid JSON: {e}).") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT:
    got = config.get("format") if isinstance(config, dict) else type(config).__name__
    raise ValueError(f"{path} is not a spra_jax adapter config (format {got!r}, expected {FORMAT!r}).")
  version = config.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ValueError(
        f"{path} has format version {version!r}; this spra_jax ({_library_version()}) reads versions up to "
        f"{FORMAT_VERSION}. Upgrade spra_jax."
    )
  for key in ("leaves", "arrays", "index_encoding"):
    if key not in config:
      raise ValueError(f"{path} is incomplete: it has no {key!r} entry.")
  return config


def _read_arrays(final: Path, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  arrays_dir = final / ARRAYS_DIR
  if not arrays_dir.is_dir():
    raise _missing(final, f"{arrays_dir} is missing: the adapter is incomplete")
  specs = config["arrays"]
  restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in specs}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      arrays = ckptr.restore(arrays_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
    raise ValueError(
        f"cannot read the arrays of adapter {final}: it is truncated or corrupted ({type(e).__name__}: {e})."
    ) from e
  for name, spec in specs.items():
    a = arrays.get(name)
    if a is None:
      raise ValueError(f"adapter {final} is corrupted: array {name!r} is missing.")
    a = np.asarray(a)
    if a.dtype.name != spec["dtype"] or list(a.shape) != spec["shape"] or _checksum(a) != spec["sha256"]:
      raise ValueError(
          f"adapter {final} is corrupted: array {name!r} does not match its checksum "
          f"(got {a.dtype.name}{list(a.shape)}, expected {spec['dtype']}{spec['shape']})."
      )
    arrays[name] = a
  return arrays


class _Leaf(NamedTuple):
  record: dict[str, Any]
  mask: LeafMask
  values: np.ndarray | None


def _decode(final: Path, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[_Leaf]:
  """Splits the flat arrays back into per-leaf masks and values, checking the table against them."""
  encoding = config["index_encoding"]
  if encoding not in INDEX_ENCODINGS:
    raise ValueError(f"adapter {final} has an unknown index encoding {encoding!r}.")
  cursors: dict[str, int] = {}

  def take(name: str, n: int, what: str) -> np.ndarray:
    start = cursors.get(name, 0)
    a = arrays.get(name)
    if n and (a is None or start + n > a.shape[0]):
      raise ValueError(f"adapter {final} is corrupted: {what} runs past the end of array {name!r}.")
    cursors[name] = start + n
    return a[start : start + n] if n else np.zeros((0,), np.int32)

  out = []
  for record in config["leaves"]:
    path, kind, shape = record.get("path"), record.get("kind"), tuple(record.get("shape", ()))
    if kind not in (SPARSE, FULL, FROZEN):
      raise ValueError(f"adapter {final} is corrupted: leaf {path!r} has kind {kind!r}.")
    if kind == FROZEN:
      out.append(_Leaf(record, LeafMask.frozen(shape), None))
      continue
    k = int(record["k"])
    values = take(f"values_{record['value_dtype']}", k, f"leaf {path!r}'s values")
    if kind == FULL:
      if k != math.prod(shape):
        raise ValueError(f"adapter {final} is corrupted: full leaf {path!r} has {k} values for shape {shape}.")
      out.append(_Leaf(record, LeafMask.full(shape), values.reshape(shape)))
      continue
    if encoding == "int32":
      idx = take("indices", k, f"leaf {path!r}'s indices").astype(np.int32)
    else:
      width = int(record["index_width"])
      if width not in WIDTH_DTYPES:
        raise ValueError(f"adapter {final} is corrupted: leaf {path!r} has index width {width}.")
      gaps = take(f"gaps_u{8 * width}", k, f"leaf {path!r}'s index gaps").astype(WIDTH_DTYPES[width])
      escapes = take("escapes", int(record["escapes"]), f"leaf {path!r}'s index escapes").astype(np.uint32)
      try:
        idx = decode_gaps(gaps, escapes)
      except ValueError as e:
        raise ValueError(f"adapter {final} is corrupted: leaf {path!r}: {e}") from None
    size = math.prod(shape)
    try:
      leaf_mask = LeafMask.sparse(shape, idx, blocks=record.get("blocks"))
      _validate_indices(path, leaf_mask, check_values=True)
    except ValueError as e:
      raise ValueError(
          f"adapter {final} is corrupted: leaf {path!r}'s indices are not sorted, unique and in [0, {size}) "
          f"({e})") from None
    out.append(_Leaf(record, leaf_mask, values))
  for name, a in arrays.items():
    if cursors.get(name, 0) != a.shape[0]:
      raise ValueError(
          f"adapter {final} is corrupted: the leaf table uses {cursors.get(name, 0)} of the {a.shape[0]} "
          f"entries of {name!r}."
      )
  return out


def _structure(leaves: list[_Leaf], like: Any) -> tuple[Any, list[_Leaf]]:
  """A treedef for the adapter's leaves: ``like``'s, or nested dicts/lists rebuilt from the key paths."""
  by_path = {leaf.record["path"]: leaf for leaf in leaves}
  if like is None:
    ids = _rebuild([(leaf.record["keypath"], i) for i, leaf in enumerate(leaves)])
    order, treedef = jax.tree.flatten(ids)
    return treedef, [leaves[i] for i in order]
  if isinstance(like, SparseDelta):
    like = like.mask
  flat, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_leaf_mask)
  paths = [path_str(p) for p, _ in flat]
  missing = [p for p in by_path if p not in set(paths)]
  extra = [p for p in paths if p not in by_path]
  if missing or extra:
    detail = []
    if extra:
      detail.append(f"leaves the adapter does not have: {extra[:6]}")
    if missing:
      detail.append(f"adapter leaves it lacks: {missing[:6]}")
    raise ValueError("the template tree does not match the adapter; it has " + "; ".join(detail) + ".")
  for path, (p, x) in zip(paths, flat):
    shape = x.shape if isinstance(x, LeafMask) else tuple(int(d) for d in np.shape(x))
    if shape != by_path[path].mask.shape:
      raise ValueError(f"the template leaf {path!r} has shape {shape}, the adapter's has {by_path[path].mask.shape}.")
  return treedef, [by_path[p] for p in paths]


def _placer(shardings: Any, treedef_delta: Any) -> Callable[[list[np.ndarray]], list[jax.Array]]:
  def put(host: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
      return jnp.asarray(host)
    if not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(f"shardings must hold jax.sharding.Sharding objects, got {type(sharding).__name__}.")
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  def place(hosts: list[np.ndarray]) -> list[jax.Array]:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
      return [put(h, shardings) for h in hosts]
    try:
      per_leaf = treedef_delta.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "shardings must be one jax.sharding.Sharding, or a tree with the structure of the loaded SparseDelta "
          f"(mask indices and values); {e}"
      ) from None
    return [put(h, s) for h, s in zip(hosts, per_leaf)]

  return place


def load_adapter(
    directory: str | os.PathLike,
    *,
    like: Any = None,
    base_params: Any = None,
    shardings: Any = None,
) -> SparseDelta:
  """Loads an adapter saved by :func:`save_adapter` as a :class:`~spra_jax.SparseDelta`.

  Args:
    directory: the adapter directory.
    like: a tree whose structure the delta's mask takes: the parameters, their
      ``jax.ShapeDtypeStruct`` tree, a mask or a delta. Defaults to
      ``base_params``; without either, the tree is rebuilt as nested dicts and
      lists from the stored key paths (NNX ``State`` objects become dicts).
    base_params: the base weights. When the adapter stores a fingerprint they
      must match it (checked on the adapter's k entries only).
    shardings: where the arrays go: one ``jax.sharding.Sharding`` for every
      array (e.g. replicated ``NamedSharding(mesh, P())``), or a tree with the
      structure of the returned delta (its mask's index vectors and its values)
      holding a sharding per array. Default: the default device.

  Returns:
    The delta; read the provenance with :func:`load_adapter_config`.

  Raises:
    FileNotFoundError: the directory, its config or its arrays are missing.
    ValueError: a truncated or corrupted adapter (bad JSON, checksum mismatch,
      inconsistent leaf table), a ``like`` tree of other paths or shapes, or
      ``base_params`` of another model (the message names the leaf).

  Example:

    >>> import tempfile, os, jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import spra_jax as spra
    >>> base = {'w': jnp.ones((8, 8))}
    >>> d = os.path.join(tempfile.mkdtemp(), 'a')
    >>> _ = spra.save_adapter(d, spra.init_delta(spra.sample_mask(0, base, density=0.5)), base_params=base)
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> delta = spra.load_adapter(d, base_params=base, shardings=NamedSharding(mesh, P()))
    >>> delta.values['w'].sharding.spec
    P()
    >>> spra.load_adapter(d, base_params={'w': jnp.zeros((8, 8))})
    Traceback (most recent call last):
    ...
    ValueError: base_params do not match the adapter's base model: leaf 'w' differs at the adapter's 32 entries ...
  """
  final = _files.absolute(directory)
  config = load_adapter_config(final)
  leaves = _decode(final, config, _read_arrays(final, config))
  treedef, ordered = _structure(leaves, like if like is not None else base_params)
  host_mask = treedef.unflatten([leaf.mask for leaf in ordered])
  host_values = treedef.unflatten([leaf.values for leaf in ordered])
  if base_params is not None:
    check_base(config, base_params, host_mask)
  host_delta = SparseDelta(host_mask, host_values)
  flat, delta_def = jax.tree.flatten(host_delta)
  return jax.tree.unflatten(delta_def, _placer(shardings, delta_def)(flat))


# --------------------------------------------------------------------------
# Several adapters.
# --------------------------------------------------------------------------


def _as_delta(x: Any, base_params: Any) -> SparseDelta:
  if isinstance(x, SparseDelta):
    return x
  if isinstance(x, (str, os.PathLike)):
    return load_adapter(x, base_params=base_params)
  raise TypeError(f"expected a SparseDelta or an adapter directory, got {type(x).__name__}.")


def merge_adapters(base_params: Any, *adapters: SparseDelta | str | os.PathLike) -> Any:
  """The base weights plus several adapters (deltas or adapter directories).

  Adapter directories are loaded against ``base_params``, so each one's
  fingerprint is checked. The deltas are summed over the union of their
  indices (:func:`spra.add_deltas`) and merged once, so the result does not
  depend on the order of the adapters beyond float32 summation.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> base = {'w': jnp.zeros(4)}
    >>> a = spra.SparseDelta({'w': spra.LeafMask.sparse((4,), jnp.array([0, 1], jnp.int32))}, {'w': jnp.ones(2)})
    >>> b = spra.SparseDelta({'w': spra.LeafMask.sparse((4,), jnp.array([1, 3], jnp.int32))}, {'w': jnp.ones(2)})
    >>> spra.merge_adapters(base, a, b)['w'].tolist()
    [1.0, 2.0, 0.0, 1.0]
  """
  if not adapters:
    raise ValueError("merge_adapters needs at least one adapter.")
  deltas = [_as_delta(a, base_params) for a in adapters]
  return merge(base_params, add_deltas(*deltas))


class LeafOverlap(NamedTuple):
  """Index overlap of two adapters on one leaf.

  Attributes:
    k_a: entries the first adapter trains on this leaf.
    k_b: entries the second adapter trains.
    shared: entries both train.
    expected: ``k_a * k_b / size``: the overlap two independent uniform masks
      of these sizes have on average.
  """

  k_a: int
  k_b: int
  shared: int
  expected: float


class AdapterOverlap(NamedTuple):
  """Index overlap of two adapters, per leaf and in total.

  Attributes:
    leaves: ``{path: LeafOverlap}`` for every leaf either adapter trains.
    k_a: total entries of the first adapter.
    k_b: total entries of the second.
    shared: total entries both train.
  """

  leaves: dict[str, LeafOverlap]
  k_a: int
  k_b: int
  shared: int

  @property
  def jaccard(self) -> float:
    """shared / |union|."""
    union = self.k_a + self.k_b - self.shared
    return self.shared / union if union else 0.0

  @property
  def expected(self) -> float:
    """The total overlap expected of independent uniform masks of the same sizes."""
    return sum(leaf.expected for leaf in self.leaves.values())


def _mask_of(x: Any) -> Any:
  if isinstance(x, SparseDelta):
    return x.mask
  if isinstance(x, (str, os.PathLike)):
    final = _files.absolute(x)
    config = load_adapter_config(final)
    leaves = _decode(final, config, _read_arrays(final, config))
    return {leaf.record["path"]: leaf.mask for leaf in leaves}
  return x


def adapter_overlap(a: Any, b: Any) -> AdapterOverlap:
  """How many trained entries two adapters share, per leaf and in total.

  Args:
    a: a :class:`~spra_jax.SparseDelta`, a mask, or an adapter directory.
    b: the same for the second adapter; leaves are matched by path.

  Returns:
    An :class:`AdapterOverlap`. Independent uniform masks at densities p and q
    share about p·q of each leaf's entries (``expected``); masks drawn with the
    same key share everything.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> params = {'w': jnp.zeros((100, 100))}
    >>> a = spra.sample_mask(0, params, density=0.5)
    >>> b = spra.sample_mask(1, params, density=0.5)
    >>> ov = spra.adapter_overlap(a, b)
    >>> ov.k_a, ov.k_b, 2300 < ov.shared < 2700, ov.expected
    (5000, 5000, True, 2500.0)
  """
  flat_a = {path_str(p): m for p, m in _flat_masks(_mask_of(a))}
  flat_b = {path_str(p): m for p, m in _flat_masks(_mask_of(b))}
  leaves = {}
  for path in sorted(set(flat_a) | set(flat_b)):
    ma, mb = flat_a.get(path), flat_b.get(path)
    if ma is not None and mb is not None and ma.shape != mb.shape:
      raise ValueError(f"leaf {path!r} has shape {ma.shape} in the first adapter and {mb.shape} in the second.")
    ka = ma.num_trainable if ma is not None else 0
    kb = mb.num_trainable if mb is not None else 0
    if ka == 0 and kb == 0:
      continue
    size = (ma or mb).size
    if ka == 0 or kb == 0:
      shared = 0
    elif ma.kind == FULL:
      shared = kb
    elif mb.kind == FULL:
      shared = ka
    else:
      shared = int(np.intersect1d(np.asarray(ma.indices), np.asarray(mb.indices), assume_unique=True).size)
    leaves[path] = LeafOverlap(ka, kb, shared, ka * kb / size if size else 0.0)
  return AdapterOverlap(
      leaves,
      sum(v.k_a for v in leaves.values()),
      sum(v.k_b for v in leaves.values()),
      sum(v.shared for v in leaves.values()),
  )
