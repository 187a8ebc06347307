"""The methods a fine-tuning recipe offers, bound to one model: SpaRTA, head-only, LoRA, full.

:func:`prepare` turns a model and a method name into a :class:`Run`: it
splits the model into what trains and what stays frozen, samples the mask
(SpaRTA, head-only) or adds the LoRA factors, lays the model out on a mesh
when one is given, and pairs the result with the trainer of its kind
(:class:`~spra_jax.recipes.LeanTrainer` or :class:`~spra_jax.recipes.DenseTrainer`).
A ``Run`` then steps, predicts, checkpoints and saves its adapter; the
fine-tuning job, the study and the examples all train through it.

* ``spra``: the lean path over a random mask of ``density`` of the entries the
  ``rules`` make eligible (``include`` / ``exclude``); leaves matched by
  ``full`` train fully (for classification the new head, by default).
* ``head``: only the head trains (a mask with the head's leaves full).
* ``lora``: LoRA factors of ``lora_rank`` on the Linear layers of the rules'
  ``include`` leaves, plus the head for classification.
* ``full``: every parameter trains.

Example (a small NNX classifier; any model the library loads works the same):

  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import spra_jax as spra
  >>> class Classifier(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.body = nnx.Linear(8, 8, rngs=rngs)
  ...     self.classifier = nnx.Linear(8, 2, rngs=rngs)
  ...   def __call__(self, x, attention_mask=None):
  ...     return self.classifier(jnp.tanh(self.body(x)))
  >>> batch = {"input_ids": jnp.ones((4, 8)), "attention_mask": None, "labels": jnp.array([0, 1, 0, 1])}
  >>> run = prepare(Classifier(nnx.Rngs(0)), "spra", tx=optax.adam(1e-2), task="classification",
  ...               density=0.25, rules={"include": "body"})
  >>> state = run.init()
  >>> state, loss = run.step(state, batch)
  >>> state, predict = run.predictor(state)
  >>> run.trainable(state), predict(batch).shape      # 25 % of the body's 72 entries + the head's 18
  (36, (4, 2))
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spra_jax import checkpoint, masks, precision, sharding
from spra_jax.models import lora as lora_lib
from spra_jax.recipes.losses import call_model
from spra_jax.recipes.trainers import DenseTrainer, LeanTrainer

__all__ = ["METHODS", "HEAD_PATTERN", "Run", "prepare", "head_mask", "lora_filter", "module_pattern", "place_on_mesh"]

METHODS = ("spra", "head", "lora", "full")
# The new task head of the library's models (sequence classification: `classifier` for BERT, `score` for decoders).
HEAD_PATTERN = r"(^|/)(classifier|score|lm_head)/"

Trainer = LeanTrainer | DenseTrainer


def module_pattern(leaf_pattern: str) -> str:
  """A leaf regex (``.../v_proj/kernel``) as a regex of the Linear modules holding those leaves (for LoRA).

  >>> module_pattern('attention/(self/value|output/dense)/(kernel|bias)$')
  'attention/(self/value|output/dense)$'
  >>> module_pattern('kernel$')     # every Linear layer
  '.'
  """
  stripped = re.sub(r"/?(\(kernel\|bias\)|\(bias\|kernel\)|kernel|bias)\$?$", "", leaf_pattern)
  return stripped + "$" if stripped else r"."


def head_mask(params: Any, head: str = HEAD_PATTERN) -> Any:
  """A mask that trains every entry of the floating-point leaves matching ``head`` and freezes the rest.

  >>> import jax.numpy as jnp
  >>> params = {'body': {'kernel': jnp.zeros((4, 4))}, 'classifier': {'kernel': jnp.zeros((4, 2))}}
  >>> masks.num_trainable(head_mask(params))
  8
  >>> head_mask({'body': {'kernel': jnp.zeros(3)}})
  Traceback (most recent call last):
  ...
  ValueError: method 'head' found no head parameters matching '(^|/)(classifier|score|lm_head)/' (paths look like 'body/kernel')
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [masks.path_str(p) for p, _ in flat]
  pattern = re.compile(head)
  if not any(pattern.search(p) for p in paths):
    shown = ", ".join(repr(p) for p in paths[:6])
    raise ValueError(f"method 'head' found no head parameters matching {head!r} (paths look like {shown})")
  roles = masks.leaf_roles(params, full=head)
  return masks.from_dense(jax.tree_util.tree_map_with_path(
      lambda p, x: np.full(x.shape, roles[masks.path_str(p)] == masks.FULL), params))


def lora_filter(head: str | None = HEAD_PATTERN) -> Callable[[tuple, Any], bool]:
  """The NNX filter of what LoRA trains: every ``nnx.LoRAParam``, and the ``nnx.Param`` leaves matching ``head``.

  >>> from flax import nnx
  >>> trainable = lora_filter()
  >>> trainable(('classifier', 'kernel'), nnx.Param(0.0)), trainable(('body', 'kernel'), nnx.Param(0.0))
  (True, False)
  >>> trainable(('body', 'lora', 'lora_a'), nnx.LoRAParam(0.0))
  True
  """
  pattern = re.compile(head) if head else None

  def trainable(path, value) -> bool:
    if isinstance(value, nnx.LoRAParam):
      return True
    return pattern is not None and isinstance(value, nnx.Param) and bool(pattern.search(masks.path_str(path)))
  return trainable


def place_on_mesh(model: nnx.Module, mesh: Mesh, rules: Any) -> None:
  """Lays ``model`` out on ``mesh`` in place: parameters by the partition ``rules``, everything else replicated.

  >>> from flax import nnx
  >>> from jax.sharding import PartitionSpec as P
  >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  >>> place_on_mesh(model, sharding.make_mesh(), [(r"kernel$", P("fsdp", None))])
  >>> model.kernel[...].sharding.spec
  P('fsdp', None)
  """
  params = nnx.state(model, nnx.Param)
  nnx.update(model, sharding.shard_params(params, mesh, rules))
  others = nnx.state(model, nnx.Not(nnx.Param))
  nnx.update(model, jax.device_put(others, NamedSharding(mesh, PartitionSpec())))


@dataclasses.dataclass
class Run:
  """A method bound to one model: its trainer, the frozen variables and what the first state starts from.

  Build it with :func:`prepare`. ``init()`` gives the first state; then
  ``state, loss = run.step(state, batch)``. States are donated to each step:
  always continue from the returned one.

  Attributes:
    method: ``'spra'``, ``'head'``, ``'lora'`` or ``'full'``.
    trainer: the compiled step and forward pass (reusable across runs).
    frozen: the variables that do not train (passed to every step).
    start: what ``trainer.init`` takes: ``(params, mask)`` (lean) or the trainable variables (dense).
    mask: the mask of a lean run (None for LoRA and full).
    base_fingerprint: the base weights' fingerprint at the mask, taken before
      training moves them (lean runs; saved with the adapter).
  """

  method: str
  trainer: Trainer
  frozen: Any
  start: Any
  mask: Any = None
  base_fingerprint: Any = None

  @property
  def lean(self) -> bool:
    return isinstance(self.trainer, LeanTrainer)

  def init(self) -> Any:
    """The first state (call once: it hands the starting weights over to the donated step)."""
    return self.trainer.init(*self.start) if self.lean else self.trainer.init(self.start)

  def step(self, state: Any, batch: Mapping[str, Any]) -> tuple[Any, jax.Array]:
    """One training step: ``(state, loss)``."""
    return self.trainer.step(state, self.frozen, batch)

  def predictor(self, state: Any) -> tuple[Any, Callable[[Mapping[str, Any]], jax.Array]]:
    """``(state, predict)``: the state made current (:meth:`~LeanTrainer.finish`) and ``predict(batch) -> logits``.

    Continue from the returned state; ``predict`` reads it, so use it before the next step.
    """
    state = self.trainer.finish(state)
    return state, lambda batch: self.trainer.predict(state, self.frozen, batch)

  def trained_variables(self, state: Any) -> Any:
    """What to write back into the model (``nnx.update(model, ...)``) once training is done."""
    return self.trainer.trained_variables(state)

  def trainable(self, state: Any) -> int:
    """Scalars that receive updates."""
    return self.trainer.trainable(state)

  def opt_state_bytes(self, state: Any) -> int:
    """The bytes of the method's optimizer state (SpaRTA: the compact moments and the mask's indices)."""
    return self.trainer.opt_state_bytes(state)

  def save_checkpoint(self, ckpt: checkpoint.TrainCheckpointer, step: int, state: Any, *,
                      data_position: Any = None, metadata: Mapping[str, Any] | None = None) -> bool:
    """Saves ``state`` at ``step`` (a lean state stores the k trained weight entries only)."""
    return ckpt.save(step, state, data_position=data_position, metadata=metadata)

  def restore_checkpoint(self, ckpt: checkpoint.TrainCheckpointer, like: Any) -> checkpoint.TrainCheckpoint:
    """The latest checkpoint restored into the structure of ``like`` (e.g. a fresh :meth:`init`)."""
    if self.lean:  # only the trained entries are stored; the rest is the base that ``like`` holds
      return ckpt.restore(like, base_params=like.params)
    return ckpt.restore(like)

  def save_adapter(self, directory: str | os.PathLike, state: Any, *,
                   metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Saves what was trained as an adapter directory, atomically, replacing an older one.

    Lean runs write a sparse adapter (:func:`spra.save_adapter`, with the base
    fingerprint); LoRA and full fine-tuning write the trained variables as a
    dense adapter (:func:`spra.checkpoint.save_dense_adapter`). ``state`` must
    be current (from :meth:`predictor` or ``trainer.finish``).
    """
    metadata = {**(metadata or {}), "method": self.method}
    if self.lean:
      return checkpoint.save_adapter(directory, state.delta, metadata=metadata,
                                     base_fingerprint=self.base_fingerprint, overwrite=True)
    return checkpoint.save_dense_adapter(directory, nnx.to_pure_dict(self.trained_variables(state)),
                                         metadata={**metadata, "trainable": self.trainable(state)}, overwrite=True)


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def prepare(
    model: nnx.Module,
    method: str,
    *,
    tx: optax.GradientTransformation,
    task: str,
    rules: Mapping[str, Any] | None = None,
    density: float = 0.01,
    distribution: masks.Distribution | str = "uniform",
    min_per_leaf: int = 0,
    seed: int = 0,
    head: str | None = None,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    mesh: Mesh | None = None,
    partition_rules: Any = None,
    keep_base: bool = False,
    trainer: Trainer | None = None,
    call: Callable = call_model,
    microbatches: int = 1,
    backward: Any = None,
) -> Run:
  """Binds ``method`` to ``model``: the mask or LoRA factors, the split, the trainer.

  Args:
    model: an NNX model that ``call`` knows how to run.
    method: one of :data:`METHODS`.
    tx: the optimizer (e.g. :func:`spra.recipes.adamw`).
    task: ``'classification'`` or ``'sft'``.
    rules: placement, ``{'include': ..., 'exclude': ..., 'full': ...}`` regexes
      over '/'-joined parameter paths (e.g. ``spra.models.presets.get(...)``).
      SpaRTA samples among ``include`` less ``exclude`` and trains ``full``
      leaves fully; LoRA goes on the Linear layers of the ``include`` leaves.
    density: SpaRTA's fraction of the eligible entries.
    distribution: a registered distribution name or a
      :class:`spra.masks.Distribution` (e.g. ``spra.masks.magnitude(...)``).
    min_per_leaf: SpaRTA trains at least this many entries of every eligible
      leaf (``spra.sample_mask``'s; 0 freezes a leaf whose share rounds to 0, with a warning).
    seed: the mask's key and LoRA's initialisation.
    head: the head's regex (default: ``rules['full']``, else
      :data:`HEAD_PATTERN`); for classification SpaRTA and LoRA train it fully.
    lora_rank, lora_alpha: LoRA's rank and scale numerator (default alpha = 2 x rank).
    mesh: lay the model out on this mesh first (by ``partition_rules``); a
      SpaRTA mask sampled on sharded leaves is shard-local.
    partition_rules: ``(regex, PartitionSpec)`` pairs for ``mesh``.
    keep_base: leave ``model``'s arrays untouched (the run trains copies), so
      one loaded model serves several runs. Without it the first step takes
      the model's weight buffers over (write the result back with
      ``nnx.update(model, run.trained_variables(state))``).
    trainer: a trainer of the right kind built earlier for a model of the
      same structure, to reuse its compilation (a study's runs share one).
    call: how a module is called on a batch.
    microbatches: gradient accumulation: each step's batch runs as this many
      microbatches (rows ``j, j + n, ...``) whose gradients are summed before
      one optimizer update, so a large effective batch fits in memory.
    backward: SpaRTA's and head-only's sparse weight gradients: ``'auto'``
      (default), ``'sampled'``, ``'dense'`` or a
      :class:`spra.sparse_backward.Backward` (see :func:`spra.lean_step`).

  Mixed precision follows the model's parameter dtype: with weights narrower
  than float32 (``param_dtype=jnp.bfloat16``), SpaRTA and head-only write the
  trained entries as ``round(base + delta)`` from float32 deltas, LoRA's
  factors are float32 (``lora_param_dtype``), and full fine-tuning keeps
  float32 optimizer moments (:func:`spra.precision.float32_state`; its bf16
  weights still round each update). Losses and softmax are float32 in every case.

  Returns:
    A :class:`Run`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
  rules = dict(rules or {})
  head = head or rules.get("full") or HEAD_PATTERN
  if mesh is not None and partition_rules is None:
    raise ValueError("a mesh needs partition_rules (e.g. spra.models.partition.rules_for(model_type))")

  if method in ("spra", "head"):
    if mesh is not None:
      place_on_mesh(model, mesh, partition_rules)  # before sampling: on sharded leaves the mask is shard-local
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    if method == "spra":
      if task == "classification" and "full" not in rules:
        rules["full"] = head
      dist = masks.get(distribution, density) if isinstance(distribution, str) else distribution
      mask = masks.sample_mask(jax.random.key(seed), params, dist, min_per_leaf=min_per_leaf, **rules)
    else:
      mask = head_mask(params, head)
    trainer = _check_trainer(trainer, LeanTrainer) or LeanTrainer(graphdef, tx, task=task, call=call,
                                                                  sharded=mesh is not None, microbatches=microbatches,
                                                                  backward=backward)
    # Taken now, from the base weights: training moves them in place. O(k): only the mask's entries are read.
    fingerprint = checkpoint.base_fingerprint(params, mask)
    return Run(method, trainer, frozen, (_copy(params) if keep_base else params, mask), mask=mask,
               base_fingerprint=fingerprint)

  if method == "lora":
    if keep_base:  # a new module over the same arrays: adding LoRA layers to it leaves ``model`` as it was
      model = nnx.merge(*nnx.split(model))
    # The factors are few: float32 even beside bf16 weights, so that their small updates are not rounded away.
    lora_lib.apply_lora(model, rank=lora_rank, alpha=2.0 * lora_rank if lora_alpha is None else lora_alpha,
                        include=module_pattern(rules.get("include") or r"(kernel)$"), rngs=nnx.Rngs(seed),
                        lora_param_dtype=jnp.float32)
    selected = lora_filter(head if task == "classification" else None)
  else:
    selected = nnx.Param
  if mesh is not None:
    place_on_mesh(model, mesh, partition_rules)
  graphdef, trainable, frozen = nnx.split(model, selected, ...)
  if any(precision.is_low_precision(x.dtype) for x in jax.tree.leaves(trainable)):
    tx = precision.float32_state(tx)  # float32 moments over bf16 weights
  trainer = _check_trainer(trainer, DenseTrainer) or DenseTrainer(graphdef, tx, task=task, call=call,
                                                                  microbatches=microbatches)
  return Run(method, trainer, frozen, _copy(trainable) if keep_base else trainable)


def _check_trainer(trainer: Trainer | None, kind: type) -> Trainer | None:
  if trainer is not None and not isinstance(trainer, kind):
    raise TypeError(f"this method trains with a {kind.__name__}, got a {type(trainer).__name__}")
  return trainer
