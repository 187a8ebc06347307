"""Our parameter paths and layouts -> PyTorch / Hugging Face names and layouts, in one place.

Ours: '/'-joined pytree paths with Flax leaf names, Linear kernels stored
``[in, out]``. PyTorch / Hugging Face: '.'-joined module names ending in
``weight`` / ``bias``, Linear weights ``[out, in]``. The model families
(``spra_jax.models``) load and export with these functions; the checkpoint
interop (``spra_jax.checkpoint``) uses them as its defaults. It depends on numpy
only, so every layer may import it.

Two strictnesses of one mapping:

* :func:`torch_name` / :func:`to_torch_layout` (``strict=True``, the model
  families' functions): every path must end in a parameter name (``kernel``,
  ``embedding``, ``scale``, ``bias``) and every ``kernel`` must be 2-D, or they
  raise ``ValueError`` naming the path.
* :func:`default_torch_name` / :func:`default_to_torch_layout` (``strict=False``,
  the checkpoint defaults for any pytree): other leaf names are kept as they are
  (``lora/lora_a`` -> ``lora.lora_a``), and kernels that are not 2-D are kept in
  our layout.

IMPORTANT: a layout function must be a pure permutation of the entries
(transpose, reshape, row reordering): adapter coordinates are mapped through it.
Both layout functions here return a new C-contiguous, writable array, so
``torch.from_numpy`` accepts the result even when the input is a read-only view
of a JAX array.

Example:

  >>> import numpy as np
  >>> torch_name('model/layers/3/self_attn/v_proj/kernel')
  'model.layers.3.self_attn.v_proj.weight'
  >>> default_torch_name('encoder/layer/0/lora/lora_a')
  'encoder.layer.0.lora.lora_a'
  >>> to_torch_layout('fc/kernel', np.zeros((3, 2))).shape
  (2, 3)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["LEAF_TO_TORCH", "default_to_torch_layout", "default_torch_name", "kernel_transposed", "to_torch_layout",
           "torch_name"]

#: Our leaf names -> the torch parameter's last name component.
LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def torch_name(path: str, *, strict: bool = True) -> str:
  """Our '/'-joined parameter path -> the HF torch state-dict name (every architecture here names them alike).

  Args:
    path: a '/'-joined path such as ``model/layers/2/mlp/down_proj/kernel``.
    strict: raise for a path that does not end in a parameter name (True), or
      keep such a last component as it is (False).

  Raises:
    ValueError: ``strict`` and the last component is not one of ``LEAF_TO_TORCH``.

  Example:

    >>> torch_name('model/layers/2/mlp/down_proj/kernel')
    'model.layers.2.mlp.down_proj.weight'
    >>> torch_name('model/embed_tokens/embedding'), torch_name('bert/embeddings/LayerNorm/scale')
    ('model.embed_tokens.weight', 'bert.embeddings.LayerNorm.weight')
    >>> torch_name('position_ids', strict=False)
    'position_ids'
    >>> torch_name('position_ids')
    Traceback (most recent call last):
    ...
    ValueError: 'position_ids' does not end in a parameter name ('kernel', 'embedding', 'scale', 'bias').
  """
  *parents, leaf = path.split("/")
  if leaf in LEAF_TO_TORCH:
    leaf = LEAF_TO_TORCH[leaf]
  elif strict:
    raise ValueError(f"{path!r} does not end in a parameter name {tuple(LEAF_TO_TORCH)}.")
  return ".".join([*parents, leaf])


def kernel_transposed(path: str, shape: tuple[int, ...], *, strict: bool = True) -> bool:
  """Whether the leaf at ``path`` of ``shape`` is transposed on its way to torch layout (a 2-D Linear kernel).

  Raises:
    ValueError: ``strict`` and a ``kernel`` that is not 2-D.

  Example:

    >>> kernel_transposed('fc/kernel', (3, 2)), kernel_transposed('fc/bias', (2,))
    (True, False)
    >>> kernel_transposed('conv/kernel', (3, 3, 4, 8), strict=False)
    False
  """
  if path.split("/")[-1] != "kernel":
    return False
  if len(shape) != 2:
    if strict:
      raise ValueError(f"{path!r}: a Linear kernel must be 2-D, got shape {tuple(shape)}.")
    return False
  return True


def to_torch_layout(path: str, array: Any, *, strict: bool = True) -> np.ndarray:
  """A parameter in torch layout (Linear kernels [in, out] -> weights [out, in]), as a new numpy array.

  Args:
    path: the leaf's '/'-joined path.
    array: the leaf in our layout.
    strict: raise for a ``kernel`` that is not 2-D (True), or keep it as it is (False).

  Returns:
    A fresh, writable, C-contiguous array.

  Example:

    >>> to_torch_layout('lm_head/kernel', np.zeros((8, 30))).shape
    (30, 8)
    >>> to_torch_layout('classifier/bias', np.zeros(3)).shape
    (3,)
  """
  array = np.asarray(array)
  if kernel_transposed(path, array.shape, strict=strict):
    array = array.T
  # A copy, because torch.from_numpy rejects read-only views (such as those of jax arrays).
  return np.array(array, order="C", copy=True)


def default_torch_name(path: str) -> str:
  """:func:`torch_name` for any pytree: leaf names other than parameter names are kept.

  Example:

    >>> default_torch_name('model/layers/3/self_attn/v_proj/kernel')
    'model.layers.3.self_attn.v_proj.weight'
    >>> default_torch_name('model/norm/scale'), default_torch_name('embeddings/LayerNorm/bias')
    ('model.norm.weight', 'embeddings.LayerNorm.bias')
  """
  return torch_name(path, strict=False)


def default_to_torch_layout(path: str, array: Any) -> np.ndarray:
  """:func:`to_torch_layout` for any pytree: 2-D ``kernel`` leaves are transposed, all others kept.

  Example:

    >>> default_to_torch_layout('fc/kernel', np.zeros((3, 2))).shape
    (2, 3)
    >>> default_to_torch_layout('fc/bias', np.zeros(2)).shape
    (2,)
  """
  return to_torch_layout(path, array, strict=False)
