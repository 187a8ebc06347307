"""The package's layering holds: a module imports only from its own layer or the layers below it.

The layers are the README's layout table, bottom first. Imports inside functions count too (a lazy import
of a higher layer is still a dependency on it); examples and notebooks may use only public names.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spra_jax"

# Bottom first. A module of layer i may import layers 0..i. The package face (spra_jax/__init__.py) and
# `__main__` sit above everything.
LAYERS = (
    ("_version", "_torch_names", "_host"),
    ("masks",),
    ("compact", "microbatch"),
    ("precision", "sparse_backward"),
    ("transform",),
    ("delta",),
    ("lean", "nnx"),
    ("sharding",),
    ("checkpoint",),
    ("models",),
    ("data", "metrics"),
    ("recipes",),
    ("finetune",),
    ("cli",),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports(path: pathlib.Path) -> set[str]:
  """The first components below ``spra_jax`` of every spra_jax import in a file (at any depth)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split(".")
      if parts[0] == "spra_jax":
        found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("spra_jax.")}
  return found


def _top(path: pathlib.Path) -> str:
  relative = path.relative_to(PACKAGE)
  return relative.parts[0].removesuffix(".py")


def test_every_module_has_a_layer():
  tops = {_top(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
  assert tops <= set(LEVEL), f"modules without a layer in LAYERS: {sorted(tops - set(LEVEL))}"


def test_lower_layers_never_import_higher_ones():
  wrong = []
  for path in sorted(PACKAGE.rglob("*.py")):
    top = _top(path)
    if top in ("__init__", "__main__"):
      continue
    for imported in _imports(path) - {top}:
      if imported in LEVEL and LEVEL[imported] > LEVEL[top]:
        wrong.append(f"{path.relative_to(ROOT)} (layer {top}) imports spra_jax.{imported}")
  assert not wrong, "\n".join(wrong)


def test_examples_and_notebook_builders_use_no_private_name():
  wrong = []
  for path in sorted([*(ROOT / "examples").rglob("*.py"), *(ROOT / "colab").glob("_build_*.py")]):
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spra_jax"):
        names = [node.module, *(a.name for a in node.names)]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith("spra_jax")]
      if isinstance(node, ast.Attribute):  # spra.x._y: a private name reached through the package face
        chain, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
          chain.append(base.attr)
          base = base.value
        if isinstance(base, ast.Name) and base.id == "spra":
          names = [".".join(["spra", *reversed(chain)])]
      private = [n for n in names for part in n.split(".") if part.startswith("_") and not part.startswith("__")]
      if private:
        wrong.append(f"{path.relative_to(ROOT)}: {private}")
  assert not wrong, "\n".join(wrong)
