"""Runs the 8-device tests (tests/multidevice) in their own pytest processes.

JAX fixes its device count when the backend starts, so those tests need a fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; each test
here starts one for one file of tests/multidevice and fails with its output if
anything there fails (or is skipped). The two files run as two tests in two test
files (this one and ``test_multidevice_finetune.py``), so that the suite's two
workers can run them side by side.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Eight fake CPU devices. Optimisation level 0 of the CPU backend cuts compile
# time (which dominates these tests on a small CPU machine) by about two thirds;
# every parity test compares runs compiled with the same flags.
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def run_on_8_devices(target: str) -> str:
  """Runs ``pytest target`` (a path under tests/multidevice) with 8 CPU devices; returns its output."""
  env = dict(os.environ, XLA_FLAGS=FLAGS, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", target, "-p", "no:cacheprovider", "-rs"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
  )
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"{target} failed (exit {proc.returncode}):\n{output[-12000:]}"
  assert " passed" in output and "skipped" not in output, output[-4000:]
  return output


def test_sharding_suite_passes_on_8_devices():
  run_on_8_devices("tests/multidevice/test_sharding.py")
