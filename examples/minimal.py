"""SpaRTA in a plain JAX training loop: `spra.masked(optax.adamw(...))` trains 1 % of the weights.

Run: python examples/minimal.py
"""
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits
import spra_jax as spra

digits = load_digits()
x, y = jnp.asarray(digits.data / 16.0, jnp.float32), jnp.asarray(digits.target)
k1, k2 = jax.random.split(jax.random.key(0))
params = {"hidden": {"kernel": jax.random.normal(k1, (64, 512)) / 8.0, "bias": jnp.zeros(512)},
          "head": {"kernel": jax.random.normal(k2, (512, 10)) / 22.6, "bias": jnp.zeros(10)}}

def loss_fn(params, x, y):
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits.argmax(-1) == y).mean()

# Train a random 1 % of the kernels' entries; every other entry stays frozen.
tx = spra.masked(optax.adamw(3e-2), density=0.01, key=jax.random.key(1), include=r"kernel$")
opt_state = tx.init(params)

@jax.jit
def step(params, opt_state, x, y):
  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, acc

for i in range(301):
  params, opt_state, loss, acc = step(params, opt_state, x, y)
  if i % 100 == 0:
    print(f"step {i:3d}  loss {loss:.3f}  train accuracy {acc:.3f}")
print(spra.mask_summary(spra.mask_of(opt_state)))
