"""The fine-tuning job: every method trains, writes its outputs, resumes exactly (after Ctrl-C and after SIGKILL, at
random moments too), guards and locks its directory."""

import json
import pathlib
import random
import re
import shlex
import signal
import sys
import time

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

import spra_jax as spra
from spra_jax import data, recipes
from spra_jax import finetune as finetune_lib
from spra_jax.finetune import FinetuneConfig, finetune

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import finetune_worker  # noqa: E402
from finetune_worker import BagOfWords, Server, ServedRun, assert_same_run, write_reviews_csv  # noqa: E402


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
  """600 real Rotten Tomatoes snippets as a local CSV (the job's local-file path)."""
  path = tmp_path_factory.mktemp("data") / "reviews.csv"
  write_reviews_csv(path)
  return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """Runs of the worker, each a fork of one process that imported everything once (compilations cached on disk)."""
  served = Server(compile_cache=tmp_path_factory.mktemp("jax-cache"))
  yield served
  served.close()


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(data._minilm_dir())


def config(tmp_path, csv, **kw):
  base = dict(model="bag-of-words", dataset=str(csv), method="spra", density=0.05, preset=None, lr=3e-2,
              steps=24, batch_size=16, max_length=24, eval_every=12, checkpoint_every=8, seed=0,
              output=str(tmp_path / "run"))
  return FinetuneConfig(**{**base, **kw})


def run(cfg, tokenizer, **kw):
  model = BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0))
  return finetune(cfg, model=model, tokenizer=tokenizer, progress=False, **kw), model


@pytest.mark.parametrize("method", ["spra", "head", "full"])
def test_each_method_trains_and_writes_its_outputs(method, tmp_path, reviews_csv, tokenizer):
  cfg = config(tmp_path, reviews_csv, method=method)
  results, model = run(cfg, tokenizer)
  out = pathlib.Path(cfg.output)
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 25))
  assert [r["step"] for r in rows if r["split"] == "validation"] == [12, 24]
  assert set(results["test"]) == {"accuracy", "mcc", "f1"} and 0 <= results["test"]["accuracy"] <= 1
  assert np.mean([r["loss"] for r in train[-6:]]) < np.mean([r["loss"] for r in train[:6]])  # it learns
  assert (out / "curves.png").stat().st_size > 5_000
  assert json.loads((out / "results.json").read_text())["test"] == results["test"]
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  head = 32 * 2 + 2
  if method == "spra":
    assert (out / "adapter" / "adapter_config.json").exists()
    delta = spra.load_adapter(out / "adapter")
    assert spra.num_trainable(delta.mask) == results["trainable"]
    assert head < results["trainable"] < 0.1 * params
    # The adapter carries the base's fingerprint (taken before training moved the weights in place) and its name.
    base = nnx.state(BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0)), nnx.Param)
    assert spra.load_adapter_config(out / "adapter")["base_model"] == "bag-of-words"
    merged = spra.merge(base, spra.load_adapter(out / "adapter", base_params=base))
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(nnx.state(model, nnx.Param))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # the model holds the trained weights
    with pytest.raises(ValueError, match="fingerprint|base"):
      spra.load_adapter(out / "adapter", base_params=nnx.state(BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(1)),
                                                               nnx.Param))
  elif method == "head":
    assert results["trainable"] == head
  else:
    assert results["trainable"] == params
    assert (out / "adapter" / "adapter_config.json").exists()


def test_output_directory_is_guarded(tmp_path, reviews_csv, tokenizer, capsys):
  # No lr: the method's default for the family (a model of unknown family, classification: the encoder row).
  cfg = config(tmp_path, reviews_csv, steps=8, eval_every=8, lr=None)
  results, _ = run(cfg, tokenizer)
  assert "learning rate 0.02 (the default of spra for encoder models)\n" in capsys.readouterr().out
  out = pathlib.Path(cfg.output)
  assert json.loads((out / "config.json").read_text())["lr"] == 0.02 == results["lr"]
  assert json.loads((out / "results.json").read_text())["lr"] == 0.02
  with pytest.raises(ValueError, match="already holds this run; pass --resume"):
    run(cfg, tokenizer)
  with pytest.raises(ValueError, match=r"different run \(fields that differ: \['density'\]; density: saved 0.05, "
                                       r"given 0.1\)"):
    run(config(tmp_path, reviews_csv, steps=8, eval_every=8, density=0.1, lr=None), tokenizer)
  with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
    run(cfg, tokenizer, resume=True, overwrite=True)
  results, _ = run(config(tmp_path, reviews_csv, steps=8, eval_every=8, density=0.1), tokenizer, overwrite=True)
  assert results["steps"] == 8 and results["lr"] == 3e-2
  assert (out / ".lock").exists() and (out / ".lock").read_text() == ""  # kept through --overwrite, released empty


def test_default_learning_rates_follow_the_table():
  assert finetune_lib.DEFAULT_LR == {
      "encoder": {"spra": 2e-2, "head": 1e-1, "lora": 3e-3, "full": 1e-4},
      "decoder": {"spra": 5e-3, "head": 3e-3, "lora": 3e-3, "full": 1e-4},
  }
  assert FinetuneConfig().lr is None
  for method in finetune_lib.METHODS:
    assert finetune_lib.default_lr(method, "encoder") == finetune_lib.DEFAULT_LR["encoder"][method]


def test_bad_inputs_name_what_was_expected(tmp_path, reviews_csv, tokenizer):
  with pytest.raises(ValueError, match="method must be one of"):
    FinetuneConfig(method="prefix")
  with pytest.raises(ValueError, match="unknown dataset 'no-such-data'.*rotten-tomatoes"):
    run(config(tmp_path, "no-such-data"), tokenizer)
  with pytest.raises(ValueError, match="label column 'sentiment'"):
    run(config(tmp_path, reviews_csv, label_column="sentiment"), tokenizer)


def test_ctrl_c_saves_the_last_step_and_the_resume_is_exact(tmp_path, reviews_csv, tokenizer, monkeypatch, request):
  # Python's own handler to start from, whatever an earlier test in this worker process left installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
  straight, _ = run(config(tmp_path / "a", reviews_csv, lr=None), tokenizer)  # the default rate, 0.02
  original, calls = recipes.Run.step, []

  def step(self, state, batch):
    calls.append(1)
    if len(calls) == 12:  # Ctrl-C during step 12, a step with an evaluation (eval_every=12) and no checkpoint
      signal.raise_signal(signal.SIGINT)
    return original(self, state, batch)

  monkeypatch.setattr(recipes.Run, "step", step)
  cfg = config(tmp_path / "b", reviews_csv, lr=None)
  out = pathlib.Path(cfg.output)
  with pytest.raises(finetune_lib.Interrupted) as stopped:
    run(cfg, tokenizer)
  assert (stopped.value.step, stopped.value.total) == (12, 24)
  assert stopped.value.checkpoint == out / "checkpoints" / "12" and stopped.value.checkpoint.is_dir()
  assert "resume=True" in str(stopped.value)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the job's handler is gone
  rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13)) and rows[-1]["split"] == "train"
  monkeypatch.undo()
  # config.json holds the resolved rate, so the resume may give it explicitly; it evaluates step 12 first, as the
  # straight run did.
  resumed, _ = run(config(tmp_path / "b", reviews_csv, lr=0.02), tokenizer, resume=True)
  assert_same_run(tmp_path / "a" / "run", out)
  assert resumed["test"] == straight["test"] and resumed["validation"] == straight["validation"]


def _wait_for(condition, worker, what, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert worker.poll() is None, f"the run ended before {what}: " + worker.output()[-3000:]
    assert time.time() < deadline, f"timed out waiting for {what}: " + worker.output()[-3000:]
    time.sleep(0.01)


def test_resume_after_sigkill_is_exact_full(tmp_path, reviews_csv, server):
  common = dict(method="full", steps=30, eval_every=30, checkpoint_every=6)
  straight = config(tmp_path / "a", reviews_csv, **common)
  worker = server.start(straight)
  assert worker.wait() == 0, worker.output()

  killed = config(tmp_path / "b", reviews_csv, **common)
  worker = server.start(killed)
  ckpt_dir = pathlib.Path(killed.output) / "checkpoints"
  _wait_for(lambda: (ckpt_dir / "12").is_dir(), worker, "checkpoint 12")
  worker.send_signal(signal.SIGKILL)
  worker.wait()
  assert not (pathlib.Path(killed.output) / "results.json").exists()  # it really was cut short
  worker = server.start(killed, "--resume")
  assert worker.wait() == 0, worker.output()
  assert_same_run(pathlib.Path(straight.output), pathlib.Path(killed.output), sparse=False)


# The SpaRTA job that the two SIGKILL tests below interrupt, and its uninterrupted run (made once, for both).
SPRA_30 = dict(method="spra", steps=30, eval_every=10, checkpoint_every=5)


@pytest.fixture(scope="module")
def straight_spra(tmp_path_factory, reviews_csv, server):
  """The output directory of SPRA_30 run straight through."""
  straight = config(tmp_path_factory.mktemp("straight"), reviews_csv, **SPRA_30)
  worker = server.start(straight, env={"SPRA_WORKER_STEP_SLEEP": "0.05"})  # (the pause changes no number)
  assert worker.wait() == 0, worker.output()
  return pathlib.Path(straight.output)


def test_lock_sigkill_and_ctrl_c_then_resume_is_exact(tmp_path, reviews_csv, tokenizer, server, straight_spra):
  """One run: locked against a second job, SIGKILLed, resumed (taking the stale lock over), Ctrl-C'd, resumed."""
  cfg = config(tmp_path / "b", reviews_csv, **SPRA_30)
  out = pathlib.Path(cfg.output)
  worker = server.start(cfg)
  _wait_for(lambda: (out / "checkpoints" / "10").is_dir(), worker, "checkpoint 10")
  worker.send_signal(signal.SIGSTOP)  # frozen where it is, still holding the lock
  # A second job on the same directory is refused at once, naming the holder.
  model = BagOfWords(tokenizer.vocab_size, 2, rngs=nnx.Rngs(0))
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=rf"{re.escape(str(out))} is in use by another job: pid {worker.pid} on "
                                       rf"host \S+ since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"):
    finetune(cfg, resume=True, model=model, tokenizer=tokenizer, progress=False)
  assert time.perf_counter() - t0 < 5  # at once: nothing was loaded
  killed_pid = worker.pid
  worker.send_signal(signal.SIGKILL)
  worker.wait()
  assert json.loads((out / ".lock").read_text())["pid"] == killed_pid  # the dead holder's note stays behind...

  start = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  worker = server.start(cfg, "--resume")  # ...and the kernel released its flock: the resume takes the lock over
  _wait_for(lambda: worker.output().count("worker: step ") >= 19 - start, worker, "step 19")
  worker.send_signal(signal.SIGINT)  # Ctrl-C
  assert worker.wait() == 130, worker.output()
  text = worker.output()
  assert f"note: took over the lock of {out} from pid {killed_pid} on host" in text
  assert "Traceback" not in text
  found = re.search(rf"^interrupted after step (\d+) of 30: the checkpoint of step \1 is in "
                    rf"{re.escape(str(out))}/checkpoints/\1; resume with: (.+ --resume)$", text, re.M)
  assert found, text
  assert (out / "checkpoints" / found.group(1)).is_dir()
  # The printed command resumes the run, and the result is the straight run's. It names this interpreter and the
  # worker script; its arguments run in a fork of the server (the same command line, without the imports again).
  argv = shlex.split(found.group(2))
  assert argv[:3] == [sys.executable, finetune_worker.__file__, "finetune"], argv
  worker = ServedRun(server, cfg, argv[2:], None)
  assert worker.wait() == 0, worker.output()
  assert_same_run(straight_spra, out)


# --------------------------------------------------------------------------
# SIGKILL at random moments: the job is the bag-of-words worker, each run a fork of the module's server, with
# compilations cached on disk.
# --------------------------------------------------------------------------

NUM_KILLS = 10
SEED = 20
STEP_SLEEP = "0.05"  # seconds per step, on top of the step itself
# Where each kill aims, in turn. 'start-up' comes after a run has shown how long a start-up takes; 'training' kills
# land within a few checkpoints of where the attempt resumed, so that the kills spread over the whole run.
KINDS = ("training", "checkpoint save", "start-up", "training", "checkpoint save", "training", "checkpoint save",
         "start-up", "training", "after training")
TOTAL_STEPS, CHECKPOINT_EVERY = SPRA_30["steps"], SPRA_30["checkpoint_every"]
TMP = ".orbax-checkpoint-tmp"  # how Orbax names a checkpoint it is still writing


def _saving(out):
  ckpt = out / "checkpoints"
  return {p.name for p in ckpt.iterdir() if TMP in p.name} if ckpt.is_dir() else set()


def _latest_checkpoint(out):
  ckpt = out / "checkpoints"
  return max([int(p.name) for p in ckpt.iterdir() if p.name.isdigit()], default=0) if ckpt.is_dir() else 0


def _train_lines(out):
  path = out / "metrics.jsonl"
  return sum('"split": "train"' in x for x in path.read_text(errors="replace").splitlines()) if path.exists() else 0


def _wait(worker, condition, timeout=240):
  """Polls ``condition`` every few ms; False if the worker ended first."""
  deadline = time.time() + timeout
  while not condition():
    if worker.poll() is not None:
      return False
    assert time.time() < deadline, "timed out: " + worker.output()[-3000:]
    time.sleep(0.003)
  return True


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reviews_csv, server, straight_spra):
  """SPRA_30 killed with SIGKILL at seeded random moments, resumed each time, until it completes.

  The result must be bit-identical to the uninterrupted run: the adapter's arrays, every line of metrics.jsonl (each
  train step exactly once) and the results. The kills are spread over the job: during start-up (checks, the lock,
  building the method, restoring, compiling), at random times during training, while a checkpoint is being written,
  and after training (the test evaluation, the adapter save, the plot).
  """
  env = {"SPRA_WORKER_STEP_SLEEP": STEP_SLEEP}
  t_begin = time.perf_counter()
  cfg = config(tmp_path / "killed", reviews_csv, **SPRA_30)
  out = pathlib.Path(cfg.output)
  rng = random.Random(SEED)
  kills, log, startups = [], [], []
  while True:
    start = _latest_checkpoint(out)  # where this attempt resumes from
    worker = server.start(cfg, *(["--resume"] if kills else []), env=env)
    if len(kills) == NUM_KILLS:
      assert worker.wait() == 0, worker.output()
      break
    kind = KINDS[len(kills) % len(KINDS)]
    before = _saving(out)
    steps = lambda: worker.output().count("worker: step ")  # noqa: E731  (steps this attempt has done)
    assert _wait(worker, lambda: "worker: ready" in worker.output()), worker.output()
    t_ready = time.perf_counter()
    if kind == "start-up":  # anywhere between the ready model and the first step: checks, lock, restore, compile
      time.sleep(rng.uniform(0, min(startups)))
    elif kind == "training":  # just after one of the next few steps, or during the step after it
      target = min(rng.randint(1, 2 * CHECKPOINT_EVERY), TOTAL_STEPS - start)
      if _wait(worker, lambda: steps() >= 1):
        startups.append(time.perf_counter() - t_ready)
      _wait(worker, lambda: steps() >= target)
      time.sleep(rng.uniform(0, float(STEP_SLEEP)))
    elif kind == "checkpoint save":  # a new save has begun (or, when none is left to do, training is over)
      _wait(worker, lambda: bool(_saving(out) - before) or f"step {TOTAL_STEPS}: validation" in worker.output())
      time.sleep(rng.uniform(0, 0.005))
    else:  # after training: the test evaluation, the adapter, the plot, the results
      _wait(worker, lambda: f"step {TOTAL_STEPS}: validation" in worker.output())
      time.sleep(rng.uniform(0, 0.3))
    if worker.poll() is None:
      worker.kill()
    status = worker.wait()
    if status == -signal.SIGKILL:
      kills.append(kind)
      log.append(f"{kind}: killed after {steps()} steps of the attempt, checkpoint {_latest_checkpoint(out)} done"
                 + (", mid-save" if _saving(out) - before else "")
                 + ("" if (out / "config.json").exists() else ", before config.json"))
    else:  # it finished before the kill landed: a completed run ends the test
      assert status == 0, worker.output()
      log.append(f"{kind}: completed before the kill")
      break
  print(f"\n{len(kills)} kills, {time.perf_counter() - t_begin:.0f} s in all:\n  " + "\n  ".join(log))

  assert len(kills) == NUM_KILLS, log
  assert any("mid-save" in line for line in log), log  # at least one kill landed while a checkpoint was written
  assert_same_run(straight_spra, out)
  assert json.loads((out / "results.json").read_text())["steps"] == TOTAL_STEPS
