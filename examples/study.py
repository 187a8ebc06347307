"""The study: does sparse random adaptation match LoRA at an equal number of trainable parameters?

This runner regenerates ``examples/RESULTS.md`` and its plots from scratch. It
fine-tunes shipped pretrained models on shipped labelled text, offline, and
writes three tables:

* Table 1 (encoder): all-MiniLM-L6-v2 with a new classification head on Rotten
  Tomatoes (2 classes) and on the tweets (3 classes): full fine-tuning, head
  only, LoRA at two ranks on the paper's projections (attention value and
  output), SpaRTA at the densities that give exactly LoRA's trainable counts,
  and SpaRTA at 0.1 %, 1 % and 5 % of those projections.
* Table 2 (decoder, the paper's setting): SmolLM2-135M with a classification
  head on Rotten Tomatoes: SpaRTA with the paper's preset (V and O sparse, the
  head fully trained) against LoRA on the same projections at the same count,
  and full fine-tuning.
* Table 3 (ablation at a fixed budget): MiniLM on Rotten Tomatoes, every row
  training the same number of entries (1 % of the V/O projections): which
  entries (uniform, Bernoulli, whole rows, whole columns, random 16x16 tiles,
  largest / smallest pretrained magnitude, Fisher top-k over a few batches) and
  where (V/O, all linear layers, MLP only).

Protocol. Each row's learning rate is tuned on validation accuracy with seed 0
over the same three-point grid around the method's customary value (x 1/3,
x 1, x 3, see ``LR_CENTRES``); the best one then runs with seeds 1 and 2, and
the tables report the test metrics over the three seeds (mean +- std). A seed
draws the mask, the new head, LoRA's initialisation and the order of the
training data; the train / validation / test split is fixed (split seed 0), so
every run is scored on the same examples.

Caching. Every run's configuration and metrics are saved as one JSON file in
``<output>/runs/`` (named by a hash of the configuration), written atomically.
A rerun skips finished runs, so an interrupted study resumes where it stopped
and ``--render-only`` rebuilds the tables and plots instantly from the files.

Run:
  python examples/study.py --workers 2     # the full study (about 75 minutes on 2 CPU cores)
  python examples/study.py --render-only   # tables and plots from the saved runs
  python examples/study.py --smoke --output /tmp/smoke --results /tmp/smoke/RESULTS.md   # a check of the pipeline in minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# What a run is.
# ---------------------------------------------------------------------------

LR_FACTORS = (1 / 3, 1.0, 3.0)
# The centre of each method's grid: the customary AdamW learning rate of the method for short fine-tuning runs
# (a head alone learns from scratch on frozen features and takes a large one).
LR_CENTRES = {
    "encoder": {"full": 1e-4, "head": 1e-1, "lora": 3e-3, "spra": 1e-2},
    "decoder": {"full": 3e-5, "head": 3e-3, "lora": 1e-3, "spra": 3e-3},
}
SEEDS = (0, 1, 2)
TUNING_SEED = 0


@dataclasses.dataclass(frozen=True)
class Scale:
  """The shape of every run on one model: steps, batch, sequence length, evaluation sizes."""

  steps: int
  batch_size: int
  max_length: int
  eval_examples: int  # validation examples scored when tuning the learning rate
  test_examples: int
  warmup_ratio: float = 0.1
  weight_decay: float = 0.0
  train_examples: int = 0  # the first N training examples only (0: all)


FULL_SCALES = {
    "encoder": Scale(steps=60, batch_size=16, max_length=40, eval_examples=400, test_examples=1000),
    "decoder": Scale(steps=30, batch_size=8, max_length=40, eval_examples=150, test_examples=500),
}
SMOKE_SCALES = {
    "encoder": Scale(steps=2, batch_size=4, max_length=16, eval_examples=8, test_examples=8, train_examples=64),
    "decoder": Scale(steps=2, batch_size=2, max_length=16, eval_examples=4, test_examples=4, train_examples=64),
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a table: a method at a budget, its learning rate tuned, run over the seeds.

  ``budget`` says how a SpaRTA row sets its density: ``"density"`` (the
  ``density`` field, a fraction of the preset's eligible entries),
  ``"lora-rank=R"`` (exactly the count LoRA of rank R adds on the same
  projections) or ``"paper-density=D"`` (the count that density D gives on the
  paper's V/O projections, placed by this row's own preset).
  """

  table: str
  label: str
  family: str  # encoder | decoder (which scale and learning-rate centres)
  model: str
  dataset: str
  method: str  # full | head | lora | spra
  preset: str = "paper"
  density: float | None = None
  budget: str = "density"
  distribution: str = "uniform"
  rank: int | None = None
  fisher_batches: int = 8
  block: tuple[int, int] = (16, 16)
  seeds: tuple[int, ...] = SEEDS

  def spec(self, scale: Scale, lr: float, seed: int) -> dict[str, Any]:
    """The configuration of one run (what its cache key is made of)."""
    shape = dataclasses.asdict(scale)
    if not shape["train_examples"]:
      del shape["train_examples"]  # all of them
    spec = {"model": self.model, "dataset": self.dataset, "method": self.method, "split_seed": 0, **shape,
            "lr": float(f"{lr:.6g}"), "seed": seed}
    if self.method in ("spra", "lora"):
      spec["preset"] = self.preset
    if self.method == "lora":
      spec.update(rank=self.rank, alpha=2.0 * self.rank)
    if self.method == "spra":
      spec.update(distribution=self.distribution, budget=self.budget)
      if self.budget == "density":
        spec["density"] = self.density
      if self.distribution == "fisher":
        spec["fisher_batches"] = self.fisher_batches
      if self.distribution == "blocks":
        spec["block"] = list(self.block)
    return spec

  def lrs(self) -> list[float]:
    centre = LR_CENTRES[self.family][self.method]
    return [float(f"{centre * f:.3g}") for f in LR_FACTORS]


def run_id(spec: dict[str, Any]) -> str:
  return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def plan(*, smoke: bool = False, decoder: str = "smollm2-135m") -> list[Row]:
  """Every row of the three tables, in the order they run (the slow decoder rows first).

  ``smoke`` keeps one or two rows of each kind (each table still has its comparisons) with tiny runs; the decoder
  rows (a tiny model there) run two seeds, the encoder rows one, so the smoke loads the encoder once.
  """
  seeds = (0,) if smoke else SEEDS
  rows: list[Row] = []
  ranks = (4,) if smoke else (4, 16)
  densities = () if smoke else (0.001, 0.01, 0.05)
  datasets = ("rotten-tomatoes",) if smoke else ("rotten-tomatoes", "tweets")
  t2 = "Table 2"
  # The decoder costs about six encoder steps per step on this CPU: two seeds for the pair the table is about, one
  # for full fine-tuning.
  rows += [Row(t2, "SpaRTA, V/O + head (paper preset), LoRA-8 count", "decoder", decoder, "rotten-tomatoes", "spra",
               budget="lora-rank=8", seeds=(0, 1)),
           Row(t2, "LoRA rank 8, V/O + head", "decoder", decoder, "rotten-tomatoes", "lora", rank=8, seeds=(0, 1)),
           Row(t2, "full fine-tuning", "decoder", decoder, "rotten-tomatoes", "full", seeds=(0,))]
  for dataset in datasets:
    t1 = f"Table 1: {dataset}"
    if not smoke:  # (the smoke has full fine-tuning in Table 2, on its tiny decoder)
      rows.append(Row(t1, "full fine-tuning", "encoder", "minilm", dataset, "full", seeds=seeds))
    rows.append(Row(t1, "head only", "encoder", "minilm", dataset, "head", seeds=seeds))
    for r in ranks:
      rows += [Row(t1, f"LoRA rank {r}, V/O + head", "encoder", "minilm", dataset, "lora", rank=r, seeds=seeds),
               Row(t1, f"SpaRTA at LoRA-{r}'s count, V/O + head", "encoder", "minilm", dataset, "spra",
                   budget=f"lora-rank={r}", seeds=seeds)]
    rows += [Row(t1, f"SpaRTA {d:.1%} of V/O + head", "encoder", "minilm", dataset, "spra", density=d, seeds=seeds)
             for d in densities]
  t3 = "Table 3"
  distributions = ("uniform", "fisher") if smoke else (
      "uniform", "bernoulli", "rows", "columns", "blocks", "magnitude", "magnitude-small", "fisher")
  names = {"uniform": "uniform (SpaRTA)", "bernoulli": "Bernoulli (the paper's code)", "rows": "whole rows",
           "columns": "whole columns", "blocks": "random 16x16 blocks", "magnitude": "largest magnitude",
           "magnitude-small": "smallest magnitude", "fisher": "Fisher top-k (8 batches)"}
  rows += [Row(t3, f"{names[d]}, V/O", "encoder", "minilm", "rotten-tomatoes", "spra", density=0.01, distribution=d,
               seeds=seeds) for d in distributions]
  presets = ("all-linear",) if smoke else ("all-linear", "mlp")
  rows += [Row(t3, f"uniform, {p}", "encoder", "minilm", "rotten-tomatoes", "spra", preset=p,
               budget="paper-density=0.01", seeds=seeds) for p in presets]
  return rows


# ---------------------------------------------------------------------------
# The run cache: one JSON file per run.
# ---------------------------------------------------------------------------


class Store:
  """``<output>/runs/<id>.json`` per run, written by rename so a killed run never leaves half a file."""

  def __init__(self, output: pathlib.Path):
    self.dir = output / "runs"
    self.dir.mkdir(parents=True, exist_ok=True)

  def get(self, spec: dict[str, Any]) -> dict[str, Any] | None:
    path = self.dir / f"{run_id(spec)}.json"
    if not path.exists():
      return None
    record = json.loads(path.read_text())
    return record if record["config"] == spec else None

  def put(self, spec: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    record = {"id": run_id(spec), "config": spec, **metrics}
    tmp = self.dir / f".{record['id']}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, self.dir / f"{record['id']}.json")
    return record


# ---------------------------------------------------------------------------
# Training (imports JAX lazily so --render-only and the worker parent stay light).
# ---------------------------------------------------------------------------


class Lab:
  """Loaded datasets, pretrained models per seed, and compiled steps shared by every run of a process."""

  def __init__(self, scales: dict[str, Scale]):
    self.scales = scales
    self._datasets: dict[str, Any] = {}
    self._arrays: dict[tuple, Any] = {}
    self._bases: dict[tuple, Any] = {}
    self._engines: dict[tuple, Any] = {}

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
    """Trains one run and returns it (not yet evaluated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import spra_jax as spra

    scale = self.scales[row.family]
    model, tokenizer = self.base(row.model, row.dataset, seed)
    arrays = self.arrays(row.model, row.dataset, scale, tokenizer)
    model_type = spra.models.model_type(model)
    rules = spra.models.presets.get(row.preset, model_type, task="sequence-classification")
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if row.method in ("spra", "head", "full"):
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      params = jax.tree.map(jnp.copy, params)  # the step writes into (donates) its weights; keep the base intact
      if row.method == "full":
        engine = self._engine(("dense", row.model, "full"), lambda: DenseEngine(graphdef, self._tx(scale)))
        state, frozen = engine.init(params), rest
      else:
        if row.method == "head":
          mask = spra.masks.from_dense(_role_is(params, rules, spra.masks.FULL))
        else:
          density = resolve_density(row, params, model_type)
          dist = self._distribution(row, density, params, rest, arrays, seed, graphdef)
          mask = spra.sample_mask(jax.random.key(seed), params, dist, **rules)
          info.update(density=density, eligible=_eligible(params, rules))
        engine = self._engine(("lean", row.model), lambda: LeanEngine(graphdef, self._tx(scale)))
        state, frozen = engine.init(params, mask), rest
        info["sparse_trainable"] = sum(r["trainable"] for r in spra.masks.summary_rows(mask) if r["kind"] == "sparse")
    else:  # lora
      from spra_jax.finetune import _module_pattern

      graphdef0, params0, rest0 = nnx.split(model, nnx.Param, ...)
      fresh = nnx.merge(graphdef0, params0, rest0)  # a new module over the same (unchanged) arrays
      spra.models.lora.apply_lora(fresh, rank=row.rank, alpha=2.0 * row.rank, include=_module_pattern(rules["include"]),
                                  rngs=nnx.Rngs(seed))
      head = re.compile(rules["full"])
      trainable = lambda path, v: isinstance(v, nnx.LoRAParam) or (  # noqa: E731
          isinstance(v, nnx.Param) and bool(head.search(spra.masks.path_str(path))))
      graphdef, train_vars, frozen = nnx.split(fresh, trainable, ...)
      train_vars = jax.tree.map(jnp.copy, train_vars)  # the head's arrays are the base's: do not donate those
      engine = self._engine(("dense", row.model, "lora", row.preset, row.rank),
                            lambda: DenseEngine(graphdef, self._tx(scale)))
      state = engine.init(train_vars)
    state = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(lr, jnp.float32))
    setup = time.perf_counter() - t0

    stream = spra.data.batches(arrays["train"], scale.batch_size, seed=seed)
    losses, times = [], []
    for _ in range(scale.steps):
      _, batch = next(stream)
      t = time.perf_counter()
      state, loss = engine.step(state, frozen, batch)
      losses.append(float(loss))  # waits for the step: the time below is the step's
      times.append(time.perf_counter() - t)
    if not all(map(math.isfinite, losses)):
      info["diverged"] = True
    state = engine.finish(state)
    steady = times[1:] or times
    info.update(
        trainable=engine.trainable(state), opt_state_bytes=engine.opt_state_bytes(state),
        step_ms=1e3 * statistics.median(steady), first_step_s=times[0], setup_s=setup,
        train_s=time.perf_counter() - t0 - setup, final_loss=float(np.mean(losses[-max(1, len(losses) // 5):])),
        parameters=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        single_threaded="intra_op_parallelism_threads=1" in os.environ.get("XLA_FLAGS", ""))
    return Trained(lambda batch: engine.predict(state, frozen, batch), arrays, info)

  def _tx(self, scale: Scale):
    """AdamW with warm-up and cosine decay; the peak learning rate lives in the state, so one compilation serves
    every learning rate of the grid (``optax.tree_utils.tree_set(state, learning_rate=...)``)."""
    import optax

    warmup = max(1, int(scale.warmup_ratio * scale.steps))
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(scale.steps, warmup + 1), 0.0)
    return optax.chain(optax.inject_hyperparams(optax.adamw)(learning_rate=1.0, weight_decay=scale.weight_decay),
                       optax.scale_by_schedule(unit))

  def _engine(self, key: tuple, make: Callable[[], Any]):
    if key not in self._engines:
      self._engines[key] = make()
    return self._engines[key]

  def _distribution(self, row: Row, density: float, params, rest, arrays, seed: int, graphdef):
    import spra_jax as spra

    if row.distribution in ("magnitude", "magnitude-small"):
      return spra.masks.magnitude(density, params, largest=row.distribution == "magnitude")
    if row.distribution == "fisher":
      scale = self.scales[row.family]
      engine = self._engine(("lean", row.model), lambda: LeanEngine(graphdef, self._tx(scale)))
      stream = spra.data.batches(arrays["train"], scale.batch_size, seed=seed + 10_000)
      batches = [(rest, next(stream)[1]) for _ in range(row.fisher_batches)]
      return spra.masks.top_k(density, spra.masks.fisher_scores(engine.loss_fn, params, batches))
    if row.distribution == "blocks":
      return spra.masks.blocks(density, block=row.block)
    return spra.masks.get(row.distribution, density)


@dataclasses.dataclass
class Trained:
  """A trained run, kept in memory until its evaluations are done."""

  predict: Callable
  arrays: dict[str, Any]  # already cut to the scale's validation and test counts
  info: dict[str, Any]

  def evaluate(self, split: str) -> dict[str, float]:
    from spra_jax.finetune import evaluate

    return evaluate(self.predict, self.arrays[split], task="classification", batch_size=64)


def _forward(graphdef):
  from flax import nnx

  def forward(trainable, frozen, batch):
    return nnx.merge(graphdef, trainable, frozen)(batch["input_ids"], attention_mask=batch["attention_mask"])
  return forward


class LeanEngine:
  """SpaRTA and head-only: the memory-lean step over a mask (one compilation per set of per-leaf counts)."""

  def __init__(self, graphdef, tx):
    import jax

    import spra_jax as spra
    from spra_jax.finetune import _classification_loss

    forward = _forward(graphdef)
    self.loss_fn = _classification_loss(forward)
    self._step = spra.lean_step(self.loss_fn, tx)
    self._forward = jax.jit(forward)

  def init(self, params, mask):
    return self._step.init(params, mask)

  def step(self, state, frozen, batch):
    return self._step(state, frozen, batch)

  def finish(self, state):
    return self._step.flush(state)

  def predict(self, state, frozen, batch):
    return self._forward(state.params, frozen, batch)

  def trainable(self, state) -> int:
    import spra_jax as spra

    return spra.num_trainable(state.delta.mask)

  def opt_state_bytes(self, state) -> int:
    from spra_jax.finetune import _tree_bytes

    # The compact moments plus the indices that say where they belong (the mask is part of the method's state).
    return _tree_bytes(state.opt_state) + _tree_bytes(state.delta.mask)


class DenseEngine:
  """Full fine-tuning and LoRA: gradients of a dense set of variables, AdamW on them."""

  def __init__(self, graphdef, tx):
    import jax
    import optax

    from spra_jax.finetune import _classification_loss

    forward = _forward(graphdef)
    self.loss_fn, self.tx = _classification_loss(forward), tx

    def step(state, frozen, batch):
      trainable, opt_state = state
      value, grads = jax.value_and_grad(self.loss_fn)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return (optax.apply_updates(trainable, updates), opt_state), value

    self._step = jax.jit(step, donate_argnums=0)
    self._forward = jax.jit(forward)

  def init(self, trainable):
    return (trainable, self.tx.init(trainable))

  def step(self, state, frozen, batch):
    return self._step(state, frozen, batch)

  def finish(self, state):
    return state

  def predict(self, state, frozen, batch):
    return self._forward(state[0], frozen, batch)

  def trainable(self, state) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(state[0])))

  def opt_state_bytes(self, state) -> int:
    from spra_jax.finetune import _tree_bytes

    return _tree_bytes(state[1])


def _role_is(params, rules, role: str):
  """A tree of bool arrays: True on every entry of the leaves that ``rules`` give ``role`` (``spra.masks.leaf_roles``)."""
  import jax
  import numpy as np

  import spra_jax as spra

  roles = spra.masks.leaf_roles(params, **rules)
  return jax.tree_util.tree_map_with_path(lambda p, x: np.full(x.shape, roles[spra.masks.path_str(p)] == role),
                                          params)


def _sparse_leaves(params, rules) -> list[tuple[str, Any]]:
  """The (path, leaf) pairs a preset makes sparse."""
  import jax

  import spra_jax as spra

  roles = spra.masks.leaf_roles(params, **rules)
  named = [(spra.masks.path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [(name, leaf) for name, leaf in named if roles[name] == spra.masks.SPARSE]


def _eligible(params, rules) -> int:
  return int(sum(leaf.size for _, leaf in _sparse_leaves(params, rules)))


def lora_count(params, rules, rank: int) -> int:
  """The parameters LoRA of ``rank`` adds on the preset's projections: rank x (in + out) per kernel."""
  return int(sum(rank * (leaf.shape[0] + leaf.shape[1]) for name, leaf in _sparse_leaves(params, rules)
                 if name.endswith("kernel") and leaf.ndim == 2))


def resolve_density(row: Row, params, model_type: str) -> float:
  """The density of the row's preset that gives the row's budget."""
  import spra_jax as spra

  rules = spra.models.presets.get(row.preset, model_type, task="sequence-classification")
  eligible = _eligible(params, rules)
  kind, _, value = row.budget.partition("=")
  if kind == "density":
    return float(row.density)
  if kind == "lora-rank":
    return lora_count(params, rules, int(value)) / eligible
  if kind == "paper-density":
    paper = spra.models.presets.get("paper", model_type, task="sequence-classification")
    return float(value) * _eligible(params, paper) / eligible
  raise ValueError(f"unknown budget {row.budget!r}: expected 'density', 'lora-rank=R' or 'paper-density=D'")


# ---------------------------------------------------------------------------
# A row: tune the learning rate on seed 0, then run the other seeds at the best one.
# ---------------------------------------------------------------------------


def _metrics(trained: Trained, splits: Iterable[str]) -> dict[str, Any]:
  import numpy as np

  out = dict(trained.info)
  for split in splits:
    t = time.perf_counter()
    out[split] = trained.evaluate(split)
    out[f"{split}_eval_s"] = time.perf_counter() - t
    if split == "test":
      labels = trained.arrays["test"]["labels"]
      out["majority"] = float(np.bincount(labels).max() / len(labels))
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
  procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i)], env=env) for i in range(n)]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"a worker failed (exit codes {codes}); the finished runs are saved, rerun to resume")


# ---------------------------------------------------------------------------
# Rendering: tables, findings and plots.
# ---------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> tuple[float, float]:
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[Row], store: Store, scales: dict[str, Scale]):
  out = []
  for row in rows:
    grid, chosen, runs = row_records(row, store, scales)
    entry = {"row": row, "grid": grid, "lr": chosen, "runs": runs}
    if runs:
      entry.update(
          acc=_ms(r["test"]["accuracy"] for r in runs), mcc=_ms(r["test"]["mcc"] for r in runs),
          trainable=runs[0]["trainable"], parameters=runs[0]["parameters"],
          opt_state_bytes=runs[0]["opt_state_bytes"], step_ms=statistics.median(r["step_ms"] for r in runs),
          edge=chosen in (row.lrs()[0], row.lrs()[-1]))
    out.append(entry)
  return out


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def _pm(pair) -> str:
  return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def table_markdown(entries: Sequence[dict[str, Any]]) -> str:
  lines = ["| method | trainable | % of model | optimizer state | step (ms) | lr | seeds | test accuracy | test MCC |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for e in entries:
    row = e["row"]
    if not e["runs"]:
      lines.append(f"| {row.label} | (not run yet) | | | | | 0 | | |")
      continue
    lr = f"{e['lr']:.3g}" + (" (edge)" if e["edge"] else "")
    lines.append(f"| {row.label} | {e['trainable']:,} | {100 * e['trainable'] / e['parameters']:.3f} % "
                 f"| {_bytes(e['opt_state_bytes'])} | {e['step_ms']:.0f} | {lr} | {len(e['runs'])} "
                 f"| {_pm(e['acc'])} | {_pm(e['mcc'])} |")
  return "\n".join(lines)


def lr_markdown(entries: Sequence[dict[str, Any]]) -> str:
  lines = ["| table | method | validation accuracy at each learning rate (seed 0; **chosen**) |", "|---|---|---|"]
  for e in entries:
    cells = []
    for lr, r in e["grid"].items():
      if r is None:
        cells.append(f"{lr:.3g}: -")
        continue
      v = "diverged" if r.get("diverged") else f"{r['validation']['accuracy']:.3f}"
      cells.append(f"**{lr:.3g}: {v}**" if lr == e["lr"] else f"{lr:.3g}: {v}")
    lines.append(f"| {e['row'].table} | {e['row'].label} | {', '.join(cells)} |")
  return "\n".join(lines)


def findings(entries: Sequence[dict[str, Any]]) -> list[str]:
  """Comparisons computed from the numbers: SpaRTA vs LoRA at equal counts, and the ablation against uniform."""
  done = [e for e in entries if e["runs"]]
  out = []

  def diff(a, b, what):
    d = a[what][0] - b[what][0]
    noise = math.hypot(a[what][1], b[what][1])
    verdict = "within the seed spread" if abs(d) <= noise else ("better" if d > 0 else "worse")
    return d, noise, verdict

  for e in done:
    row = e["row"]
    if row.method != "spra" or not row.budget.startswith("lora-rank="):
      continue
    rank = int(row.budget.partition("=")[2])
    lora = next((v for v in done if v["row"].table == row.table and v["row"].method == "lora"
                 and v["row"].rank == rank), None)
    if lora is None:
      continue
    da, na, va = diff(e, lora, "acc")
    dm, nm, vm = diff(e, lora, "mcc")
    out.append(f"{row.table}: SpaRTA at LoRA rank {rank}'s count ({e['trainable']:,} vs {lora['trainable']:,} "
               f"trainable) minus LoRA: accuracy {da:+.3f} ({va}, spread {na:.3f}), MCC {dm:+.3f} ({vm}, spread "
               f"{nm:.3f}); optimizer state {e['opt_state_bytes'] / lora['opt_state_bytes']:.2f}x LoRA's, step time "
               f"{e['step_ms'] / lora['step_ms']:.2f}x.")
  t3 = [e for e in done if e["row"].table == "Table 3"]
  uniform = next((e for e in t3 if e["row"].distribution == "uniform" and e["row"].preset == "paper"), None)
  if uniform:
    ranked = sorted(t3, key=lambda e: -e["acc"][0])
    out.append("Table 3, test accuracy from best to worst: " + ", ".join(
        f"{e['row'].label} {e['acc'][0]:.3f}" for e in ranked) + ".")
    for e in t3:
      if e is uniform:
        continue
      da, na, va = diff(e, uniform, "acc")
      if va != "within the seed spread":
        out.append(f"Table 3: {e['row'].label} is {va} than uniform on V/O by {abs(da):.3f} accuracy "
                   f"(spread {na:.3f}).")
  return out


def plot_tradeoff(entries: Sequence[dict[str, Any]], png: pathlib.Path) -> None:
  """Test accuracy against trainable parameters (log scale), one panel per Table 1 / Table 2 dataset."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tables = [t for t in dict.fromkeys(e["row"].table for e in entries) if t != "Table 3"]
  tables = [t for t in tables if any(e["runs"] for e in entries if e["row"].table == t)]
  if not tables:
    return
  fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.0), squeeze=False)
  style = {"spra": ("o-", "C0", "SpaRTA"), "lora": ("s", "C1", "LoRA"), "full": ("*", "C3", "full"),
           "head": ("v", "C2", "head only")}
  for ax, table in zip(axes[0], tables):
    mine = [e for e in entries if e["row"].table == table and e["runs"]]
    for method, (fmt, color, name) in style.items():
      pts = sorted((e for e in mine if e["row"].method == method), key=lambda e: e["trainable"])
      if not pts:
        continue
      ax.errorbar([e["trainable"] for e in pts], [e["acc"][0] for e in pts], yerr=[e["acc"][1] for e in pts],
                  fmt=fmt, color=color, capsize=3, label=name, ms=7)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel="test accuracy (mean ± std over seeds)", title=table)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def plot_ablation(entries: Sequence[dict[str, Any]], png: pathlib.Path) -> None:
  """Table 3 as bars: test accuracy and MCC per distribution / placement, error bars over seeds, runs as dots."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mine = [e for e in entries if e["row"].table == "Table 3" and e["runs"]]
  if not mine:
    return
  fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * len(mine) * 2), 4.2))
  for ax, (key, metric, name) in zip(axes, (("acc", "accuracy", "test accuracy"), ("mcc", "mcc", "test MCC"))):
    xs = range(len(mine))
    ax.bar(xs, [e[key][0] for e in mine], yerr=[e[key][1] for e in mine], capsize=3,
           color=["C0" if e["row"].preset == "paper" else "C4" for e in mine], alpha=0.8)
    for x, e in zip(xs, mine):
      ax.plot([x] * len(e["runs"]), [r["test"][metric] for r in e["runs"]], "k.", alpha=0.5)
    low = min(r["test"][metric] for e in mine for r in e["runs"])
    ax.set_ylim(max(0.0, low - 0.05), None)
    ax.set_xticks(list(xs), [e["row"].label for e in mine], rotation=35, ha="right", fontsize=8)
    ax.set(ylabel=name)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle("Table 3: which entries and where, at one budget (MiniLM, Rotten Tomatoes)")
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def render(rows: Sequence[Row], store: Store, scales: dict[str, Scale], results: pathlib.Path,
           output: pathlib.Path, *, discussion: pathlib.Path | None = None, decoder: str = "smollm2-135m") -> str:
  """Writes RESULTS.md and the plots from the saved runs; returns the markdown."""
  entries = summarize(rows, store, scales)
  tradeoff, ablation = output / "tradeoff.png", output / "ablation.png"
  plot_tradeoff(entries, tradeoff)
  plot_ablation(entries, ablation)
  rel = lambda p: os.path.relpath(p, results.parent)  # noqa: E731
  runs = sorted(store.dir.glob("*.json"))
  threaded = any(r.get("single_threaded") for e in entries for r in e["runs"])
  enc, dec = scales["encoder"], scales["decoder"]
  parts = [
      "# Results: SpaRTA against LoRA, full fine-tuning and other masks",
      "",
      "Generated by `python examples/study.py` from the run records in "
      f"`{rel(store.dir)}/` ({len(runs)} runs); `--render-only` rebuilds this page from them. "
      "Everything ran on CPU, offline, on the pretrained models and labelled data that pip packages ship.",
      "",
      "**Protocol.** Each row's learning rate is chosen on validation accuracy (seed 0) from the same three-point "
      f"grid around the method's customary value (x{', x'.join(f'{f:.3g}' for f in LR_FACTORS)}); the chosen rate "
      f"runs with seeds {', '.join(map(str, SEEDS))} (Table 2: two seeds, one for full fine-tuning) and the test "
      "metrics are mean ± std over them. "
      "'(edge)' marks a rate at the end of its grid (the optimum may lie beyond). "
      f"Encoder runs: {enc.steps} steps of {enc.batch_size} examples, {enc.max_length} tokens, AdamW with "
      f"{enc.warmup_ratio:.0%} warm-up and cosine decay, weight decay {enc.weight_decay}, validation on "
      f"{enc.eval_examples} examples, test on {enc.test_examples}. Decoder runs: {dec.steps} steps of "
      f"{dec.batch_size}, {dec.max_length} tokens, validation {dec.eval_examples}, test {dec.test_examples}. "
      f"These are short, low-data runs ({enc.steps * enc.batch_size:,} and {dec.steps * dec.batch_size:,} training "
      "examples): they compare methods under one "
      "budget, they are not the best each model can reach.",
      "",
      "**Columns.** *trainable*: scalars that receive updates (the new head included for every method but full "
      "fine-tuning, which trains everything); *optimizer state*: AdamW's moments over the trained scalars, plus "
      "SpaRTA's int32 indices; *step*: median wall time of a training step (the first, compiling step excluded), "
      f"measured in the study's own processes on a {os.cpu_count()}-core CPU"
      f"{' (single-threaded workers side by side)' if threaded else ''}, so compare ratios within a table, not "
      "absolute times across machines.",
      "",
  ]
  name = "SmolLM2-135M" if decoder == "smollm2-135m" else pathlib.Path(decoder).name
  titles = {"Table 2": f"Table 2: {name} with a classification head, Rotten Tomatoes (the paper's setting)",
            "Table 3": "Table 3: which entries and where, at one budget (MiniLM, Rotten Tomatoes, "
                       "the count of 1 % of V/O)"}
  for table in dict.fromkeys(e["row"].table for e in entries):
    mine = [e for e in entries if e["row"].table == table]
    title = titles.get(table, table.replace("Table 1: ", "Table 1: all-MiniLM-L6-v2, ") + " (encoder)")
    parts += [f"## {title}", "", table_markdown(mine), ""]
    majority = next((r for e in mine for r in e["runs"]), None)
    if majority is not None and "majority" in majority:
      parts += [f"Majority class on the test examples: accuracy {majority['majority']:.3f}, MCC 0.", ""]
  if tradeoff.exists():
    parts += ["## Accuracy against trainable parameters", "", f"![trade-off]({rel(tradeoff)})", ""]
  if ablation.exists():
    parts += ["## The ablation at a glance", "", f"![ablation]({rel(ablation)})", ""]
  found = findings(entries)
  if found:
    parts += ["## Computed comparisons", "",
              "Differences of means; 'within the seed spread' when the difference is no larger than the two "
              "standard deviations combined (sqrt(s1² + s2²)), which with three seeds is the honest reading.", ""]
    parts += [f"- {line}" for line in found] + [""]
  if discussion is not None and discussion.exists():
    parts += [discussion.read_text().strip(), ""]
  parts += ["## Learning-rate tuning", "", lr_markdown(entries), ""]
  text = "\n".join(parts)
  results.parent.mkdir(parents=True, exist_ok=True)
  results.write_text(text)
  return text


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--output", default=str(HERE / "results" / "study"), help="run records and plots")
  ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown page to write")
  ap.add_argument("--discussion", default=str(HERE / "results" / "study_discussion.md"),
                  help="a hand-written reading of the numbers, included in the page when the file exists")
  ap.add_argument("--smoke", action="store_true", help="a tiny study (2 steps, 8 examples) that checks the pipeline")
  ap.add_argument("--decoder", default="smollm2-135m", help="the Table 2 model (an alias or a local checkpoint)")
  ap.add_argument("--tables", default="1,2,3", help="which tables to run, e.g. 1,3")
  ap.add_argument("--workers", type=int, default=1, help="parallel single-threaded worker processes")
  ap.add_argument("--render-only", action="store_true", help="no training: render from the saved runs")
  ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def selected_rows(args) -> list[Row]:
  wanted = {f"Table {t.strip()}" for t in args.tables.split(",") if t.strip()}
  unknown = wanted - {"Table 1", "Table 2", "Table 3"}
  if unknown:
    raise SystemExit(f"--tables takes numbers among 1, 2, 3; got {args.tables!r}")
  return [r for r in plan(smoke=args.smoke, decoder=args.decoder) if r.table.split(":")[0] in wanted]


def _without(argv: Sequence[str], flag: str) -> list[str]:
  """``argv`` less ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + "="):
      out.append(a)
  return out


def main(argv=None) -> str:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  scales = SMOKE_SCALES if args.smoke else FULL_SCALES
  output = pathlib.Path(args.output)
  store = Store(output)
  rows = selected_rows(args)
  if args.worker is not None:
    work(rows, store, scales, claims=output / "claims",
         log=lambda s: print(f"[worker {args.worker}] {s}", flush=True))
    return ""
  if not args.render_only:
    t0 = time.perf_counter()
    if args.workers > 1:
      run_workers(_without(argv, "--workers"), args.workers, output / "claims")
    else:
      work(rows, store, scales)
    print(f"study finished in {time.perf_counter() - t0:.0f} s")
  text = render(rows, store, scales, pathlib.Path(args.results), output,
                discussion=pathlib.Path(args.discussion) if args.discussion else None, decoder=args.decoder)
  print(text)
  print(f"wrote {args.results}")
  return text


if __name__ == "__main__":
  main()
