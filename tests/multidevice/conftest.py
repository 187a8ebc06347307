"""Multi-device tests: their own pytest process with 8 (fake CPU) devices.

``tests/test_multidevice.py`` launches ``python -m pytest tests/multidevice`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Run directly, set that
flag yourself (before JAX starts) or every test here is skipped.

Fake CPU devices run collectives on shared threads: a step loop that does not
wait for each step can deadlock, so every loop here blocks on each result.
"""

import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


def pytest_collection_modifyitems(config, items):
  del config
  if jax.device_count() >= NUM_DEVICES:
    return
  skip = pytest.mark.skip(
      reason=f"needs {NUM_DEVICES} devices, found {jax.device_count()}: run with "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES} (tests/test_multidevice.py does)"
  )
  for item in items:
    if "tests/multidevice" in str(item.fspath).replace(os.sep, "/"):
      item.add_marker(skip)


def load_example(relative):
  """Imports a script of the repository (e.g. ``examples/benchmarks/collectives.py``) as a module, by its path.

  The same helper as in tests/conftest.py: in this directory ``import conftest`` finds this file.
  """
  path = pathlib.Path(__file__).resolve().parents[2] / relative
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module
