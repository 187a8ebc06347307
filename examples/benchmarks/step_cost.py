"""Benchmark: what one training step costs, per fine-tuning method.

Compiles ONE training step per method on the same model and batch and reads
the compiled executable's memory and FLOP figures from XLA, then times the
steps side by side. Methods (every step is jitted with the parameters and the
optimizer state donated, so each can update in place):

  full          dense ``jax.grad`` over all parameters + ``optax.adamw``.
  optax.masked  leaf-level masking as written with Optax alone:
                ``optax.multi_transform({'train': adamw, 'freeze': set_to_zero()})``
                where 'train' are the leaves the sparse mask touches (full-size
                AdamW moments for those leaves); dense ``jax.grad``.
  spra.masked   ``spra.masked(optax.adamw(lr), mask)``: dense ``jax.grad``,
                compact O(k) optimizer state.
  spra lean     ``spra.lean_step(loss_fn, optax.adamw(lr))``: differentiates
                the k delta values only; every kernel is multiplied by
                ``spra.sparse_backward.matmul``, so each trained kernel's k
                gradient entries come from the layer's input and output
                cotangent (the sampled product, chosen per leaf by the cost
                model), never from a dense ``[in, out]`` product.
  lean dense dW the same step with ``backward='dense'``: the dense weight
                gradient ``x^T dy`` per layer, then its k entries (the lean
                path before the sampled product).
  LoRA          W + (alpha / r) A B on the same target kernels (A [in, r]
                small random, B [r, out] zeros); only A and B are
                differentiated, AdamW on them; the rank r is chosen so that
                the trainable count is as close as possible to k.
  floor         a frozen-weight backward pass: the gradient of the loss with
                respect to the input activations only (for the Llama model, the
                embedded tokens). It is the least any PEFT method pays.

Models (pure JAX on dict parameters, float32):

  dense   8 dense layers 1024x1024 (kernel + bias, tanh between), batch 64,
          MSE to a random target; 1 % of all 8 kernels, LoRA on all 8.
  llama   a Llama-shaped decoder: 4 layers, d_model 512, 8 heads, SwiGLU MLP
          1376, vocab 2048, seq 128, batch 8 (embedding, RMSNorm, causal
          attention with rotary embeddings, final norm, untied lm_head,
          next-token cross-entropy). Two placements:
            paper       1 % of the self_attn v_proj / o_proj kernels;
            all-linear  1 % of every q/k/v/o/gate/up/down kernel.
          Embeddings, norms and lm_head are frozen in every PEFT method.
          The dense stack also runs at 0.1 % (the second goal below).
          ``full`` and ``floor`` do not depend on the placement: they are
          compiled and timed once and shown in both tables.

Run:
  python examples/benchmarks/step_cost.py [--models dense,llama] [--steps 5]
          [--rounds 3] [--density 0.01] [--small] [--sweep | --no-sweep]
          [--json examples/benchmarks/results/step_cost.json]
          [--png examples/benchmarks/results/step_cost.png]

``--small`` shrinks every model (dense 4x128, llama 2 layers d=64 seq 16) for a
quick smoke test. The script exits with status 1 when a goal is missed. The table is printed and also written next to the JSON as
``.md``; the PNG holds one panel per metric, as a ratio to full fine-tuning.

Columns (each with its ratio to full fine-tuning in parentheses):

  trainable     number of trained scalars (k for the sparse methods).
  opt state     bytes of the optimizer state's leaves. spra.masked includes its
                int32 indices; spra lean counts its whole state except the
                weights (delta indices and values, AdamW moments, the pending
                update, the step counter).
  temporaries   ``compiled.memory_analysis().temp_size_in_bytes``: XLA's scratch
                memory for the step (activations, gradients, copies).
  total live    arguments + outputs - aliased (donated) bytes + temporaries:
                the step's peak footprint, weights included.
  FLOPs         ``compiled.cost_analysis()['flops']``.
  step          median wall time of a step, blocking on its result each step,
                over ``rounds`` interleaved rounds of ``steps`` steps per method
                (methods of one model are timed side by side, round-robin, so
                that load from other processes hits them alike).

Goals (checked and printed after each table):
  * lean temporaries <= floor temporaries + 1.25 x (bytes of the largest
    leaf the mask trains) + 64 x k bytes;
  * lean total live <= LoRA's total live, and <= 0.5 x full fine-tuning's;
  * dense stack: lean FLOPs <= 1.10 x the floor's at 1 %, <= 1.02 x at 0.1 %;
  * llama ``all-linear``: lean FLOPs <= LoRA's, lean step time <= 0.9 x LoRA's;
  * llama ``paper``: lean step time <= LoRA's and <= 0.8 x full's.

The density sweep (``--sweep``, on by default; a table in the ``.md``, the
``sweep`` entry of the JSON, and ``step_cost_sweep.png``) computes the weight
gradient of one Llama-MLP-shaped layer (1024 tokens, 512 x 1376; a loss linear
in the layer's output, so nothing else is computed) at densities 0.01 % .. 10 %:
the sampled and the dense path on a uniform mask, and the structured path on a
whole-rows mask (``spra.masks.rows``) of the same density, marking which path
the cost model (``spra.sparse_backward.choose``) picks. The rows mask's FLOPs
include its fallback branch (XLA counts both sides of the on-device check), so
above the cost model's threshold they read as the dense product's; its times
are what runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spra_jax as spra

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MASK_SEED = 0
LEARNING_RATE = 1e-4
LORA_ALPHA = 16.0
METHODS = ("full", "optax.masked", "spra.masked", "spra lean", "lean dense dW", "LoRA", "floor")
SWEEP_DENSITIES = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
SWEEP_DENSITIES_SMALL = (0.001, 0.01, 0.1)  # --small


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------


def linear(x: jax.Array, kernel: jax.Array, path: str, lora: dict | None, lora_scale: float) -> jax.Array:
  """``x @ kernel``, plus the low-rank term when ``lora`` adapts ``path``."""
  y = spra.sparse_backward.matmul(x, kernel)  # x @ kernel; a sparse-trained kernel gets the fast backward
  if lora is not None and path in lora:
    y = y + (x @ lora[path]["a"]) @ lora[path]["b"] * lora_scale
  return y


class Model:
  """A model, its batch, and the functions every method trains through.

  ``loss(params, *batch, lora=None, lora_scale=1.0)`` is the training loss.
  ``floor(params, *batch)`` returns ``(loss, gradient w.r.t. the input
  activations)`` with the weights held fixed. ``placements`` maps a placement
  name to the ``include`` regex of the leaves that are sparsified (and adapted
  by LoRA).
  """

  def __init__(self, name: str, params: Any, batch: tuple, loss: Callable, floor: Callable,
               placements: dict[str, str], config: dict):
    self.name, self.params, self.batch = name, params, batch
    self.loss, self.floor = loss, floor
    self.placements, self.config = placements, config


def dense_model(small: bool) -> Model:
  layers, width, batch = (4, 128, 16) if small else (8, 1024, 64)
  keys = jax.random.split(jax.random.key(1), layers + 2)
  params = {
      "layers": {
          str(i): {
              "kernel": jax.random.normal(keys[i], (width, width), jnp.float32) / math.sqrt(width),
              "bias": jnp.zeros((width,), jnp.float32),
          }
          for i in range(layers)
      }
  }
  x = jax.random.normal(keys[-2], (batch, width), jnp.float32)
  y = jax.random.normal(keys[-1], (batch, width), jnp.float32)

  def from_input(params, h, y, lora=None, lora_scale=1.0):
    for i in range(layers):
      p = params["layers"][str(i)]
      h = linear(h, p["kernel"], f"layers/{i}/kernel", lora, lora_scale) + p["bias"]
      if i < layers - 1:
        h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)

  def floor(params, x, y):
    return jax.value_and_grad(from_input, argnums=1)(params, x, y)

  return Model(
      name="dense",
      params=params,
      batch=(x, y),
      loss=from_input,
      floor=floor,
      placements={f"all {layers} kernels": r"kernel$", f"all {layers} kernels, 0.1 %": (r"kernel$", 0.001)},
      config={"layers": layers, "width": width, "batch": batch, "activation": "tanh", "loss": "mse"},
  )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotary(x: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding of ``x`` [batch, seq, heads, head_dim] (half-split form)."""
  seq, head_dim = x.shape[1], x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama_model(small: bool, batch: int | None = None) -> Model:
  if small:
    cfg = {"layers": 2, "d_model": 64, "heads": 4, "mlp_hidden": 176, "vocab": 256, "seq": 16, "batch": 2}
  else:
    cfg = {"layers": 4, "d_model": 512, "heads": 8, "mlp_hidden": 1376, "vocab": 2048, "seq": 128, "batch": 8}
  if batch is not None:
    # Activations grow with the batch while weights and optimizer state do not: a
    # small batch shows the weight-dominated regime of large models.
    cfg["batch"] = batch
  n_layers, d, n_heads, f, vocab = cfg["layers"], cfg["d_model"], cfg["heads"], cfg["mlp_hidden"], cfg["vocab"]
  head_dim = d // n_heads
  keys = iter(jax.random.split(jax.random.key(2), 8 * n_layers + 4))

  def dense(shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(shape[0])

  def layer():
    return {
        "input_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
        "self_attn": {name: {"kernel": dense((d, d))} for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "post_attention_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
        "mlp": {"gate_proj": {"kernel": dense((d, f))}, "up_proj": {"kernel": dense((d, f))},
                "down_proj": {"kernel": dense((f, d))}},
    }

  params = {
      "embed_tokens": {"embedding": jax.random.normal(next(keys), (vocab, d), jnp.float32) * 0.02},
      "layers": {str(i): layer() for i in range(n_layers)},
      "norm": {"scale": jnp.ones((d,), jnp.float32)},
      "lm_head": {"kernel": dense((d, vocab))},
  }
  tokens = jax.random.randint(next(keys), (cfg["batch"], cfg["seq"] + 1), 0, vocab, jnp.int32)

  def from_hidden(params, h, targets, lora=None, lora_scale=1.0):
    b, s, _ = h.shape
    causal = jnp.tril(jnp.ones((s, s), bool))
    for i in range(n_layers):
      p = params["layers"][str(i)]
      pre = f"layers/{i}"

      def proj(x, group, name, p=p, pre=pre):
        return linear(x, p[group][name]["kernel"], f"{pre}/{group}/{name}/kernel", lora, lora_scale)

      x = rms_norm(h, p["input_layernorm"]["scale"])
      q = rotary(proj(x, "self_attn", "q_proj").reshape(b, s, n_heads, head_dim))
      k = rotary(proj(x, "self_attn", "k_proj").reshape(b, s, n_heads, head_dim))
      v = proj(x, "self_attn", "v_proj").reshape(b, s, n_heads, head_dim)
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
      scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
      attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
      h = h + proj(attn, "self_attn", "o_proj")

      x = rms_norm(h, p["post_attention_layernorm"]["scale"])
      gated = jax.nn.silu(proj(x, "mlp", "gate_proj")) * proj(x, "mlp", "up_proj")
      h = h + proj(gated, "mlp", "down_proj")
    h = rms_norm(h, params["norm"]["scale"])
    logits = (h @ params["lm_head"]["kernel"]).astype(jnp.float32)  # the loss in float32 for any weights' dtype
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def loss(params, tokens, lora=None, lora_scale=1.0):
    h = params["embed_tokens"]["embedding"][tokens[:, :-1]]
    return from_hidden(params, h, tokens[:, 1:], lora, lora_scale)

  def floor(params, tokens):
    h = params["embed_tokens"]["embedding"][tokens[:, :-1]]
    return jax.value_and_grad(from_hidden, argnums=1)(params, h, tokens[:, 1:])

  return Model(
      name="llama",
      params=params,
      batch=(tokens,),
      loss=loss,
      floor=floor,
      placements={
          "paper": r"self_attn/(v_proj|o_proj)/kernel",
          "all-linear": r"(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/kernel",
      },
      config=cfg,
  )


MODELS = {"dense": dense_model, "llama": llama_model}


# --------------------------------------------------------------------------
# Methods: each is a jitted step ``fn(*carry, *rest) -> (*new_carry, loss)``
# whose carry (parameters and optimizer state) is donated.
# --------------------------------------------------------------------------


def tree_nbytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def copy_tree(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan")))


class Runner:
  """One method's compiled step, its live arguments and what XLA says about it.

  ``fn(*carry, *rest)`` returns ``(*new_carry, loss)``; ``carry`` (parameters
  and optimizer state) is donated and replaced by the outputs every call;
  ``rest`` (frozen weights, the batch) is not.
  """

  def __init__(self, method: str, fn: Any, carry: tuple, rest: tuple, trainable: int, opt_state_bytes: int,
               note: str = "", info: dict | None = None):
    self.method, self.fn, self.carry, self.rest = method, fn, carry, rest
    self.trainable, self.opt_state_bytes, self.note = trainable, opt_state_bytes, note
    self.info = info or {}
    self.compiled = None
    self.compile_s = 0.0
    self.flops_step = None  # another step whose compiled FLOPs are reported instead (see lean_runner)
    self.flops = None
    self.times_ms: list[float] = []

  def compile(self) -> None:
    t0 = time.perf_counter()
    self.compiled = self.fn.lower(*self.carry, *self.rest).compile()
    self.compile_s = time.perf_counter() - t0
    if self.flops_step is not None:
      self.flops = _flops(self.flops_step.lower(*self.carry, *self.rest).compile())

  def step(self) -> None:
    out = self.compiled(*self.carry, *self.rest)
    jax.block_until_ready(out)
    self.carry = tuple(out[: len(self.carry)])

  def stats(self) -> dict:
    mem = self.compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes)
    args, outs, alias = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    return {
        "trainable": int(self.trainable),
        "opt_state_bytes": int(self.opt_state_bytes),
        "temp_bytes": temp,
        "argument_bytes": args,
        "output_bytes": outs,
        "alias_bytes": alias,
        "total_live_bytes": args + outs - alias + temp,
        "flops": _flops(self.compiled) if self.flops is None else self.flops,
        "step_ms_median": statistics.median(self.times_ms) if self.times_ms else float("nan"),
        "step_ms_all": [round(t, 3) for t in self.times_ms],
        "compile_s": round(self.compile_s, 2),
        "note": self.note,
        **self.info,
    }


def dense_grad_runner(method: str, model: Model, tx: optax.GradientTransformation, trainable: int,
                      params: Any = None) -> Runner:
  """A step that differentiates all parameters densely, then runs ``tx`` (on a copy of ``params``, default the model's)."""

  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(model.loss)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = copy_tree(model.params if params is None else params)
  opt_state = tx.init(params)
  return Runner(method, jax.jit(step, donate_argnums=(0, 1)), (params, opt_state), model.batch, trainable,
                tree_nbytes(opt_state))


def full_runner(model: Model) -> Runner:
  n = sum(x.size for x in jax.tree.leaves(model.params))
  return dense_grad_runner("full", model, optax.adamw(LEARNING_RATE), n)


def optax_masked_runner(model: Model, mask: Any) -> Runner:
  trained = jax.tree.map(lambda m: m.kind != "frozen", mask, is_leaf=spra.masks.is_leaf_mask)
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trained)
  tx = optax.multi_transform({"train": optax.adamw(LEARNING_RATE), "freeze": optax.set_to_zero()}, labels)
  n = sum(p.size for p, t in zip(jax.tree.leaves(model.params), jax.tree.leaves(trained)) if t)
  runner = dense_grad_runner("optax.masked", model, tx, n)
  runner.note = "trains every entry of the leaves the mask touches"
  return runner


def spra_masked_runner(model: Model, mask: Any) -> Runner:
  return dense_grad_runner("spra.masked", model, spra.masked(optax.adamw(LEARNING_RATE), mask), spra.num_trainable(mask))


def lean_runner(model: Model, mask: Any, backward: str = "auto", *, count_one_chunk: bool = True) -> Runner:
  lean = spra.lean_step(model.loss, optax.adamw(LEARNING_RATE), backward=backward)
  state = lean.init(copy_tree(model.params), mask)
  opt_bytes = tree_nbytes(state) - tree_nbytes(state.params)
  method = "spra lean" if backward == "auto" else "lean dense dW"
  runner = Runner(method, lean, (state,), model.batch, spra.num_trainable(mask), opt_bytes)  # LeanStep.lower
  if backward == "auto" and count_one_chunk:
    # XLA counts a loop body once, so the chunked sampled product's FLOPs are read from the same step built
    # with one chunk per leaf (same arithmetic; its memory figures are not used).
    runner.flops_step = spra.lean_step(model.loss, optax.adamw(LEARNING_RATE),
                                       backward=spra.sparse_backward.Backward(chunk_bytes=1 << 62))
  return runner


def lora_targets(model: Model, mask: Any) -> dict[str, tuple[int, int]]:
  """'/'-joined path -> kernel shape, for every leaf the sparse mask trains."""
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=spra.masks.is_leaf_mask)
  return {spra.masks.path_str(p): m.shape for p, m in flat if m.kind != "frozen"}


def lora_rank(targets: dict[str, tuple[int, int]], k: int) -> int:
  """The rank whose trainable count r * sum(in + out) is nearest to k (at least 1)."""
  per_rank = sum(a + b for a, b in targets.values())
  lo = max(1, k // per_rank)
  return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - k), r))


def lora_runner(model: Model, mask: Any) -> Runner:
  targets = lora_targets(model, mask)
  rank = lora_rank(targets, spra.num_trainable(mask))
  keys = jax.random.split(jax.random.key(3), len(targets))
  lora = {
      path: {"a": jax.random.normal(key, (fan_in, rank), jnp.float32) / math.sqrt(fan_in),
             "b": jnp.zeros((rank, fan_out), jnp.float32)}
      for key, (path, (fan_in, fan_out)) in zip(keys, sorted(targets.items()))
  }
  tx = optax.adamw(LEARNING_RATE)
  scale = LORA_ALPHA / rank

  def step(lora, opt_state, params, *batch):
    loss, grads = jax.value_and_grad(lambda factors: model.loss(params, *batch, lora=factors, lora_scale=scale))(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  opt_state = tx.init(lora)
  n = sum(x.size for x in jax.tree.leaves(lora))
  return Runner("LoRA", jax.jit(step, donate_argnums=(0, 1)), (lora, opt_state), (model.params, *model.batch), n,
                tree_nbytes(opt_state), note=f"rank {rank} on {len(targets)} kernels", info={"rank": rank})


def floor_runner(model: Model) -> Runner:
  def step(params, *batch):
    loss, grad_in = model.floor(params, *batch)
    return grad_in, loss

  return Runner("floor", jax.jit(step), (), (model.params, *model.batch), 0, 0,
                note="input-activation gradient, weights fixed")


# --------------------------------------------------------------------------
# Measuring, goals, output.
# --------------------------------------------------------------------------


def fmt_bytes(n: float, digits: int = 1) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.{digits}f} {unit}"
  return f"{int(n)} B"


def fmt_flops(n: float) -> str:
  for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} "


def fmt_ratio(x: float, full: float) -> str:
  if not full or math.isnan(x) or math.isnan(full):
    return ""
  r = x / full
  return f" ({r:.2f}×)" if r >= 0.1 or r == 0 else f" ({r:.2g}×)"


def table(rows: dict[str, dict]) -> str:
  full = rows["full"]
  lines = [
      "| method | trainable | opt state | temporaries | total live | FLOPs | step (ms) |",
      "|---|---|---|---|---|---|---|",
  ]
  for method in METHODS:
    r = rows[method]
    lines.append(
        f"| {method} | {r['trainable']:,}{fmt_ratio(r['trainable'], full['trainable'])} "
        f"| {fmt_bytes(r['opt_state_bytes'])}{fmt_ratio(r['opt_state_bytes'], full['opt_state_bytes'])} "
        f"| {fmt_bytes(r['temp_bytes'])}{fmt_ratio(r['temp_bytes'], full['temp_bytes'])} "
        f"| {fmt_bytes(r['total_live_bytes'])}{fmt_ratio(r['total_live_bytes'], full['total_live_bytes'])} "
        f"| {fmt_flops(r['flops'])}{fmt_ratio(r['flops'], full['flops'])} "
        f"| {r['step_ms_median']:.1f}{fmt_ratio(r['step_ms_median'], full['step_ms_median'])} |"
    )
  return "\n".join(lines)


def check_goals(model: Model, placement: str, rows: dict[str, dict], largest_leaf_bytes: int,
                density: float) -> list[dict]:
  lean, lora, full, floor = rows["spra lean"], rows["LoRA"], rows["full"], rows["floor"]
  k = lean["trainable"]
  goals = []

  def goal(name, value, bound, detail):
    goals.append({"goal": name, "value": value, "bound": bound, "met": bool(value <= bound), "detail": detail})

  b = lambda n: fmt_bytes(n, 2)
  bound = floor["temp_bytes"] + 1.25 * largest_leaf_bytes + 64 * k
  goal("lean temporaries <= floor temporaries + 1.25 x largest trained leaf + 64 k", lean["temp_bytes"], bound,
       f"{b(lean['temp_bytes'])} vs {b(floor['temp_bytes'])} + 1.25 x {b(largest_leaf_bytes)} + 64 x {k:,}"
       f" = {b(bound)}")
  goal("lean total live <= LoRA total live", lean["total_live_bytes"], lora["total_live_bytes"],
       f"{b(lean['total_live_bytes'])} vs {b(lora['total_live_bytes'])}")
  goal("lean total live <= 0.5 x full total live", lean["total_live_bytes"], 0.5 * full["total_live_bytes"],
       f"{b(lean['total_live_bytes'])} vs 0.5 x {b(full['total_live_bytes'])} = {b(0.5 * full['total_live_bytes'])}")
  if model.name == "dense":
    factor = 1.02 if density <= 0.001 else 1.10
    goal(f"lean FLOPs <= {factor:.2f} x floor FLOPs", lean["flops"], factor * floor["flops"],
         f"{fmt_flops(lean['flops'])} vs {factor:.2f} x {fmt_flops(floor['flops'])}"
         f" ({lean['flops'] / floor['flops']:.3f}x; dense dW: {rows['lean dense dW']['flops'] / floor['flops']:.3f}x)")
  if model.name == "llama" and placement == "all-linear":
    goal("lean FLOPs <= LoRA FLOPs", lean["flops"], lora["flops"],
         f"{fmt_flops(lean['flops'])} vs {fmt_flops(lora['flops'])}")
    goal("lean step time <= 0.9 x LoRA step time", lean["step_ms_median"], 0.9 * lora["step_ms_median"],
         f"{lean['step_ms_median']:.1f} ms vs 0.9 x {lora['step_ms_median']:.1f} ms"
         f" = {0.9 * lora['step_ms_median']:.1f} ms")
  if model.name == "llama" and placement == "paper":
    goal("lean step time <= LoRA step time", lean["step_ms_median"], lora["step_ms_median"],
         f"{lean['step_ms_median']:.1f} ms vs {lora['step_ms_median']:.1f} ms")
    goal("lean step time <= 0.8 x full step time", lean["step_ms_median"], 0.8 * full["step_ms_median"],
         f"{lean['step_ms_median']:.1f} ms vs 0.8 x {full['step_ms_median']:.1f} ms"
         f" = {0.8 * full['step_ms_median']:.1f} ms")
  return goals


def measure(runners: list[Runner], args) -> None:
  """Compiles and warms every runner, then times them side by side: ``rounds`` round-robin rounds of ``steps``."""
  for r in runners:
    r.compile()
    r.step()  # warm-up
  for _ in range(args.rounds):
    for r in runners:
      for _ in range(args.steps):
        t0 = time.perf_counter()
        r.step()
        r.times_ms.append((time.perf_counter() - t0) * 1e3)


def run_model(model: Model, args) -> dict[str, dict]:
  """Builds, compiles and times every method of every placement of ``model``."""
  shared = [full_runner(model), floor_runner(model)]
  per_placement = {}
  for placement, spec in model.placements.items():
    include, density = spec if isinstance(spec, tuple) else (spec, args.density)
    mask = spra.sample_mask(jax.random.key(MASK_SEED), model.params, density=density, include=include)
    leaf_bytes = {path: math.prod(shape) * 4 for path, shape in lora_targets(model, mask).items()}
    per_placement[placement] = (
        mask,
        # --small: every leaf's sampled product fits in one chunk, so its FLOPs are counted in full as they are.
        [optax_masked_runner(model, mask), spra_masked_runner(model, mask),
         lean_runner(model, mask, count_one_chunk=not args.small),
         lean_runner(model, mask, "dense"), lora_runner(model, mask)],
        max(leaf_bytes.values()),
        include,
        density,
    )
  runners = shared + [r for _, rs, *_ in per_placement.values() for r in rs]

  measure(runners, args)

  out = {}
  shared_stats = {r.method: r.stats() for r in shared}
  for placement, (mask, rs, largest_leaf, include, density) in per_placement.items():
    rows = dict(shared_stats)
    rows.update({r.method: r.stats() for r in rs})
    rows = {m: rows[m] for m in METHODS}
    out[placement] = {
        "model": model.name,
        "placement": placement,
        "include": include,
        "density": density,
        "mask_trainable": spra.num_trainable(mask),
        "lora_rank": rows["LoRA"]["rank"],
        "largest_trained_leaf_bytes": int(largest_leaf),
        "config": model.config,
        "rows": rows,
        "goals": check_goals(model, placement, rows, largest_leaf, density),
    }
  return out


def plot(results: dict, path: str) -> None:
  """Grouped bars, one panel per metric, as ratios to full fine-tuning."""
  from matplotlib.figure import Figure  # no pyplot: the Agg canvas renders PNG without global state

  metrics = [("temp_bytes", "XLA temporaries"), ("total_live_bytes", "total live bytes"),
             ("flops", "XLA FLOPs"), ("step_ms_median", "median step time")]
  groups = list(results)
  colors = ["#4c4c4c", "#d62728", "#1f77b4", "#2ca02c", "#98df8a", "#ff7f0e", "#9467bd"]
  fig = Figure(figsize=(13, 8.5), layout="constrained")
  axes = fig.subplots(2, 2)
  width = 0.8 / len(METHODS)
  for ax, (key, title) in zip(axes.flat, metrics):
    for j, method in enumerate(METHODS):
      ratios = [results[g]["rows"][method][key] / results[g]["rows"]["full"][key] for g in groups]
      xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(groups))]
      bars = ax.bar(xs, ratios, width, label=method, color=colors[j])
      ax.bar_label(bars, labels=[f"{v:.2f}" for v in ratios], fontsize=7, rotation=90, padding=2)
    labels = []
    for g in groups:
      full = results[g]["rows"]["full"][key]
      absolute = f"{full:.3g} ms" if key == "step_ms_median" else (
          f"{fmt_flops(full)}FLOP" if key == "flops" else fmt_bytes(full))
      labels.append(f"{g}\n(full = {absolute})")
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
    ax.set_ylabel("× full fine-tuning")
    ax.set_title(title)
    ax.set_ylim(0, max(1.3, ax.get_ylim()[1] * 1.12))
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=len(METHODS), fontsize=9)
  fig.suptitle("Cost of one training step (ratio to full fine-tuning; lower is better)")
  fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------
# The density sweep: one layer, the three ways to its weight gradient.
# --------------------------------------------------------------------------

SWEEP_SHAPE, SWEEP_TOKENS = (512, 1376), 1024
SWEEP_PATHS = ("sampled", "dense", "structured")


def sweep(args) -> dict:
  """FLOPs, temporaries and time of one layer's weight gradient per path and density (see the module docstring)."""
  (fan_in, fan_out), tokens = ((64, 176), 64) if args.small else (SWEEP_SHAPE, SWEEP_TOKENS)
  keys = jax.random.split(jax.random.key(4), 3)
  w = jax.random.normal(keys[0], (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
  x = jax.random.normal(keys[1], (tokens, fan_in), jnp.float32)
  cotangent = jax.random.normal(keys[2], (tokens, fan_out), jnp.float32)  # dy, through a linear loss

  def grad_fn(mode):
    def loss(delta, params, x, r):
      return (spra.sparse_backward.matmul(x, spra.attach(params, delta, backward=mode)["w"]) * r).sum()
    grad = spra.grad(loss)
    return jax.jit(lambda *args: (grad(*args),))  # a Runner's step returns a tuple

  forward = Runner("forward", jax.jit(lambda p, x, r: (((x @ p["w"]) * r).sum(),)), (), ({"w": w}, x, cotangent),
                   0, 0)
  cases = [forward]
  densities = SWEEP_DENSITIES_SMALL if args.small else SWEEP_DENSITIES
  for density in densities:
    uniform = spra.sample_mask(jax.random.key(MASK_SEED), {"w": w}, density=density)
    rows = spra.sample_mask(jax.random.key(MASK_SEED), {"w": w}, spra.masks.rows(density))
    for path, mask, mode in (("sampled", uniform, "sampled"), ("dense", uniform, "dense"),
                             ("structured", rows, "auto")):
      delta = spra.init_delta(mask)
      r = Runner(path, grad_fn(mode), (), (delta, {"w": w}, x, cotangent), spra.num_trainable(mask), 0,
                 info={"density": density})
      if path != "dense":  # FLOPs from one chunk: XLA counts a loop body once (see lean_runner)
        r.flops_step = grad_fn(spra.sparse_backward.Backward(mode=mode, chunk_bytes=1 << 62))
      cases.append(r)
  measure(cases, args)
  base = forward.stats()
  rows_out = []
  for density in densities:
    got = {r.method: r.stats() for r in cases[1:] if r.info["density"] == density}
    k = got["sampled"]["trainable"]
    rows_out.append({
        "density": density,
        "k": k,
        "k_rows_mask": got["structured"]["trainable"],
        "choice": spra.sparse_backward.choose((fan_in, fan_out), k=k, tokens=tokens),
        **{f"{p}_{m}": got[p][key] for p in SWEEP_PATHS
           for m, key in (("flops", "flops"), ("temp_bytes", "temp_bytes"), ("ms", "step_ms_median"))},
    })
  return {"shape": [fan_in, fan_out], "tokens": tokens, "forward_flops": base["flops"],
          "forward_ms": base["step_ms_median"], "rows": rows_out}


def sweep_table(res: dict) -> str:
  fwd_f, fwd_t = res["forward_flops"], res["forward_ms"]  # context only
  lines = [
      f"### density sweep: one {res['shape'][0]} x {res['shape'][1]} layer, {res['tokens']} tokens "
      f"(the loss is linear in the output, so each function computes the weight gradient alone; for scale, the "
      f"forward matmul: {fmt_flops(fwd_f)}FLOP, {fwd_t:.2f} ms)",
      "",
      "| density | k | FLOPs sampled | FLOPs dense | FLOPs rows mask | ms sampled | ms dense | ms rows mask "
      "| cost model picks |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in res["rows"]:
    faster = "sampled" if r["sampled_ms"] <= r["dense_ms"] else "dense"
    flops = {p: fmt_flops(r[f"{p}_flops"]) for p in SWEEP_PATHS}
    ms = {p: f"{r[f'{p}_ms']:.2f}" for p in SWEEP_PATHS}
    for p in ("sampled", "dense"):  # the cost model's pick in bold
      if p == r["choice"]:
        flops[p], ms[p] = f"**{flops[p]}**", f"**{ms[p]}**"
    lines.append(
        f"| {r['density'] * 100:g} % | {r['k']:,} | {flops['sampled']} | {flops['dense']} | {flops['structured']} "
        f"| {ms['sampled']} | {ms['dense']} | {ms['structured']} | {r['choice']} (faster here: {faster}) |")
  return "\n".join(lines)


def plot_sweep(res: dict, path: str) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4.2), layout="constrained")
  ax_f, ax_t = fig.subplots(1, 2)
  d = [r["density"] * 100 for r in res["rows"]]
  for p, color in zip(SWEEP_PATHS, ("#2ca02c", "#98df8a", "#1f77b4")):
    label = {"structured": "rows mask (structured)"}.get(p, p)
    ax_f.plot(d, [r[f"{p}_flops"] for r in res["rows"]], "o-", color=color, label=label)
    ax_t.plot(d, [r[f"{p}_ms"] for r in res["rows"]], "o-", color=color, label=label)
  for r, x in zip(res["rows"], d):
    ax_t.annotate(r["choice"][0], (x, r[f"{r['choice']}_ms"]), textcoords="offset points",
                  xytext=(0, 7), ha="center", fontsize=8)
  for ax, title in ((ax_f, "weight-gradient FLOPs (XLA)"), (ax_t, "weight-gradient time (ms; letter = cost model's pick)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  fig.suptitle(f"One {res['shape'][0]} x {res['shape'][1]} layer, {res['tokens']} tokens")
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="dense,llama", help="comma-separated: " + ",".join(MODELS))
  ap.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  ap.add_argument("--density", type=float, default=0.01)
  ap.add_argument("--small", action="store_true", help="shrink every model for a quick smoke test")
  ap.add_argument("--llama-batch", type=int, default=None,
                  help="batch size of the Llama-shaped model (default 8; 1 shows the weight-dominated regime)")
  ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                  help="also run the density sweep of one layer's weight gradient")
  ap.add_argument("--json", default=os.path.join(RESULTS, "step_cost.json"))
  ap.add_argument("--png", default=os.path.join(RESULTS, "step_cost.png"))
  args = ap.parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

  results, md = {}, []
  for name in names:
    model = MODELS[name](args.small, args.llama_batch) if name == "llama" else MODELS[name](args.small)
    t0 = time.perf_counter()
    for placement, res in run_model(model, args).items():
      group = f"{name} / {placement}"
      results[group] = res
      lora = res["rows"]["LoRA"]
      text = [
          f"### {group} ({', '.join(f'{k}={v}' for k, v in model.config.items())})",
          "",
          (
              f"sparse k = {res['mask_trainable']:,} (density {res['density']:g} of the leaves matching "
              f"`{res['include']}`); LoRA rank {res['lora_rank']}: {lora['trainable']:,} trainable "
              f"({lora['trainable'] / res['mask_trainable']:.2f}× k)"
          ),
          "",
          table(res["rows"]),
          "",
      ]
      for g in res["goals"]:
        text.append(f"- goal: {g['goal']}: {g['detail']} -> {'met' if g['met'] else 'MISSED'}")
      if name != "llama":
        text.append("- step times reported only (the time goals apply to the llama placements)")
      rows, floor = res["rows"], res["rows"]["floor"]
      text.append(
          f"- context: the floor alone keeps {fmt_bytes(floor['total_live_bytes'])} live "
          f"({floor['total_live_bytes'] / rows['full']['total_live_bytes']:.2f}× full) and "
          f"{fmt_bytes(floor['temp_bytes'])} of temporaries; temporaries minus the floor's: lean "
          f"{fmt_bytes(rows['spra lean']['temp_bytes'] - floor['temp_bytes'])}, "
          f"LoRA {fmt_bytes(rows['LoRA']['temp_bytes'] - floor['temp_bytes'])}")
      text.append("")
      print("\n".join(text), flush=True)
      md.extend(text)
    print(f"({name}: {time.perf_counter() - t0:.0f} s to build, compile and time)\n", flush=True)

  swept = None
  if args.sweep:
    t0 = time.perf_counter()
    swept = sweep(args)
    text = sweep_table(swept)
    print(text + f"\n\n(sweep: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    md.extend([text, ""])

  summary = {
      "benchmark": "step_cost",
      "jax": jax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
      "args": {"models": names, "steps": args.steps, "rounds": args.rounds, "density": args.density,
               "small": args.small, "llama_batch": args.llama_batch},
      "results": results,
      "sweep": swept,
      "all_goals_met": all(g["met"] for r in results.values() for g in r["goals"]),
  }
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
      f.write("\n".join(md))
    print(f"wrote {args.json} and {os.path.splitext(args.json)[0]}.md")
  if args.png:
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(results, args.png)
    print(f"wrote {args.png}")
    if swept is not None:
      sweep_png = os.path.splitext(args.png)[0] + "_sweep.png"
      plot_sweep(swept, sweep_png)
      print(f"wrote {sweep_png}")
  return summary


if __name__ == "__main__":
  sys.exit(0 if main()["all_goals_met"] else 1)
