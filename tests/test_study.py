"""The study runner (examples/study) end to end, in its smoke size."""

import json

from conftest import load_example as load


def test_study_smoke_writes_the_three_tables_and_resumes_from_its_run_records(tiny_llama_dir, tmp_path, capsys):
  """The study runner end to end in its smoke size (tiny runs; a tiny random Llama stands in for SmolLM2)."""
  study = load("examples/study")
  out, results = tmp_path / "study", tmp_path / "RESULTS.md"
  argv = ["--smoke", "--decoder", str(tiny_llama_dir), "--output", str(out), "--results", str(results),
          "--discussion", ""]
  text = study.main(argv)
  assert results.read_text() == text
  rows = study.plan(smoke=True, decoder=str(tiny_llama_dir))
  # Every row's learning rates (one in the smoke) ran on seed 0, and the chosen one on the row's other seeds.
  records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
  specs = {json.dumps(r["config"], sort_keys=True) for r in records}
  scales = study.SMOKE_SCALES
  expected = {json.dumps(row.spec(scales[row.family], lr, 0), sort_keys=True) for row in rows for lr in row.lrs()}
  assert expected <= specs
  assert len(records) == len(specs) == len(expected) + sum(len(r.seeds) - 1 for r in rows)
  for table in ("## Table 1: all-MiniLM-L6-v2, rotten-tomatoes", "## Table 2: tiny-llama", "## Table 3",
                "## Learning-rate tuning", "## Computed comparisons"):
    assert table in text
  assert "(not run yet)" not in text
  entries = {(e["row"].table, e["row"].label): e for e in study.summarize(rows, study.Store(out), scales)}
  # Equal budgets are equal: SpaRTA at LoRA's count trains exactly LoRA's count (the head included in both).
  lora, sparta = entries[("Table 1: rotten-tomatoes", "LoRA rank 4, V/O + head")], entries[
      ("Table 1: rotten-tomatoes", "SpaRTA at LoRA-4's count, V/O + head")]
  assert lora["trainable"] == sparta["trainable"] == 6 * 2 * 4 * (384 + 384) + 384 * 2 + 2
  # Table 3's placements keep the count of 1 % of V/O (each leaf rounds on its own).
  t3 = [e for (t, _), e in entries.items() if t == "Table 3"]
  assert max(e["trainable"] for e in t3) - min(e["trainable"] for e in t3) <= 1000
  full = entries[("Table 2", "full fine-tuning")]
  # AdamW's two f32 moments per parameter (plus a few scalar counters and the learning rate).
  assert full["trainable"] == full["parameters"]
  assert 2 * 4 * full["parameters"] <= full["opt_state_bytes"] <= 2 * 4 * full["parameters"] + 64
  assert (out / "tradeoff.png").stat().st_size > 10_000 and (out / "ablation.png").stat().st_size > 10_000
  # A rerun trains nothing and renders the same page; a lost record is rerun alone.
  store = study.Store(out)
  assert study.work(rows, store, scales, log=lambda s: None) == 0
  # (the cheapest kind of run: the tiny decoder's SpaRTA, seed 1)
  lost = next(r for r in records if r["config"]["seed"] == 1 and r["config"]["method"] == "spra"
              and r["config"]["model"] == str(tiny_llama_dir))
  (out / "runs" / f"{lost['id']}.json").unlink()
  assert study.work(rows, store, scales, log=lambda s: None) == 1
  again = study.main([*argv, "--render-only"])
  assert again == results.read_text() and again.count("\n| ") == text.count("\n| ")
