"""Checkpoints: sparse-delta adapters, training checkpoints, merged export and interop.

One concept per module:

* :mod:`~spra_jax.checkpoint.adapter`: :func:`save_adapter` / :func:`load_adapter`
  / :func:`load_adapter_config`, a trained delta as a small Orbax adapter
  directory with provenance and a base-model fingerprint;
* :mod:`~spra_jax.checkpoint.dense`: :func:`save_dense_adapter` /
  :func:`load_dense_adapter`, whole trained arrays (LoRA, full fine-tuning) as
  a versioned adapter directory of the same safety;
* :mod:`~spra_jax.checkpoint.fingerprint`: :func:`base_fingerprint` /
  :func:`check_base`, which base weights an adapter belongs to, in O(k);
* :mod:`~spra_jax.checkpoint.analysis`: :func:`adapter_overlap`,
  :func:`merge_adapters`, several adapters together;
* :mod:`~spra_jax.checkpoint.train`: :class:`TrainCheckpointer`, resumable
  training checkpoints with ``orbax.checkpoint.CheckpointManager``;
* :mod:`~spra_jax.checkpoint.interop`: :func:`export_merged`,
  :func:`export_peft_sparta`, :func:`import_peft_sparta`, Hugging Face
  safetensors and the SpaRTA PyTorch package's adapter format;
* :mod:`~spra_jax.checkpoint.encoding`: the gap encoding of stored indices.

The on-disk schema (formats, versions, leaf tables) is private to ``_format.py``
and the atomic publishing of files and directories to ``_files.py``.
"""

from spra_jax.checkpoint import encoding
from spra_jax.checkpoint.adapter import load_adapter, load_adapter_config, save_adapter
from spra_jax.checkpoint.analysis import AdapterOverlap, LeafOverlap, adapter_overlap, merge_adapters
from spra_jax.checkpoint.dense import load_dense_adapter, save_dense_adapter
from spra_jax.checkpoint.fingerprint import base_fingerprint, check_base
from spra_jax.checkpoint.interop import (
    default_to_torch_layout,
    default_torch_name,
    export_merged,
    export_peft_sparta,
    import_peft_sparta,
)
from spra_jax.checkpoint.train import TrainCheckpoint, TrainCheckpointer, trained_entries, with_trained_entries

__all__ = [
    "AdapterOverlap",
    "LeafOverlap",
    "TrainCheckpoint",
    "TrainCheckpointer",
    "adapter_overlap",
    "base_fingerprint",
    "check_base",
    "default_to_torch_layout",
    "default_torch_name",
    "encoding",
    "export_merged",
    "export_peft_sparta",
    "import_peft_sparta",
    "load_adapter",
    "load_adapter_config",
    "load_dense_adapter",
    "merge_adapters",
    "save_adapter",
    "save_dense_adapter",
    "trained_entries",
    "with_trained_entries",
]
