"""The job: a run in progress (model, data, method) and the loop that trains, evaluates and saves."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spra_jax import _host
from spra_jax import data as data_lib
from spra_jax import recipes
from spra_jax import sharding as sharding_lib
from spra_jax.finetune.checks import _check_batch_on_mesh, _family_of_model, _infer_task, validate
from spra_jax.finetune.config import FinetuneConfig, default_lr, parse_mesh
from spra_jax.finetune.rundir import (
    OutputLock,
    _append_jsonl,
    _kept_metrics,
    _prepare_output,
    _write_atomic,
    _write_config,
    plot_curves,
)



# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def _select_rules(config: FinetuneConfig, preset_rules: Mapping[str, Any]) -> dict[str, Any]:
  rules = dict(preset_rules)
  for name in ("include", "exclude", "full"):
    if getattr(config, name) is not None:
      rules[name] = getattr(config, name)
  return rules


def _cast_params(model: nnx.Module, dtype: str) -> None:
  """Casts a model's floating-point parameters to ``dtype`` in place (a model the caller built; its compute dtype is its own)."""
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, params))


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
      model, tokenizer = models.from_pretrained(config.model, task=task, num_labels=self.num_labels, seed=config.seed,
                                                dtype=config.compute_dtype or "float32",
                                                param_dtype=config.param_dtype or "float32")
      if preset_rules is None and config.preset:
        preset_rules = models.presets.get(config.preset, models.model_type(model), task=task)
    elif config.param_dtype is not None:
      _cast_params(model, config.param_dtype)
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
      _check_batch_on_mesh(config.batch_size // config.grad_accum_steps, self.mesh,
                           microbatches=config.grad_accum_steps)
    self.preset_rules = dict(preset_rules or {})
    # On a cluster each process tokenises only its share of each global batch, when the batch comes (the rows its
    # devices hold); on one process the splits are tokenised up front, in one call each.
    self.share: slice | None = None
    if self.mesh is not None and _host.multiprocess():
      self.share = _host.process_rows(sharding_lib.batch_sharding(self.mesh, 1), (config.batch_size,))
      columns = {"labels": config.label_column} if self.task == "classification" else None
      self.arrays = {name: data_lib.TokenizedSplit(split, self._tokenize, columns=columns)
                     for name, split in self.dataset.items()}
    else:
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
    """A batch split over the mesh's ``data`` x ``fsdp`` axes (unchanged without a mesh).

    On a cluster ``batch`` is this process's share of the global batch (rows ``self.share``), and the result is
    the global batch of ``config.batch_size`` rows.
    """
    if self.mesh is None:
      return batch

    def place(v):
      sharding = sharding_lib.batch_sharding(self.mesh, np.ndim(v))
      if self.share is None:
        return jax.device_put(v, sharding)
      local = np.asarray(v)
      return jax.make_array_from_process_local_data(sharding, local, (self.config.batch_size, *local.shape[1:]))

    return {k: place(v) for k, v in batch.items()}

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
                           mesh=self.mesh, partition_rules=partition_rules, microbatches=c.grad_accum_steps,
                           backward=c.sparse_backward)



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
    # Process 0 checks and prepares the output directory; the others go on once it has, or fail with it.
    error = None
    if lock is not None:
      try:
        _prepare_output(out, config, resume=resume, overwrite=overwrite)
      except ValueError as e:
        error = e
    if not bool(_host.broadcast_from_primary(np.int32(error is None))):
      raise error or ValueError(f"process 0 refused the output directory {out} (its log says why)")
    print(f"learning rate {config.lr:g} ({checked.lr_source})", flush=True)
    accum = f", {config.grad_accum_steps} microbatches per step" if config.grad_accum_steps > 1 else ""
    print(f"precision: {config.param_dtype} weights, {config.compute_dtype} compute ({checked.dtype_source}){accum}",
          flush=True)
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
                               batch_size=config.batch_size, limit=config.eval_examples, share=job.share)
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
    elif metrics_path.exists() and _host.is_primary():
      metrics_path.unlink()

    batches = data_lib.batches(job.arrays["train"], config.batch_size, seed=config.seed, start=position,
                               share=job.share)
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
                          batch_size=config.batch_size, limit=config.test_examples, share=job.share)
  _append_jsonl(metrics_path, {"step": total, "split": "test", **test})
  adapter_dir = out / "adapter"
  run.save_adapter(adapter_dir, state, metadata={"config": config.identity(), "base_model": config.model})
  plot_curves(metrics_path, out / "curves.png")

  results = {
      "test": test,
      "validation": last_val,
      "method": config.method,
      "lr": config.lr,
      "param_dtype": config.param_dtype,
      "compute_dtype": config.compute_dtype,
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
