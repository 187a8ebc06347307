"""The step-cost benchmark runs end to end on small models and reports real figures."""

import importlib.util
import json
import pathlib

import jax

import spra_jax as spra

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relative):
  path = ROOT / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_step_cost_benchmark_small(tmp_path, capsys):
  bench = load("examples/benchmarks/step_cost.py")
  out_json, out_png = tmp_path / "step_cost.json", tmp_path / "step_cost.png"
  summary = bench.main(["--small", "--steps", "1", "--rounds", "1", "--json", str(out_json), "--png", str(out_png)])
  printed = capsys.readouterr().out

  results = summary["results"]
  assert set(results) == {"dense / all 4 kernels", "dense / all 4 kernels, 0.1 %", "llama / paper",
                          "llama / all-linear"}
  assert results["dense / all 4 kernels, 0.1 %"]["density"] == 0.001
  for group, res in results.items():
    rows = res["rows"]
    assert list(rows) == list(bench.METHODS)

    # The sparse methods train exactly the mask's entries; rebuild it independently.
    model = bench.MODELS[res["model"]](True)
    mask = spra.sample_mask(jax.random.key(bench.MASK_SEED), model.params, density=res["density"],
                            include=res["include"])
    k = spra.num_trainable(mask)
    assert k > 0 and res["mask_trainable"] == k
    assert rows["spra.masked"]["trainable"] == rows["spra lean"]["trainable"] == k
    assert rows["full"]["trainable"] == sum(x.size for x in jax.tree.leaves(model.params))
    assert k < rows["optax.masked"]["trainable"] < rows["full"]["trainable"]
    assert rows["LoRA"]["trainable"] == rows["LoRA"]["rank"] * sum(
        sum(m.shape) for m in jax.tree.leaves(mask, is_leaf=spra.masks.is_leaf_mask) if m.kind != "frozen")

    # Optimizer state: compact < leaf-level masking < full AdamW.
    assert 0 < rows["spra.masked"]["opt_state_bytes"] < rows["optax.masked"]["opt_state_bytes"]
    assert rows["optax.masked"]["opt_state_bytes"] < rows["full"]["opt_state_bytes"]
    assert rows["floor"]["opt_state_bytes"] == 0

    # The lean step needs fewer temporaries than full fine-tuning.
    assert rows["spra lean"]["temp_bytes"] < rows["full"]["temp_bytes"]
    # The sampled weight gradient costs fewer FLOPs than the dense one it replaces, at the same k.
    assert rows["lean dense dW"]["trainable"] == k
    assert rows["spra lean"]["flops"] < rows["lean dense dW"]["flops"], group
    for method, r in rows.items():
      assert r["total_live_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
      assert r["flops"] > 0 and r["step_ms_median"] > 0, method
      assert r["alias_bytes"] > 0 or method == "floor", method  # donation took effect
    assert {g["goal"] for g in res["goals"]} >= {"lean total live <= LoRA total live"}
    assert f"### {group}" in printed

  assert len(results["llama / paper"]["goals"]) == 5 and len(results["llama / all-linear"]["goals"]) == 5
  assert [g["goal"] for g in results["dense / all 4 kernels, 0.1 %"]["goals"]][-1] == "lean FLOPs <= 1.02 x floor FLOPs"

  # The density sweep: one row per density; the sampled path's FLOPs grow with k, the dense path's do not.
  sweep = summary["sweep"]["rows"]
  assert [r["density"] for r in sweep] == list(bench.SWEEP_DENSITIES_SMALL)
  assert all(r["sampled_flops"] < r["dense_flops"] for r in sweep)
  assert sweep[0]["sampled_flops"] < sweep[-1]["sampled_flops"]
  assert abs(sweep[0]["dense_flops"] - sweep[-1]["dense_flops"]) < 0.05 * sweep[0]["dense_flops"]
  assert {r["choice"] for r in sweep} == {"sampled", "dense"}  # the cost model switches within the sweep
  assert (tmp_path / "step_cost_sweep.png").stat().st_size > 10_000
  assert "density sweep" in printed
  saved = json.loads(out_json.read_text())
  assert saved["results"].keys() == results.keys()
  assert out_png.stat().st_size > 10_000
  assert "| spra lean |" in (tmp_path / "step_cost.md").read_text()
