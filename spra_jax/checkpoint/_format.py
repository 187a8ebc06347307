"""The on-disk schema of adapters: formats, versions, the config file, leaf tables, index encodings, checksums.

Two kinds of adapter directory share one layout, told apart by the ``format``
key of their ``adapter_config.json``:

* ``spra_jax.sparse_adapter`` (:func:`~spra_jax.save_adapter`): a
  :class:`~spra_jax.SparseDelta`. ``arrays/`` is an Orbax checkpoint of a few
  flat arrays: every sparse leaf's int32 indices concatenated into one vector
  (or, with ``index_encoding="gaps"``, their gaps in 1 or 2 bytes each, see
  :mod:`spra_jax.checkpoint.encoding`), and the values of every trained leaf
  concatenated per dtype. The config's leaf table (path, key path, kind, shape,
  k, value dtype) says where each leaf's run starts; ``arrays`` holds dtype,
  shape and SHA-256 of every flat array.
* ``spra_jax.dense_adapter`` (:func:`~spra_jax.checkpoint.save_dense_adapter`):
  a tree of whole arrays (LoRA factors, fully fine-tuned weights). ``arrays/``
  holds one Orbax array per leaf; the leaf table gives each leaf's path, key
  path, shape, dtype, array name and SHA-256.

Both configs carry ``format_version`` (an int; a reader refuses newer versions),
``library_version`` and the user's JSON ``metadata``.

Why flat arrays for the sparse format rather than one Orbax array per leaf: a 7B
Llama has 224 weight matrices, and Orbax writes a metadata record per array
(about 350 bytes each). Four arrays keep that overhead constant, whatever the
model, and give the gap encoding long runs to work on.

IMPORTANT: this module is the only place that knows the schema. A change to
what is written must bump the format's version and keep reading the older
versions; readers check the format, the version, every checksum and the leaf
table against the arrays, so that a damaged or foreign directory raises instead
of loading wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spra_jax._version import __version__
from spra_jax.checkpoint import _files
from spra_jax.checkpoint.encoding import WIDTH_DTYPES, decode_gaps, encode_gaps
from spra_jax.masks import FROZEN, FULL, SPARSE, Distribution, LeafMask, is_leaf_mask, path_str, validate_indices

CONFIG_NAME = "adapter_config.json"
ARRAYS_DIR = "arrays"

FORMAT = "spra_jax.sparse_adapter"
FORMAT_VERSION = 1
INDEX_ENCODINGS = ("int32", "gaps")

DENSE_FORMAT = "spra_jax.dense_adapter"
DENSE_FORMAT_VERSION = 1

# format -> (newest version this library reads, keys every config of it must have)
_FORMATS = {
    FORMAT: (FORMAT_VERSION, ("leaves", "arrays", "index_encoding")),
    DENSE_FORMAT: (DENSE_FORMAT_VERSION, ("leaves",)),
}

# What the job wrote for LoRA and full fine-tuning before the dense format: Orbax variables/ and a format-less JSON.
_LEGACY_DENSE_DIR = "variables"


# --------------------------------------------------------------------------
# JSON.
# --------------------------------------------------------------------------


def jsonable(x: Any, where: str) -> Any:
  """Turns metadata into JSON: Distributions become their spec, regexes their pattern.

  Raises:
    TypeError: a value with no JSON form; the message names where it is (``where``, e.g. ``metadata['seed']``).
  """
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
    return {str(k): jsonable(v, f"{where}[{k!r}]") for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0 and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(x).item()
  raise TypeError(f"{where} is a {type(x).__name__}, which cannot be stored as JSON metadata.")


def keypath_json(path: Sequence[Any]) -> list[list[Any]]:
  """A pytree key path as JSON (``[["dict", "layers"], ["dict", 0], ...]``); int dict keys stay ints."""
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


def rebuild_tree(entries: list[tuple[list[list[Any]], Any]]) -> Any:
  """Nested dicts and lists from (keypath, leaf) pairs (the tree of an adapter loaded without a template)."""
  if len(entries) == 1 and not entries[0][0]:
    return entries[0][1]
  kinds = {kp[0][0] for kp, _ in entries}
  groups: dict[Any, list] = {}
  for kp, leaf in entries:
    groups.setdefault(kp[0][1], []).append((kp[1:], leaf))
  children = {key: rebuild_tree(sub) for key, sub in groups.items()}
  if kinds == {"seq"}:
    return [children[i] for i in sorted(children)]
  return children


# --------------------------------------------------------------------------
# Arrays and checksums.
# --------------------------------------------------------------------------


def as_host(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def checksum(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def flat_masks(mask: Any) -> list[tuple[Any, LeafMask]]:
  """``(key path, LeafMask)`` pairs of a mask tree; anything else as a leaf is a TypeError."""
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)
  for p, m in flat:
    if not isinstance(m, LeafMask):
      raise TypeError(f"mask leaf at {path_str(p)!r} is a {type(m).__name__}, expected a LeafMask.")
  return flat


def read_arrays(final: Path, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Reads the named arrays of ``final/arrays`` to the host and checks each against its spec.

  ``specs`` maps array names to ``{'dtype', 'shape', 'sha256'}`` (and, for the
  dense format, the leaf's ``path``, which messages name instead of the array).

  Raises:
    FileNotFoundError: no ``arrays`` directory.
    ValueError: unreadable (truncated, corrupted) files, or an array that does not match its spec.
  """
  arrays_dir = final / ARRAYS_DIR
  if not arrays_dir.is_dir():
    raise missing(final, f"{arrays_dir} is missing: the adapter is incomplete")
  restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in specs}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      arrays = ckptr.restore(arrays_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
    raise ValueError(
        f"cannot read the arrays of adapter {final}: it is truncated or corrupted ({type(e).__name__}: {e})."
    ) from e
  for name, spec in specs.items():
    label = spec.get("path", name)
    a = arrays.get(name)
    if a is None:
      raise ValueError(f"adapter {final} is corrupted: array {label!r} is missing.")
    a = np.asarray(a)
    if a.dtype.name != spec["dtype"] or list(a.shape) != spec["shape"] or checksum(a) != spec["sha256"]:
      raise ValueError(
          f"adapter {final} is corrupted: array {label!r} does not match its checksum "
          f"(got {a.dtype.name}{list(a.shape)}, expected {spec['dtype']}{spec['shape']})."
      )
    arrays[name] = a
  return arrays


# --------------------------------------------------------------------------
# The config file.
# --------------------------------------------------------------------------


def missing(final: Path, what: str) -> FileNotFoundError:
  """A FileNotFoundError for ``what``, naming the hidden siblings an interrupted save or replace left."""
  hint = ""
  left = _files.leftovers(final)
  if left:
    hint = f" (an interrupted save or replace left {', '.join(p.name for p in left)} next to it)"
  return FileNotFoundError(f"{what}{hint}.")


def _dense_summary(config: Mapping[str, Any]) -> str:
  meta = config.get("metadata")
  method = meta.get("method") if isinstance(meta, Mapping) else None
  leaves = config.get("leaves")
  n = len(leaves) if isinstance(leaves, list) else None
  count = "trained variables" if n is None else f"{n} trained variable{'' if n == 1 else 's'}"
  return f"method {method!r}, {count}" if isinstance(method, str) else count


def _sparse_summary(config: Mapping[str, Any]) -> str:
  mask = config.get("mask")
  trainable = mask.get("trainable") if isinstance(mask, Mapping) else None
  return f"a SparseDelta of {trainable:,} trained entries" if isinstance(trainable, int) else "a SparseDelta"


def wrong_kind(final: Path, config: Mapping[str, Any], expect: str) -> ValueError:
  """The error for an adapter of the other kind: which kind it is and which loader reads it."""
  if expect == FORMAT:
    return ValueError(
        f"{final} is a dense adapter ({_dense_summary(config)}), not a sparse one; load it with "
        f"spra.checkpoint.load_dense_adapter."
    )
  return ValueError(
      f"{final} is a sparse adapter ({_sparse_summary(config)}), not a dense one; load it with spra.load_adapter."
  )


def read_config(final: Path, expect: str | None = None) -> dict[str, Any]:
  """The checked ``adapter_config.json`` of the adapter at ``final``.

  Args:
    final: the adapter directory (absolute).
    expect: ``FORMAT`` or ``DENSE_FORMAT`` to accept that format only (the other
      one raises, saying which loader to use); None to accept either.

  Raises:
    FileNotFoundError: no directory or no config file.
    ValueError: a config that is truncated, not JSON, of an unknown format or a
      newer format version, or without the entries its format needs.
  """
  if not final.is_dir():
    raise missing(final, f"no adapter directory at {final}")
  path = final / CONFIG_NAME
  if not path.is_file():
    raise missing(final, f"{path} is missing: not a spra_jax adapter directory, or an incomplete one")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is truncated or corrupted (not valid JSON: {e}).") from None
  got = config.get("format") if isinstance(config, dict) else type(config).__name__
  if not isinstance(got, str) or got not in _FORMATS:
    expected = repr(expect) if expect else f"{FORMAT!r} or {DENSE_FORMAT!r}"
    hint = ""
    if isinstance(config, dict) and got is None and (final / _LEGACY_DENSE_DIR).is_dir():
      hint = (f" It looks like the unversioned {_LEGACY_DENSE_DIR}/ directory that earlier versions of the job wrote "
              f"for LoRA and full fine-tuning: restore it with orbax.checkpoint, or save it again with "
              f"spra.checkpoint.save_dense_adapter.")
    raise ValueError(f"{path} is not a spra_jax adapter config (format {got!r}, expected {expected}).{hint}")
  if expect is not None and got != expect:
    raise wrong_kind(final, config, expect)
  newest, required = _FORMATS[got]
  version = config.get("format_version")
  if not isinstance(version, int) or version > newest:
    raise ValueError(
        f"{path} has format version {version!r}; this spra_jax ({__version__}) reads versions up to "
        f"{newest}. Upgrade spra_jax."
    )
  for key in required:
    if key not in config:
      raise ValueError(f"{path} is incomplete: it has no {key!r} entry.")
  return config


# --------------------------------------------------------------------------
# The sparse format's leaf table and flat arrays.
# --------------------------------------------------------------------------


def mask_stats(flat: list[tuple[Any, LeafMask]]) -> dict[str, Any]:
  """The config's ``mask`` summary: counts, densities, leaves per kind, fully trained paths."""
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


def pack_sparse(
    flat: list[tuple[Any, LeafMask]], values: list[Any], index_encoding: str
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """A delta's leaf table and its flat arrays (indices or gaps and escapes, values per dtype), on the host.

  Raises:
    ValueError: values of the wrong shape, a shard-local mask with ``gaps``, or a delta that trains nothing.
  """
  leaves, index_parts, value_parts = [], {}, {}
  for (p, m), v in zip(flat, values):
    record: dict[str, Any] = {"path": path_str(p), "keypath": keypath_json(p), "kind": m.kind, "shape": list(m.shape)}
    if m.kind != FROZEN:
      host = as_host(v)
      expected = (m.num_trainable,) if m.kind == SPARSE else m.shape
      if host.shape != expected:
        raise ValueError(f"delta leaf {record['path']!r} has values of shape {host.shape}, expected {expected}.")
      record["k"] = m.num_trainable
      record["value_dtype"] = host.dtype.name
      value_parts.setdefault(f"values_{host.dtype.name}", []).append(host.reshape(-1))
    if m.kind == SPARSE:
      idx = as_host(m.indices).astype(np.int32, copy=False)
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
  return leaves, arrays


def array_specs(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """The config's ``arrays`` entry: dtype, shape and SHA-256 of every flat array."""
  return {n: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": checksum(a)} for n, a in arrays.items()}


class Leaf(NamedTuple):
  """One leaf of a stored sparse adapter: its table record, its mask and its values (None if frozen)."""

  record: dict[str, Any]
  mask: LeafMask
  values: np.ndarray | None


def unpack_sparse(final: Path, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[Leaf]:
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
      out.append(Leaf(record, LeafMask.frozen(shape), None))
      continue
    k = int(record["k"])
    values = take(f"values_{record['value_dtype']}", k, f"leaf {path!r}'s values")
    if kind == FULL:
      if k != math.prod(shape):
        raise ValueError(f"adapter {final} is corrupted: full leaf {path!r} has {k} values for shape {shape}.")
      out.append(Leaf(record, LeafMask.full(shape), values.reshape(shape)))
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
      validate_indices(path, leaf_mask, check_values=True)
    except ValueError as e:
      raise ValueError(
          f"adapter {final} is corrupted: leaf {path!r}'s indices are not sorted, unique and in [0, {size}) "
          f"({e})") from None
    out.append(Leaf(record, leaf_mask, values))
  for name, a in arrays.items():
    if cursors.get(name, 0) != a.shape[0]:
      raise ValueError(
          f"adapter {final} is corrupted: the leaf table uses {cursors.get(name, 0)} of the {a.shape[0]} "
          f"entries of {name!r}."
      )
  return out


def read_sparse(final: Path) -> tuple[dict[str, Any], list[Leaf]]:
  """The config and the checked leaves of the sparse adapter at ``final`` (on the host)."""
  config = read_config(final, expect=FORMAT)
  return config, unpack_sparse(final, config, read_arrays(final, config["arrays"]))
