"""Fault test: one fine-tuning job killed with SIGKILL at seeded random moments, resumed each time, until it completes.

The result must be bit-identical to an uninterrupted run: the adapter's arrays, every line of metrics.jsonl (each
train step exactly once) and the results. The kills are spread over the job: during start-up (checks, the lock,
building the method, restoring, compiling), at random times during training, while a checkpoint is being written,
and after training (the test evaluation, the adapter save, the plot). The job is the bag-of-words worker, each run a
fork of one process that imported everything once, with compilations cached on disk, so the whole test takes about 80 s
on two busy cores.
"""

import json
import pathlib
import random
import signal
import sys
import time

import pytest

from spra_jax.finetune import FinetuneConfig

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from finetune_worker import Server, assert_same_run, write_reviews_csv  # noqa: E402

NUM_KILLS = 10
SEED = 20
STEP_SLEEP = "0.05"  # seconds per step, on top of the step itself
# Where each kill aims, in turn. 'start-up' comes after a run has shown how long a start-up takes; 'training' kills
# land within a few checkpoints of where the attempt resumed, so that the kills spread over the whole run.
KINDS = ("training", "checkpoint save", "start-up", "training", "checkpoint save", "training", "checkpoint save",
         "start-up", "training", "after training")
TOTAL_STEPS, CHECKPOINT_EVERY = 30, 5
TMP = ".orbax-checkpoint-tmp"  # how Orbax names a checkpoint it is still writing


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "reviews.csv"
  write_reviews_csv(path)
  return path


def _config(directory, csv):
  return FinetuneConfig(model="bag-of-words", dataset=str(csv), method="spra", density=0.05, preset=None, lr=3e-2,
                        steps=TOTAL_STEPS, batch_size=16, max_length=24, eval_every=10,
                        checkpoint_every=CHECKPOINT_EVERY, seed=0, output=str(directory / "run"))


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


@pytest.fixture
def server(tmp_path):
  """Forks of one worker process that imported everything once; compilations cached on disk across the runs."""
  served = Server(compile_cache=tmp_path / "jax-cache")
  yield served
  served.close()


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reviews_csv, server):
  env = {"SPRA_WORKER_STEP_SLEEP": STEP_SLEEP}
  t_begin = time.perf_counter()
  straight = _config(tmp_path / "straight", reviews_csv)
  worker = server.start(straight, env=env)
  assert worker.wait() == 0, worker.output()

  cfg = _config(tmp_path / "killed", reviews_csv)
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
  assert_same_run(pathlib.Path(straight.output), out)
  assert json.loads((out / "results.json").read_text())["steps"] == TOTAL_STEPS
