"""Training recipes: the losses, trainers, evaluation and schedule that every method shares.

The fine-tuning job (:mod:`spra_jax.finetune`), the study and the examples
train through this package, so a method means the same thing everywhere:

* :mod:`~spra_jax.recipes.losses`: a model as ``forward(trainable, frozen, batch)``;
  classification and SFT losses (float32 softmax).
* :mod:`~spra_jax.recipes.schedules`: AdamW with warm-up and cosine decay,
  optionally with the peak rate in the state (one compilation per sweep).
* :mod:`~spra_jax.recipes.trainers`: :class:`LeanTrainer` (SpaRTA, head-only)
  and :class:`DenseTrainer` (LoRA, full): compiled, reusable, stateless.
* :mod:`~spra_jax.recipes.methods`: :func:`prepare` binds a method to a model
  (mask or LoRA, split, mesh layout) as a :class:`Run`.
* :mod:`~spra_jax.recipes.evaluation`: :func:`evaluate` on a tokenised split.

  >>> import spra_jax as spra
  >>> spra.recipes.METHODS
  ('spra', 'head', 'lora', 'full')
"""

from spra_jax.recipes.evaluation import evaluate, majority_rate, padded_batches
from spra_jax.recipes.losses import TASKS, call_model, classification_loss, loss_for, model_forward, sft_loss
from spra_jax.recipes.methods import (
    HEAD_PATTERN,
    METHODS,
    Run,
    head_mask,
    lora_filter,
    module_pattern,
    place_on_mesh,
    prepare,
)
from spra_jax.recipes.schedules import adamw, set_learning_rate, warmup_cosine
from spra_jax.recipes.trainers import DenseTrainer, LeanTrainer, tree_bytes

__all__ = [
    "DenseTrainer",
    "HEAD_PATTERN",
    "LeanTrainer",
    "METHODS",
    "Run",
    "TASKS",
    "adamw",
    "call_model",
    "classification_loss",
    "evaluate",
    "head_mask",
    "loss_for",
    "lora_filter",
    "majority_rate",
    "model_forward",
    "module_pattern",
    "padded_batches",
    "place_on_mesh",
    "prepare",
    "set_learning_rate",
    "sft_loss",
    "tree_bytes",
    "warmup_cosine",
]
