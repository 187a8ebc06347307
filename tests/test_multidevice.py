"""Runs the 8-device tests (tests/multidevice) in their own pytest processes.

JAX fixes its device count when the backend starts, so those tests need a fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; each test
here starts one for files of tests/multidevice and fails with its output if
anything there fails (or is skipped). They run as two tests in two test files
(this one: the sharding suite; ``test_multidevice_finetune.py``: the job and
the bf16 paths on meshes), so that the suite's two workers can run them side by
side.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Eight fake CPU devices, compiled with the run's flags (tests/conftest.py: optimisation level 0).
FLAGS = xla_flags(8)
# What each of the two 8-device processes runs: together, every file of tests/multidevice.
SHARDING_FILES = ("tests/multidevice/test_sharding.py",)
MESH_JOB_FILES = ("tests/multidevice/test_finetune_mesh.py", "tests/multidevice/test_precision_mesh.py")


def run_on_8_devices(*targets: str, compile_cache: bool = False) -> str:
  """Runs ``pytest *targets`` (paths under tests/multidevice) in one process with 8 CPU devices; returns its output.

  ``compile_cache``: a compilation cache, new for each run, lets a test load a program an earlier test of the run
  compiled (the same sharded lean step on the same mesh, say) instead of compiling it again.
  """
  with tempfile.TemporaryDirectory(prefix="jax-cache-") as cache:
    env = dict(os.environ, XLA_FLAGS=FLAGS, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if compile_cache:
      env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", "-rs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"{' '.join(targets)} failed (exit {proc.returncode}):\n{output[-12000:]}"
  assert " passed" in output and "skipped" not in output, output[-4000:]
  return output


def test_every_8_device_file_has_a_process():
  files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "multidevice").glob("test_*.py"))
  assert files == sorted(SHARDING_FILES + MESH_JOB_FILES), files


def test_sharding_suite_passes_on_8_devices():
  # (the cache: test_lean_step_with_explicit_shardings_equals_sharded_lean_step loads the 2x4 lean step of the
  # parity test before it)
  run_on_8_devices(*SHARDING_FILES, compile_cache=True)
