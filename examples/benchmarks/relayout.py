"""Benchmark: the optimizer's collectives after moving a run to another mesh, with and without re-laying its mask.

A ``spra.masked`` state is initialised on fsdp=8 (each leaf's mask stratified over its 8 shard blocks), then put on
another mesh of the same 8 devices as it was saved and as ``spra.sharding.relayout`` re-lays it (what
``TrainCheckpointer.restore`` does by itself when the target state is built on the new mesh). For each, the
optimizer's update (``tx.update`` from dense gradients, with the ``spra.sharding`` shardings of that state) is
compiled and its collectives are counted in the HLO (``collectives.count_collectives``). The model is the
collectives benchmark's Llama-shaped decoder; 5 % of every kernel and the embedding train, the head fully.

  data=2 x fsdp=4    every new block is two old ones: re-laid, the update needs no collective.
  data=2 x tensor=4  the new mesh splits other dimensions: the entries do not fall evenly into its blocks, the
                     leaves keep their layout (correct, with the collectives it had).

Run (8 fake CPU devices are set up by the script itself, before JAX starts):
  python examples/benchmarks/relayout.py [--small] [--json examples/benchmarks/results/relayout.json]

Exits with status 1 if the re-laid update on data=2 x fsdp=4 has a collective.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import collectives  # noqa: E402

import spra_jax as spra  # noqa: E402
from spra_jax import sharding as sh  # noqa: E402

TRAIN = dict(include=r"(kernel|embedding)$", exclude=r"lm_head", full=r"lm_head")
TARGETS = {"data=2 x fsdp=4": dict(data=2, fsdp=4), "data=2 x tensor=4": dict(data=2, tensor=4)}


def count(tx, state, params, shardings) -> int:
  state_shardings = sh.opt_state_shardings(state, shardings)
  update = jax.jit(tx.update, in_shardings=(shardings, state_shardings, shardings),
                   out_shardings=(shardings, state_shardings))
  placed = jax.device_put(params, shardings)
  hlo = update.lower(placed, jax.device_put(state, state_shardings), placed).compile().as_text()
  return len(collectives.count_collectives(hlo))


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="a tiny model (d=64) for a quick check")
  ap.add_argument("--json", default=None, help="where to write the results (and a .md table beside)")
  args = ap.parse_args(argv)
  params = collectives.init_params(collectives.config(args.small))
  rules = spra.models.partition.rules_for("llama")
  tx = spra.masked(optax.adamw(1e-3), density=0.05, key=jax.random.key(0), **TRAIN)
  state = tx.init(jax.device_put(params, sh.param_shardings(params, sh.make_mesh(fsdp=8), rules)))
  rows = []
  for name, axes in TARGETS.items():
    shardings = sh.param_shardings(params, sh.make_mesh(**axes), rules)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      relaid = sh.relayout(state, shardings, strict=False)
    kept = [m for m in caught if "keep their old layout" in str(m.message)]
    masks = jax.tree.leaves(spra.mask_of(relaid), is_leaf=spra.masks.is_leaf_mask)
    grids = [spra.masks.block_grid(m.shape, s) for m, s in zip(masks, jax.tree.leaves(shardings))]
    sparse = [(m, g) for m, g in zip(masks, grids) if m.kind == "sparse"]
    rows.append({"mesh": name, "as_saved": count(tx, state, params, shardings),
                 "relaid": count(tx, relaid, params, shardings),
                 "leaves_relaid": sum(m.blocks == g for m, g in sparse),
                 "sparse_leaves": len(sparse), "warned": bool(kept)})
  lines = ["| fsdp=8 onto | optimizer collectives as saved | after relayout | sparse leaves shard-local |",
           "|---|---|---|---|"]
  lines += [f"| {r['mesh']} | {r['as_saved']} | {r['relaid']} | {r['leaves_relaid']} of {r['sparse_leaves']} |"
            for r in rows]
  text = "\n".join(lines)
  print(text)
  if args.json:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"small": args.small, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
  if rows[0]["relaid"] != 0:
    print("FAILED: the re-laid update on data=2 x fsdp=4 has collectives", file=sys.stderr)
    raise SystemExit(1)
  return {"rows": rows}


if __name__ == "__main__":
  main()
