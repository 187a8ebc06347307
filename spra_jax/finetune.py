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

Everything that decides the result lives in the config, which is saved as
``config.json`` in the output directory; resuming refuses a directory written
by a run with a different config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spra_jax import data as data_lib
from spra_jax import sharding as sharding_lib
from spra_jax import metrics as metrics_lib
from spra_jax.delta import SparseDelta, extract
from spra_jax.lean import lean_step
from spra_jax.masks import from_dense, get as get_distribution, num_trainable, path_str, sample_mask

__all__ = ["FinetuneConfig", "METHODS", "finetune", "Job"]

METHODS = ("spra", "head", "lora", "full")
_HEAD_PATTERN = r"(^|/)(classifier|score|lm_head)/"


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
    lr, weight_decay, warmup_ratio: AdamW with linear warm-up and decay.
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
      ``spra.sharding.DEFAULT_RULES`` and batches split over ``data`` x
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
  lr: float = 1e-3
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
    if not 0 < self.density <= 1:
      raise ValueError(f"density must be in (0, 1], got {self.density}")
    for name in ("batch_size", "max_length", "eval_every", "checkpoint_every", "lora_rank"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("eval_examples", "test_examples"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
    if self.steps is None and self.epochs is None:
      raise ValueError("give steps or epochs")
    if self.steps is not None and self.steps <= 0 or self.epochs is not None and self.epochs <= 0:
      raise ValueError(f"steps and epochs must be positive, got steps={self.steps} epochs={self.epochs}")
    parse_mesh(self.mesh)  # fails early on a malformed spec

  def identity(self) -> dict[str, Any]:
    """The fields that must match for a resume (everything but the output path)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "output"}


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
# Losses and predictions over a pure function of the parameters.
# ---------------------------------------------------------------------------


def _classification_loss(forward: Callable) -> Callable:
  """``forward(params, frozen, batch) -> logits`` to a mean cross-entropy of the same arguments."""

  def loss_fn(params, frozen, batch):
    logits = forward(params, frozen, batch).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss_fn


def _sft_loss(forward: Callable) -> Callable:
  """Next-token cross-entropy over the response tokens (``loss_mask``) only."""

  def loss_fn(params, frozen, batch):
    logits = forward(params, frozen, batch)[:, :-1].astype(jnp.float32)
    targets, weights = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  return loss_fn


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def _schedule(config: FinetuneConfig, total_steps: int) -> optax.Schedule:
  warmup = int(config.warmup_ratio * total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, max(warmup, 1), max(total_steps, warmup + 1), 0.0) \
      if warmup else optax.cosine_decay_schedule(config.lr, max(total_steps, 1))


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
  is loaded with ``spra.models.from_pretrained``.
  """

  def __init__(self, config: FinetuneConfig, *, model: nnx.Module | None = None, tokenizer: Any = None,
               preset_rules: Mapping[str, Any] | None = None, dataset: Any = None):
    self.config = config
    self.out = pathlib.Path(config.output).absolute()
    self.dataset = dataset if dataset is not None else data_lib.load(config.dataset, seed=config.seed)
    self.task = config.task or self._infer_task()
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
      model, tokenizer = models.from_pretrained(config.model, task=task, num_labels=self.num_labels, seed=config.seed)
      if preset_rules is None and config.preset:
        preset_rules = models.presets.get(config.preset, models.model_type(model), task=task)
    if tokenizer is None:
      raise ValueError("a tokenizer is needed with a model passed in directly")
    if tokenizer.pad_token_id is None:
      tokenizer.pad_token = tokenizer.eos_token
    self.model, self.tokenizer = model, tokenizer
    self.mesh = None
    axes = parse_mesh(config.mesh)
    if axes is not None:
      self.mesh = sharding_lib.make_mesh(**axes)
      batch_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      if config.batch_size % batch_ways:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of data x fsdp = {batch_ways} "
                         f"on the mesh {dict(self.mesh.shape)}")
    self.preset_rules = dict(preset_rules or {})
    self.arrays = {name: self._tokenize(split) for name, split in self.dataset.items()}

  def _infer_task(self) -> str:
    columns = self.dataset["train"].column_names
    for prompt, response in (("prompt", "response"), ("question", "answer")):
      if prompt in columns and response in columns:
        self.config.prompt_column = self.config.prompt_column or prompt
        self.config.response_column = self.config.response_column or response
        return "sft"
    return "classification"

  def _tokenize(self, split: Any) -> dict[str, np.ndarray]:
    c = self.config
    if self.task == "classification":
      return data_lib.tokenize_classification(split, self.tokenizer, text_column=c.text_column,
                                              label_column=c.label_column, max_length=c.max_length)
    return data_lib.tokenize_sft(split, self.tokenizer, prompt_column=c.prompt_column or "prompt",
                                 response_column=c.response_column or "response", max_length=c.max_length)

  # -- the model as a pure function -------------------------------------------------

  def _call(self, module: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    return module(batch["input_ids"], attention_mask=batch["attention_mask"])

  def _place_on_mesh(self) -> None:
    """Lays the model out on the mesh: parameters by the partition rules, everything else replicated."""
    if self.mesh is None:
      return
    from spra_jax import models  # the models package is the top layer; import it only when needed

    params = nnx.state(self.model, nnx.Param)
    rules = models.partition.rules_for(models.model_type(self.model))
    nnx.update(self.model, sharding_lib.shard_params(params, self.mesh, rules))
    others = nnx.state(self.model, nnx.Not(nnx.Param))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    nnx.update(self.model, jax.device_put(others, replicated))

  def place_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A batch split over the mesh's ``data`` x ``fsdp`` axes (unchanged without a mesh)."""
    if self.mesh is None:
      return batch
    return {k: jax.device_put(v, sharding_lib.batch_sharding(self.mesh, np.ndim(v))) for k, v in batch.items()}

  def _loss_of(self, forward: Callable) -> Callable:
    return _classification_loss(forward) if self.task == "classification" else _sft_loss(forward)

  def total_steps(self) -> int:
    c = self.config
    per_epoch = data_lib.num_batches(self.arrays["train"], c.batch_size)
    return c.steps if c.steps is not None else max(1, math.ceil(c.epochs * per_epoch))

  def build(self) -> _Trainer:
    """The trainer of the configured method (mask sampled, LoRA applied...)."""
    c = self.config
    self.schedule = _schedule(c, self.total_steps())
    tx = optax.adamw(self.schedule, weight_decay=c.weight_decay)
    head = self.preset_rules.get("full") or _HEAD_PATTERN
    if c.method in ("spra", "head"):
      self._place_on_mesh()  # before sampling: on sharded leaves the mask is shard-local
      graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
      if c.method == "spra":
        rules = _select_rules(c, self.preset_rules)
        if self.task == "classification" and "full" not in rules:
          rules["full"] = head
        mask = sample_mask(jax.random.key(c.seed), params, get_distribution(c.distribution, c.density), **rules)
      else:
        head_re = __import__("re").compile(head)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        chosen = [bool(head_re.search(path_str(p))) and jnp.issubdtype(leaf.dtype, jnp.floating) for p, leaf in flat]
        if not any(chosen):
          raise ValueError(f"method 'head' found no head parameters matching {head!r}")
        mask = from_dense(jax.tree_util.tree_unflatten(
            treedef, [np.full(leaf.shape, keep) for (_, leaf), keep in zip(flat, chosen)]))
      return _LeanTrainer(self, graphdef, params, rest, mask, tx)
    if c.method == "lora":
      from spra_jax import models

      rules = _select_rules(c, self.preset_rules)
      models.lora.apply_lora(self.model, rank=c.lora_rank, alpha=c.lora_alpha,
                             include=_module_pattern(rules.get("include") or r"(kernel)$"), rngs=nnx.Rngs(c.seed))
      self._place_on_mesh()
      head_re = __import__("re").compile(head)
      trainable = lambda path, value: isinstance(value, nnx.LoRAParam) or (  # noqa: E731
          isinstance(value, nnx.Param) and bool(head_re.search(path_str(path))))
      return _DenseTrainer(self, trainable, tx)
    self._place_on_mesh()
    return _DenseTrainer(self, nnx.Param, tx)


def _module_pattern(leaf_pattern: str) -> str:
  """A leaf regex (``.../v_proj/kernel``) as a regex of the Linear modules holding those leaves.

  >>> _module_pattern('attention/(self/value|output/dense)/(kernel|bias)$')
  'attention/(self/value|output/dense)$'
  """
  import re

  stripped = re.sub(r"/?(\(kernel\|bias\)|\(bias\|kernel\)|kernel|bias)\$?$", "", leaf_pattern)
  return stripped + "$" if stripped else r"."


class _Trainer:
  """What the job needs of a method: init, step, predictions, sizes, saving."""

  job: Job

  def init(self) -> Any: ...
  def step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, jax.Array]: ...
  def module(self, state: Any) -> tuple[Any, Callable]: ...
  def trained_variables(self, state: Any) -> Any: ...
  def trainable(self) -> int: ...
  def opt_state_bytes(self, state: Any) -> int: ...

  def lr(self, step: int) -> float:
    return float(self.job.schedule(step - 1))

  def save(self, ckpt: Any, step: int, state: Any, *, data_position: Any) -> None:
    ckpt.save(step, state, data_position=data_position, metadata={"config": self.job.config.identity()})

  def restore(self, ckpt: Any, like: Any) -> Any:
    return ckpt.restore(like)


def _tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


class _LeanTrainer(_Trainer):
  """SpaRTA and head-only: the lean step over the mask (weights updated in place)."""

  def __init__(self, job: Job, graphdef, params, rest, mask, tx):
    self.job, self.graphdef, self.rest, self.mask = job, graphdef, rest, mask
    self._params = params
    # Taken now, from the base weights: training updates them in place. O(k): only the mask's entries are read.
    from spra_jax.checkpoint.adapter import base_fingerprint

    self._fingerprint = base_fingerprint(params, mask)

    def forward(params, rest, batch):
      return job._call(nnx.merge(graphdef, params, rest), batch)

    make_step = lean_step if job.mesh is None else sharding_lib.sharded_lean_step
    self._lean = make_step(job._loss_of(forward), tx)
    self._forward = jax.jit(forward)

  def init(self):
    return self._lean.init(self._params, self.mask)

  def step(self, state, batch):
    return self._lean(state, self.rest, batch)

  def module(self, state):
    state = self._lean.flush(state)
    return state, lambda batch: self._forward(state.params, self.rest, batch)

  def trained_variables(self, state):
    return state.params

  def restore(self, ckpt, like):
    # Only the k trained entries of the weights are stored; the rest is the base.
    return ckpt.restore(like, base_params=like.params)

  def save_adapter(self, directory, state, save_fn, *, metadata):
    # ``state`` comes from module(), so it is flushed (flushing again would donate the buffers the model now holds).
    save_fn(directory, state.delta, metadata={**metadata, "method": self.job.config.method,
                                              "base_model": self.job.config.model},
            base_fingerprint=self._fingerprint, overwrite=True)

  def trainable(self):
    return num_trainable(self.mask)

  def opt_state_bytes(self, state):
    return _tree_bytes(state.opt_state) + _tree_bytes(state.delta.mask)


class _DenseTrainer(_Trainer):
  """LoRA and full fine-tuning: gradients of a dense subset of the variables."""

  def __init__(self, job: Job, trainable_filter, tx):
    self.job, self.tx = job, tx
    self.graphdef, self._trainable, self.frozen = nnx.split(job.model, trainable_filter, ...)

    def forward(trainable, frozen, batch):
      return job._call(nnx.merge(self.graphdef, trainable, frozen), batch)

    loss = job._loss_of(forward)

    def step(state, frozen, batch):
      trainable, opt_state = state
      value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), value

    self._step = jax.jit(step, donate_argnums=0)
    self._forward = jax.jit(forward)

  def init(self):
    return (self._trainable, self.tx.init(self._trainable))

  def step(self, state, batch):
    return self._step(state, self.frozen, batch)

  def module(self, state):
    return state, lambda batch: self._forward(state[0], self.frozen, batch)

  def trained_variables(self, state):
    return state[0]

  def trainable(self):
    return int(sum(x.size for x in jax.tree.leaves(self._trainable)))

  def opt_state_bytes(self, state):
    return _tree_bytes(state[1])

  def save_adapter(self, directory, state, save_fn, *, metadata):
    """LoRA and full fine-tuning: the trained variables, with their config."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if directory.exists():
      import shutil
      shutil.rmtree(directory)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(directory / "variables", nnx.to_pure_dict(state[0]))
    (directory / "adapter_config.json").write_text(json.dumps(
        {**metadata, "method": self.job.config.method, "trainable": self.trainable()}, indent=2))


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int, limit: int = 0) -> Iterator[tuple[int, dict]]:
  """Every row once, in order, in fixed-shape batches (the last one padded)."""
  n = data_lib._num_rows(arrays)
  n = min(n, limit) if limit else n
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    real = len(rows)
    rows = np.concatenate([rows, np.full(batch_size - real, rows[-1])])
    yield real, {k: v[rows] for k, v in arrays.items()}


def evaluate(predict: Callable, arrays: Mapping[str, np.ndarray], *, task: str, batch_size: int,
             limit: int = 0) -> dict[str, float]:
  """Classification: accuracy, MCC, F1. SFT: mean response loss and token accuracy."""
  if task == "classification":
    predictions, labels = [], []
    for real, batch in _padded_batches(arrays, batch_size, limit):
      logits = np.asarray(predict(batch))
      predictions.append(logits[:real].argmax(-1))
      labels.append(batch["labels"][:real])
    return metrics_lib.classification(np.concatenate(labels), np.concatenate(predictions))
  total_loss = correct = count = 0.0
  for real, batch in _padded_batches(arrays, batch_size, limit):
    logits = np.asarray(predict(batch), np.float32)[:real, :-1]
    targets = batch["input_ids"][:real, 1:]
    weights = batch["loss_mask"][:real, 1:].astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    total_loss += float((nll * weights).sum())
    correct += float(((logits.argmax(-1) == targets) * weights).sum())
    count += float(weights.sum())
  return {"loss": total_loss / max(count, 1), "token_accuracy": correct / max(count, 1)}


# ---------------------------------------------------------------------------
# Output directory, metrics log and plot.
# ---------------------------------------------------------------------------


def _prepare_output(out: pathlib.Path, config: FinetuneConfig, *, resume: bool, overwrite: bool) -> None:
  saved = out / "config.json"
  if saved.exists():
    previous = json.loads(saved.read_text())
    if overwrite:
      import shutil
      shutil.rmtree(out)
    elif previous != config.identity():
      changed = sorted(k for k in set(previous) | set(config.identity()) if previous.get(k) != config.identity().get(k))
      raise ValueError(f"{out} holds a different run (fields that differ: {changed}); choose another --output or "
                       "pass --overwrite")
    elif not resume:
      raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite to start over")
  elif resume and out.exists() and any(out.iterdir()):
    raise ValueError(f"{out} has no config.json, so there is no run to resume there")


def _write_config(out: pathlib.Path, config: FinetuneConfig) -> None:
  saved = out / "config.json"
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / "config.json.tmp"
  tmp.write_text(json.dumps(config.identity(), indent=2, sort_keys=True))
  os.replace(tmp, saved)


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


def _append_jsonl(path: pathlib.Path, row: Mapping[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


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
    ``seconds``, ``majority`` (the majority-class rate of the test split, for
    classification) and the paths written.

  Writes into ``config.output``: ``config.json``, ``metrics.jsonl`` (one JSON
  object per logged step or evaluation), ``curves.png``, ``checkpoints/``,
  ``adapter/`` (the SpaRTA / head adapter with its ``adapter_config.json``; the
  trained variables for LoRA and full fine-tuning) and ``results.json``.
  """
  from spra_jax.checkpoint import TrainCheckpointer, save_adapter

  t_start = time.perf_counter()
  out = pathlib.Path(config.output).absolute()
  _prepare_output(out, config, resume=resume, overwrite=overwrite)
  job = Job(config, model=model, tokenizer=tokenizer, preset_rules=preset_rules)
  trainer = job.build()
  _write_config(out, config)  # only once the model, the data and the method are known to work
  state = trainer.init()
  total = job.total_steps()
  metrics_path = out / "metrics.jsonl"

  start_step, position = 0, data_lib.Position()
  ckpt = TrainCheckpointer(out / "checkpoints", max_to_keep=2)
  if resume and ckpt.latest_step() is not None:
    restored = trainer.restore(ckpt, state)
    state, start_step = restored.state, restored.step
    position = data_lib.Position(**restored.data_position)
    # Drop log lines written after the checkpoint: the resumed run writes them again.
    if metrics_path.exists():
      kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
      metrics_path.write_text("".join(line + "\n" for line in kept))
  elif metrics_path.exists():
    metrics_path.unlink()

  batches = data_lib.batches(job.arrays["train"], config.batch_size, seed=config.seed, start=position)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start_step, desc=f"{config.method} {config.model}", unit="step", dynamic_ncols=True)
  last_val: dict[str, float] = {}
  t_train, examples = time.perf_counter(), 0
  for step in range(start_step + 1, total + 1):
    position, batch = next(batches)
    state, loss = trainer.step(state, job.place_batch(batch))
    loss = float(loss)  # blocks on the step: keeps one step in flight, and on meshes avoids collective pile-ups
    if not math.isfinite(loss):
      raise FloatingPointError(f"the training loss became {loss} at step {step}; lower --lr")
    examples += config.batch_size
    _append_jsonl(metrics_path, {"step": step, "split": "train", "loss": loss, "lr": float(trainer.lr(step))})
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{examples / (time.perf_counter() - t_train):.1f}")
    if step % config.eval_every == 0 or step == total:
      state, predict = trainer.module(state)
      last_val = evaluate(lambda b: predict(job.place_batch(b)), job.arrays["validation"], task=job.task, batch_size=config.batch_size,
                          limit=config.eval_examples)
      _append_jsonl(metrics_path, {"step": step, "split": "validation", **last_val})
      line = f"step {step}: validation " + " ".join(f"{k} {v:.4f}" for k, v in last_val.items())
      bar.write(line) if bar is not None else print(line, flush=True)
    if step % config.checkpoint_every == 0 and step < total:
      trainer.save(ckpt, step, state, data_position=dataclasses.asdict(position))
  if bar is not None:
    bar.close()
  ckpt.wait_until_finished()
  ckpt.close()

  state, predict = trainer.module(state)
  nnx.update(job.model, trainer.trained_variables(state))  # the model object now holds what was trained
  test = evaluate(lambda b: predict(job.place_batch(b)), job.arrays["test"], task=job.task, batch_size=config.batch_size,
                  limit=config.test_examples)
  _append_jsonl(metrics_path, {"step": total, "split": "test", **test})
  adapter_dir = out / "adapter"
  trainer.save_adapter(adapter_dir, state, save_adapter, metadata={"config": config.identity()})
  plot_curves(metrics_path, out / "curves.png")

  results = {
      "test": test,
      "validation": last_val,
      "trainable": trainer.trainable(),
      "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(job.model, nnx.Param)))),
      "opt_state_bytes": trainer.opt_state_bytes(state),
      "steps": total,
      "seconds": time.perf_counter() - t_start,
      "task": job.task,
      "mesh": None if job.mesh is None else dict(job.mesh.shape),
      "output": str(out),
      "adapter": str(adapter_dir),
  }
  if job.task == "classification":
    labels = job.arrays["test"]["labels"][: config.test_examples or None]  # the rows the test metrics cover
    results["majority"] = float(np.bincount(labels).max() / len(labels))
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=2))
  os.replace(tmp, out / "results.json")
  return results
