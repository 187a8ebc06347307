"""A deterministic fuzz of ``adapter_config.json``: every edit is refused with a ValueError or TypeError, or harmless.

Three adapters (sparse with int32 indices, sparse with gap-encoded indices, dense) get single edits drawn from a
fixed seed: shapes, paths, key paths, kinds, counts, dtypes, encodings, versions, checksums, array specs, metadata,
rows dropped, duplicated or reordered, and truncated or non-JSON files. Loading the edited adapter must either raise
a ValueError or TypeError (no other type, no crash) or give values bit-identical to the unedited one.
"""

from __future__ import annotations

import copy
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spra_jax as spra
from spra_jax.checkpoint import load_dense_adapter, save_dense_adapter
from spra_jax.masks import LeafMask

SEED = 20


def _base():
  k = jax.random.split(jax.random.key(3), 4)
  return {"a": jax.random.normal(k[0], (4, 6)), "c": jax.random.normal(k[1], (4, 6)),
          "h": jax.random.normal(k[2], (3,)).astype(jnp.bfloat16), "f": jnp.ones(5), "z": jnp.zeros(7)}


def _delta():
  mask = {"a": LeafMask.sparse((4, 6), jnp.array([0, 7, 23], jnp.int32)),
          "c": LeafMask.sparse((4, 6), jnp.array([1, 2, 3, 300 % 24], jnp.int32)),
          "h": LeafMask.full((3,)), "f": LeafMask.frozen((5,)),
          "z": LeafMask.sparse((7,), jnp.zeros((0,), jnp.int32))}
  values = {"a": jnp.array([1.0, 2.0, 3.0]), "c": jnp.array([4.0, 5.0, 6.0, 7.0]),
            "h": jnp.array([0.5, -1.0, 2.0], jnp.bfloat16), "f": None, "z": jnp.zeros((0,))}
  return spra.SparseDelta(mask, values)


def _dense():
  return {"layers": {0: {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 3), jnp.bfloat16)}},
          "head": jnp.full((3, 2), 0.25), "empty": jnp.zeros((0, 4))}


# --------------------------------------------------------------------------
# Mutations: (name, applies_to, fn(cfg, rng) -> new cfg, or str for raw text).
# --------------------------------------------------------------------------


def _row(cfg, rng):
  return rng.choice(cfg["leaves"])


def _two_rows(cfg, rng):
  return rng.sample(cfg["leaves"], 2)


def _set(key, value):
  def fn(cfg, rng):
    cfg[key] = value
    return cfg
  return fn


def _pop(key):
  def fn(cfg, rng):
    cfg.pop(key, None)
    return cfg
  return fn


def _row_set(field, choices):
  def fn(cfg, rng):
    _row(cfg, rng)[field] = rng.choice(choices)
    return cfg
  return fn


def _row_pop(fields):
  def fn(cfg, rng):
    _row(cfg, rng).pop(rng.choice(fields), None)
    return cfg
  return fn


def _same_size_shape(cfg, rng):
  row = rng.choice([r for r in cfg["leaves"] if len(r["shape"]) >= 2] or cfg["leaves"])
  row["shape"] = list(reversed(row["shape"])) if len(row["shape"]) >= 2 else row["shape"] + [1]
  return cfg


def _other_size_shape(cfg, rng):
  row = _row(cfg, rng)
  row["shape"] = [d + rng.choice([1, 2]) for d in row["shape"]] or [2]
  return cfg


def _swap(field):
  def fn(cfg, rng):
    r1, r2 = _two_rows(cfg, rng)
    r1[field], r2[field] = r2[field], r1[field]
    return cfg
  return fn


def _swap_path_and_keypath(cfg, rng):
  same = {}
  for r in cfg["leaves"]:
    same.setdefault(tuple(r["shape"]), []).append(r)
  r1, r2 = next(v for v in same.values() if len(v) >= 2)[:2]
  for field in ("path", "keypath"):
    r1[field], r2[field] = r2[field], r1[field]
  return cfg


def _drop_row(cfg, rng):
  cfg["leaves"].remove(_row(cfg, rng))
  return cfg


def _duplicate_row(cfg, rng):
  cfg["leaves"].append(copy.deepcopy(_row(cfg, rng)))
  return cfg


def _reorder_rows(cfg, rng):
  cfg["leaves"] = cfg["leaves"][::-1]
  return cfg


def _row_to(value):
  def fn(cfg, rng):
    cfg["leaves"][rng.randrange(len(cfg["leaves"]))] = value
    return cfg
  return fn


def _k_edit(cfg, rng):
  row = rng.choice([r for r in cfg["leaves"] if "k" in r])
  row["k"] = rng.choice([row["k"] + 1, row["k"] - 1, 0, -1, 10**12, "3", None, 1.5, True])
  return cfg


def _kind_edit(cfg, rng):
  row = _row(cfg, rng)
  row["kind"] = rng.choice([k for k in ("sparse", "full", "frozen", "dense", None) if k != row["kind"]])
  return cfg


def _keypath_edit(cfg, rng):
  _row(cfg, rng)["keypath"] = rng.choice([[], [["bad", "x"]], "x", [["dict"]], [["seq", "0"]], [["dict", "q"]]])
  return cfg


def _path_edit(cfg, rng):
  _row(cfg, rng)["path"] = rng.choice(["renamed", "", 7, None])
  return cfg


def _spec(cfg, rng):
  return cfg["arrays"][rng.choice(sorted(cfg["arrays"]))]


def _spec_edit(field, choices):
  def fn(cfg, rng):
    _spec(cfg, rng)[field] = rng.choice(choices)
    return cfg
  return fn


def _spec_shape(cfg, rng):
  spec = _spec(cfg, rng)
  spec["shape"] = rng.choice([[spec["shape"][0] + 1], [spec["shape"][0] - 1], [], [1, spec["shape"][0]], ["x"]])
  return cfg


def _spec_rename(cfg, rng):
  name = rng.choice(sorted(cfg["arrays"]))
  cfg["arrays"][name + "_x"] = cfg["arrays"].pop(name)
  return cfg


def _spec_drop(cfg, rng):
  cfg["arrays"].pop(rng.choice(sorted(cfg["arrays"])))
  return cfg


def _spec_add(cfg, rng):
  cfg["arrays"]["values_float16"] = {"dtype": "float16", "shape": [2], "sha256": "0" * 64}
  return cfg


def _flip_hex(s):
  return s[:5] + ("0" if s[5] != "0" else "1") + s[6:]


def _table_digest_flip(cfg, rng):
  cfg["table_sha256"] = _flip_hex(cfg["table_sha256"])
  return cfg


def _array_sha_flip(cfg, rng):
  if "arrays" in cfg and cfg["format"] == "spra_jax.sparse_adapter":
    spec = _spec(cfg, rng)
  else:
    spec = rng.choice([r for r in cfg["leaves"]])
  spec["sha256"] = _flip_hex(spec["sha256"])
  return cfg


def _metadata_edit(cfg, rng):
  choice = rng.randrange(3)
  if choice == 0:
    cfg["metadata"] = dict(cfg.get("metadata") or {}, note="edited by hand")
  elif choice == 1:
    cfg.pop("metadata", None)
  else:
    cfg["metadata"] = "not a dict"
  return cfg


def _counts_edit(cfg, rng):
  if "mask" in cfg:
    cfg["mask"]["trainable"] = rng.choice([0, cfg["mask"]["trainable"] + 10, "many"])
  else:
    cfg["trainable"] = rng.choice([0, cfg["trainable"] + 10, "many"])
  cfg["nbytes"] = rng.choice([0, {"indices": -1}, None])
  return cfg


def _fingerprint_edit(cfg, rng):
  fp = cfg.get("base_fingerprint")
  choice = rng.randrange(5)
  if choice == 0:
    cfg["base_fingerprint"] = None
  elif choice == 1:
    cfg["base_fingerprint"] = "x"
  elif choice == 2:
    fp["leaves"] = []
  elif choice == 3:
    entry = fp["leaves"][rng.choice([p for p, e in fp["leaves"].items() if "hash" in e])]
    entry["hash"] = _flip_hex(entry["hash"])
  else:
    fp["leaves"][rng.choice(sorted(fp["leaves"]))] = 3
  return cfg


def _gaps_width(cfg, rng):
  row = rng.choice([r for r in cfg["leaves"] if "index_width" in r])
  row["index_width"] = rng.choice([1, 2, 4, 3, "1", None])
  return cfg


def _gaps_escapes(cfg, rng):
  row = rng.choice([r for r in cfg["leaves"] if "escapes" in r])
  row["escapes"] = rng.choice([row["escapes"] + 1, -1, "0"])
  return cfg


def _blocks(cfg, rng):
  row = rng.choice([r for r in cfg["leaves"] if r.get("kind") == "sparse"])
  row["blocks"] = rng.choice([[2, 3], [1, 1], [0, 1], "x", [4, 6, 1]])
  return cfg


def _dense_array_name(cfg, rng):
  r1, r2 = rng.sample([r for r in cfg["leaves"] if r["array"]], 2)
  r1["array"] = rng.choice([r2["array"], None, "leaf_99999"])
  return cfg


def _wrapped_in_a_list(cfg, rng):
  row = _row(cfg, rng)
  field = rng.choice(sorted(row))
  row[field] = [row[field]]
  return cfg


def _truncate(text, rng):
  return text[: rng.randrange(1, len(text) - 1)]


SPARSE, GAPS, DENSE = "sparse", "gaps", "dense"
ALL = (SPARSE, GAPS, DENSE)

MUTATIONS = [
    ("truncated JSON", ALL, "text", _truncate),
    ("not UTF-8", ALL, "text", lambda text, rng: b"\xff\xfe" + text.encode()),
    ("empty file", ALL, "text", lambda text, rng: ""),
    ("a JSON list", ALL, "text", lambda text, rng: "[1, 2]"),
    ("format_version", ALL, "cfg",
     lambda cfg, rng: _set("format_version", rng.choice([0, -1, 2, "1", True, 1.5, None]))(cfg, rng)),
    ("no format_version", ALL, "cfg", _pop("format_version")),
    ("format", ALL, "cfg",
     lambda cfg, rng: _set("format", rng.choice(["x", None, "spra_jax.dense_adapter", "spra_jax.sparse_adapter"]))(
         cfg, rng)),
    ("index_encoding", (SPARSE, GAPS), "cfg",
     lambda cfg, rng: _set("index_encoding", rng.choice(["gaps", "int32", "zstd", None, 3, ["int32"]]))(cfg, rng)),
    ("no leaves", ALL, "cfg", _pop("leaves")),
    ("no arrays", (SPARSE, GAPS), "cfg", _pop("arrays")),
    ("leaves not a list", ALL, "cfg", lambda cfg, rng: _set("leaves", rng.choice([{}, [], "x", None]))(cfg, rng)),
    ("arrays not a dict", (SPARSE, GAPS), "cfg",
     lambda cfg, rng: _set("arrays", rng.choice([{}, [], "x", None]))(cfg, rng)),
    ("same-size shape", ALL, "cfg", _same_size_shape),
    ("other-size shape", ALL, "cfg", _other_size_shape),
    ("bad shape", ALL, "cfg", _row_set("shape", ["x", [-1, 24], [True], None, [2.5]])),
    ("swap same-shape paths", ALL, "cfg", _swap_path_and_keypath),
    ("swap paths only", ALL, "cfg", _swap("path")),
    ("swap keypaths only", ALL, "cfg", _swap("keypath")),
    ("rename a path", ALL, "cfg", _path_edit),
    ("keypath", ALL, "cfg", _keypath_edit),
    ("kind", (SPARSE, GAPS), "cfg", _kind_edit),
    ("k", (SPARSE, GAPS), "cfg", _k_edit),
    ("value dtype", (SPARSE, GAPS), "cfg", _row_set("value_dtype", ["bfloat16", "float16", "int32", "nope", None])),
    ("dense dtype", (DENSE,), "cfg", _row_set("dtype", ["bfloat16", "float16", "int32", "nope", None])),
    ("a row field dropped", (SPARSE, GAPS), "cfg", _row_pop(["path", "keypath", "kind", "shape", "k", "value_dtype"])),
    ("a dense row field dropped", (DENSE,), "cfg", _row_pop(["path", "keypath", "shape", "dtype", "array", "sha256"])),
    ("a row not a dict", ALL, "cfg", lambda cfg, rng: _row_to(rng.choice(["x", None, [], 3]))(cfg, rng)),
    ("a row dropped", ALL, "cfg", _drop_row),
    ("a row duplicated", ALL, "cfg", _duplicate_row),
    ("rows reordered", ALL, "cfg", _reorder_rows),
    ("array spec dtype", (SPARSE, GAPS), "cfg", _spec_edit("dtype", ["float16", "int64", "nope", None])),
    ("array spec shape", (SPARSE, GAPS), "cfg", _spec_shape),
    ("array spec renamed", (SPARSE, GAPS), "cfg", _spec_rename),
    ("array spec dropped", (SPARSE, GAPS), "cfg", _spec_drop),
    ("array spec added", (SPARSE, GAPS), "cfg", _spec_add),
    ("array spec not a dict", (SPARSE, GAPS), "cfg",
     lambda cfg, rng: cfg["arrays"].update({sorted(cfg["arrays"])[0]: "x"}) or cfg),
    ("array checksum", ALL, "cfg", _array_sha_flip),
    ("dense array name", (DENSE,), "cfg", _dense_array_name),
    ("table checksum edited", ALL, "cfg", _table_digest_flip),
    ("table checksum not a str", ALL, "cfg", lambda cfg, rng: _set("table_sha256", rng.choice([5, None, []]))(cfg, rng)),
    ("table checksum removed", ALL, "cfg", _pop("table_sha256")),
    ("metadata", ALL, "cfg", _metadata_edit),
    ("counts", ALL, "cfg", _counts_edit),
    ("library_version", ALL, "cfg", _set("library_version", "99.0")),
    ("base fingerprint", (SPARSE, GAPS), "cfg", _fingerprint_edit),
    ("gap width", (GAPS,), "cfg", _gaps_width),
    ("gap escapes", (GAPS,), "cfg", _gaps_escapes),
    ("blocks", (SPARSE, GAPS), "cfg", _blocks),
    ("a row field wrapped in a list", ALL, "cfg", _wrapped_in_a_list),
]


# --------------------------------------------------------------------------
# The fuzz.
# --------------------------------------------------------------------------


def _load(kind, directory, base):
  if kind == DENSE:
    return load_dense_adapter(directory)[0]
  # The int32 one without base weights (its tree rebuilt from the key paths, no fingerprint to catch a swap), the
  # gap-encoded one with them (the template and fingerprint checks, and edited fingerprints, are exercised).
  return spra.load_adapter(directory, base_params=base if kind == GAPS else None)


def _same(kind, got, want) -> bool:
  if kind != DENSE:
    mdef = jax.tree.structure(want.mask, is_leaf=spra.masks.is_leaf_mask)
    if mdef != jax.tree.structure(got.mask, is_leaf=spra.masks.is_leaf_mask):
      return False
    for mg, mw in zip(mdef.flatten_up_to(got.mask), mdef.flatten_up_to(want.mask)):
      if (mg.kind, mg.shape) != (mw.kind, mw.shape):
        return False
  if jax.tree.structure(got) != jax.tree.structure(want):
    return False
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      return False
  return True


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
  root = tmp_path_factory.mktemp("fuzz")
  base = _base()
  saved = {
      SPARSE: spra.save_adapter(root / SPARSE, _delta(), base_params=base, metadata={"seed": 1}),
      GAPS: spra.save_adapter(root / GAPS, _delta(), base_params=base, index_encoding="gaps"),
      DENSE: save_dense_adapter(root / DENSE, _dense(), metadata={"method": "lora"}),
  }
  return root, base, saved


def _edited_adapter(root, saved, kind, i, edited):
  d = root / f"m{i:03d}"
  d.mkdir()
  (d / "adapter_config.json").write_bytes(edited if isinstance(edited, bytes) else edited.encode())
  os.symlink(saved[kind] / "arrays", d / "arrays")  # the arrays are not edited; no need to copy them
  return d


def test_every_config_edit_is_refused_or_harmless(adapters):
  root, base, saved = adapters
  rng = random.Random(SEED)
  originals = {kind: _load(kind, d, base) for kind, d in saved.items()}
  cases = [(kind, m) for m in MUTATIONS for kind in m[1]]
  rng.shuffle(cases)
  outcomes, bad = {"refused": 0, "harmless": 0, "loaded without a digest": 0}, []
  for i, (kind, (name, _, form, fn)) in enumerate(cases):
    text = (saved[kind] / "adapter_config.json").read_text()
    if form == "text":
      edited, unchecked = fn(text, rng), None
    else:
      cfg = fn(json.loads(text), rng)
      edited = json.dumps(cfg, indent=2)
      # The same edit in an adapter written before table_sha256 existed: it may load other numbers (nothing
      # records the table), but it must still fail, if it fails, with a ValueError or TypeError.
      unchecked = json.dumps({k: v for k, v in cfg.items() if k != "table_sha256"} if isinstance(cfg, dict) else cfg)
    for digest, content in ((True, edited), (False, unchecked)):
      if content is None:
        continue
      d = _edited_adapter(root, saved, kind, 2 * i + (not digest), content)
      label = f"{kind}: {name}{'' if digest else ' (no table_sha256)'}"
      try:
        got = _load(kind, d, base)
      except (ValueError, TypeError):
        outcomes["refused"] += digest
        continue
      except Exception as e:  # the property under test: no other type escapes
        bad.append(f"{label}: {type(e).__name__}: {e}")
        continue
      if not digest:
        outcomes["loaded without a digest"] += 1
      elif _same(kind, got, originals[kind]):
        outcomes["harmless"] += 1
      else:
        bad.append(f"{label}: loaded values that differ from the original")
  assert not bad, "\n".join(bad)
  assert len(cases) >= 60 and outcomes["refused"] >= 60 and outcomes["harmless"] >= 5, outcomes


def test_the_edits_the_issue_names_are_refused(adapters):
  root, base, saved = adapters

  def edited(name, fn):
    cfg = json.loads((saved[SPARSE] / "adapter_config.json").read_text())
    fn(cfg)
    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    os.symlink(saved[SPARSE] / "arrays", d / "arrays")
    return d

  def row(cfg, path):
    return next(r for r in cfg["leaves"] if r["path"] == path)

  d = edited("shape46", lambda cfg: row(cfg, "a").update(shape=[6, 4]))
  with pytest.raises(ValueError, match="does not match its table_sha256"):
    spra.load_adapter(d)
  d = edited("swap", lambda cfg: _swap_path_and_keypath(cfg, None))
  with pytest.raises(ValueError, match="does not match its table_sha256"):
    spra.load_adapter(d)
  d = edited("encoding", lambda cfg: cfg.update(index_encoding="gaps"))
  with pytest.raises(ValueError, match="leaf table is malformed"):
    spra.load_adapter(d)
