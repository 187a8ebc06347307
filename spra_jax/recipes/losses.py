"""Losses over a model written as a pure function of its variables.

Every recipe sees a model as ``forward(trainable, frozen, batch) -> logits``:
the variables that train, the variables that do not, and a batch of arrays
(``input_ids``, ``attention_mask`` and the task's targets). :func:`model_forward`
builds it from an NNX graph definition; the losses below wrap it. Logits are
cast to float32 before the softmax, so a bfloat16 model still gets a float32
loss.

  >>> import jax.numpy as jnp
  >>> forward = lambda trainable, frozen, batch: batch["x"] @ trainable["w"]   # two examples, two classes
  >>> loss = classification_loss(forward)
  >>> batch = {"x": jnp.ones((2, 3)), "labels": jnp.array([0, 1])}
  >>> round(float(loss({"w": jnp.zeros((3, 2))}, None, batch)), 4)   # uniform logits: log 2
  0.6931
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["TASKS", "call_model", "model_forward", "classification_loss", "sft_loss", "loss_for"]

TASKS = ("classification", "sft")

Forward = Callable[[Any, Any, Mapping[str, jax.Array]], jax.Array]


def call_model(module: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
  """The library's model calling convention: ``module(input_ids, attention_mask=...)`` -> logits."""
  return module(batch["input_ids"], attention_mask=batch["attention_mask"])


def model_forward(graphdef: nnx.GraphDef, call: Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array] = call_model
                  ) -> Forward:
  """``forward(trainable, frozen, batch)``: the module of ``graphdef`` rebuilt from both parts, then ``call``-ed.

  ``trainable`` and ``frozen`` are the two states of ``nnx.split(model, filter, ...)`` (or any split whose
  parts ``nnx.merge`` accepts in that order).
  """

  def forward(trainable, frozen, batch):
    return call(nnx.merge(graphdef, trainable, frozen), batch)
  return forward


def classification_loss(forward: Forward) -> Callable:
  """Mean cross-entropy of ``forward``'s logits against ``batch['labels']`` (same arguments as ``forward``)."""

  def loss_fn(trainable, frozen, batch):
    logits = forward(trainable, frozen, batch).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss_fn


def sft_loss(forward: Forward) -> Callable:
  """Next-token cross-entropy over the response tokens only (``batch['loss_mask']``), averaged per token.

  Position t's logits predict token t + 1; a row whose mask is all zero contributes nothing.
  """

  def loss_fn(trainable, frozen, batch):
    logits = forward(trainable, frozen, batch)[:, :-1].astype(jnp.float32)
    targets, weights = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  return loss_fn


def loss_for(task: str, forward: Forward) -> Callable:
  """The loss of ``task`` (``'classification'`` or ``'sft'``) over ``forward``.

  >>> loss_for('regression', None)
  Traceback (most recent call last):
  ...
  ValueError: task must be one of ['classification', 'sft'], got 'regression'
  """
  if task == "classification":
    return classification_loss(forward)
  if task == "sft":
    return sft_loss(forward)
  raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
