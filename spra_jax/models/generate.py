"""Text generation with a KV cache for the causal LMs of :mod:`spra_jax.models.llama`.

:func:`generate` runs the prompt once (prefill) into a preallocated
:class:`~spra_jax.models.llama.KVCache`, then decodes one token per step with
a compiled step function. Prompts of different lengths are **left-padded**
(``tokenizer.padding_side = 'left'``): each row's positions count only its
real tokens, so a padded row decodes exactly as it would alone. Decoding is
greedy at ``temperature=0`` and otherwise samples, optionally restricted by
``top_k`` and/or ``top_p`` (nucleus).

Example (a tiny random model; greedy with and without the cache agree):

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from spra_jax.models import llama
  >>> from spra_jax.models.generate import generate, generate_uncached
  >>> config = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
  ...                            num_attention_heads=4, num_key_value_heads=2)
  >>> model = llama.build(config, task='causal-lm', rngs=nnx.Rngs(0))
  >>> prompt = jnp.array([[0, 0, 5, 9, 3], [4, 8, 1, 2, 7]], jnp.int32)
  >>> mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  >>> new = generate(model, prompt, attention_mask=mask, max_new_tokens=4)
  >>> new.shape
  (2, 4)
  >>> bool((new == generate_uncached(model, prompt, attention_mask=mask, max_new_tokens=4)).all())
  True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["generate", "generate_uncached", "sample_logits"]


def sample_logits(logits: jax.Array, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, key: jax.Array | None = None) -> jax.Array:
  """Picks one token id per row of ``logits`` [batch, vocab].

  ``temperature=0`` is greedy (argmax; ``top_k``/``top_p`` then change
  nothing). Otherwise the logits are divided by ``temperature``, restricted to
  the ``top_k`` largest and/or the smallest set whose probability reaches
  ``top_p``, and sampled with ``key``.

  Raises:
    ValueError: a negative temperature, ``top_k < 1``, ``top_p`` outside
      (0, 1], or sampling without a key.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
    >>> sample_logits(logits).tolist()
    [1]
    >>> sample_logits(logits, temperature=1.0, top_k=1, key=jax.random.key(0)).tolist()
    [1]
  """
  _check_sampling(temperature, top_k, top_p, key)
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the probability before it is still below top_p (so the first one always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    drop_sorted = before >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, key: Any) -> None:
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}.")
  if temperature > 0 and key is None:
    raise ValueError(f"sampling (temperature={temperature}) needs a PRNG key: pass key=jax.random.key(seed).")


def _prepare(model: nnx.Module, input_ids: Any, attention_mask: Any, max_new_tokens: int):
  if not hasattr(model, "init_cache") or not hasattr(model, "logits"):
    raise TypeError(f"generate needs a causal LM (e.g. llama.LlamaForCausalLM), got a {type(model).__name__}.")
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers of shape [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}.")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
  mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, got {mask.shape}.")
  if not bool(jnp.all(mask[:, -1] == 1)):
    raise ValueError("generate needs left-padded prompts (every row's last token real, attention_mask[:, -1] == 1); "
                     "set tokenizer.padding_side = 'left'.")
  return input_ids.astype(jnp.int32), mask


def _eos_set(eos_token_id: int | list[int] | tuple[int, ...] | None) -> jax.Array | None:
  if eos_token_id is None:
    return None
  ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
  return jnp.asarray(ids, jnp.int32)


def generate(model: nnx.Module, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None) -> jax.Array:
  """Generates up to ``max_new_tokens`` tokens after each (left-padded) prompt, with a KV cache.

  Args:
    model: a causal LM (:class:`~spra_jax.models.llama.LlamaForCausalLM`).
    input_ids: int prompts [batch, seq], left-padded.
    max_new_tokens: how many tokens to generate.
    attention_mask: 1 for prompt tokens, 0 for (left) padding; default all 1.
    temperature: 0 for greedy decoding, otherwise the sampling temperature.
    top_k: sample among the k most likely tokens only.
    top_p: sample from the smallest set of tokens whose probability reaches p.
    key: PRNG key, needed when ``temperature > 0``.
    eos_token_id: id(s) that end a row: later positions of that row are filled
      with ``pad_token_id``, and decoding stops when every row has ended.
    pad_token_id: filler after the end (default: the first ``eos_token_id``, else 0).

  A ``longrope`` model (Phi-3 with a long context) switches to its long factors once the sequence passes its
  original context; the cache is then rebuilt once, over every token so far, as transformers' generation does.

  Returns:
    The new tokens only, int32 [batch, n] with ``n <= max_new_tokens`` (shorter
    when every row ended early); the prompt is not repeated.

  Raises:
    TypeError: a model without an LM head.
    ValueError: right-padded prompts, bad sampling arguments.

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from spra_jax.models import llama
    >>> config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                            num_attention_heads=2)
    >>> model = llama.build(config, task='causal-lm', rngs=nnx.Rngs(0))
    >>> out = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=5, temperature=0.8, top_p=0.9,
    ...                key=jax.random.key(0))
    >>> out.shape, out.dtype
    ((1, 5), dtype('int32'))
  """
  _check_sampling(temperature, top_k, top_p, key)
  input_ids, mask = _prepare(model, input_ids, attention_mask, max_new_tokens)
  batch, prompt_len = input_ids.shape
  eos = _eos_set(eos_token_id)
  if pad_token_id is None:
    pad_token_id = int(eos[0]) if eos is not None else 0
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = model.init_cache(batch=batch, max_length=prompt_len + max_new_tokens)
  graphdef, state = nnx.split(model)
  sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
  keys = jax.random.split(key if key is not None else jax.random.key(0), max_new_tokens)
  config = getattr(getattr(model, "model", None), "config", None) or getattr(model, "config", None)
  switch = None  # a longrope model's original context, where its cache is rebuilt
  if config is not None and getattr(config, "rope_type", "default") == "longrope":
    switch = int(config.rope_scaling_dict["original_max_position_embeddings"])

  token, cache = _prefill(graphdef, state, input_ids, mask, positions, cache, keys[0], **sampling)
  position = positions[:, -1]
  done = jnp.zeros((batch,), bool)
  out = []
  for i in range(max_new_tokens):
    token = jnp.where(done, pad_token_id, token)
    out.append(token)
    if eos is not None:
      done = done | jnp.isin(token, eos)
      if bool(done.all()):
        break
    if i + 1 < max_new_tokens:
      length = prompt_len + i + 1  # slots filled so far
      if switch is not None and length == switch + 1 and prompt_len <= switch:
        # A longrope model passes its original context here: recompute every key with the long factors (as
        # transformers' Phi-3 generation does) rather than keep the cached ones made with the short factors.
        ids = jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1)
        full = jnp.concatenate([mask, jnp.ones((batch, i + 1), jnp.int32)], axis=1)
        again = jnp.maximum(jnp.cumsum(full, axis=1) - 1, 0)
        cache = model.init_cache(batch=batch, max_length=prompt_len + max_new_tokens)
        token, cache = _prefill(graphdef, state, ids, full, again, cache, keys[i + 1], **sampling)
        position = again[:, -1]
        continue
      position = position + 1
      token, cache = _step(graphdef, state, token, position, cache, keys[i + 1], **sampling)
  return jnp.stack(out, axis=1)


_STATIC = ("graphdef", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(graphdef, state, ids, mask, positions, cache, key, *, temperature, top_k, top_p):
  """Runs the prompt into the cache and picks the first new token (the LM head on the last position only)."""
  lm = nnx.merge(graphdef, state)
  hidden, cache = lm.model(ids, mask, positions=positions, cache=cache)
  logits = lm.logits(hidden[:, -1])
  return sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, key=key), cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def _step(graphdef, state, token, position, cache, key, *, temperature, top_k, top_p):
  """One decoding step: the previous token in, the next token out."""
  lm = nnx.merge(graphdef, state)
  logits, cache = lm(token[:, None], positions=position[:, None], cache=cache)
  return sample_logits(logits[:, 0], temperature=temperature, top_k=top_k, top_p=top_p, key=key), cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy_full(graphdef, state, ids, mask):
  """The argmax token after every position [batch, seq], from one full forward pass."""
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits = nnx.merge(graphdef, state)(ids, mask, positions=positions)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def generate_uncached(model: nnx.Module, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
                      eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> jax.Array:
  """Greedy generation that reruns the whole sequence each step (no cache): the reference for :func:`generate`.

  Same arguments and result as greedy :func:`generate`; it costs a full
  forward pass per token, so use it for checks only.

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from spra_jax.models import llama
    >>> config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                            num_attention_heads=2)
    >>> model = llama.build(config, task='causal-lm', rngs=nnx.Rngs(0))
    >>> generate_uncached(model, jnp.array([[1, 2, 3]]), max_new_tokens=3).shape
    (1, 3)
  """
  input_ids, mask = _prepare(model, input_ids, attention_mask, max_new_tokens)
  eos = _eos_set(eos_token_id)
  if pad_token_id is None:
    pad_token_id = int(eos[0]) if eos is not None else 0
  graphdef, state = nnx.split(model)
  batch, prompt_len = input_ids.shape
  # One fixed-size buffer (one compilation): slots not yet generated are masked out, and causal attention
  # keeps them from touching the positions that are read.
  ids = jnp.concatenate([input_ids, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
  mask = jnp.concatenate([mask, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
  done, out = jnp.zeros((batch,), bool), []
  for i in range(max_new_tokens):
    last = prompt_len + i - 1
    token = _greedy_full(graphdef, state, ids, mask)[:, last]
    token = jnp.where(done, pad_token_id, token)
    out.append(token)
    if eos is not None:
      done = done | jnp.isin(token, eos)
      if bool(done.all()):
        break
    ids = ids.at[:, last + 1].set(token)
    mask = mask.at[:, last + 1].set(1)
  return jnp.stack(out, axis=1)
