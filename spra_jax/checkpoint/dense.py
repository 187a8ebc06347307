"""Dense adapters on disk: whole trained arrays (LoRA factors, fully fine-tuned weights) with a versioned config.

A sparse adapter (:func:`~spra_jax.save_adapter`) stores the k trained entries
of each weight. LoRA and full fine-tuning train whole arrays, so their adapter
is those arrays: ``save_dense_adapter(directory, variables)`` writes any tree
of arrays (nested dicts, int keys for layer lists allowed, as
``nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))`` gives them), and
``load_dense_adapter`` reads it back. A dense adapter directory holds

* ``adapter_config.json``: ``"format": "spra_jax.dense_adapter"``, the format
  and library versions, ``trainable`` (the number of stored entries),
  ``nbytes``, a leaf table with one row per array (path, key path, shape,
  dtype, the array's name in ``arrays/``, its SHA-256), and the caller's JSON
  ``metadata`` (e.g. ``{"method": "lora", ...}``);
* ``arrays/``: an Orbax checkpoint with one array per leaf (zero-size leaves
  live in the table only: Orbax refuses them).

IMPORTANT, what holds (as for sparse adapters):

* ``metadata`` must be JSON; a value that is not raises ``TypeError`` before
  anything is written;
* a save writes into a hidden sibling ``.<name>.tmp-*`` and publishes it with
  one rename when complete (an existing adapter is refused unless
  ``overwrite=True``, and then swapped atomically), so a reader sees the old or
  the new adapter, never a mix, and a failed save leaves nothing behind (a
  killed one leaves the hidden sibling, never a partial adapter; the next save
  to the same destination removes it once its process is gone);
* loading checks the format and version, every array's checksum, dtype and
  shape, the leaf table's own checksum (``table_sha256``, so that two swapped
  paths or an edited shape are caught), and a ``like`` template's paths, shapes
  and dtypes, so a truncated, corrupted, edited or foreign directory raises
  instead of loading wrong numbers;
* a sparse adapter given to :func:`load_dense_adapter`, or a dense one given to
  :func:`~spra_jax.load_adapter`, raises a ``ValueError`` that names the loader
  to use.

Every array is read to the host of the calling process; arrays sharded over
several processes are refused (save those with
:class:`~spra_jax.checkpoint.TrainCheckpointer`).

Example:

  >>> import tempfile, os, jax.numpy as jnp
  >>> from spra_jax.checkpoint import load_dense_adapter, save_dense_adapter
  >>> variables = {'layers': {0: {'lora_a': jnp.ones((4, 2), jnp.bfloat16)}}, 'head': {'kernel': jnp.zeros((4, 3))}}
  >>> d = os.path.join(tempfile.mkdtemp(), 'adapter')
  >>> _ = save_dense_adapter(d, variables, metadata={'method': 'lora', 'rank': 2})
  >>> loaded, config = load_dense_adapter(d)
  >>> str(loaded['layers'][0]['lora_a'].dtype), config['metadata']['method'], config['trainable']
  ('bfloat16', 'lora', 20)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spra_jax import _host
from spra_jax._version import __version__
from spra_jax.checkpoint import _files, _format
from spra_jax.checkpoint._format import ARRAYS_DIR, CONFIG_NAME, DENSE_FORMAT, DENSE_FORMAT_VERSION
from spra_jax.checkpoint.adapter import _put
from spra_jax.masks import path_str

__all__ = ["DENSE_FORMAT", "DENSE_FORMAT_VERSION", "load_dense_adapter", "save_dense_adapter"]


# --------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------


def _host_leaf(path: str, x: Any) -> np.ndarray:
  if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
    raise TypeError(
        f"variables leaf {path!r} is a {type(x).__name__}; expected an array (jax.Array or numpy.ndarray), "
        f"as nnx.to_pure_dict(nnx.state(model, ...)) gives."
    )
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise TypeError(f"variables leaf {path!r} holds PRNG keys; store jax.random.key_data of them instead.")
  return _host.to_host(x)  # gathered from every process when it spans several (collective then)


def save_dense_adapter(
    directory: str | os.PathLike,
    variables: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
  """Saves a tree of whole trained arrays (LoRA, full fine-tuning) as a dense adapter directory.

  Args:
    directory: where the adapter goes. It must not exist unless ``overwrite``.
    variables: a tree of arrays: nested dicts (str or int keys) or lists, e.g.
      ``nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))``. Every leaf must be
      a ``jax.Array`` or ``numpy.ndarray``. On a multi-process cluster every process calls this (arrays that
      span processes are gathered; process 0 writes the one adapter).
    metadata: JSON provenance, stored under ``metadata`` as given (numpy
      scalars become numbers, tuples lists). A ``method`` key (``"lora"``,
      ``"full"``) is named by the error :func:`~spra_jax.load_adapter` raises
      for this directory.
    overwrite: replace an existing adapter at ``directory`` (atomically).

  Returns:
    The absolute path of the adapter.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is False.
    TypeError: ``metadata`` that is not JSON, or a leaf that is not an array;
      raised before anything is written.
    ValueError: an empty tree, or two leaves with the same path.

  Warns:
    UserWarning: a leaf holds NaN or inf values (the message names it); they
      are saved as they are.

  IMPORTANT: the adapter is written into a hidden sibling of ``directory`` and
  renamed into place only when complete. A save that fails removes its sibling
  and leaves the previous adapter (if any) untouched; a killed one leaves a
  ``.<name>.tmp-*`` directory, which the next save to ``directory`` removes
  once no process of its pid is alive on this host.

  Example:

    >>> import tempfile, os, jax.numpy as jnp
    >>> d = os.path.join(tempfile.mkdtemp(), 'a')
    >>> _ = save_dense_adapter(d, {'w': jnp.ones(3)})
    >>> save_dense_adapter(d, {'w': jnp.zeros(3)})
    Traceback (most recent call last):
    ...
    FileExistsError: ... already exists; pass overwrite=True to replace it.
    >>> save_dense_adapter(d, {'w': jnp.zeros(3)}, metadata={'when': object()}, overwrite=True)
    Traceback (most recent call last):
    ...
    TypeError: metadata['when'] is a object, which cannot be stored as JSON metadata.
    >>> float(load_dense_adapter(save_dense_adapter(d, {'w': jnp.zeros(3)}, overwrite=True))[0]['w'].sum())
    0.0
  """
  final = _files.absolute(directory)
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")
  if metadata is not None and not isinstance(metadata, Mapping):
    raise TypeError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}.")
  meta = dict(_format.jsonable(dict(metadata or {}), "metadata"))

  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  if not flat:
    raise ValueError("variables holds no array; there is nothing to save.")
  leaves, arrays, seen, named = [], {}, set(), []
  for p, x in flat:
    path = path_str(p)
    if path in seen:
      # Paths identify leaves in the table and against a template; two leaves of one path could be swapped.
      raise ValueError(f"two leaves of variables have the path {path!r} (e.g. the keys 0 and '0'); rename one.")
    seen.add(path)
    host = _host_leaf(path, x)
    named.append((path, host))
    record = {"path": path, "keypath": _format.keypath_json(p), "shape": list(host.shape), "dtype": host.dtype.name,
              "array": None, "sha256": _format.checksum(host)}
    if host.size:  # Orbax refuses zero-size arrays; the table alone rebuilds them.
      record["array"] = f"leaf_{len(arrays):05d}"
      arrays[record["array"]] = host
    leaves.append(record)

  config = {
      "format": DENSE_FORMAT,
      "format_version": DENSE_FORMAT_VERSION,
      "library_version": __version__,
      "trainable": sum(math.prod(r["shape"]) for r in leaves),
      "nbytes": sum(a.nbytes for a in arrays.values()),
      "leaves": leaves,
      "metadata": meta,
  }
  config[_format.TABLE_DIGEST] = _format.table_digest(config)
  _format.nonfinite_warning("save_dense_adapter: variables", named, stacklevel=2)
  # On a cluster every process has every array by now (gathered above): process 0 writes the one adapter.
  with _files.shared_output(final, overwrite=overwrite, what="save_dense_adapter") as tmp:
    if tmp is not None:
      if arrays:
        with ocp.StandardCheckpointer(multiprocessing_options=_format.this_process_only()) as ckptr:
          ckptr.save(tmp / ARRAYS_DIR, arrays)
          ckptr.wait_until_finished()
      _files.write_json(tmp / CONFIG_NAME, config)
  return final


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def _records(final: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The leaf table, each row checked for the fields and types the format writes."""
  table = config["leaves"]
  if not isinstance(table, list) or not table:
    raise ValueError(f"adapter {final} is corrupted: its leaf table is empty or not a list.")
  seen, names = set(), set()
  for i, r in enumerate(table):
    ok = (isinstance(r, dict) and isinstance(r.get("path"), str) and _format.keypath_ok(r.get("keypath"))
          and isinstance(r.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in r["shape"])
          and isinstance(r.get("dtype"), str) and isinstance(r.get("sha256"), str)
          and "array" in r and (r["array"] is None or isinstance(r["array"], str)))
    if not ok:
      raise ValueError(f"adapter {final} is corrupted: row {i} of its leaf table is malformed ({r!r:.200}).")
    if r["path"] in seen:
      raise ValueError(f"adapter {final} is corrupted: its leaf table lists {r['path']!r} twice.")
    seen.add(r["path"])
    if r["array"] is not None and r["array"] in names:
      raise ValueError(f"adapter {final} is corrupted: two leaves of its leaf table name the array {r['array']!r}.")
    names.add(r["array"])
    if (r["array"] is None) != (math.prod(r["shape"]) == 0):
      raise ValueError(
          f"adapter {final} is corrupted: leaf {r['path']!r} of shape {r['shape']} "
          f"{'has no stored array' if r['array'] is None else 'names an array, but is empty'}."
      )
  return table


def _empty(final: Path, record: Mapping[str, Any]) -> np.ndarray:
  """A zero-size leaf, rebuilt from its table row and checked like the stored ones."""
  try:
    dtype = np.dtype(jnp.dtype(record["dtype"]))
  except (TypeError, ValueError):
    raise ValueError(f"adapter {final} is corrupted: leaf {record['path']!r} has dtype {record['dtype']!r}.") from None
  a = np.zeros(record["shape"], dtype)
  if a.size:  # _records pairs a missing array with an empty shape; checked again for what reaches here
    raise ValueError(f"adapter {final} is corrupted: leaf {record['path']!r} of shape {record['shape']} has no array.")
  if _format.checksum(a) != record["sha256"]:
    raise ValueError(f"adapter {final} is corrupted: array {record['path']!r} does not match its checksum.")
  return a


def _match(final: Path, records: list[dict[str, Any]], like: Any) -> tuple[Any, list[int], list[Any]]:
  """``like``'s treedef, the table row of each of its leaves, and each leaf's sharding (or None)."""
  by_path = {r["path"]: i for i, r in enumerate(records)}
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  paths = [path_str(p) for p, _ in flat]
  _format.check_template_paths(paths, by_path)
  shardings = []
  for path, (_, x) in zip(paths, flat):
    r = records[by_path[path]]
    shape = tuple(int(d) for d in np.shape(x))
    if shape != tuple(r["shape"]):
      raise ValueError(f"the template leaf {path!r} has shape {shape}, the adapter's has {tuple(r['shape'])}.")
    dtype = getattr(x, "dtype", None)
    if dtype is not None and np.dtype(dtype).name != r["dtype"]:
      raise ValueError(f"the template leaf {path!r} has dtype {np.dtype(dtype).name}, the adapter's has {r['dtype']}.")
    sharding = getattr(x, "sharding", None)
    shardings.append(sharding if isinstance(sharding, jax.sharding.Sharding) else None)
  return treedef, [by_path[p] for p in paths], shardings


def load_dense_adapter(directory: str | os.PathLike, *, like: Any = None) -> tuple[Any, dict[str, Any]]:
  """Loads a dense adapter saved by :func:`save_dense_adapter`: its arrays and its config.

  Args:
    directory: the adapter directory.
    like: a tree whose structure the result takes (arrays, ``jax.ShapeDtypeStruct``
      or an ``nnx.State``, e.g. ``nnx.state(model, nnx.LoRAParam)``); its paths,
      shapes and dtypes must be the adapter's, and arrays go where its leaves'
      shardings say. Without it, the tree is rebuilt as nested dicts and lists
      from the stored key paths (int keys stay ints) on the default device.

  Returns:
    ``(variables, config)``: the tree of arrays, bit-identical to what was
    saved, and the adapter's ``adapter_config.json`` (``config['metadata']`` is
    the saved metadata).

  Raises:
    FileNotFoundError: the directory, its config or its arrays are missing.
    ValueError: a truncated or corrupted adapter (bad JSON, checksum mismatch,
      malformed leaf table), an unknown format or a newer format version, a
      sparse adapter (load it with :func:`~spra_jax.load_adapter`), or a
      ``like`` tree of other paths, shapes or dtypes.

  Example:

    >>> import tempfile, os, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> d = save_dense_adapter(os.path.join(tempfile.mkdtemp(), 'full'),
    ...                        nnx.to_pure_dict(nnx.state(model, nnx.Param)), metadata={'method': 'full'})
    >>> fresh = nnx.Linear(4, 2, rngs=nnx.Rngs(1))
    >>> state, _ = load_dense_adapter(d, like=nnx.state(fresh, nnx.Param))
    >>> nnx.update(fresh, state)
    >>> bool((fresh.kernel[...] == model.kernel[...]).all())
    True
    >>> load_dense_adapter(d, like={'kernel': jnp.zeros((4, 2), jnp.bfloat16), 'bias': jnp.zeros(2)})
    Traceback (most recent call last):
    ...
    ValueError: the template leaf 'kernel' has dtype bfloat16, the adapter's has float32.
  """
  final = _files.absolute(directory)
  config = _format.read_config(final, expect=DENSE_FORMAT)
  records = _records(final, config)
  specs = {r["array"]: {"dtype": r["dtype"], "shape": r["shape"], "sha256": r["sha256"], "path": r["path"]}
           for r in records if r["array"] is not None}
  arrays = _format.read_arrays(final, specs) if specs else {}
  hosts = [arrays[r["array"]] if r["array"] is not None else _empty(final, r) for r in records]
  # Last, as the specific checks above say more: the table's digest catches edits that pass them (a path swap).
  _format.check_table(final, config)
  if like is None:
    order, treedef = _format.rebuild_checked(final, [r["keypath"] for r in records])
    shardings = [None] * len(order)
  else:
    treedef, order, shardings = _match(final, records, like)
  return treedef.unflatten([_put(hosts[i], s) for i, s in zip(order, shardings)]), config
