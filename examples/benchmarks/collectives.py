"""Benchmark: the collectives a sharded training step compiles to, per fine-tuning method.

Compiles ONE training step per method on 8 devices with the same parameter
sharding and counts the collective ops in the compiled HLO text (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute) and their bytes
(each op's result, per device). Methods:

  full          dense ``jax.grad`` + ``optax.adamw`` on every parameter.
  spra.masked   dense ``jax.grad`` + ``spra.masked(optax.adamw(...), density, key)``
                initialised on the sharded parameters (shard-local mask).
  spra lean     ``spra.sharding.sharded_lean_step`` (the lean path): gradients of
                the k delta values only.

Each step is jitted with the parameters and optimizer state donated and with
``spra.sharding`` shardings (``sharded_train_step`` / ``sharded_lean_step``).
The *optimizer portion* of each method is compiled on its own as well (for
``spra.masked``: ``tx.update`` + ``optax.apply_updates`` from dense gradients;
for the lean path: the AdamW update of the delta values and the in-place write
of the weights) and must contain no collective at all.

Checks (the script exits with status 1 if one fails):
  * the optimizer portion of both sparse methods has no collective;
  * no sparse method has a collective beyond full fine-tuning's (the multiset
    difference of (op, shape) pairs) whose size reaches a full parameter's shard
    (the smallest per-device shard of a trainable parameter).

Model: a Llama-shaped decoder with the models contract's parameter paths
(``model/layers/<i>/self_attn/q_proj/kernel``, ...): 2 layers, d_model 256,
8 heads (4 KV heads), SwiGLU 512, vocabulary 512, batch 8 x 64 tokens;
1 % of every attention and MLP kernel trains. Meshes (data, fsdp, tensor):
2x4 data x tensor, and 1x8 fsdp.

Run (8 fake CPU devices are set up by the script itself, before JAX starts):
  python examples/benchmarks/collectives.py [--small] [--meshes 2x4,1x8]
          [--json examples/benchmarks/results/collectives.json]

The table is printed and also written next to the JSON as ``.md``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import spra_jax as spra  # noqa: E402
from spra_jax import sharding as sh  # noqa: E402
from spra_jax.models import partition  # noqa: E402

MESHES = {"2x4 data x tensor": dict(data=2, fsdp=1, tensor=4), "1x8 fsdp": dict(data=1, fsdp=8, tensor=1)}
MESH_KEYS = {"2x4": "2x4 data x tensor", "1x8": "1x8 fsdp"}
TRAIN = r"(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))/kernel$"
LR = 1e-4
RULES = partition.rules_for("llama")  # the model below has the Llama paths


# --------------------------------------------------------------------------
# The model (pure JAX, contract paths, kernels stored [in, out]).
# --------------------------------------------------------------------------


def config(small: bool) -> dict:
  if small:
    return dict(layers=2, d=64, heads=4, kv_heads=2, ffn=128, vocab=128, batch=8, seq=16)
  return dict(layers=2, d=256, heads=8, kv_heads=4, ffn=512, vocab=512, batch=8, seq=64)


def init_params(cfg: dict) -> dict:
  keys = iter(jax.random.split(jax.random.key(0), 8 * cfg["layers"] + 2))
  d, hd = cfg["d"], cfg["d"] // cfg["heads"]

  def dense(shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(shape[0])

  def layer():
    return {
        "self_attn": {"q_proj": {"kernel": dense((d, cfg["heads"] * hd))},
                      "k_proj": {"kernel": dense((d, cfg["kv_heads"] * hd))},
                      "v_proj": {"kernel": dense((d, cfg["kv_heads"] * hd))},
                      "o_proj": {"kernel": dense((cfg["heads"] * hd, d))}},
        "mlp": {"gate_proj": {"kernel": dense((d, cfg["ffn"]))}, "up_proj": {"kernel": dense((d, cfg["ffn"]))},
                "down_proj": {"kernel": dense((cfg["ffn"], d))}},
        "input_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
        "post_attention_layernorm": {"scale": jnp.ones((d,), jnp.float32)},
    }

  return {
      "model": {"embed_tokens": {"embedding": jax.random.normal(next(keys), (cfg["vocab"], d), jnp.float32) * 0.02},
                "layers": [layer() for _ in range(cfg["layers"])],
                "norm": {"scale": jnp.ones((d,), jnp.float32)}},
      "lm_head": {"kernel": dense((d, cfg["vocab"]))},
  }


def make_loss(cfg: dict):
  heads, kv_heads = cfg["heads"], cfg["kv_heads"]

  def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale

  def rotary(x):
    seq, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / 10000.0 ** (jnp.arange(hd // 2, dtype=jnp.float32) / (hd // 2))
    ang = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def loss_fn(params, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h = params["model"]["embed_tokens"]["embedding"][inputs]
    b, s, d = h.shape
    hd = d // heads
    causal = jnp.tril(jnp.ones((s, s), bool))
    for p in params["model"]["layers"]:
      att, mlp = p["self_attn"], p["mlp"]
      x = rms_norm(h, p["input_layernorm"]["scale"])
      q = rotary((x @ att["q_proj"]["kernel"]).reshape(b, s, heads, hd))
      k = rotary((x @ att["k_proj"]["kernel"]).reshape(b, s, kv_heads, hd))
      v = (x @ att["v_proj"]["kernel"]).reshape(b, s, kv_heads, hd)
      k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
      scores = jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), jnp.finfo(jnp.float32).min)
      attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, heads * hd)
      h = h + attn @ att["o_proj"]["kernel"]
      x = rms_norm(h, p["post_attention_layernorm"]["scale"])
      h = h + (jax.nn.silu(x @ mlp["gate_proj"]["kernel"]) * (x @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    logits = rms_norm(h, params["model"]["norm"]["scale"]) @ params["lm_head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return loss_fn


# --------------------------------------------------------------------------
# Counting collectives in compiled HLO (the multi-device tests load this file for count_collectives too).
# --------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


def count_collectives(hlo_text: str) -> list[dict[str, Any]]:
  """The collectives of a compiled HLO module: one dict per op with ``op``, ``bytes`` and ``shape``.

  Reads ``compiled.as_text()``; ``bytes`` is the size of the op's result per
  device (the ``-start`` half of async pairs is counted, ``-done`` is not).

  Example:

    >>> count_collectives('  %ar = f32[128,4]{1,0} all-reduce(f32[128,4]{1,0} %x), replica_groups={}')
    [{'op': 'all-reduce', 'bytes': 2048, 'shape': 'f32[128,4]'}]
  """
  out = []
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    nbytes, shapes = 0, []
    for dtype, dims in _SHAPE.findall(match.group(1)):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      nbytes += size * _DTYPE_BYTES[dtype]
      shapes.append(f"{dtype}[{dims}]")
    if match.group(3) and len(shapes) > 1:
      # Async start ops return (operands..., results...): count the results only.
      half = len(shapes) // 2
      nbytes = sum(math.prod(int(d) for d in s[s.index("[") + 1:-1].split(",") if d) * _DTYPE_BYTES[s[:s.index("[")]]
                   for s in shapes[half:])
      shapes = shapes[half:]
    out.append({"op": match.group(2), "bytes": nbytes, "shape": " ".join(shapes)})
  return out


# --------------------------------------------------------------------------
# Compiling the steps and counting.
# --------------------------------------------------------------------------


def summarize(ops: list[dict]) -> dict:
  by_op = collections.OrderedDict((op, {"count": 0, "bytes": 0}) for op in COLLECTIVES)
  for o in ops:
    by_op[o["op"]]["count"] += 1
    by_op[o["op"]]["bytes"] += o["bytes"]
  return {"by_op": by_op, "count": len(ops), "bytes": sum(o["bytes"] for o in ops), "ops": ops}


def components(ops: list[dict]) -> list[tuple[str, str]]:
  """(op, shape) of every array a collective moves (a combined all-reduce moves several)."""
  return [(o["op"], shape) for o in ops for shape in o["shape"].split()]


def hlo_of(lowered) -> str:
  return lowered.compile().as_text()


def run_mesh(mesh_name: str, cfg: dict, density: float) -> dict:
  mesh = sh.make_mesh(**MESHES[mesh_name])
  loss_fn = make_loss(cfg)
  base = init_params(cfg)
  shardings = sh.param_shardings(base, mesh, RULES)
  tokens = jax.random.randint(jax.random.key(1), (cfg["batch"], cfg["seq"] + 1), 0, cfg["vocab"], jnp.int32)
  tokens = jax.device_put(tokens, sh.batch_sharding(mesh))
  fresh = lambda: jax.device_put(jax.tree.map(np.asarray, base), shardings)  # noqa: E731
  results: dict[str, Any] = {}

  # Full fine-tuning.
  tx = optax.adamw(LR)
  params = fresh()
  state = tx.init(params)
  state_sh = sh.opt_state_shardings(state, shardings, params)
  state = jax.device_put(state, state_sh)
  step = sh.sharded_train_step(loss_fn, tx, param_shardings=shardings, opt_state_shardings=state_sh,
                               batch_shardings=sh.batch_sharding(mesh))
  step_hlo = hlo_of(step.lower(params, state, tokens))
  opt = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]),
                in_shardings=(shardings, state_sh, shardings), out_shardings=shardings)
  opt_hlo = hlo_of(opt.lower(params, state, params))
  _, _, loss = step(params, state, tokens)
  results["full"] = dict(step=summarize(count_collectives(step_hlo)),
                         optimizer=summarize(count_collectives(opt_hlo)),
                         loss=float(jax.block_until_ready(loss)), trainable=sum(x.size for x in jax.tree.leaves(base)))

  # spra.masked, initialised on the sharded parameters.
  tx = spra.masked(optax.adamw(LR), density=density, key=jax.random.key(0), include=TRAIN)
  params = fresh()
  state = tx.init(params)
  mask = spra.mask_of(state)
  sh.check_shard_local(mask, shardings)
  state_sh = sh.opt_state_shardings(state, shardings)
  state = jax.device_put(state, state_sh)
  step = sh.sharded_train_step(loss_fn, tx, param_shardings=shardings, opt_state_shardings=state_sh,
                               batch_shardings=sh.batch_sharding(mesh))
  step_hlo = hlo_of(step.lower(params, state, tokens))
  opt = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]),
                in_shardings=(shardings, state_sh, shardings), out_shardings=shardings)
  opt_hlo = hlo_of(opt.lower(params, state, params))
  mask_copy = jax.tree.map(np.asarray, mask)
  _, _, loss = step(params, state, tokens)
  results["spra.masked"] = dict(step=summarize(count_collectives(step_hlo)),
                                optimizer=summarize(count_collectives(opt_hlo)),
                                loss=float(jax.block_until_ready(loss)), trainable=spra.num_trainable(mask_copy))

  # The lean path, with the same (shard-local) mask.
  lean = sh.sharded_lean_step(loss_fn, optax.adamw(LR))
  state = lean.init(fresh(), jax.device_put(mask_copy, sh.mask_shardings(mask, shardings)))
  lean_sh = sh.lean_state_shardings(state, shardings)
  step_hlo = hlo_of(lean.lower(state, tokens))

  def optimizer_part(s, grads):
    updates, opt_state = lean.tx.update(grads, s.opt_state, s.delta.values)
    params, delta = spra.apply_updates(s.params, s.delta, updates)
    return s._replace(params=params, delta=delta, opt_state=opt_state)

  opt = jax.jit(optimizer_part, in_shardings=(lean_sh, lean_sh.pending), out_shardings=lean_sh)
  opt_hlo = hlo_of(opt.lower(state, state.pending))
  state, loss = lean(state, tokens)
  results["spra lean"] = dict(step=summarize(count_collectives(step_hlo)),
                              optimizer=summarize(count_collectives(opt_hlo)),
                              loss=float(jax.block_until_ready(loss)), trainable=spra.num_trainable(mask_copy))

  # XLA combines collectives into tuples differently per program, so compare their components: the multiset of
  # (op, component shape) of a sparse method minus full fine-tuning's. A component "scales with a parameter" when
  # its shape is a parameter's shape, or the shape of a piece of it cut along any dimensions by mesh-axis sizes.
  cuts = sorted({math.prod(c) for r in range(4) for c in itertools.combinations(mesh.shape.values(), r)})
  param_shapes = set()
  for leaf in jax.tree.leaves(base):
    options = [[s // c for c in cuts if s % c == 0] for s in leaf.shape]
    param_shapes.update(f"f32[{','.join(map(str, shape))}]" for shape in itertools.product(*options))
  full_parts = collections.Counter(components(results["full"]["step"]["ops"]))
  for method in ("spra.masked", "spra lean"):
    extra = collections.Counter(components(results[method]["step"]["ops"])) - full_parts
    results[method]["extra_vs_full"] = [dict(op=op, shape=shape, count=n) for (op, shape), n in sorted(extra.items())]
    results[method]["extra_param_sized"] = [e for e in results[method]["extra_vs_full"] if e["shape"] in param_shapes]
  return dict(mesh=dict(MESHES[mesh_name]), methods=results)


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def table(mesh_name: str, res: dict) -> str:
  head = ["method", "trainable"] + list(COLLECTIVES) + ["total", "optimizer part", "extra vs full (param-sized)"]
  lines = [f"### {mesh_name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, r in res["methods"].items():
    cells = [method, f"{r['trainable']:,}"]
    for op in COLLECTIVES:
      c = r["step"]["by_op"][op]
      cells.append(f"{c['count']} / {fmt_bytes(c['bytes'])}" if c["count"] else "0")
    cells.append(f"{r['step']['count']} / {fmt_bytes(r['step']['bytes'])}")
    cells.append(f"{r['optimizer']['count']} / {fmt_bytes(r['optimizer']['bytes'])}")
    if method == "full":
      cells.append("-")
    else:
      n_extra = sum(e["count"] for e in r["extra_vs_full"])
      cells.append(f"{n_extra} ({len(r['extra_param_sized'])})")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Cells: count / bytes per device (an op's result). Extra vs full: arrays moved by collectives that "
               "full fine-tuning's step does not move (in parentheses: those shaped like a parameter or a piece of "
               "one).")
  for method, r in res["methods"].items():
    if method != "full" and r["extra_vs_full"]:
      shown = ", ".join(f"{e['count']}x {e['op']} {e['shape']}" for e in r["extra_vs_full"])
      lines.append(f"- {method} extra: {shown}")
  return "\n".join(lines)


def check(results: dict) -> list[str]:
  failures = []
  for mesh_name, res in results.items():
    for method in ("spra.masked", "spra lean"):
      r = res["methods"][method]
      if r["optimizer"]["count"]:
        failures.append(f"{mesh_name} / {method}: the optimizer part has {r['optimizer']['count']} collectives")
      if r["extra_param_sized"]:
        failures.append(f"{mesh_name} / {method}: param-sized collectives beyond full fine-tuning: "
                        f"{r['extra_param_sized']}")
  return failures


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="a tiny model (d=64) for a quick check")
  ap.add_argument("--meshes", default="2x4,1x8", help="comma-separated: " + ",".join(MESH_KEYS))
  ap.add_argument("--density", type=float, default=0.01)
  ap.add_argument("--json", default=None, help="write results here (and the table as .md beside it)")
  args = ap.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit(f"needs 8 devices, found {jax.device_count()}: JAX started before this script set XLA_FLAGS.")
  cfg = config(args.small)
  results = {}
  for key in args.meshes.split(","):
    name = MESH_KEYS[key.strip()]
    results[name] = run_mesh(name, cfg, args.density)
  text = [f"## Collectives per training step ({jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{'small' if args.small else 'default'} Llama-shaped model, density {args.density})", ""]
  text += [table(name, res) + "\n" for name, res in results.items()]
  failures = check(results)
  text.append("Checks: " + ("optimizer parts have no collectives; sparse methods add no param-sized collective "
                            "beyond full fine-tuning's." if not failures else "FAILED: " + "; ".join(failures)))
  report = "\n".join(text)
  print(report)
  summary = {"config": cfg, "density": args.density, "device": str(jax.devices()[0].platform),
             "results": results, "failures": failures}
  if args.json:
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    path.with_suffix(".md").write_text(report + "\n")
  return summary


if __name__ == "__main__":
  out = main()
  sys.exit(1 if out["failures"] else 0)
