"""Benchmark: mixed precision per fine-tuning method, float32 against bfloat16 weights.

Part 1 (deterministic, XLA's compiled memory analysis): ONE training step per
method on the Llama-shaped model of ``step_cost.py`` (4 layers, d_model 512,
batch 8, seq 128; SpaRTA and LoRA on every q/k/v/o/gate/up/down kernel at
1 %), with the weights in float32 and then in bfloat16 (computing in the
weights' dtype; logits and the loss in float32). Methods:

  full          dense ``jax.grad`` + AdamW; with bf16 weights AdamW runs in
                float32 (``spra.precision.float32_state``: float32 moments).
  LoRA          W + (alpha / r) A B on the same kernels, A and B float32
                whatever the weights' dtype; r matched to SpaRTA's count.
  spra lean     ``spra.lean_step`` + AdamW on the float32 delta; with bf16
                weights the state also keeps the k base values (``LeanState.base``)
                and writes ``round(base + delta)``.
  spra masked   ``spra.masked(optax.adamw(...))`` with dense ``jax.grad``; with
                bf16 weights the state keeps float32 masters of the k entries.

Columns: ``state B/entry`` is the bytes of everything the method keeps besides
the weights (optimizer state, masks, deltas, masters, LoRA factors) per trained
entry; ``arguments`` is the step's inputs (weights, state, batch);
``temporaries`` is ``memory_analysis().temp_size_in_bytes``; ``total live`` is
arguments + outputs - donated + temporaries (weights included).

On XLA:CPU a bf16 matmul converts its operands to float32 first, so the bf16
steps' temporaries hold float32 copies and come out *larger* than the float32
steps'; the arguments (the weights) halve. GPU and TPU compute bf16 natively.

Part 2 (``--real-run``): the fine-tuning job on MiniLM + Rotten Tomatoes (the
demo's configuration: SpaRTA at 5 %, 200 steps of 32, the same seeds) once with
``--param-dtype float32 --compute-dtype float32`` and once with bfloat16 for
both, printed side by side with the test accuracy difference (goal: within 1
point). About 10 minutes on 2 CPU cores.

Run:
  python examples/benchmarks/precision.py [--small] [--real-run] [--steps 200]
          [--json examples/benchmarks/results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import spra_jax as spra

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import (  # noqa: E402  (the benchmark next door: the same model and runner)
    LEARNING_RATE,
    LORA_ALPHA,
    MASK_SEED,
    Runner,
    copy_tree,
    dense_grad_runner,
    fmt_bytes,
    llama_model,
    lora_rank,
    lora_targets,
    tree_nbytes,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("full", "LoRA", "spra lean", "spra masked")
DTYPES = ("float32", "bfloat16")
PLACEMENT = "all-linear"


def cast_floats(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def full_runner(model, params) -> Runner:
  tx = optax.adamw(LEARNING_RATE)
  if spra.precision.is_low_precision(jax.tree.leaves(params)[0].dtype):
    tx = spra.precision.float32_state(tx)
  n = sum(x.size for x in jax.tree.leaves(params))
  return dense_grad_runner("full", model, tx, n, params=params)


def masked_runner(model, params, mask) -> Runner:
  tx = spra.masked(optax.adamw(LEARNING_RATE), mask)
  return dense_grad_runner("spra masked", model, tx, spra.num_trainable(mask), params=params)


def lean_runner(model, params, mask) -> Runner:
  lean = spra.lean_step(model.loss, optax.adamw(LEARNING_RATE))
  state = lean.init(params, mask)
  return Runner("spra lean", lean, (state,), model.batch, spra.num_trainable(mask),
                tree_nbytes(state) - tree_nbytes(state.params))


def lora_runner(model, params, mask) -> Runner:
  targets = lora_targets(model, mask)
  rank = lora_rank(targets, spra.num_trainable(mask))
  keys = jax.random.split(jax.random.key(3), len(targets))
  lora = {path: {"a": jax.random.normal(key, (fan_in, rank), jnp.float32) / math.sqrt(fan_in),
                 "b": jnp.zeros((rank, fan_out), jnp.float32)}
          for key, (path, (fan_in, fan_out)) in zip(keys, sorted(targets.items()))}
  dtype = jax.tree.leaves(params)[0].dtype
  tx, scale = optax.adamw(LEARNING_RATE), LORA_ALPHA / rank

  def step(lora, opt_state, params, *batch):
    def loss(factors):  # float32 factors, used in the weights' dtype
      return model.loss(params, *batch, lora=cast_floats(factors, dtype), lora_scale=scale)
    value, grads = jax.value_and_grad(loss)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, value

  opt_state = tx.init(lora)
  n = sum(x.size for x in jax.tree.leaves(lora))
  return Runner("LoRA", jax.jit(step, donate_argnums=(0, 1)), (lora, opt_state), (params, *model.batch), n,
                tree_nbytes(opt_state) + tree_nbytes(lora), info={"rank": rank})


def memory_table(small: bool, density: float) -> dict[str, dict[str, dict]]:
  model = llama_model(small)
  include = model.placements[PLACEMENT]
  mask = spra.sample_mask(jax.random.key(MASK_SEED), model.params, density=density, include=include)
  out: dict[str, dict[str, dict]] = {}
  for dtype in DTYPES:
    params = cast_floats(model.params, jnp.dtype(dtype))
    builders = {"full": lambda: full_runner(model, params),  # dense_grad_runner copies the weights it donates
                "LoRA": lambda: lora_runner(model, params, mask),
                "spra lean": lambda: lean_runner(model, copy_tree(params), mask),
                "spra masked": lambda: masked_runner(model, params, mask)}
    out[dtype] = {}
    for method in METHODS:
      runner = builders[method]()
      runner.compile()
      stats = runner.stats()
      stats["state_bytes_per_entry"] = runner.opt_state_bytes / runner.trainable
      out[dtype][method] = {k: stats[k] for k in ("trainable", "opt_state_bytes", "state_bytes_per_entry",
                                                  "argument_bytes", "temp_bytes", "total_live_bytes")}
      del runner
  return {"model": model.config, "placement": PLACEMENT, "density": density, "rows": out}


def render_memory(result: dict) -> str:
  rows = result["rows"]
  lines = [f"Llama-shaped model {result['model']}, {result['placement']} at {100 * result['density']:g} %",
           "", "| method | weights | trainable | state B/entry | state | arguments | temporaries | total live |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for method in METHODS:
    for dtype in DTYPES:
      r = rows[dtype][method]
      lines.append(f"| {method} | {dtype} | {r['trainable']:,} | {r['state_bytes_per_entry']:.1f} | "
                   f"{fmt_bytes(r['opt_state_bytes'])} | {fmt_bytes(r['argument_bytes'])} | {fmt_bytes(r['temp_bytes'])} | "
                   f"{fmt_bytes(r['total_live_bytes'])} |")
  return "\n".join(lines)


def real_runs(steps: int) -> dict[str, Any]:
  from spra_jax.finetune import FinetuneConfig, finetune

  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in DTYPES:
      cfg = FinetuneConfig(model="minilm", dataset="rotten-tomatoes", method="spra", density=0.05, lr=2e-2,
                           steps=steps, batch_size=32, max_length=48, eval_every=max(1, steps // 2),
                           eval_examples=512, param_dtype=dtype, compute_dtype=dtype,
                           output=os.path.join(tmp, dtype))
      t0 = time.perf_counter()
      results = finetune(cfg, progress=False)
      runs[dtype] = {"test": results["test"], "seconds": round(time.perf_counter() - t0, 1),
                     "trainable": results["trainable"], "opt_state_bytes": results["opt_state_bytes"]}
  diff = runs["bfloat16"]["test"]["accuracy"] - runs["float32"]["test"]["accuracy"]
  return {"steps": steps, "runs": runs, "accuracy_diff_points": 100 * diff, "goal_met": abs(100 * diff) <= 1.0}


def render_real(result: dict) -> str:
  lines = [f"MiniLM + SpaRTA 5 % on Rotten Tomatoes, {result['steps']} steps of 32, same seeds", "",
           "| weights and compute | test accuracy | test MCC | wall time |", "|---|---:|---:|---:|"]
  for dtype, r in result["runs"].items():
    lines.append(f"| {dtype} | {r['test']['accuracy']:.4f} | {r['test']['mcc']:.4f} | {r['seconds']:.0f} s |")
  verdict = "met" if result["goal_met"] else "MISSED"
  lines.append(f"\nbf16 - f32 test accuracy: {result['accuracy_diff_points']:+.2f} points (goal: within 1): {verdict}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="a 2-layer d=64 model for a quick smoke test")
  ap.add_argument("--density", type=float, default=0.01)
  ap.add_argument("--real-run", action="store_true", help="also run the job in float32 and in bfloat16")
  ap.add_argument("--steps", type=int, default=200, help="training steps of each real run")
  ap.add_argument("--json", default=os.path.join(RESULTS, "precision.json"))
  ap.add_argument("--keep-real-run", action="store_true",
                  help="without --real-run: keep the real runs already recorded in --json (they take ~30 min)")
  args = ap.parse_args(argv)
  result = {"memory": memory_table(args.small, args.density), "backend": jax.default_backend()}
  text = render_memory(result["memory"])
  if args.real_run:
    result["real_run"] = real_runs(args.steps)
  elif args.keep_real_run and os.path.exists(args.json):
    with open(args.json) as f:
      previous = json.load(f).get("real_run")
    if previous:
      result["real_run"] = previous
  if "real_run" in result:
    text += "\n\n" + render_real(result["real_run"])
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
    f.write(text + "\n")
  return result


if __name__ == "__main__":
  main()
