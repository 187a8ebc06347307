"""Training the runs: loaded models and compiled trainers shared by a process, a row's grid and seeds, workers."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .plan import TUNING_SEED, Row, Scale, _eligible, resolve_density
from .store import Store

PACKAGE = pathlib.Path(__file__).resolve().parent


class Lab:
  """Loaded datasets, pretrained models per seed, and compiled steps shared by every run of a process."""

  def __init__(self, scales: dict[str, Scale]):
    self.scales = scales
    self._datasets: dict[str, Any] = {}
    self._arrays: dict[tuple, Any] = {}
    self._bases: dict[tuple, Any] = {}
    self._trainers: dict[tuple, Any] = {}

  # -- data and models ----------------------------------------------------------------------

  def dataset(self, name: str):
    import spra_jax as spra

    if name not in self._datasets:
      self._datasets[name] = spra.data.load(name, seed=0)
    return self._datasets[name]

  def arrays(self, model: str, dataset: str, scale: Scale, tokenizer: Any) -> dict[str, Any]:
    import spra_jax as spra

    limits = {"train": scale.train_examples, "validation": scale.eval_examples, "test": scale.test_examples}
    key = (model, dataset, scale.max_length, *limits.values())
    if key not in self._arrays:
      ds = self.dataset(dataset)
      # Only the examples a run can use are tokenised (rows are padded to max_length, so a prefix of the split
      # tokenises to a prefix of the arrays).
      self._arrays[key] = {
          name: spra.data.tokenize_classification(ds[name].select(range(min(limit, len(ds[name])))) if limit
                                                  else ds[name], tokenizer, max_length=scale.max_length)
          for name, limit in limits.items()}
    return self._arrays[key]

  def base(self, model: str, dataset: str, seed: int):
    """(nnx model, tokenizer) of ``model`` with a new head for ``dataset`` drawn from ``seed`` (kept for reuse)."""
    import spra_jax as spra

    labels = self.dataset(dataset)["train"].features["label"].num_classes
    key = (model, labels, seed)
    if key not in self._bases:
      model_obj, tokenizer = spra.models.from_pretrained(model, task="sequence-classification", num_labels=labels,
                                                         seed=seed)
      if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
      self._bases[key] = (model_obj, tokenizer)
    return self._bases[key]

  # -- one run ------------------------------------------------------------------------------

  def train(self, row: Row, lr: float, seed: int) -> Trained:
    """Trains one run through the library's recipe and returns it (not yet evaluated)."""
    import jax
    import numpy as np
    from flax import nnx

    import spra_jax as spra

    scale = self.scales[row.family]
    model, tokenizer = self.base(row.model, row.dataset, seed)
    arrays = self.arrays(row.model, row.dataset, scale, tokenizer)
    model_type = spra.models.model_type(model)
    rules = spra.models.presets.get(row.preset, model_type, task="sequence-classification")
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    # One compiled trainer per model and method serves every learning rate and seed of the study: the peak rate
    # lives in the optimizer state (a tunable AdamW), and masks of equal per-leaf counts share the lean step.
    key = ("lean", row.model) if row.method in ("spra", "head") else (row.method, row.model, row.preset, row.rank)
    trainer = self._trainers.get(key)
    density, distribution = 0.0, "uniform"
    if row.method == "spra":
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      if trainer is None:  # the lean trainer first: the Fisher distribution needs its loss
        trainer = spra.recipes.LeanTrainer(graphdef, self._tx(scale), task="classification")
      density = resolve_density(row, params, model_type)
      distribution = self._distribution(row, density, params, rest, arrays, seed, trainer)
      info.update(density=density, eligible=_eligible(params, rules))
    run = spra.recipes.prepare(model, row.method, tx=self._tx(scale), task="classification", rules=rules,
                               density=density, distribution=distribution, seed=seed, lora_rank=row.rank or 8,
                               keep_base=True, trainer=trainer)  # LoRA's alpha: prepare's default, 2 x rank
    self._trainers[key] = run.trainer
    if run.mask is not None:
      info["sparse_trainable"] = sum(r["trainable"] for r in spra.masks.summary_rows(run.mask) if r["kind"] == "sparse")
    state = spra.recipes.set_learning_rate(run.init(), lr)
    setup = time.perf_counter() - t0

    stream = spra.data.batches(arrays["train"], scale.batch_size, seed=seed)
    losses, times = [], []
    for _ in range(scale.steps):
      _, batch = next(stream)
      t = time.perf_counter()
      state, loss = run.step(state, batch)
      losses.append(float(loss))  # waits for the step: the time below is the step's
      times.append(time.perf_counter() - t)
    if not all(map(math.isfinite, losses)):
      info["diverged"] = True
    state, predict = run.predictor(state)
    steady = times[1:] or times
    info.update(
        trainable=run.trainable(state), opt_state_bytes=run.opt_state_bytes(state),
        step_ms=1e3 * statistics.median(steady), first_step_s=times[0], setup_s=setup,
        train_s=time.perf_counter() - t0 - setup, final_loss=float(np.mean(losses[-max(1, len(losses) // 5):])),
        parameters=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        single_threaded="intra_op_parallelism_threads=1" in os.environ.get("XLA_FLAGS", ""))
    return Trained(predict, arrays, info)

  def _tx(self, scale: Scale):
    """AdamW with warm-up and cosine decay, its peak rate in the state (set per run)."""
    import spra_jax as spra

    return spra.recipes.adamw(1.0, scale.steps, warmup_ratio=scale.warmup_ratio, weight_decay=scale.weight_decay,
                              tunable=True)

  def _distribution(self, row: Row, density: float, params, rest, arrays, seed: int, trainer):
    import spra_jax as spra

    if row.distribution in ("magnitude", "magnitude-small"):
      return spra.masks.magnitude(density, params, largest=row.distribution == "magnitude")
    if row.distribution == "fisher":
      scale = self.scales[row.family]
      stream = spra.data.batches(arrays["train"], scale.batch_size, seed=seed + 10_000)
      batches = [(rest, next(stream)[1]) for _ in range(row.fisher_batches)]
      return spra.masks.top_k(density, spra.masks.fisher_scores(trainer.loss_fn, params, batches))
    if row.distribution == "blocks":
      return spra.masks.blocks(density, block=row.block)
    return row.distribution


@dataclasses.dataclass
class Trained:
  """A trained run, kept in memory until its evaluations are done."""

  predict: Callable
  arrays: dict[str, Any]  # already cut to the scale's validation and test counts
  info: dict[str, Any]

  def evaluate(self, split: str) -> dict[str, float]:
    import spra_jax as spra

    return spra.recipes.evaluate(self.predict, self.arrays[split], task="classification", batch_size=64)


def _metrics(trained: Trained, splits: Iterable[str]) -> dict[str, Any]:
  import spra_jax as spra

  out = dict(trained.info)
  for split in splits:
    t = time.perf_counter()
    out[split] = trained.evaluate(split)
    out[f"{split}_eval_s"] = time.perf_counter() - t
    if split == "test":
      labels = trained.arrays["test"]["labels"]
      out["majority"] = spra.recipes.majority_rate(labels)
  return out


def best_lr(row: Row, records: dict[float, dict[str, Any]]) -> float:
  """The grid's learning rate with the best validation accuracy (ties: MCC, then the smaller rate)."""
  def score(lr):
    r = records[lr]
    if r.get("diverged"):
      return (-1.0, -1.0, 0.0)
    return (r["validation"]["accuracy"], r["validation"]["mcc"], -lr)
  return max(row.lrs(), key=score)


def run_row(row: Row, lab: Lab, store: Store, scales: dict[str, Scale], *,
            log: Callable[[str], None] = print) -> int:
  """Runs what the row still lacks in the store; returns how many runs trained."""
  scale = scales[row.family]
  trained_now = 0
  grid: dict[float, dict[str, Any]] = {}
  kept: dict[float, Trained] = {}
  for lr in row.lrs():
    spec = row.spec(scale, lr, TUNING_SEED)
    record = store.get(spec)
    if record is None:
      kept[lr] = lab.train(row, lr, TUNING_SEED)
      record = store.put(spec, _metrics(kept[lr], ["validation"]))
      trained_now += 1
      log(f"  {row.table} | {row.label} | lr {lr:g} seed {TUNING_SEED}: val acc "
          f"{record['validation']['accuracy']:.4f} ({record['train_s']:.0f} s)")
    grid[lr] = record
  chosen = best_lr(row, grid)
  for lr in row.lrs():
    if lr != chosen:
      kept.pop(lr, None)  # free the memory of the runs that lost
  for seed in row.seeds:
    spec = row.spec(scale, chosen, seed)
    record = store.get(spec)
    if record is not None and "test" in record:
      continue
    trained = kept.pop(chosen) if seed == TUNING_SEED and chosen in kept else None
    if trained is None:
      trained = lab.train(row, chosen, seed)
      trained_now += 1
    splits = ["validation", "test"] if seed == TUNING_SEED else ["test"]
    record = store.put(spec, _metrics(trained, splits))
    log(f"  {row.table} | {row.label} | lr {chosen:g} seed {seed}: test acc {record['test']['accuracy']:.4f} "
        f"mcc {record['test']['mcc']:.4f}")
  return trained_now


def row_records(row: Row, store: Store, scales: dict[str, Scale]):
  """(grid records by lr, chosen lr, the chosen lr's records per seed) from the store; None where missing."""
  scale = scales[row.family]
  grid = {lr: store.get(row.spec(scale, lr, TUNING_SEED)) for lr in row.lrs()}
  if any(r is None for r in grid.values()):
    return grid, None, []
  chosen = best_lr(row, grid)
  runs = [store.get(row.spec(scale, chosen, s)) for s in row.seeds]
  return grid, chosen, [r for r in runs if r is not None and "test" in r]


# ---------------------------------------------------------------------------
# Workers: rows are claimed one at a time through lock files, so N processes share the list.
# ---------------------------------------------------------------------------


def _claim(claims: pathlib.Path, row: Row) -> bool:
  name = hashlib.sha1(repr(row).encode()).hexdigest()[:16]
  try:
    os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def work(rows: Sequence[Row], store: Store, scales: dict[str, Scale], *, claims: pathlib.Path | None = None,
         log: Callable[[str], None] = print) -> int:
  lab = None
  trained = 0
  for i, row in enumerate(rows, 1):
    if claims is not None and not _claim(claims, row):
      continue
    _, chosen, runs = row_records(row, store, scales)
    if chosen is not None and len(runs) == len(row.seeds):
      continue
    log(f"[{i}/{len(rows)}] {row.table} | {row.label}")
    lab = lab or Lab(scales)
    trained += run_row(row, lab, store, scales, log=log)
  return trained


def run_workers(argv: Sequence[str], n: int, claims: pathlib.Path) -> None:
  """Starts ``n`` worker processes of this script, one CPU thread each, and waits for them."""
  import shutil

  shutil.rmtree(claims, ignore_errors=True)
  claims.mkdir(parents=True)
  env = dict(os.environ)
  # Two single-threaded processes keep 2 cores busier than one process with two threads (small matmuls).
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                      " intra_op_parallelism_threads=1").strip()
  procs = [subprocess.Popen([sys.executable, str(PACKAGE), *argv, "--worker", str(i)], env=env) for i in range(n)]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"a worker failed (exit codes {codes}); the finished runs are saved, rerun to resume")
