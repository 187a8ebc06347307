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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from spra_jax import data as data_lib
from spra_jax import recipes
from spra_jax import sharding as sharding_lib
from spra_jax.recipes import METHODS

__all__ = ["FinetuneConfig", "METHODS", "finetune", "Job"]


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
    self.schedule = recipes.warmup_cosine(c.lr, total, c.warmup_ratio)  # what the metrics log reports
    tx = recipes.adamw(c.lr, total, warmup_ratio=c.warmup_ratio, weight_decay=c.weight_decay)
    partition_rules = None
    if self.mesh is not None:
      from spra_jax import models

      partition_rules = models.partition.rules_for(models.model_type(self.model))
    return recipes.prepare(self.model, c.method, tx=tx, task=self.task, rules=_select_rules(c, self.preset_rules),
                           density=c.density, distribution=c.distribution, seed=c.seed,
                           head=self.preset_rules.get("full"), lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                           mesh=self.mesh, partition_rules=partition_rules)


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
  ``adapter/`` (the SpaRTA / head adapter, :func:`spra.load_adapter`; for LoRA
  and full fine-tuning a dense adapter of the trained variables,
  :func:`spra.checkpoint.load_dense_adapter`) and ``results.json``.
  """
  from spra_jax.checkpoint import TrainCheckpointer

  t_start = time.perf_counter()
  out = pathlib.Path(config.output).absolute()
  _prepare_output(out, config, resume=resume, overwrite=overwrite)
  job = Job(config, model=model, tokenizer=tokenizer, preset_rules=preset_rules)
  run = job.build()
  _write_config(out, config)  # only once the model, the data and the method are known to work
  state = run.init()
  total = job.total_steps()
  metrics_path = out / "metrics.jsonl"

  start_step, position = 0, data_lib.Position()
  ckpt = TrainCheckpointer(out / "checkpoints", max_to_keep=2)
  if resume and ckpt.latest_step() is not None:
    restored = run.restore_checkpoint(ckpt, state)
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
    state, loss = run.step(state, job.place_batch(batch))
    loss = float(loss)  # blocks on the step: keeps one step in flight, and on meshes avoids collective pile-ups
    if not math.isfinite(loss):
      raise FloatingPointError(f"the training loss became {loss} at step {step}; lower --lr")
    examples += config.batch_size
    _append_jsonl(metrics_path, {"step": step, "split": "train", "loss": loss, "lr": float(job.schedule(step - 1))})
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{examples / (time.perf_counter() - t_train):.1f}")
    if step % config.eval_every == 0 or step == total:
      state, predict = run.predictor(state)
      last_val = recipes.evaluate(lambda b: predict(job.place_batch(b)), job.arrays["validation"], task=job.task,
                                  batch_size=config.batch_size, limit=config.eval_examples)
      _append_jsonl(metrics_path, {"step": step, "split": "validation", **last_val})
      line = f"step {step}: validation " + " ".join(f"{k} {v:.4f}" for k, v in last_val.items())
      bar.write(line) if bar is not None else print(line, flush=True)
    if step % config.checkpoint_every == 0 and step < total:
      run.save_checkpoint(ckpt, step, state, data_position=dataclasses.asdict(position),
                          metadata={"config": config.identity()})
  if bar is not None:
    bar.close()
  ckpt.wait_until_finished()
  ckpt.close()

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
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=2))
  os.replace(tmp, out / "results.json")
  return results
