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
``library_version`` and the user's JSON ``metadata``, and ``table_sha256``: the
SHA-256 of the canonical JSON (sorted keys, no spaces) of what decides the
loaded numbers, the leaf table (and, for the sparse format, ``arrays`` and
``index_encoding``). The per-array checksums catch damaged array files; this one
catches an edited table whose every row is still plausible (a same-size shape
edit, two same-shape paths swapped, a dropped or duplicated row). Readers check
it when it is there: adapters written before it was added have none, and are
still version 1 (the field is an addition a version-1 reader ignores, so adding
it needed no new version, and older spra_jax releases still read new adapters).

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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spra_jax import _host
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

# The config entry holding the SHA-256 of the table (see the module docstring) and, per format, what it covers.
TABLE_DIGEST = "table_sha256"
TABLE_FIELDS = {FORMAT: ("index_encoding", "arrays", "leaves"), DENSE_FORMAT: ("leaves",)}


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


def this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a save or restore that this process does alone (no barrier with the others)."""
  if not _host.multiprocess():
    return ocp.options.MultiprocessingOptions()
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def as_host(x: Any) -> np.ndarray:
  """``x`` on the host; gathered from every process when it spans several (collective then, see ``spra_jax._host``)."""
  return _host.to_host(x)


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

  The arrays are read one at a time. Reading them in one request would be
  faster, but when one of them is damaged the request fails while the reads of
  the others are still in flight, and those complete later on an event loop the
  storage layer has already closed, printing ``RuntimeError: Event loop is
  closed`` tracebacks to stderr long after the caller caught the ValueError.
  One read at a time leaves nothing in flight when a read fails.

  Raises:
    FileNotFoundError: no ``arrays`` directory.
    ValueError: unreadable (truncated, corrupted) files, or an array that does not match its spec.
  """
  arrays_dir = final / ARRAYS_DIR
  if not arrays_dir.is_dir():
    raise missing(final, f"{arrays_dir} is missing: the adapter is incomplete")

  def unreadable(e: Exception) -> ValueError:
    return ValueError(
        f"cannot read the arrays of adapter {final}: it is truncated or corrupted ({type(e).__name__}: {e})."
    )

  # Partial restores of one name each. The item only names the entry to read (Orbax reads the stored shape and
  # dtype); for a name the checkpoint lacks, the placeholder comes back as it was given.
  placeholder = jax.ShapeDtypeStruct((1,), np.uint8)
  arrays = {}
  with ocp.PyTreeCheckpointer() as ckptr:
    for name, spec in specs.items():
      label = spec.get("path", name)
      args = ocp.args.PyTreeRestore(item={name: placeholder},
                                    restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)},
                                    partial_restore=True)
      try:
        a = ckptr.restore(arrays_dir, args=args)[name]
      except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
        raise unreadable(e) from e
      if not isinstance(a, np.ndarray):
        raise ValueError(f"adapter {final} is corrupted: array {label!r} is missing.")
      if a.dtype.name != spec["dtype"] or list(a.shape) != spec["shape"] or checksum(a) != spec["sha256"]:
        raise ValueError(
            f"adapter {final} is corrupted: array {label!r} does not match its checksum "
            f"(got {a.dtype.name}{list(a.shape)}, expected {spec['dtype']}{spec['shape']})."
        )
      arrays[name] = a
  return arrays


def nonfinite_warning(what: str, named: Sequence[tuple[str, Any]], stacklevel: int) -> None:
  """Warns (``UserWarning``) naming the leaves of ``named`` (path, host array) that hold NaN or inf."""
  bad = []
  for path, a in named:
    a = np.asarray(a)
    if a.size and jnp.issubdtype(a.dtype, jnp.inexact):
      finite = np.isfinite(a)
      if not finite.all():
        nan = int(np.count_nonzero(np.isnan(a)))
        bad.append(f"{path!r} ({nan} NaN, {a.size - int(finite.sum()) - nan} inf of {a.size})")
  if bad:
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    warnings.warn(
        f"{what} has non-finite values in {len(bad)} leaf{'' if len(bad) == 1 else 's'}: {shown}; they are saved "
        f"as they are (a diverged run? lower the learning rate).", UserWarning, stacklevel=stacklevel + 1)


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
  if isinstance(version, int) and not isinstance(version, bool) and version > newest:
    raise ValueError(
        f"{path} has format version {version!r}; this spra_jax ({__version__}) reads versions up to "
        f"{newest}. Upgrade spra_jax."
    )
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ValueError(f"{path} is corrupted: its format_version is {version!r}, expected an int from 1 to {newest}.")
  for key in required:
    if key not in config:
      raise ValueError(f"{path} is incomplete: it has no {key!r} entry.")
  return config


def table_digest(config: Mapping[str, Any]) -> str:
  """The SHA-256 of the canonical JSON of what decides a config's loaded numbers (``TABLE_FIELDS`` of its format)."""
  covered = {field: config.get(field) for field in TABLE_FIELDS[config["format"]]}
  canonical = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def check_table(final: Path, config: Mapping[str, Any]) -> None:
  """Checks the config's ``table_sha256`` where it has one (adapters written before it have none).

  Raises:
    ValueError: the digest is not a string, or the table no longer matches it.
  """
  if TABLE_DIGEST not in config:
    return
  recorded = config[TABLE_DIGEST]
  if not isinstance(recorded, str) or recorded != table_digest(config):
    covered = ", ".join(repr(f) for f in TABLE_FIELDS[config["format"]])
    raise ValueError(
        f"adapter {final} is corrupted: its {CONFIG_NAME} does not match its {TABLE_DIGEST} (the checksum of "
        f"{covered}); the file was edited or damaged after saving (e.g. a shape, a path or a row changed)."
    )


_KEY_KINDS = {"dict": (str, int), "seq": (int,), "attr": (str,), "index": (int,)}


def _is_count(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def keypath_ok(kp: Any) -> bool:
  """Whether ``kp`` is a key path as :func:`keypath_json` writes it."""
  return isinstance(kp, list) and all(
      isinstance(k, list) and len(k) == 2 and isinstance(k[0], str) and k[0] in _KEY_KINDS
      and isinstance(k[1], _KEY_KINDS[k[0]])
      and not isinstance(k[1], bool) for k in kp)


def rebuild_checked(final: Path, keypaths: list[Any]) -> Any:
  """The treedef of leaves at ``keypaths`` (nested dicts and lists), or a ValueError if they do not form a tree."""
  try:
    ids = rebuild_tree([(kp, i) for i, kp in enumerate(keypaths)])
    order, treedef = jax.tree.flatten(ids)
  except (IndexError, KeyError, TypeError, ValueError):
    order = None
  if order is None or sorted(order) != list(range(len(keypaths))):
    raise ValueError(f"adapter {final} is corrupted: the key paths of its leaf table do not form one tree.")
  return order, treedef


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
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], list[tuple[str, np.ndarray]]]:
  """A delta's leaf table, its flat arrays (indices or gaps and escapes, values per dtype) and each trained leaf's
  (path, values), on the host.

  Raises:
    ValueError: values of the wrong shape, a shard-local mask with ``gaps``, or a delta that trains nothing.
  """
  leaves, index_parts, value_parts, named = [], {}, {}, []
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
      named.append((record["path"], host))
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
  return leaves, arrays, named


def array_specs(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """The config's ``arrays`` entry: dtype, shape and SHA-256 of every flat array."""
  return {n: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": checksum(a)} for n, a in arrays.items()}


class Leaf(NamedTuple):
  """One leaf of a stored sparse adapter: its table record, its mask and its values (None if frozen)."""

  record: dict[str, Any]
  mask: LeafMask
  values: np.ndarray | None


def check_sparse_table(final: Path, config: Mapping[str, Any]) -> None:
  """Checks that the sparse config's encoding, array specs and leaf table have the fields and types it writes.

  So that an edited or damaged table raises a ValueError naming the row, never a KeyError or TypeError further on.
  """
  encoding = config["index_encoding"]
  if not isinstance(encoding, str) or encoding not in INDEX_ENCODINGS:
    raise ValueError(
        f"adapter {final} has index_encoding {encoding!r}; this spra_jax ({__version__}) reads "
        f"{' and '.join(repr(e) for e in INDEX_ENCODINGS)}: the config is corrupted, or was written by a newer "
        f"spra_jax.")
  specs = config["arrays"]
  if not isinstance(specs, dict) or not specs:
    raise ValueError(f"adapter {final} is corrupted: its 'arrays' entry is empty or not a dict.")
  for name, spec in specs.items():
    if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("sha256"), str)
            and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 1 and _is_count(spec["shape"][0])):
      # Every array of the format is flat (a run of indices, gaps or values per leaf).
      raise ValueError(f"adapter {final} is corrupted: the spec of array {name!r} is malformed ({spec!r:.200}).")
  table = config["leaves"]
  if not isinstance(table, list) or not table:
    raise ValueError(f"adapter {final} is corrupted: its leaf table is empty or not a list.")
  seen = set()
  for i, r in enumerate(table):
    ok = (isinstance(r, dict) and isinstance(r.get("path"), str) and keypath_ok(r.get("keypath"))
          and r.get("kind") in (SPARSE, FULL, FROZEN)
          and isinstance(r.get("shape"), list) and all(_is_count(d) for d in r["shape"]))
    if ok and r["kind"] != FROZEN:
      ok = _is_count(r.get("k")) and isinstance(r.get("value_dtype"), str)
    if ok and r["kind"] == SPARSE:
      ok = r["k"] <= math.prod(r["shape"])
      if encoding == "gaps":
        ok = ok and _is_count(r.get("index_width")) and r["index_width"] in WIDTH_DTYPES and _is_count(r.get("escapes"))
      blocks = r.get("blocks")
      if blocks is not None:
        ok = ok and (isinstance(blocks, list) and len(blocks) == len(r["shape"])
                     and all(_is_count(b) and b > 0 for b in blocks))
    if not ok:
      raise ValueError(f"adapter {final} is corrupted: row {i} of its leaf table is malformed ({r!r:.200}).")
    if r["path"] in seen:
      raise ValueError(f"adapter {final} is corrupted: its leaf table lists {r['path']!r} twice.")
    seen.add(r["path"])


def unpack_sparse(final: Path, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[Leaf]:
  """Splits the flat arrays back into per-leaf masks and values, checking the table against them.

  The config must have passed :func:`check_sparse_table`.
  """
  encoding = config["index_encoding"]
  cursors: dict[str, int] = {}

  def take(name: str, n: int, what: str, dtype: Any) -> np.ndarray:
    start = cursors.get(name, 0)
    a = arrays.get(name)
    if n and (a is None or a.ndim != 1 or start + n > a.shape[0]):
      raise ValueError(f"adapter {final} is corrupted: {what} runs past the end of array {name!r}.")
    cursors[name] = start + n
    # A run of no entries (a leaf with k = 0) has no array behind it when no leaf stores that dtype: Orbax refuses
    # zero-size arrays, so the save left it out; it is empty of the dtype the table names.
    return a[start : start + n] if n else np.zeros((0,), dtype)

  out = []
  for record in config["leaves"]:
    path, kind, shape = record["path"], record["kind"], tuple(record["shape"])
    if kind == FROZEN:
      out.append(Leaf(record, LeafMask.frozen(shape), None))
      continue
    k = record["k"]
    try:
      value_dtype = np.dtype(jnp.dtype(record["value_dtype"]))
    except (TypeError, ValueError):
      raise ValueError(
          f"adapter {final} is corrupted: leaf {path!r} has value dtype {record['value_dtype']!r}.") from None
    values = take(f"values_{record['value_dtype']}", k, f"leaf {path!r}'s values", value_dtype)
    if values.dtype != value_dtype:
      raise ValueError(
          f"adapter {final} is corrupted: leaf {path!r}'s values are {values.dtype.name}, its row says "
          f"{value_dtype.name}.")
    if kind == FULL:
      if k != math.prod(shape):
        raise ValueError(f"adapter {final} is corrupted: full leaf {path!r} has {k} values for shape {shape}.")
      out.append(Leaf(record, LeafMask.full(shape), values.reshape(shape)))
      continue
    if encoding == "int32":
      idx = take("indices", k, f"leaf {path!r}'s indices", np.int32).astype(np.int32)
    else:
      width = record["index_width"]
      gaps = take(f"gaps_u{8 * width}", k, f"leaf {path!r}'s index gaps", WIDTH_DTYPES[width])
      gaps = gaps.astype(WIDTH_DTYPES[width])
      escapes = take("escapes", record["escapes"], f"leaf {path!r}'s index escapes", np.uint32).astype(np.uint32)
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
  """The config and the checked leaves of the sparse adapter at ``final`` (on the host).

  The specific checks (table rows, arrays, their checksums, the table against the arrays) come first, as their
  messages say more; the table digest last catches what passes them all (a same-size shape edit, a path swap).
  """
  config = read_config(final, expect=FORMAT)
  check_sparse_table(final, config)
  leaves = unpack_sparse(final, config, read_arrays(final, config["arrays"]))
  check_table(final, config)
  return config, leaves


def check_template_paths(paths: list[str], stored: Any) -> None:
  """Raises a ValueError naming the differences when a template's leaf paths are not the adapter's ``stored`` ones.

  >>> check_template_paths(['a', 'b'], {'a': 0, 'c': 1})
  Traceback (most recent call last):
  ...
  ValueError: the template tree does not match the adapter; it has leaves the adapter does not have: ['b']; adapter leaves it lacks: ['c'].
  """
  given = set(paths)
  missing = [p for p in stored if p not in given]
  extra = [p for p in paths if p not in stored]
  if missing or extra:
    detail = []
    if extra:
      detail.append(f"leaves the adapter does not have: {extra[:6]}")
    if missing:
      detail.append(f"adapter leaves it lacks: {missing[:6]}")
    raise ValueError("the template tree does not match the adapter; it has " + "; ".join(detail) + ".")
