"""The fine-tuning job: SpaRTA, LoRA, head-only or full fine-tuning on a dataset.

:func:`finetune` runs a whole job from a :class:`FinetuneConfig`: it loads a
pretrained model and a dataset, trains with the chosen method, evaluates on
held-out data every ``eval_every`` steps (accuracy, MCC and F1 for
classification; loss and response-token accuracy for supervised fine-tuning),
writes metrics as JSON lines and a PNG of the curves, checkpoints for resume,
saves the adapter, and ends with the test metrics. ``spra-jax finetune`` (see
:mod:`spra_jax.cli`) is its command line.

Methods:

* ``spra``: the lean path (:func:`spra.lean_step`) over a random mask of
  ``density`` (placed by ``preset`` or ``include``/``exclude``/``full``
  rules); the classification head trains fully.
* ``head``: only the classification head trains.
* ``lora``: LoRA adapters of ``lora_rank`` on the preset's projections.
* ``full``: every parameter trains.

The methods themselves (losses, trainers, evaluation, the schedule) live in
:mod:`spra_jax.recipes`; this module owns the config, the loop and the output
directory.

Everything that decides the result lives in the config, which is saved as
``config.json`` in the output directory; resuming refuses a directory written
by a run with a different config.

Default learning rates. ``lr=None`` (no ``--lr``) means the method's default
for the model's family (:data:`DEFAULT_LR`, :func:`default_lr`); the job prints
the rate it uses and stores it in ``config.json`` and ``results.json``:

===========  ======  ======  ======  ======
family       spra    head    lora    full
===========  ======  ======  ======  ======
``encoder``  2e-2    1e-1    3e-3    1e-4
``decoder``  5e-3    3e-3    3e-3    1e-4
===========  ======  ======  ======  ======

They come from the study in ``examples/RESULTS.md`` (short runs on MiniLM and
SmolLM2-135M; rates tuned on validation). Encoders (BERT): head, LoRA and full
fine-tuning are the rates that won on MiniLM; SpaRTA's 2e-2 is the demo's (the
study's winners were 1e-2 at 5 % density and 3e-2 at 1 %). Decoders (Llama
family): SmolLM2's winners were at the top of their grids (SpaRTA 9e-3, LoRA
3e-3, full 9e-5), so LoRA and full take those; SpaRTA takes 5e-3, between the
grid's 3e-3 and 9e-3 and the rate ``examples/sft.py`` fine-tunes SmolLM2 with;
head-only is the study's untuned centre. A model passed in whose family is not
known uses the encoder row for classification and the decoder row for SFT.

Checks before loading. :func:`validate` checks everything that can be checked
without loading the model or the data (the config's values, the mesh against
the devices, that the model exists, the dataset's file and columns), and the
output directory is locked and guarded next; only then does the model load.

The output directory is locked for the whole run (:class:`OutputLock`, an
``flock`` on ``<output>/.lock``): a second job on the same directory is refused
at once, with the holder's pid, host and start time. A lock left by a job that
was killed needs no cleaning: the kernel releases an ``flock`` when its process
ends, so the next run takes it over (and says so).

Ctrl-C (SIGINT) during training stops after the current step: the job saves a
checkpoint of that step, waits for it and raises :class:`Interrupted` (the
command prints where the checkpoint is and the command that resumes it, and
exits with status 130). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from spra_jax import data as data_lib
from spra_jax import masks as masks_lib
from spra_jax import recipes
from spra_jax import sharding as sharding_lib
from spra_jax.recipes import METHODS

__all__ = ["DEFAULT_LR", "FinetuneConfig", "Interrupted", "Job", "METHODS", "OutputLock", "Validated", "default_lr",
           "finetune", "validate"]

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
      or an alias of a shipped model (``minilm``, ``smollm2-135m``).
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
    for name in ("batch_size", "max_length", "eval_every", "checkpoint_every", "lora_rank"):
      if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    for name in ("eval_examples", "test_examples"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = all), got {getattr(self, name)!r}")
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
    """The fields that must match for a resume (everything but the output path)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "output"}


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


# ---------------------------------------------------------------------------
# Checks before loading anything.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Validated:
  """What :func:`validate` found: the config with its learning rate resolved, and what the job needs next.

  Attributes:
    config: a copy of the config with ``lr`` resolved.
    lr_source: how the rate was chosen, in words (``'given'`` or the default it is).
    family: ``'encoder'`` or ``'decoder'`` (what :data:`DEFAULT_LR` is keyed by).
    task: ``'classification'`` or ``'sft'``.
    columns: the dataset's columns.
    dataset: the dataset, where its columns could only be seen by loading it
      (a hub dataset, a ``save_to_disk`` directory, a JSON array file); else None.
    mesh: the device mesh of ``config.mesh`` (None without one).
  """

  config: FinetuneConfig
  lr_source: str
  family: str
  task: str
  columns: list[str]
  dataset: Any = None
  mesh: Any = None


def _infer_task(columns: list[str]) -> tuple[str, str | None, str | None]:
  """``(task, prompt_column, response_column)`` from a dataset's columns (SFT for prompt/response pairs)."""
  for prompt, response in (("prompt", "response"), ("question", "answer")):
    if prompt in columns and response in columns:
      return "sft", prompt, response
  return "classification", None, None


def _check_batch_on_mesh(batch_size: int, mesh: Any) -> None:
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_ways:
    raise ValueError(f"batch_size {batch_size} must be a multiple of data x fsdp = {batch_ways} "
                     f"on the mesh {dict(mesh.shape)}")


def _family_of_model(model: nnx.Module, task: str) -> str:
  from spra_jax import models

  try:
    family = _FAMILY_OF_ARCHITECTURE.get(models.ARCHITECTURES.get(models.model_type(model), ""))
  except ValueError:  # a model of the caller's own: no model type
    family = None
  return family or ("encoder" if task == "classification" else "decoder")


def _family_of_name(name: str) -> str:
  """The family of a model name, from its files' config alone (the weights are not read)."""
  from spra_jax import models

  try:
    path = models.hub.resolve(name)  # cheap for an alias or a local path; a hub id is looked up (offline: the cache)
  except OSError as e:  # FileNotFoundError for a path or an alias's package, OSError for an uncached hub id
    what = "is not installed" if name in models.ALIASES else "is unknown"
    raise ValueError(f"model {name!r} {what}: {e}") from None
  if path.is_file() and path.suffix == ".gguf":
    return "decoder"  # the GGUF reader reads Llama-family decoders only
  folder = path.parent if path.is_file() else path
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise ValueError(f"model {name!r}: {folder} has no config.json, so it is not a Hugging Face model directory "
                     "(expected config.json + model.safetensors, or a .gguf file)")
  try:
    model_type = json.loads(config_file.read_text()).get("model_type")
  except (ValueError, AttributeError, UnicodeDecodeError) as e:
    raise ValueError(f"model {name!r}: {config_file} is not a JSON object ({e})") from None
  if model_type not in models.ARCHITECTURES:
    raise ValueError(f"model {name!r} has model_type={model_type!r}; the supported model types are "
                     f"{sorted(models.ARCHITECTURES)}")
  return _FAMILY_OF_ARCHITECTURE.get(models.ARCHITECTURES[model_type], "decoder")


def validate(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
             model: nnx.Module | None = None, tokenizer: Any = None, dataset: Any = None) -> Validated:
  """Checks what a job can check before loading its model: raises the first problem found as a ValueError.

  The config's values are checked when it is built; this adds what needs the
  machine: the mesh against the devices, the preset's name, the dataset (its
  file exists, has rows and the task's columns: a CSV's header is all that is
  read), the model (an alias that is installed, a path that exists with a
  known ``model_type``, or a hub id in the cache when offline; the weights are
  not read), and resolves the learning rate. It takes milliseconds for local
  files. The output directory is checked by :func:`finetune` once it holds
  the directory's lock.

  Args:
    config: the run's config.
    resume, overwrite: as for :func:`finetune` (they exclude each other).
    model, tokenizer: a ready model and its tokenizer (then ``config.model``
      is only a name).
    dataset: a loaded ``DatasetDict`` (then ``config.dataset`` is only a name).

  Returns:
    A :class:`Validated`.

  Example:

  >>> import os, tempfile
  >>> csv = os.path.join(tempfile.mkdtemp(), "reviews.csv")
  >>> with open(csv, "w") as f:
  ...   _ = f.write("review,label\\ngreat,1\\n")
  >>> validate(FinetuneConfig(dataset=csv))
  Traceback (most recent call last):
  ...
  ValueError: classification needs the text column 'text' (--text-column); ...reviews.csv has the columns ['review', 'label']
  >>> checked = validate(FinetuneConfig(dataset=csv, text_column="review"))
  >>> checked.config.lr, checked.lr_source
  (0.02, 'the default of spra for encoder models')
  """
  if resume and overwrite:
    raise ValueError("resume and overwrite exclude each other (--resume continues the run in the output directory, "
                     "--overwrite deletes it)")
  mesh = None
  axes = parse_mesh(config.mesh)
  if axes is not None:
    try:
      mesh = sharding_lib.make_mesh(**axes)
    except ValueError as e:
      raise ValueError(f"mesh {config.mesh!r} does not fit the {jax.device_count()} device(s) here: {e}") from None
    _check_batch_on_mesh(config.batch_size, mesh)
  if config.preset is not None:
    from spra_jax.models import presets

    if config.preset not in presets.PRESETS:
      raise ValueError(f"preset must be one of {list(presets.PRESETS)} or None, got {config.preset!r}")

  # The dataset: its columns, from the header alone where the source has one.
  columns = list(dataset["train"].column_names) if dataset is not None else data_lib.peek_columns(config.dataset)
  if columns is None:
    dataset = data_lib.load(config.dataset, seed=config.seed, label_column=config.label_column)
    columns = list(dataset["train"].column_names)
  task = config.task or _infer_task(columns)[0]
  if task == "classification":
    needed = {"text": config.text_column, "label": config.label_column}
  else:
    inferred = _infer_task(columns)
    needed = {"prompt": config.prompt_column or inferred[1] or "prompt",
              "response": config.response_column or inferred[2] or "response"}
  missing = [f"the {role} column {name!r} (--{role}-column)" for role, name in needed.items() if name not in columns]
  if missing:
    raise ValueError(f"{'classification' if task == 'classification' else 'supervised fine-tuning'} needs "
                     f"{' and '.join(missing)}; {config.dataset} has the columns {columns}")

  # The model: that it exists and what family it is, from its config file.
  if model is None:
    family = _family_of_name(config.model)
  else:
    if tokenizer is None:
      raise ValueError("a tokenizer is needed with a model passed in directly")
    family = _family_of_model(model, task)
  if family == "encoder" and task == "sft" and model is None:
    raise ValueError(f"model {config.model!r} is an encoder: supervised fine-tuning needs a causal LM "
                     "(e.g. --model smollm2-135m), or pass --task classification")

  if config.lr is None:
    lr, source = default_lr(config.method, family), f"the default of {config.method} for {family} models"
  else:
    lr, source = float(config.lr), "given"
  return Validated(dataclasses.replace(config, lr=lr), source, family, task, columns, dataset, mesh)


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def _select_rules(config: FinetuneConfig, preset_rules: Mapping[str, Any]) -> dict[str, Any]:
  rules = dict(preset_rules)
  for name in ("include", "exclude", "full"):
    if getattr(config, name) is not None:
      rules[name] = getattr(config, name)
  return rules


class Job:
  """A fine-tuning run in progress; :func:`finetune` drives it.

  Build it with a config and, optionally, a ready model and tokenizer (any
  NNX model that follows the library's call conventions); otherwise the model
  is loaded with ``spra.models.from_pretrained``. ``dataset`` and ``mesh`` may
  come ready too (from :func:`validate`).
  """

  def __init__(self, config: FinetuneConfig, *, model: nnx.Module | None = None, tokenizer: Any = None,
               preset_rules: Mapping[str, Any] | None = None, dataset: Any = None, mesh: Any = None):
    self.config = config
    self.out = pathlib.Path(config.output).absolute()
    if dataset is None:
      print(f"loading dataset {config.dataset}", flush=True)
      dataset = data_lib.load(config.dataset, seed=config.seed, label_column=config.label_column)
    self.dataset = dataset
    inferred = _infer_task(self.dataset["train"].column_names)
    self.task = config.task or inferred[0]
    # Not written back into the config: config.json keeps what was asked for, so a resume compares like with like.
    self.prompt_column = config.prompt_column or inferred[1] or "prompt"
    self.response_column = config.response_column or inferred[2] or "response"
    self.num_labels = None
    if self.task == "classification":
      feature = self.dataset["train"].features.get(config.label_column)
      if feature is None:
        raise ValueError(f"classification needs the label column {config.label_column!r}; the dataset has "
                         f"{self.dataset['train'].column_names}")
      self.num_labels = getattr(feature, "num_classes", None) or int(max(self.dataset["train"][config.label_column])) + 1
      self.label_names = list(getattr(feature, "names", [str(i) for i in range(self.num_labels)]))
    if model is None:
      from spra_jax import models  # the models package is the top layer; import it only when needed

      task = "sequence-classification" if self.task == "classification" else "causal-lm"
      print(f"loading model {config.model}", flush=True)  # the tests look for this line to tell checks from loads
      model, tokenizer = models.from_pretrained(config.model, task=task, num_labels=self.num_labels, seed=config.seed)
      if preset_rules is None and config.preset:
        preset_rules = models.presets.get(config.preset, models.model_type(model), task=task)
    if tokenizer is None:
      raise ValueError("a tokenizer is needed with a model passed in directly")
    if tokenizer.pad_token_id is None:
      tokenizer.pad_token = tokenizer.eos_token
    self.model, self.tokenizer = model, tokenizer
    self.family = _family_of_model(model, self.task)
    self.mesh = mesh
    axes = parse_mesh(config.mesh)
    if self.mesh is None and axes is not None:
      self.mesh = sharding_lib.make_mesh(**axes)
    if self.mesh is not None:
      _check_batch_on_mesh(config.batch_size, self.mesh)
    self.preset_rules = dict(preset_rules or {})
    self.arrays = {name: self._tokenize(split) for name, split in self.dataset.items()}

  def _tokenize(self, split: Any) -> dict[str, np.ndarray]:
    c = self.config
    if self.task == "classification":
      return data_lib.tokenize_classification(split, self.tokenizer, text_column=c.text_column,
                                              label_column=c.label_column, max_length=c.max_length)
    return data_lib.tokenize_sft(split, self.tokenizer, prompt_column=self.prompt_column,
                                 response_column=self.response_column, max_length=c.max_length)

  @property
  def lr(self) -> float:
    """The learning rate: the config's, or the method's default for this model (:func:`default_lr`)."""
    return self.config.lr if self.config.lr is not None else default_lr(self.config.method, self.family)

  def place_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A batch split over the mesh's ``data`` x ``fsdp`` axes (unchanged without a mesh)."""
    if self.mesh is None:
      return batch
    return {k: jax.device_put(v, sharding_lib.batch_sharding(self.mesh, np.ndim(v))) for k, v in batch.items()}

  def total_steps(self) -> int:
    c = self.config
    per_epoch = data_lib.num_batches(self.arrays["train"], c.batch_size)
    return c.steps if c.steps is not None else max(1, math.ceil(c.epochs * per_epoch))

  def build(self) -> recipes.Run:
    """The configured method bound to the model (mask sampled, LoRA applied, laid out on the mesh)."""
    c = self.config
    total = self.total_steps()
    self.schedule = recipes.warmup_cosine(self.lr, total, c.warmup_ratio)  # what the metrics log reports
    tx = recipes.adamw(self.lr, total, warmup_ratio=c.warmup_ratio, weight_decay=c.weight_decay)
    partition_rules = None
    if self.mesh is not None:
      from spra_jax import models

      partition_rules = models.partition.rules_for(models.model_type(self.model))
    return recipes.prepare(self.model, c.method, tx=tx, task=self.task, rules=_select_rules(c, self.preset_rules),
                           density=c.density, distribution=c.distribution, seed=c.seed,
                           head=self.preset_rules.get("full"), lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                           mesh=self.mesh, partition_rules=partition_rules)


# ---------------------------------------------------------------------------
# Output directory: its lock, its guard, the metrics log and the plot.
# ---------------------------------------------------------------------------

LOCK_NAME = ".lock"
# What a run may leave in a directory before its config.json exists (a resume there starts afresh).
_PRE_CONFIG_FILES = {LOCK_NAME, "config.json.tmp"}


class OutputLock:
  """An exclusive lock on a job's output directory, held through an open file while the job runs.

  :meth:`acquire` (or ``with OutputLock(directory):``) creates the directory
  if needed, takes an ``flock`` on ``directory/.lock`` and writes the holder's
  pid, host and start time into it. Another lock on the same directory, from
  any process, fails at once with a ValueError naming the holder. The kernel
  drops an ``flock`` when its process ends, however it ends, so a lock left by
  a killed job needs no cleaning: the next job takes it over, and
  :attr:`stale` holds what the dead holder had written (None after a clean
  release, which empties the file). The file itself stays.

  Example:

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> with OutputLock(directory):
    ...   OutputLock(directory).acquire()
    Traceback (most recent call last):
    ...
    ValueError: ... is in use by another job: pid ... on host ... since ...; wait for it to end or stop it, or choose another --output
    >>> with OutputLock(directory) as lock:
    ...   lock.stale is None
    True
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory).absolute()
    self.path = self.directory / LOCK_NAME
    self.stale: dict[str, Any] | None = None
    self._fd: int | None = None

  @staticmethod
  def _read(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 4096, 0)
    try:
      info = json.loads(raw) if raw.strip() else None
    except ValueError:
      return None
    return info if isinstance(info, dict) else None

  @staticmethod
  def describe(info: Mapping[str, Any] | None) -> str:
    """The holder in words: ``'pid 12 on host h since 2026-01-01 10:00:00 UTC'``."""
    if not info:
      return "a process that has not written its details yet"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"

  def acquire(self) -> OutputLock:
    """Takes the lock; raises ValueError when another job holds it or the directory cannot be written."""
    import fcntl

    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create the output directory {self.directory}: {e.strerror or e}") from None
    try:
      # O_CLOEXEC: a program the job starts must not inherit the lock and keep it after the job ends.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise ValueError(f"the output directory {self.directory} is not writable: {e.strerror or e}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self.describe(self._read(fd))
      os.close(fd)
      raise ValueError(f"{self.directory} is in use by another job: {holder}; wait for it to end or stop it, or "
                       "choose another --output") from None
    except OSError as e:
      os.close(fd)
      raise ValueError(f"cannot lock the output directory {self.directory} ({e.strerror or e}); its file system "
                       "may not support locks: choose another --output") from None
    self.stale = self._read(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(info).encode(), 0)
      # The lock file may be writable in a directory that is not: try a real new file.
      probe = self.directory / f".write-check-{os.getpid()}"
      os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
      os.unlink(probe)
    except OSError as e:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise ValueError(f"the output directory {self.directory} is not writable: {e.strerror or e}") from None
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the lock file (so the next holder sees a clean release) and releases the lock."""
    import fcntl

    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # the lock is released below all the same
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> OutputLock:
    return self.acquire()

  def __exit__(self, *exc: object) -> None:
    self.release()


def _prepare_output(out: pathlib.Path, config: FinetuneConfig, *, resume: bool, overwrite: bool) -> None:
  """The directory guard (called with the directory's lock held)."""
  saved = out / "config.json"
  if saved.exists():
    try:
      previous = json.loads(saved.read_text())
    except ValueError as e:
      raise ValueError(f"{saved} is not valid JSON ({e}); pass --overwrite to start over") from None
    identity = config.identity()
    if overwrite:
      import shutil

      for entry in out.iterdir():  # everything but the lock, which this job holds
        if entry.name != LOCK_NAME:
          shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    elif previous != identity:
      changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
      values = "; ".join(f"{k}: saved {previous.get(k)!r}, given {identity.get(k)!r}" for k in changed)
      raise ValueError(f"{out} holds a different run (fields that differ: {changed}; {values}); choose another "
                       "--output or pass --overwrite")
    elif not resume:
      raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite to start over")
  elif resume and any(p.name not in _PRE_CONFIG_FILES for p in out.iterdir()):
    raise ValueError(f"{out} has no config.json, so there is no run to resume there")


def _write_config(out: pathlib.Path, config: FinetuneConfig) -> None:
  _write_atomic(out / "config.json", json.dumps(config.identity(), indent=2, sort_keys=True))


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def plot_curves(metrics_path: pathlib.Path, png_path: pathlib.Path) -> None:
  """A PNG of the training loss and the validation metrics over steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  train = [r for r in rows if r["split"] == "train"]
  val = [r for r in rows if r["split"] == "validation"]
  fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
  ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
  keys = [k for k in ("accuracy", "mcc", "f1", "token_accuracy", "loss") if val and k in val[0]]
  for k in keys:
    ax_val.plot([r["step"] for r in val], [r[k] for r in val], marker="o", ms=3, label=k)
  ax_val.set(xlabel="step", title="validation")
  ax_val.legend(loc="best")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
  """Raised by :func:`finetune` when Ctrl-C (SIGINT) stopped training, once the checkpoint of the last step is saved.

  A ``KeyboardInterrupt``, so code that catches ``Exception`` lets it through.

  Attributes:
    step: the last completed step, which the checkpoint holds.
    total: the run's total steps.
    checkpoint: the checkpoint's directory.
    output: the run's output directory (resume with ``finetune(config, resume=True)``).
  """

  def __init__(self, step: int, total: int, checkpoint: pathlib.Path, output: pathlib.Path):
    super().__init__(f"interrupted after step {step} of {total}: the checkpoint of step {step} is in {checkpoint}; "
                     "continue with finetune(config, resume=True)")
    self.step, self.total, self.checkpoint, self.output = step, total, checkpoint, output


class _StopOnInterrupt:
  """While active (main thread only), a first SIGINT asks the loop to stop after its step; a second stops at once."""

  def __init__(self):
    self.requested = False
    self._previous: Any = None

  def _handle(self, signum: int, frame: Any) -> None:
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\ninterrupted: stopping after this step to save a checkpoint (Ctrl-C again stops at once, unsaved)",
          file=sys.stderr, flush=True)

  def __enter__(self) -> _StopOnInterrupt:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    if self._previous is not None or threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def _append_jsonl(path: pathlib.Path, row: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def _kept_metrics(path: pathlib.Path, upto: int) -> list[str]:
  """The log lines of steps up to ``upto``; a line torn by a kill mid-write is dropped."""
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
      kept.append(line)
  return kept


def finetune(
    config: FinetuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: nnx.Module | None = None,
    tokenizer: Any = None,
    preset_rules: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Runs a fine-tuning job end to end and returns its results.

  Everything that can be checked is checked before the model loads
  (:func:`validate`, then the output directory's lock and guard), so a
  mistake fails in a second with a ValueError, not after the load.

  Args:
    config: the run's :class:`FinetuneConfig`.
    resume: continue the run saved in ``config.output`` from its latest
      checkpoint (the config must match the saved one).
    overwrite: delete whatever ``config.output`` holds and start over.
    model, tokenizer: a ready NNX model and its tokenizer, instead of loading
      ``config.model`` (for models the library does not load itself). The
      model holds the trained weights when this returns (its old weight
      buffers are donated to the training step: do not keep references to them).
    preset_rules: ``include``/``exclude``/``full`` rules to use as the preset
      (by default they come from ``spra.models.presets``).
    progress: show a progress bar with the loss and the throughput.

  Returns:
    A dict with ``test`` (the test metrics), ``validation`` (the last
    validation metrics), ``trainable``, ``opt_state_bytes``, ``steps``,
    ``seconds``, ``lr`` (the rate used), ``majority`` (the majority-class rate
    of the test split, for classification) and the paths written.

  Raises:
    ValueError: a config, model, dataset or output directory that cannot
      work, or an output directory another job holds (:class:`OutputLock`).
    Interrupted: Ctrl-C during training, after the checkpoint of the last
      completed step was saved.

  Writes into ``config.output``: ``.lock`` (see :class:`OutputLock`),
  ``config.json`` (with ``lr`` resolved), ``metrics.jsonl`` (one JSON object
  per logged step or evaluation), ``curves.png``, ``checkpoints/``,
  ``adapter/`` (the SpaRTA / head adapter, :func:`spra.load_adapter`; for LoRA
  and full fine-tuning a dense adapter of the trained variables,
  :func:`spra.checkpoint.load_dense_adapter`) and ``results.json``.
  """
  t_start = time.perf_counter()
  checked = validate(config, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer)
  config = checked.config
  out = pathlib.Path(config.output).absolute()
  # Metadata and logs are written by process 0 (the library's multi-host rule), so it alone holds the lock.
  lock = OutputLock(out) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    if lock is not None and lock.stale:
      print(f"note: took over the lock of {out} from {OutputLock.describe(lock.stale)}, which ended without "
            "releasing it (the kernel released it)", flush=True)
    _prepare_output(out, config, resume=resume, overwrite=overwrite)
    print(f"learning rate {config.lr:g} ({checked.lr_source})", flush=True)
    job = Job(config, model=model, tokenizer=tokenizer, preset_rules=preset_rules, dataset=checked.dataset,
              mesh=checked.mesh)
    return _train(job, out, resume=resume, progress=progress, t_start=t_start)
  finally:
    if lock is not None:
      lock.release()


def _train(job: Job, out: pathlib.Path, *, resume: bool, progress: bool, t_start: float) -> dict[str, Any]:
  from spra_jax.checkpoint import TrainCheckpointer

  config = job.config
  run = job.build()
  _write_config(out, config)  # only once the model, the data and the method are known to work
  state = run.init()
  total = job.total_steps()
  metrics_path = out / "metrics.jsonl"

  def validation(state: Any, step: int) -> tuple[Any, dict[str, float]]:
    state, predict = run.predictor(state)
    metrics = recipes.evaluate(lambda b: predict(job.place_batch(b)), job.arrays["validation"], task=job.task,
                               batch_size=config.batch_size, limit=config.eval_examples)
    _append_jsonl(metrics_path, {"step": step, "split": "validation", **metrics})
    line = f"step {step}: validation " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    bar.write(line) if bar is not None else print(line, flush=True)
    return state, metrics

  bar = None
  start_step, position = 0, data_lib.Position()
  last_val: dict[str, float] = {}
  with TrainCheckpointer(out / "checkpoints", max_to_keep=2) as ckpt:
    if resume and ckpt.latest_step() is not None:
      restored = run.restore_checkpoint(ckpt, state)
      state, start_step = restored.state, restored.step
      position = data_lib.Position(**restored.data_position)
      # Drop log lines written after the checkpoint (the resumed run writes them again), atomically: a kill now
      # must not lose the lines before it.
      kept = _kept_metrics(metrics_path, start_step) if metrics_path.exists() else []
      _write_atomic(metrics_path, "".join(line + "\n" for line in kept))
      rows = [json.loads(line) for line in kept]
      evaluated = [r for r in rows if r["split"] == "validation"]
      if evaluated:
        last_val = {k: v for k, v in evaluated[-1].items() if k not in ("step", "split")}
      # A Ctrl-C checkpoint comes before its step's evaluation: run that evaluation now, as a straight run did.
      if (start_step % config.eval_every == 0 or start_step == total) and \
         not any(r["split"] == "validation" and r["step"] == start_step for r in rows):
        state, last_val = validation(state, start_step)
    elif metrics_path.exists():
      metrics_path.unlink()

    batches = data_lib.batches(job.arrays["train"], config.batch_size, seed=config.seed, start=position)
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=total, initial=start_step, desc=f"{config.method} {config.model}", unit="step",
                 dynamic_ncols=True)
    t_train, examples = time.perf_counter(), 0
    with _StopOnInterrupt() as stop:
      for step in range(start_step + 1, total + 1):
        position, batch = next(batches)
        state, loss = run.step(state, job.place_batch(batch))
        loss = float(loss)  # blocks on the step: keeps one step in flight, and on meshes avoids collective pile-ups
        if not math.isfinite(loss):
          raise FloatingPointError(f"the training loss became {loss} at step {step}; lower --lr (it is "
                                   f"{config.lr:g})")
        examples += config.batch_size
        _append_jsonl(metrics_path, {"step": step, "split": "train", "loss": loss, "lr": float(job.schedule(step - 1))})
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{examples / (time.perf_counter() - t_train):.1f}")
        if stop.requested:
          if bar is not None:
            bar.close()
          run.save_checkpoint(ckpt, step, state, data_position=dataclasses.asdict(position),
                              metadata={"config": config.identity()})
          ckpt.wait_until_finished()
          raise Interrupted(step, total, ckpt.directory / str(step), out)
        if step % config.eval_every == 0 or step == total:
          state, last_val = validation(state, step)
        if step % config.checkpoint_every == 0 and step < total:
          run.save_checkpoint(ckpt, step, state, data_position=dataclasses.asdict(position),
                              metadata={"config": config.identity()})
    if bar is not None:
      bar.close()
    ckpt.wait_until_finished()

  state, predict = run.predictor(state)
  nnx.update(job.model, run.trained_variables(state))  # the model object now holds what was trained
  test = recipes.evaluate(lambda b: predict(job.place_batch(b)), job.arrays["test"], task=job.task,
                          batch_size=config.batch_size, limit=config.test_examples)
  _append_jsonl(metrics_path, {"step": total, "split": "test", **test})
  adapter_dir = out / "adapter"
  run.save_adapter(adapter_dir, state, metadata={"config": config.identity(), "base_model": config.model})
  plot_curves(metrics_path, out / "curves.png")

  results = {
      "test": test,
      "validation": last_val,
      "method": config.method,
      "lr": config.lr,
      "trainable": run.trainable(state),
      "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(job.model, nnx.Param)))),
      "opt_state_bytes": run.opt_state_bytes(state),
      "steps": total,
      "seconds": time.perf_counter() - t_start,
      "task": job.task,
      "mesh": None if job.mesh is None else dict(job.mesh.shape),
      "output": str(out),
      "adapter": str(adapter_dir),
  }
  if job.task == "classification":
    labels = job.arrays["test"]["labels"][: config.test_examples or None]  # the rows the test metrics cover
    results["majority"] = recipes.majority_rate(labels)
  _write_atomic(out / "results.json", json.dumps(results, indent=2))
  return results
