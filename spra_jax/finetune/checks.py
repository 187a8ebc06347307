"""Checks before loading anything: the config against the machine, the model name, the dataset file."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spra_jax import data as data_lib
from spra_jax import sharding as sharding_lib
from spra_jax.finetune.config import _FAMILY_OF_ARCHITECTURE, FinetuneConfig, default_dtype, default_lr, parse_mesh



# ---------------------------------------------------------------------------
# Checks before loading anything.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Validated:
  """What :func:`validate` found: the config with its learning rate resolved, and what the job needs next.

  Attributes:
    config: a copy of the config with ``lr``, ``param_dtype`` and ``compute_dtype`` resolved.
    lr_source: how the rate was chosen, in words (``'given'`` or the default it is).
    dtype_source: how the dtypes were chosen, in words.
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
  dtype_source: str = "given"


def _infer_task(columns: list[str]) -> tuple[str, str | None, str | None]:
  """``(task, prompt_column, response_column)`` from a dataset's columns (SFT for prompt/response pairs)."""
  for prompt, response in (("prompt", "response"), ("question", "answer")):
    if prompt in columns and response in columns:
      return "sft", prompt, response
  return "classification", None, None


def _check_batch_on_mesh(batch_size: int, mesh: Any, *, microbatches: int = 1) -> None:
  """Each (micro)batch of ``batch_size`` rows must split evenly over the mesh's data x fsdp devices."""
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % batch_ways:
    what = (f"batch_size / grad_accum_steps = {batch_size}" if microbatches > 1 else f"batch_size {batch_size}")
    raise ValueError(f"{what} must be a multiple of data x fsdp = {batch_ways} on the mesh {dict(mesh.shape)}")


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
    _check_batch_on_mesh(config.batch_size // config.grad_accum_steps, mesh, microbatches=config.grad_accum_steps)
  param_dtype, compute_dtype, dtype_source = _resolve_dtypes(config)
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
  resolved = dataclasses.replace(config, lr=lr, param_dtype=param_dtype, compute_dtype=compute_dtype)
  return Validated(resolved, source, family, task, columns, dataset, mesh, dtype_source)


def _resolve_dtypes(config: FinetuneConfig) -> tuple[str, str, str]:
  """The run's parameter and compute dtypes (the backend's default where the config names none), checked to run here."""
  backend = jax.default_backend()
  default = default_dtype(backend)
  param_dtype, compute_dtype = config.param_dtype or default, config.compute_dtype or default
  for name in {param_dtype, compute_dtype}:
    try:  # a matmul and a float32 sum: what every step does in these dtypes
      x = jnp.ones((2, 2), name)
      float((x @ x).astype(jnp.float32).sum())
    except Exception as e:  # noqa: BLE001 - any failure means this backend cannot train in the dtype
      raise ValueError(f"the {backend} backend cannot compute in {name} here ({type(e).__name__}: {e}); "
                       "choose another --param-dtype / --compute-dtype") from None
  if config.param_dtype and config.compute_dtype:
    source = "given"
  else:
    source = f"{'given and ' if config.param_dtype or config.compute_dtype else ''}the default on {backend}"
  return param_dtype, compute_dtype, source
