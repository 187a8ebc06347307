"""Two JAX processes (2 CPU devices each, gloo) train, save and load as one process with 4 devices does.

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

import spra_jax as spra
from spra_jax.checkpoint import _files

WORKER = pathlib.Path(__file__).resolve().parent / "multihost_worker.py"
TIMEOUT_S = 600


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_and_save_one_adapter(tmp_path):
  lone, cluster = tmp_path / "one", tmp_path / "two"
  lone.mkdir()
  cluster.mkdir()
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmds = [[sys.executable, str(WORKER), str(lone), "1", "0", "0"],
          *[[sys.executable, str(WORKER), str(cluster), "2", str(i), port] for i in (0, 1)]]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for c in cmds]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]

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
