"""Sparse-delta adapters on disk: ``save_adapter`` / ``load_adapter`` / ``load_adapter_config``.

An adapter directory holds

* ``adapter_config.json``: the format and library versions, the base model's
  name, how the mask was drawn (density, distribution, seed, include / exclude /
  full rules, as far as the mask or the caller knows them), a table with one
  row per parameter leaf (path, kind, shape, k, value dtype), a fingerprint of
  the base weights (:mod:`spra_jax.checkpoint.fingerprint`), and a SHA-256
  checksum of every stored array;
* ``arrays/``: an Orbax checkpoint of a few flat arrays (every sparse leaf's
  indices, or their gaps, and the values per dtype; the schema is described in
  ``spra_jax/checkpoint/_format.py``).

Indices are always stored: JAX does not promise the same random bits across
releases, so a seed alone cannot rebuild a mask.

IMPORTANT, what holds:

* a save writes into a hidden sibling directory and renames it into place only
  when complete, so an interrupted save never touches the previous adapter (a
  killed one leaves a ``.<name>.tmp-*`` directory, which the next save to the
  same destination removes once the process that made it is gone);
* loading checks every array's checksum, the leaf table against the arrays and
  the table's own checksum (``table_sha256``), so a truncated, corrupted or
  edited adapter raises a ValueError instead of loading wrong numbers;
* loading with the weights of another model (``base_params``) raises a
  fingerprint mismatch naming the first leaf that differs.

Whole trained arrays (LoRA, full fine-tuning) are the dense adapter format of
:mod:`spra_jax.checkpoint.dense`; several adapters together (overlap, merging)
are :mod:`spra_jax.checkpoint.analysis`.

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

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spra_jax import _host
from spra_jax._version import __version__
from spra_jax.checkpoint import _files, _format
from spra_jax.checkpoint import fingerprint as _fingerprint
from spra_jax.checkpoint._format import ARRAYS_DIR, CONFIG_NAME, FORMAT, FORMAT_VERSION, INDEX_ENCODINGS
from spra_jax.checkpoint.fingerprint import base_fingerprint, check_base  # their home before the split; still read
from spra_jax.delta import SparseDelta
from spra_jax.masks import LeafMask, is_leaf_mask, path_str

__all__ = [
  "CONFIG_NAME",
  "FORMAT",
  "FORMAT_VERSION",
  "base_fingerprint",
  "check_base",
  "load_adapter",
  "load_adapter_config",
  "save_adapter",
]

_SAMPLING_KEYS = ("distribution", "density", "seed", "include", "exclude", "full", "allocation", "relative_to")


# --------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------


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

  Warns:
    UserWarning: the delta holds NaN or inf values (the message names the
      leaves and counts them); they are saved as they are.

  IMPORTANT: the adapter is written into a hidden sibling of ``directory`` and
  renamed into place only when complete. An interrupted save leaves the previous
  adapter (if any) untouched; a killed one also leaves its hidden
  ``.<name>.tmp-<host>-<pid>-*`` sibling, which the next save to ``directory``
  removes when no process of that pid is alive on this host (a save still
  running elsewhere keeps its own).

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
  if not _host.all_agree(overwrite or not final.exists()):  # (early: before the delta is gathered)
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it.")

  meta = dict(_format.jsonable(dict(metadata or {}), "metadata"))
  base_model = meta.pop("base_model", None)
  sampling = {k: meta.pop(k) for k in _SAMPLING_KEYS if k in meta}

  flat = _format.flat_masks(delta.mask)
  mask_def = jax.tree.structure(delta.mask, is_leaf=is_leaf_mask)
  values = mask_def.flatten_up_to(delta.values)
  if base_params is not None and base_fingerprint is not None:
    raise ValueError("give base_params or base_fingerprint, not both.")
  fingerprint = None
  if base_params is not None:
    base_fingerprint = _fingerprint.base_fingerprint(base_params, delta.mask)
  if base_fingerprint is not None:
    fingerprint = {"algorithm": _fingerprint.FINGERPRINT_ALGORITHM, "leaves": dict(base_fingerprint)}

  leaves, arrays, named = _format.pack_sparse(flat, values, index_encoding)
  _format.nonfinite_warning("save_adapter: the delta", named, stacklevel=2)

  config = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "library_version": __version__,
      "base_model": base_model,
      "mask": {**sampling, **_format.mask_stats(flat)},
      "index_encoding": index_encoding,
      "nbytes": {"indices": sum(arrays[n].nbytes for n in arrays if not n.startswith("values_")),
                 "values": sum(arrays[n].nbytes for n in arrays if n.startswith("values_"))},
      "arrays": _format.array_specs(arrays),
      "leaves": leaves,
      "base_fingerprint": fingerprint,
      "metadata": meta,
  }
  config[_format.TABLE_DIGEST] = _format.table_digest(config)

  # On several processes, every array is on every host by now (gathered above): process 0 writes the one adapter,
  # the others wait for it and fail with it.
  with _files.shared_output(final, overwrite=overwrite, what="save_adapter") as tmp:
    if tmp is not None:
      with ocp.StandardCheckpointer(multiprocessing_options=_format.this_process_only()) as ckptr:
        ckptr.save(tmp / ARRAYS_DIR, arrays)
        ckptr.wait_until_finished()
      _files.write_json(tmp / CONFIG_NAME, config)
  return final


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


def load_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The ``adapter_config.json`` of a sparse or dense adapter, checked for format and version.

  It reads both kinds (``config['format']`` tells them apart:
  ``'spra_jax.sparse_adapter'`` from :func:`save_adapter`,
  ``'spra_jax.dense_adapter'`` from :func:`~spra_jax.checkpoint.save_dense_adapter`)
  and reads no array.

  Raises:
    FileNotFoundError: no adapter (or no config file) at ``directory``.
    ValueError: the config is truncated, not JSON, or of an unknown format or a
      newer format version.

  Example:

    >>> import tempfile
    >>> load_adapter_config(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    FileNotFoundError: .../adapter_config.json is missing: not a spra_jax adapter directory, or an incomplete one.
  """
  return _format.read_config(_files.absolute(directory))


def _structure(final: Path, leaves: list[_format.Leaf], like: Any) -> tuple[Any, list[_format.Leaf]]:
  """A treedef for the adapter's leaves: ``like``'s, or nested dicts/lists rebuilt from the key paths."""
  by_path = {leaf.record["path"]: leaf for leaf in leaves}
  if like is None:
    order, treedef = _format.rebuild_checked(final, [leaf.record["keypath"] for leaf in leaves])
    return treedef, [leaves[i] for i in order]
  if isinstance(like, SparseDelta):
    like = like.mask
  flat, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_leaf_mask)
  paths = [path_str(p) for p, _ in flat]
  _format.check_template_paths(paths, by_path)
  for path, (p, x) in zip(paths, flat):
    shape = x.shape if isinstance(x, LeafMask) else tuple(int(d) for d in np.shape(x))
    if shape != by_path[path].mask.shape:
      raise ValueError(f"the template leaf {path!r} has shape {shape}, the adapter's has {by_path[path].mask.shape}.")
  return treedef, [by_path[p] for p in paths]


def _put(host: np.ndarray, sharding: Any) -> jax.Array:
  """A host array on the default device (``sharding=None``) or laid out by ``sharding``, each device its slice."""
  if sharding is None:
    return jnp.asarray(host)
  if not isinstance(sharding, jax.sharding.Sharding):
    raise TypeError(f"shardings must hold jax.sharding.Sharding objects, got {type(sharding).__name__}.")
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _placer(shardings: Any, treedef_delta: Any) -> Callable[[list[np.ndarray]], list[jax.Array]]:
  def place(hosts: list[np.ndarray]) -> list[jax.Array]:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
      return [_put(h, shardings) for h in hosts]
    try:
      per_leaf = treedef_delta.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "shardings must be one jax.sharding.Sharding, or a tree with the structure of the loaded SparseDelta "
          f"(mask indices and values); {e}"
      ) from None
    return [_put(h, s) for h, s in zip(hosts, per_leaf)]

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
      inconsistent leaf table), a dense adapter (the message says so and names
      :func:`~spra_jax.checkpoint.load_dense_adapter`), a ``like`` tree of
      other paths or shapes, or ``base_params`` of another model (the message
      names the leaf).

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
  config, leaves = _format.read_sparse(final)
  treedef, ordered = _structure(final, leaves, like if like is not None else base_params)
  host_mask = treedef.unflatten([leaf.mask for leaf in ordered])
  host_values = treedef.unflatten([leaf.values for leaf in ordered])
  if base_params is not None:
    _fingerprint.check_base(config, base_params, host_mask)
  host_delta = SparseDelta(host_mask, host_values)
  flat, delta_def = jax.tree.flatten(host_delta)
  return jax.tree.unflatten(delta_def, _placer(shardings, delta_def)(flat))
