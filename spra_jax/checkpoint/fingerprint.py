"""The base-weights fingerprint: which base model an adapter was trained on, checked in O(k).

An adapter is a set of changes to particular entries of particular weights; the
same numbers added to another model's weights are silently wrong. So a sparse
adapter stores, per leaf, the shape of the base weight and a 128-bit hash of the
base values at the adapter's entries (:func:`base_fingerprint`), and loading it
with base weights (``load_adapter(..., base_params=...)``) recomputes the hash
on those entries only and compares (:func:`check_base`), naming the first leaf
that differs.

IMPORTANT: the hash is of the values rounded to bfloat16 (so that a float32 base
and its bfloat16 copy match) and is read at the adapter's k entries only, so it
tells different checkpoints apart, not whether a few base entries elsewhere were
edited. Take it before training changes the base in place (the lean path does);
``save_adapter(base_fingerprint=...)`` stores one taken earlier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from spra_jax import _host
from spra_jax.checkpoint._format import flat_masks
from spra_jax.masks import FROZEN, FULL, LeafMask, path_str

__all__ = ["FINGERPRINT_ALGORITHM", "base_fingerprint", "check_base"]

#: Stored next to the hashes, so that a later algorithm can be told apart.
FINGERPRINT_ALGORITHM = "blake2b-128 of the base values at the adapter's entries, rounded to bfloat16"


@jax.jit
def _take_flat(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.reshape(x, (-1,))[idx]


def _base_values(leaf: Any, m: LeafMask) -> np.ndarray:
  """The base values an adapter's leaf touches, on the host (O(k))."""
  if m.kind == FULL:
    return _host.to_host(leaf).reshape(-1)
  if isinstance(leaf, np.ndarray):
    return leaf.reshape(-1)[_host.to_host(m.indices)]
  # Taken where the weights are (a sharded leaf stays sharded), then gathered: O(k) on the host.
  return _host.to_host(_take_flat(leaf, m.indices))


def _digest(values: np.ndarray) -> str:
  # Rounded to bfloat16 so that a float32 base and its bfloat16 copy match.
  rounded = np.asarray(values).astype(np.float32).astype(ml_dtypes.bfloat16)
  return hashlib.blake2b(np.ascontiguousarray(rounded).tobytes(), digest_size=16).hexdigest()


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
  for p, m in flat_masks(mask):
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
  recorded = config.get("base_fingerprint")
  stored = recorded.get("leaves") if isinstance(recorded, Mapping) else None
  if (recorded is not None and not isinstance(recorded, Mapping)) or not (
      stored is None or (isinstance(stored, Mapping) and all(isinstance(e, Mapping) for e in stored.values()))):
    raise ValueError(
        f"the adapter's base_fingerprint is malformed ({recorded!r:.200}); its config was edited or damaged.")
  params = _flat_params(base_params)
  name = config.get("base_model")
  what = f"the adapter's base model {name!r}" if name else "the adapter's base model"
  flat = flat_masks(mask)
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
      k = entry.get("k")
      raise ValueError(
          f"base_params do not match {what}: leaf {path!r} differs at the adapter's "
          f"{f'{k:,}' if isinstance(k, int) else 'stored'} entries "
          f"(fingerprint {current.get(path, {}).get('hash')} != {entry['hash']})."
      )
