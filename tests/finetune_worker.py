"""A fine-tuning run in its own process, through the command line: python finetune_worker.py ARGS... .

ARGS are ``spra-jax finetune`` options (``--resume`` included); the model is a
small bag-of-words classifier handed to the command (``--model`` only names
it). Each step sleeps ``SPRA_WORKER_STEP_SLEEP`` seconds (default 0.1) so that
a test can interrupt or kill the process between steps. The worker prints
``worker: ready`` once its imports are done and its model is built, and
``worker: step ...`` after each step, for tests that time their kills.

The tests import the model, the CSV they train on, :class:`Worker` (this
script in a subprocess) and :func:`assert_same_run` from here.
"""

import json
import os
import pathlib
import select
import shlex
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

import spra_jax as spra
from spra_jax import cli, data, recipes

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


class BagOfWords(nnx.Module):
  """Embeddings, mean pooling over the attention mask, a hidden layer, a classifier."""

  def __init__(self, vocab, num_labels, *, rngs):
    self.embed = nnx.Embed(vocab, 32, rngs=rngs)
    self.dense = nnx.Linear(32, 32, rngs=rngs)
    self.classifier = nnx.Linear(32, num_labels, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    m = attention_mask[..., None].astype(jnp.float32)
    pooled = (self.embed(input_ids) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return self.classifier(jax.nn.gelu(self.dense(pooled)))


def write_reviews_csv(path) -> None:
  """600 real Rotten Tomatoes snippets as a local CSV with string labels (the job's local-file path)."""
  ds = data.load("rotten-tomatoes", seed=0)["train"].select(range(600))
  ds.to_pandas()[["text", "label"]].assign(label=lambda d: d.label.map({0: "rotten", 1: "fresh"})).to_csv(path, index=False)


def cli_args(config) -> list[str]:
  """The ``spra-jax finetune`` options that give ``config`` (a FinetuneConfig), every field spelled out."""
  args = []
  for name, value in vars(config).items():
    if value is None and name == "preset":
      value = "none"
    if value is not None:
      args += [f"--{name.replace('_', '-')}", str(value)]
  return args


# Helpers for the tests that run this worker.


class Worker:
  """The worker script (the command line, a bag-of-words model) in a subprocess, its output in a log file."""

  def __init__(self, cfg, *flags, argv=None, env=None):
    self.log = pathlib.Path(cfg.output + ".log")
    self.log.parent.mkdir(parents=True, exist_ok=True)
    self.start = self.log.stat().st_size if self.log.exists() else 0
    argv = argv or [sys.executable, os.path.abspath(__file__), *cli_args(cfg), "--no-progress", *flags]
    with open(self.log, "ab") as log:
      self.proc = subprocess.Popen(argv, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)

  def output(self):
    """What this process wrote."""
    return self.log.read_bytes()[self.start:].decode(errors="replace")

  def wait(self, timeout=300):
    return self.proc.wait(timeout=timeout)

  @property
  def pid(self):
    return self.proc.pid

  def poll(self):
    return self.proc.poll()

  def send_signal(self, sig):
    self.proc.send_signal(sig)

  def kill(self):
    self.send_signal(signal.SIGKILL)


def assert_same_run(a: pathlib.Path, b: pathlib.Path, *, sparse: bool = True) -> None:
  """Two output directories hold the same run: every log line (each step once), the results, the adapter's arrays."""
  ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
  for key in ("test", "validation", "trainable", "steps", "lr", "opt_state_bytes", "majority"):
    assert ra[key] == rb[key], key
  la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
  assert la == lb
  train = [r["step"] for r in lb if r["split"] == "train"]
  assert train == list(range(1, ra["steps"] + 1))
  if sparse:
    da, db = (spra.load_adapter(d / "adapter") for d in (a, b))
    for x, y in zip(jax.tree.leaves(da), jax.tree.leaves(db), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  else:
    va, vb = (spra.checkpoint.load_dense_adapter(d / "adapter")[0] for d in (a, b))
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def main(argv, tokenizer=None):
  tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  pause = float(os.environ.get("SPRA_WORKER_STEP_SLEEP", "0.1"))
  original = recipes.Run.step

  def slow(self, state, batch):
    time.sleep(pause)
    state, loss = original(self, state, batch)
    print(f"worker: step loss {float(loss)}", flush=True)  # one line per step: tests time their kills by it
    return state, loss

  recipes.Run.step = slow  # every method steps through a Run
  model = BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0))
  print("worker: ready", flush=True)
  prog = shlex.join([sys.executable, os.path.abspath(__file__)])
  argv = argv[1:] if argv[:1] == ["finetune"] else argv  # the resume command it prints names the subcommand
  return cli.main(["finetune", *argv], prog=prog, model=model, tokenizer=tokenizer)


def serve():
  """``--serve``: import and load the tokenizer once, then run each job read from stdin in a forked child.

  A request is a JSON line ``{"argv": [...], "log": path, "env": {...}}``; the
  server answers with the child's pid, and with ``exit STATUS`` when it ends
  (negative: killed by that signal). Nothing here has started JAX's runtime or
  a thread, so forking is safe; each child starts its own. Tests that start
  many short runs save the imports this way (several seconds a run).
  """
  tokenizer = transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  # What each run would otherwise import and warm up on its own, for its curves.png: matplotlib and its fonts
  # (about 1.5 s of CPU a run). Drawing starts no thread, so forking stays safe.
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  ax.plot([0, 1], [0, 1], label="warm-up")
  ax.legend()
  fig.savefig(io.BytesIO(), format="png")
  plt.close(fig)
  print("serving", flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: its output goes to the log; it never returns to the loop
      status = 1
      try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.update(request.get("env") or {})
        status = main(request["argv"], tokenizer=tokenizer)
      except BaseException:
        import traceback

        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(pid, flush=True)
    print(f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)


class Server:
  """This script's ``--serve`` mode in a subprocess: :meth:`start` runs a job in a fork of it."""

  def __init__(self, env=None, *, compile_cache=None):
    if compile_cache is not None:  # the runs' compilations, on disk: later runs load them instead of compiling
      env = {**(env or {}), "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=ROOT, bufsize=0,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert self.line(120) == "serving"

  def line(self, timeout):
    """The server's next line, read without buffering (so that select sees what is still to come)."""
    out, fd, deadline = b"", self.proc.stdout.fileno(), time.time() + timeout
    while not out.endswith(b"\n"):
      ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
      assert ready, f"the server said nothing within {timeout} s"
      byte = os.read(fd, 1)
      assert byte, "the server ended"
      out += byte
    return out.decode().strip()

  def start(self, cfg, *flags, env=None):
    return ServedRun(self, cfg, [*cli_args(cfg), "--no-progress", *flags], env)

  def close(self):
    self.proc.stdin.close()  # the server's loop ends at the end of its input
    self.proc.wait(timeout=60)
    self.proc.stdout.close()


class ServedRun:
  """A job running in a fork of a :class:`Server` (the interface of :class:`Worker`)."""

  def __init__(self, server, cfg, argv, env):
    self.server, self.log = server, pathlib.Path(cfg.output + ".log")
    self.log.parent.mkdir(parents=True, exist_ok=True)
    self.log.touch()
    self.start = self.log.stat().st_size
    server.proc.stdin.write((json.dumps({"argv": argv, "log": str(self.log), "env": env}) + "\n").encode())
    self.pid, self.status = int(server.line(60)), None

  def output(self):
    return self.log.read_bytes()[self.start:].decode(errors="replace")

  def poll(self):
    """None while it runs, else its exit status."""
    if self.status is None:
      try:
        os.kill(self.pid, 0)  # the server reaps the child as soon as it ends, so this fails from then on
        return None
      except ProcessLookupError:
        return self.wait()
    return self.status

  def send_signal(self, sig):
    try:
      os.kill(self.pid, sig)
    except ProcessLookupError:
      pass  # it has ended: wait() says how

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def wait(self, timeout=300):
    if self.status is None:
      answer = self.server.line(timeout).split()
      assert answer[0] == "exit", answer
      self.status = int(answer[1])
    return self.status


if __name__ == "__main__":
  sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1:]))
