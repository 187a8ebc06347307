"""The adapter-size benchmark runs on a small Llama-shaped tree and reports sizes within the bound."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relative):
  path = ROOT / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_adapter_size_benchmark_small(tmp_path, capsys):
  bench = load("examples/benchmarks/adapter_size.py")
  out_json, out_md = tmp_path / "size.json", tmp_path / "size.md"
  args = ["--small", "--layers", "1", "--densities", "0.01", "--json", str(out_json), "--md", str(out_md)]
  summary = bench.main(args)
  printed = capsys.readouterr().out
  assert json.loads(out_json.read_text())["results"][0]["trainable"] == summary["results"][0]["trainable"]
  res = summary["results"][0]
  # 1 % of the seven kernels of one layer, each rounded on its own.
  kernels = 4 * 256 * 256 + 3 * 256 * 512
  assert abs(res["trainable"] - 0.01 * kernels) <= 7
  rows = res["rows"]
  assert rows["spra int32"]["within_bound"] and rows["spra gaps"]["within_bound"]
  assert rows["spra gaps"]["data_bytes"] < rows["spra int32"]["data_bytes"]
  # The package's format stores two int32 coordinates and a float32 per entry, uncompressed.
  assert rows["peft-sparta"]["data_bytes"] >= 12 * res["trainable"]
  assert "| 1 % |" in printed and "spra gaps" in out_md.read_text()
