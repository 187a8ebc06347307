"""Flax NNX models that load real pretrained checkpoints.

``spra.models.from_pretrained(name_or_path)`` returns ``(model, tokenizer)`` for
an alias (``minilm``, ``smollm2-135m``, ``gemma3-270m``), a local Hugging Face directory, a
``.gguf`` file or (online) a Hub id. Parameter paths mirror the Hugging Face
module names (``encoder/layer/3/attention/self/value/kernel``,
``model/layers/3/self_attn/v_proj/kernel``), so masks, presets and adapters
address them with one regex and map back to PyTorch names.

* :mod:`~spra_jax.models.bert`: BERT / MiniLM encoders and pooling.
* ``spra_jax.models.llama``: Llama / Mistral / Qwen2 / Qwen3 / Phi-3 /
  Gemma 1-3 decoders (with
  ``gguf`` and ``generate``), imported on first use.
* :mod:`~spra_jax.models.presets`: which leaves to sparsify, train fully or
  freeze (``paper``, ``all-linear``, ``mlp``, ``attention``).
* :mod:`~spra_jax.models.lora`: a LoRA baseline on the same models.

Example:

  >>> import spra_jax as spra
  >>> 'minilm' in spra.models.available()['aliases']
  True
  >>> spra.models.presets.get('paper', 'bert')['include']
  'attention/(self/value|output/dense)/(kernel|bias)$'
"""

from __future__ import annotations

import importlib
from typing import Any

from spra_jax.models import bert, hub, lora, partition, presets
from spra_jax.models._io import LazyTensor, open_safetensors
from spra_jax.models.bert import cls_pool, l2_normalize, mean_pool
from spra_jax.models.hub import ALIASES, ARCHITECTURES, architecture, available, from_pretrained, model_type
from spra_jax.models.lora import apply_lora, lora_param_count

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "LazyTensor",
    "apply_lora",
    "architecture",
    "available",
    "bert",
    "cls_pool",
    "from_pretrained",
    "hub",
    "l2_normalize",
    "lora",
    "partition",
    "lora_param_count",
    "mean_pool",
    "model_type",
    "open_safetensors",
    "presets",
]

# Modules imported on first attribute access (they may be absent from an installation).
_LAZY_MODULES = ("llama", "gguf", "generate")


def __getattr__(name: str) -> Any:
  if name in _LAZY_MODULES:
    return importlib.import_module(f"spra_jax.models.{name}")
  raise AttributeError(f"module 'spra_jax.models' has no attribute {name!r}")
