"""spra_jax: SpaRTA (Sparse Random parameTer Adaptation) for JAX.

Fine-tune a pretrained model by training only a small random subset of its
scalar parameters; every other entry stays frozen.

  >>> import jax, optax
  >>> import spra_jax as spra
  >>> tx = spra.masked(optax.adamw(1e-4), density=0.01, key=jax.random.key(0))

See ``spra.masked`` (the Optax transformation), ``spra.sample_mask`` and
``spra.masks`` (mask distributions), and ``spra.SparseDelta`` (adapters).
"""

from spra_jax import checkpoint, compact, data, masks, metrics, microbatch, models, nnx, precision, sparse_backward
from spra_jax.checkpoint import adapter_overlap, load_adapter, load_adapter_config, merge_adapters, save_adapter
from spra_jax.delta import (
    SparseDelta,
    add_deltas,
    apply_updates,
    attach,
    extract,
    grad,
    init_delta,
    merge,
    unmerge,
    value_and_grad,
)
from spra_jax.lean import LeanState, LeanStep, lean_step
from spra_jax.masks import LeafMask, from_dense, num_trainable, sample_mask, to_dense
from spra_jax.masks import summary as mask_summary
from spra_jax.transform import SparseMaskedState, mask_of, masked

from spra_jax import recipes, sharding  # noqa: E402  (after the modules they build on)

from spra_jax._version import __version__ as __version__  # defined once, in _version.py

__all__ = [
    "LeafMask",
    "LeanState",
    "LeanStep",
    "SparseDelta",
    "SparseMaskedState",
    "adapter_overlap",
    "add_deltas",
    "apply_updates",
    "attach",
    "checkpoint",
    "compact",
    "data",
    "extract",
    "from_dense",
    "grad",
    "init_delta",
    "lean_step",
    "load_adapter",
    "load_adapter_config",
    "mask_of",
    "mask_summary",
    "masked",
    "masks",
    "merge",
    "merge_adapters",
    "metrics",
    "microbatch",
    "models",
    "nnx",
    "num_trainable",
    "precision",
    "recipes",
    "sample_mask",
    "save_adapter",
    "sharding",
    "sparse_backward",
    "to_dense",
    "unmerge",
    "value_and_grad",
]
