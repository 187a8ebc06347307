"""Two JAX processes (4 CPU devices each, gloo) train, save and load as one process with 8 devices does.

``tests/multihost_worker.py`` is the program; here it runs once as a lone process and once as a 2-process cluster on
127.0.0.1, all three processes at the same time. The values are compared, not only the completion: CPU collectives
have been seen to return wrong data intermittently.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import safetensors.numpy
from conftest import xla_flags

import spra_jax as spra
from spra_jax.checkpoint import _files

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
TIMEOUT_S = 600


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_together(runs):
  """Starts every ``(argv, env)`` at once, waits for all (bounded), and asserts each exited 0."""
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for cmd, env in runs]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]


def test_two_processes_match_one_process_and_save_one_adapter(tmp_path):
  lone, cluster = tmp_path / "one", tmp_path / "two"
  lone.mkdir()
  cluster.mkdir()
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # (the worker adds its device count)
  cmds = [[sys.executable, str(WORKER), str(lone), "1", "0", "0"],
          *[[sys.executable, str(WORKER), str(cluster), "2", str(i), port] for i in (0, 1)]]
  _run_together([(c, env) for c in cmds])

  ref = json.loads((lone / "losses-0.json").read_text())
  for i in (0, 1):
    got = json.loads((cluster / f"losses-{i}.json").read_text())
    for method in ("masked", "lean"):
      np.testing.assert_allclose(got[method], ref[method], rtol=1e-5, err_msg=method)
    assert got == json.loads((cluster / "losses-0.json").read_text())  # both processes saw the same replicated loss

  for name in ("masked", "lean"):
    a, b = spra.load_adapter(lone / name), spra.load_adapter(cluster / name)
    assert a.num_trainable == b.num_trainable > 0
    for x, y in zip(jax.tree.leaves(a.mask), jax.tree.leaves(b.mask)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.values), jax.tree.leaves(b.values)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
    assert np.abs(np.concatenate([np.ravel(v) for v in jax.tree.leaves(b.values)])).max() > 0  # it trained
    config_a, config_b = spra.load_adapter_config(lone / name), spra.load_adapter_config(cluster / name)
    assert config_b["base_fingerprint"] == config_a["base_fingerprint"] is not None
    assert _files.leftovers(cluster / name) == []  # one adapter published, no staging left by either process
  dense = [spra.checkpoint.load_dense_adapter(d / "dense")[0]["lm_head"]["kernel"] for d in (lone, cluster)]
  np.testing.assert_allclose(np.asarray(dense[1]), np.asarray(dense[0]), atol=1e-5, rtol=0)
  merged = [safetensors.numpy.load_file(str(d / "merged" / "model.safetensors")) for d in (lone, cluster)]
  assert sorted(merged[0]) == sorted(merged[1]) and len(merged[0]) > 10
  for name in merged[0]:
    np.testing.assert_allclose(merged[1][name], merged[0][name], atol=1e-5, rtol=0, err_msg=name)
  assert _files.leftovers(cluster / "dense") == _files.leftovers(cluster / "merged") == []
  sparta = [safetensors.numpy.load_file(str(d / "sparta" / "sparse_deltas.safetensors")) for d in (lone, cluster)]
  assert sorted(sparta[0]) == sorted(sparta[1])
  for name in sparta[0]:
    np.testing.assert_allclose(sparta[1][name], sparta[0][name], atol=1e-5, rtol=0, err_msg=name)


def test_the_job_on_two_processes_writes_one_run_equal_to_one_process(tmp_path, tiny_llama_dir):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import finetune_worker as fw

  from spra_jax.finetune import FinetuneConfig

  csv = tmp_path / "reviews.csv"
  fw.write_reviews_csv(csv)
  port = str(_free_port())

  def argv(out, *flags):
    cfg = FinetuneConfig(model=str(tiny_llama_dir), dataset=str(csv), method="spra", density=0.05, lr=3e-2,
                         steps=8, batch_size=16, max_length=24, eval_every=4, checkpoint_every=4, seed=0,
                         eval_examples=64, test_examples=64, mesh="data=8", output=str(out))
    return [sys.executable, "-m", "spra_jax", "finetune", *fw.cli_args(cfg),
            "--no-progress", *flags]

  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  runs = [(argv(tmp_path / "one"), "8"),
          *[(argv(tmp_path / "two", "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id", str(i)), "4") for i in (0, 1)]]
  _run_together([(cmd, {**env, "XLA_FLAGS": xla_flags(int(n))}) for cmd, n in runs])

  one, two = tmp_path / "one", tmp_path / "two"
  rows = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)}
  assert [r["step"] for r in rows[two] if r["split"] == "train"] == list(range(1, 9))  # each step once
  assert [(r["step"], r["split"]) for r in rows[two]] == [(r["step"], r["split"]) for r in rows[one]]
  for a, b in zip(rows[one], rows[two]):
    for key in set(a) - {"step", "split"}:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f"{a['step']} {a['split']} {key}")
  da, db = spra.load_adapter(one / "adapter"), spra.load_adapter(two / "adapter")
  for x, y in zip(jax.tree.leaves(da.mask), jax.tree.leaves(db.mask)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(da.values), jax.tree.leaves(db.values)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  assert json.loads((two / "results.json").read_text())["steps"] == 8
  assert _files.leftovers(two / "adapter") == []

  # Resume on the cluster: from the checkpoint of step 4, steps 5..8 run again and are logged once, as before.
  port = str(_free_port())
  _run_together([(argv(two, "--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                       "--process-id", str(i), "--resume"),
                  {**env, "XLA_FLAGS": xla_flags(4)}) for i in (0, 1)])
  again = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in again] == [(r["step"], r["split"]) for r in rows[two]]
  for a, b in zip(rows[two], again):
    for key in set(a) - {"step", "split"}:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=f"{a['step']} {a['split']} {key}")
  for x, y in zip(jax.tree.leaves(db.values), jax.tree.leaves(spra.load_adapter(two / "adapter").values)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_cluster_options_are_checked_before_anything_starts(capsys):
  from spra_jax import cli

  assert cli.main(["finetune", "--num-processes", "2"]) == 2
  assert "need --distributed" in capsys.readouterr().err
  assert cli.main(["finetune", "--distributed", "--coordinator-address", "127.0.0.1:1"]) == 2
  err = capsys.readouterr().err
  assert "needs all of --coordinator-address, --num-processes and --process-id" in err and "None" in err
