"""Shared test set-up: offline always, one CPU device, small helpers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
