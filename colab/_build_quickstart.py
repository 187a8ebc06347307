"""Writes colab/quickstart.ipynb from the cells below (run it after editing them)."""

import pathlib

import nbformat as nbf

MD, CODE = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    MD("""# spra_jax quickstart: SpaRTA in a JAX training loop

SpaRTA (Sparse Random parameTer Adaptation) fine-tunes a pretrained model by training only a small random
subset of its scalar parameters and freezing the rest. This notebook:

1. pretrains a small classifier on upright handwritten digits,
2. adapts it to digits rotated by 90° with `spra.masked(optax.adamw(...))`, training 2 % of the hidden weights,
3. compares it with head-only and full fine-tuning (accuracy, trainable parameters, optimizer state),
4. runs the memory-lean path (`spra.lean_step`) and extracts the sparse adapter.

It runs on CPU in well under a minute; on Colab pick any runtime."""),
    CODE("""import os, sys
IN_COLAB = "COLAB_RELEASE_TAG" in os.environ
# On Colab, install spra_jax from where you got it (a git URL or a wheel path).
SPRA_JAX_SOURCE = os.environ.get("SPRA_JAX_SOURCE", "")
if IN_COLAB:
    if not SPRA_JAX_SOURCE:
        raise RuntimeError("Set SPRA_JAX_SOURCE to a pip-installable source of spra_jax, e.g. a git URL.")
    %pip install -q "{SPRA_JAX_SOURCE}" scikit-learn matplotlib"""),
    CODE("""import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from sklearn.datasets import load_digits
import spra_jax as spra

digits = load_digits()
images = digits.images / 16.0
labels = digits.target
rng = np.random.default_rng(0)
order = rng.permutation(len(labels))
pre_idx, adapt_idx, test_idx = order[:1000], order[1000:1200], order[1200:]
flat = lambda imgs: jnp.asarray(imgs.reshape(len(imgs), -1), jnp.float32)
rotated = np.rot90(images, k=1, axes=(1, 2))
x_pre, y_pre = flat(images[pre_idx]), jnp.asarray(labels[pre_idx])
x_adapt, y_adapt = flat(rotated[adapt_idx]), jnp.asarray(labels[adapt_idx])
x_test, y_test = flat(rotated[test_idx]), jnp.asarray(labels[test_idx])
print(f"pretrain {len(pre_idx)} upright, adapt {len(adapt_idx)} rotated, test {len(test_idx)} rotated")"""),
    CODE("""def init_mlp(key, n_in=64, hidden=256, n_out=10):
    k1, k2, k3 = jax.random.split(key, 3)
    he = lambda k, i, o: jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i)
    return {"hidden_0": {"kernel": he(k1, n_in, hidden), "bias": jnp.zeros(hidden)},
            "hidden_1": {"kernel": he(k2, hidden, hidden), "bias": jnp.zeros(hidden)},
            "head": {"kernel": he(k3, hidden, n_out) * 0.1, "bias": jnp.zeros(n_out)}}

def forward(params, x):
    h = jax.nn.relu(x @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"])
    h = jax.nn.relu(h @ params["hidden_1"]["kernel"] + params["hidden_1"]["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]

def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()

def accuracy(params, x, y):
    return float((forward(params, x).argmax(-1) == y).mean())

def train(params, tx, x, y, steps=300):
    opt_state = tx.init(params)
    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, opt_state, losses

pretrained, _, _ = train(init_mlp(jax.random.key(0)), optax.adamw(3e-3), x_pre, y_pre, steps=400)
print(f"pretrained: upright {accuracy(pretrained, flat(images[test_idx]), jnp.asarray(labels[test_idx])):.3f}, "
      f"rotated {accuracy(pretrained, x_test, y_test):.3f}")"""),
    MD("""## Sample a mask and train with `spra.masked`

`spra.sample_mask` picks exactly 2 % of each hidden kernel's entries (a stable per-leaf key, so the same key gives
the same mask everywhere); `full=` trains the head entirely. The optimizer state exists only for those entries."""),
    CODE("""mask = spra.sample_mask(jax.random.key(1), pretrained, density=0.02, include=r"hidden_\\d/kernel", full=r"^head/")
print(spra.mask_summary(mask))

state_bytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s) if hasattr(x, "nbytes"))
runs = {
    # Frozen leaves need an explicit zero update: optax.masked alone passes their raw gradients through.
    "head only": optax.multi_transform(
        {"train": optax.adamw(1e-2), "freeze": optax.set_to_zero()},
        {name: jax.tree.map(lambda _: "train" if name == "head" else "freeze", leaf) for name, leaf in pretrained.items()}),
    "SpaRTA 2 % + head": spra.masked(optax.adamw(1e-2), mask),
    "full fine-tuning": optax.adamw(1e-2),
}
results, curves = {}, {}
for name, tx in runs.items():
    tuned, opt_state, curves[name] = train(pretrained, tx, x_adapt, y_adapt)
    results[name] = (accuracy(tuned, x_test, y_test), state_bytes(opt_state))
    if name.startswith("SpaRTA"):
        sparta_tuned, sparta_state = tuned, opt_state
for name, (acc, nbytes) in results.items():
    print(f"{name:>18}: rotated test accuracy {acc:.3f}, optimizer state {nbytes / 1024:7.1f} KiB")"""),
    CODE("""fig, ax = plt.subplots(figsize=(6, 3.5))
for name, losses in curves.items():
    ax.plot(losses, label=name)
ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Adapting to rotated digits (200 examples)")
ax.legend(); plt.show()"""),
    MD("""Only the sampled entries moved, and the optimizer state holds the mask, so `spra.mask_of` recovers it:"""),
    CODE("""changed = jax.tree.map(lambda a, b: int((a != b).sum()), sparta_tuned, pretrained)
print("entries changed per leaf:", changed)
print("trainable entries:", spra.num_trainable(spra.mask_of(sparta_state)))
assert sum(jax.tree.leaves(changed)) <= spra.num_trainable(mask)"""),
    MD("""## The memory-lean path and the sparse adapter

`spra.lean_step` differentiates only the sparse deltas: no dense gradient of any full weight is kept, and the weights
are updated in place. The result is a `SparseDelta` (indices + values) that merges into the base for free."""),
    CODE("""step = spra.lean_step(loss_fn, optax.adamw(1e-2))
# The step updates the weights in place (their buffers are donated), so hand it a copy
# and keep the pretrained weights for the comparison below.
state = step.init(jax.tree.map(jnp.copy, pretrained), mask)
for _ in range(300):
    state, loss = step(state, x_adapt, y_adapt)
state = step.flush(state)
print(f"lean path: rotated test accuracy {accuracy(state.params, x_test, y_test):.3f}")

delta = state.delta
merged = spra.merge(pretrained, delta)
print("adapter:", spra.num_trainable(delta.mask), "values;",
      "merged == trained weights:", all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.allclose(a, b, atol=1e-6)), merged, state.params))))"""),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "colab": {"provenance": []},
})
out = pathlib.Path(__file__).with_name("quickstart.ipynb")
nbf.write(nb, out)
print("wrote", out)
