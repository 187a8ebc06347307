"""The output directory: its lock, its guard, the config and metrics files, the plot of the curves."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any

from spra_jax import _host
from spra_jax.finetune.config import FinetuneConfig



# ---------------------------------------------------------------------------
# Output directory: its lock, its guard, the metrics log and the plot.
# ---------------------------------------------------------------------------

LOCK_NAME = ".lock"
# What a run may leave in a directory before its config.json exists (a resume there starts afresh).
_PRE_CONFIG_FILES = {LOCK_NAME, "config.json.tmp"}


class OutputLock:
  """An exclusive lock on a job's output directory, held through an open file while the job runs.

  :meth:`acquire` (or ``with OutputLock(directory):``) creates the directory
  if needed, takes an ``flock`` on ``directory/.lock`` and writes the holder's
  pid, host and start time into it. Another lock on the same directory, from
  any process, fails at once with a ValueError naming the holder. The kernel
  drops an ``flock`` when its process ends, however it ends, so a lock left by
  a killed job needs no cleaning: the next job takes it over, and
  :attr:`stale` holds what the dead holder had written (None after a clean
  release, which empties the file). The file itself stays.

  Example:

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> with OutputLock(directory):
    ...   OutputLock(directory).acquire()
    Traceback (most recent call last):
    ...
    ValueError: ... is in use by another job: pid ... on host ... since ...; wait for it to end or stop it, or choose another --output
    >>> with OutputLock(directory) as lock:
    ...   lock.stale is None
    True
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory).absolute()
    self.path = self.directory / LOCK_NAME
    self.stale: dict[str, Any] | None = None
    self._fd: int | None = None

  @staticmethod
  def _read(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 4096, 0)
    try:
      info = json.loads(raw) if raw.strip() else None
    except ValueError:
      return None
    return info if isinstance(info, dict) else None

  @staticmethod
  def describe(info: Mapping[str, Any] | None) -> str:
    """The holder in words: ``'pid 12 on host h since 2026-01-01 10:00:00 UTC'``."""
    if not info:
      return "a process that has not written its details yet"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"

  def acquire(self) -> OutputLock:
    """Takes the lock; raises ValueError when another job holds it or the directory cannot be written."""
    import fcntl

    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create the output directory {self.directory}: {e.strerror or e}") from None
    try:
      # O_CLOEXEC: a program the job starts must not inherit the lock and keep it after the job ends.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise ValueError(f"the output directory {self.directory} is not writable: {e.strerror or e}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self.describe(self._read(fd))
      os.close(fd)
      raise ValueError(f"{self.directory} is in use by another job: {holder}; wait for it to end or stop it, or "
                       "choose another --output") from None
    except OSError as e:
      os.close(fd)
      raise ValueError(f"cannot lock the output directory {self.directory} ({e.strerror or e}); its file system "
                       "may not support locks: choose another --output") from None
    self.stale = self._read(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(info).encode(), 0)
      # The lock file may be writable in a directory that is not: try a real new file.
      probe = self.directory / f".write-check-{os.getpid()}"
      os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
      os.unlink(probe)
    except OSError as e:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise ValueError(f"the output directory {self.directory} is not writable: {e.strerror or e}") from None
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the lock file (so the next holder sees a clean release) and releases the lock."""
    import fcntl

    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # the lock is released below all the same
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> OutputLock:
    return self.acquire()

  def __exit__(self, *exc: object) -> None:
    self.release()


def _prepare_output(out: pathlib.Path, config: FinetuneConfig, *, resume: bool, overwrite: bool) -> None:
  """The directory guard (called with the directory's lock held)."""
  saved = out / "config.json"
  if saved.exists():
    try:
      previous = json.loads(saved.read_text())
    except ValueError as e:
      raise ValueError(f"{saved} is not valid JSON ({e}); pass --overwrite to start over") from None
    identity = config.identity()
    if overwrite:
      import shutil

      for entry in out.iterdir():  # everything but the lock, which this job holds
        if entry.name != LOCK_NAME:
          shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    elif previous != identity:
      changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
      values = "; ".join(f"{k}: saved {previous.get(k)!r}, given {identity.get(k)!r}" for k in changed)
      raise ValueError(f"{out} holds a different run (fields that differ: {changed}; {values}); choose another "
                       "--output or pass --overwrite")
    elif not resume:
      raise ValueError(f"{out} already holds this run; pass --resume to continue it or --overwrite to start over")
  elif resume and any(p.name not in _PRE_CONFIG_FILES for p in out.iterdir()):
    raise ValueError(f"{out} has no config.json, so there is no run to resume there")


def _write_config(out: pathlib.Path, config: FinetuneConfig) -> None:
  _write_atomic(out / "config.json", json.dumps(config.identity(), indent=2, sort_keys=True))


def _write_atomic(path: pathlib.Path, text: str) -> None:
  if not _host.is_primary():  # metadata, logs and results: process 0 writes them (on one process: always)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def plot_curves(metrics_path: pathlib.Path, png_path: pathlib.Path) -> None:
  """A PNG of the training loss and the validation metrics over steps (by process 0 only, on several)."""
  if not _host.is_primary():
    return
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  train = [r for r in rows if r["split"] == "train"]
  val = [r for r in rows if r["split"] == "validation"]
  fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
  ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
  keys = [k for k in ("accuracy", "mcc", "f1", "token_accuracy", "loss") if val and k in val[0]]
  for k in keys:
    ax_val.plot([r["step"] for r in val], [r[k] for r in val], marker="o", ms=3, label=k)
  ax_val.set(xlabel="step", title="validation")
  ax_val.legend(loc="best")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def _append_jsonl(path: pathlib.Path, row: Mapping[str, Any]) -> None:
  if not _host.is_primary():
    return
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def _kept_metrics(path: pathlib.Path, upto: int) -> list[str]:
  """The log lines of steps up to ``upto``; a line torn by a kill mid-write is dropped."""
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
      kept.append(line)
  return kept
