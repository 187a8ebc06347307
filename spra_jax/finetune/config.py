"""The job's configuration: every field a run depends on, its checks, the default learning rates."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any

from spra_jax import masks as masks_lib
from spra_jax import precision
from spra_jax import sharding as sharding_lib
from spra_jax.recipes import METHODS



# The learning rate of each method when the config gives none, by model family (see the module's docstring).
DEFAULT_LR: dict[str, dict[str, float]] = {
    "encoder": {"spra": 2e-2, "head": 1e-1, "lora": 3e-3, "full": 1e-4},
    "decoder": {"spra": 5e-3, "head": 3e-3, "lora": 3e-3, "full": 1e-4},
}
# The family of each architecture module of ``spra.models`` (``spra.models.ARCHITECTURES``' values).
_FAMILY_OF_ARCHITECTURE = {"bert": "encoder", "llama": "decoder"}


def default_lr(method: str, family: str) -> float:
  """The learning rate a job uses for ``method`` on a model of ``family`` when none is given.

  >>> default_lr('spra', 'encoder'), default_lr('full', 'decoder')
  (0.02, 0.0001)
  >>> default_lr('spra', 'vision')
  Traceback (most recent call last):
  ...
  ValueError: family must be one of ['encoder', 'decoder'], got 'vision'
  """
  if family not in DEFAULT_LR:
    raise ValueError(f"family must be one of {list(DEFAULT_LR)}, got {family!r}")
  if method not in DEFAULT_LR[family]:
    raise ValueError(f"method must be one of {list(DEFAULT_LR[family])}, got {method!r}")
  return DEFAULT_LR[family][method]


@dataclasses.dataclass
class FinetuneConfig:
  """Everything a fine-tuning run depends on (saved as ``config.json``).

  Attributes:
    model: a local checkpoint directory, a ``.gguf`` file, a hub id (online)
      or an alias of a shipped model (``minilm``, ``smollm2-135m``, ``gemma3-270m``).
    dataset: a shipped dataset (``rotten-tomatoes``, ``tweets``, ``jeopardy``),
      a local CSV / JSON / Parquet file or a hub dataset name.
    task: ``classification`` or ``sft``; by default ``sft`` when the dataset
      has ``prompt``/``response`` (or ``question``/``answer``) columns, else
      ``classification``.
    method: one of ``spra``, ``head``, ``lora``, ``full``.
    density: the fraction of the eligible entries SpaRTA trains.
    distribution: a registered mask distribution (``spra.masks.available()``).
    preset: where SpaRTA / LoRA go (``paper``, ``all-linear``, ``mlp``,
      ``attention``); ``include``/``exclude``/``full`` override its rules.
    lr: AdamW's peak learning rate; None: the method's default for the
      model's family (:data:`DEFAULT_LR`), resolved when the job starts and
      saved resolved in ``config.json``.
    weight_decay, warmup_ratio: AdamW's weight decay, and the fraction of the
      steps spent warming up linearly (then cosine decay).
    steps / epochs: the training length (``steps`` wins when both are given).
    batch_size, max_length: the batch shape (fixed, so one compilation).
    grad_accum_steps: each step runs its batch as this many microbatches of
      ``batch_size / grad_accum_steps`` rows and sums their gradients before
      one update (compact gradients for SpaRTA): the effective batch is
      ``batch_size``, the activations those of one microbatch.
    sparse_backward: how SpaRTA's weight gradients are computed: ``auto``
      (per leaf, by :func:`spra.sparse_backward.choose`), ``sampled`` (only the
      k entries) or ``dense``. It changes the cost, not the result (beyond
      float rounding), so it is not part of :meth:`identity`: a run may resume
      with another choice.
    param_dtype, compute_dtype: ``float32``, ``bfloat16`` or ``float16``: the
      weights' dtype and the dtype the model computes in (losses and softmax
      are float32 always). None: float32 on CPU, bfloat16 on GPU and TPU,
      resolved when the job starts (:func:`default_dtype`) and saved resolved
      in ``config.json``. SpaRTA with bf16 weights keeps float32 deltas and
      writes ``round(base + delta)`` into the weights.
    eval_every: evaluate on the validation split every this many steps.
    eval_examples: cap on validation examples per evaluation (0 = all).
    test_examples: cap on the test examples of the final evaluation (0 = all).
    checkpoint_every: save a resumable checkpoint every this many steps.
    seed: seeds the mask, the head's initialisation, the split and the order.
    lora_rank, lora_alpha: LoRA's rank and scale numerator.
    text_column, label_column, prompt_column, response_column: dataset columns.
    mesh: a device mesh, ``'data=2,tensor=4'`` (axes ``data``, ``fsdp``,
      ``tensor``; ``data`` defaults to the devices left over) or ``'auto'``
      (every device on ``data``); parameters are laid out by
      the model family's partition rules (``spra.models.partition.rules_for``) and batches split over ``data`` x
      ``fsdp``. Default: one device.
    output: the output directory.
  """

  model: str = "minilm"
  dataset: str = "rotten-tomatoes"
  task: str | None = None
  method: str = "spra"
  density: float = 0.01
  distribution: str = "uniform"
  preset: str | None = "paper"
  include: str | None = None
  exclude: str | None = None
  full: str | None = None
  lr: float | None = None
  weight_decay: float = 0.0
  warmup_ratio: float = 0.06
  steps: int | None = None
  epochs: float | None = 1.0
  batch_size: int = 32
  max_length: int = 64
  grad_accum_steps: int = 1
  sparse_backward: str = "auto"
  param_dtype: str | None = None
  compute_dtype: str | None = None
  eval_every: int = 100
  eval_examples: int = 0
  test_examples: int = 0
  checkpoint_every: int = 100
  seed: int = 0
  lora_rank: int = 8
  lora_alpha: float = 16.0
  text_column: str = "text"
  label_column: str = "label"
  prompt_column: str | None = None
  response_column: str | None = None
  mesh: str | None = None
  output: str = "runs/finetune"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
    if self.task not in (None, "classification", "sft"):
      raise ValueError(f"task must be 'classification' or 'sft', got {self.task!r}")
    for name in ("model", "dataset", "output", "distribution", "text_column", "label_column"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
        raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
    if not _is_real(self.density) or not 0 < self.density <= 1:
      raise ValueError(f"density must be in (0, 1], got {self.density}")
    for name in ("batch_size", "max_length", "eval_every", "checkpoint_every", "lora_rank", "grad_accum_steps"):
      if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    for name in ("eval_examples", "test_examples"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = all), got {getattr(self, name)!r}")
    if self.sparse_backward not in ("auto", "sampled", "dense"):
      raise ValueError(f"sparse_backward must be 'auto', 'sampled' or 'dense', got {self.sparse_backward!r}")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum_steps {self.grad_accum_steps} "
                       "(each step runs batch_size / grad_accum_steps rows at a time)")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) is not None:
        setattr(self, name, precision.float_dtype(getattr(self, name), what=name).name)
    if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.lr is not None and (not _is_real(self.lr) or not 0 < self.lr < math.inf):
      raise ValueError(f"lr must be a positive finite number (or None for the method's default), got {self.lr}")
    if not _is_real(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
      raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
    if not _is_real(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
      raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if not _is_real(self.lora_alpha) or not 0 < self.lora_alpha < math.inf:
      raise ValueError(f"lora_alpha must be a positive finite number, got {self.lora_alpha}")
    if self.steps is None and self.epochs is None:
      raise ValueError("give steps or epochs")
    if self.steps is not None and (not _is_int(self.steps) or self.steps <= 0):
      raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
    if self.epochs is not None and (not _is_real(self.epochs) or not 0 < self.epochs < math.inf):
      raise ValueError(f"epochs must be a positive finite number, got {self.epochs}")
    if self.distribution not in masks_lib.available():
      raise ValueError(f"distribution must be one of {masks_lib.available()}, got {self.distribution!r}")
    for name in ("include", "exclude", "full"):
      pattern = getattr(self, name)
      if pattern is not None:
        try:
          re.compile(pattern)
        except re.error as e:
          raise ValueError(f"{name} is not a valid regular expression ({e}): {pattern!r}") from None
    parse_mesh(self.mesh)  # fails early on a malformed spec

  def identity(self) -> dict[str, Any]:
    """The fields that must match for a resume (everything but the output path and ``sparse_backward``)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("output", "sparse_backward")}


def default_dtype(backend: str) -> str:
  """The parameter and compute dtype of a job that names none: float32 on CPU, bfloat16 on accelerators.

  >>> default_dtype('cpu'), default_dtype('gpu'), default_dtype('tpu')
  ('float32', 'bfloat16', 'bfloat16')
  """
  return "float32" if backend == "cpu" else "bfloat16"


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def parse_mesh(spec: str | None) -> dict[str, int] | None:
  """Reads a ``--mesh`` spec: ``'data=2,tensor=4'`` -> ``{'data': 2, 'tensor': 4}``.

  ``'auto'`` gives ``{}`` (every device on ``data``); None or ``''`` gives None
  (no mesh).

  >>> parse_mesh('data=2, tensor=4'), parse_mesh('auto'), parse_mesh(None)
  ({'data': 2, 'tensor': 4}, {}, None)
  >>> parse_mesh('model=2')
  Traceback (most recent call last):
  ...
  ValueError: mesh spec 'model=2': expected comma-separated axis=size with axes data, fsdp, tensor (e.g. 'data=2,tensor=4') or 'auto'
  """
  if spec is None or not spec.strip():
    return None
  if spec.strip() == "auto":
    return {}
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, _, size = part.strip().partition("=")
    if name not in sharding_lib.AXES or name in axes or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes "
                       f"{', '.join(sharding_lib.AXES)} (e.g. 'data=2,tensor=4') or 'auto'")
    axes[name] = int(size)
  return axes
