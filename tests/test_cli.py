"""The command line: every user error is one line `error: ...`, exit status 2, found before anything loads."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from spra_jax import cli
from spra_jax import finetune as finetune_lib
from spra_jax.finetune import DEFAULT_LR, FinetuneConfig, OutputLock, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from finetune_worker import cli_args  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Small dataset files (nothing here ever gets loaded: the checks read headers only)."""
  d = tmp_path_factory.mktemp("files")
  contents = {
      "good.csv": "text,label\ngreat film,fresh\ndull,rotten\n",
      "empty.csv": "",
      "header.csv": "text,label\n\n",
      "nolabel.csv": "text,sentiment\ngreat film,fresh\n",
      "notext.csv": "review,label\ngreat film,fresh\n",
      "qa.csv": "question,answer\nwhat?,that\n",
  }
  for name, text in contents.items():
    (d / name).write_text(text)
  (d / "a-file").write_text("not a directory")
  (d / "gpt2").mkdir()
  (d / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  (d / "llama").mkdir()
  (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
  return d


def _run_main(capsys, argv):
  """``spra-jax finetune ARGV`` in this process: (exit status, stdout, stderr)."""
  try:
    status = cli.main(["finetune", *argv])
  except SystemExit as e:  # argparse's own errors
    status = e.code
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _assert_one_line_error(status, out, err, prefix):
  assert status == 2, (out, err)
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(prefix), err
  assert "loading" not in out  # the job prints 'loading dataset/model ...' before each load: none happened


def test_config_model_and_dataset_errors_are_one_line_and_come_first(files, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  out = tmp_path / "run"
  cases = [
      (["--steps", "0"], "error: steps must be a positive integer, got 0"),
      (["--batch-size", "0"], "error: batch_size must be a positive integer, got 0"),
      (["--density", "2"], "error: density must be in (0, 1], got 2.0"),
      (["--epochs", "nan"], "error: epochs must be a positive finite number, got nan"),
      (["--seed", "-1"], "error: seed must be an integer in [0, 2**32), got -1"),
      (["--lora-alpha", "0"], "error: lora_alpha must be a positive finite number, got 0.0"),
      (["--mesh", "foo"], "error: mesh spec 'foo': expected comma-separated axis=size with axes data, fsdp, tensor"),
      (["--mesh", "data=1000"], "error: mesh 'data=1000' does not fit the 1 device(s) here: mesh data=1000 x fsdp=1"),
      (["--distribution", "nope"], "error: distribution must be one of ["),
      (["--preset", "nope"], "error: preset must be one of ['paper', 'all-linear', 'mlp', 'attention'] or None, "
                             "got 'nope'"),
      (["--include", "("], "error: include is not a valid regular expression (missing ), unterminated subpattern"),
      (["--model", "minilmm"], "error: model 'minilmm' is unknown: 'minilmm' is not a local file or directory, nor an "
                               "alias (minilm, smollm2-135m, gemma3-270m)"),
      (["--model", str(files / "missing")], f"error: model '{files / 'missing'}' is unknown: no such file or directory"),
      (["--model", str(files / "gpt2")], f"error: model '{files / 'gpt2'}' has model_type='gpt2'; the supported model "
                                         "types are ['bert', 'gemma', 'gemma2', 'gemma3_text', 'llama', "
                                         "'mistral', 'phi3', 'qwen2', 'qwen3']"),
      (["--dataset", "no-such-data"], "error: unknown dataset 'no-such-data': it is not one of the shipped datasets"),
      (["--dataset", str(files / "none.csv")], f"error: dataset file '{files / 'none.csv'}' does not exist"),
      (["--dataset", str(files / "empty.csv")], f"error: dataset file '{files / 'empty.csv'}' is empty"),
      (["--dataset", str(files / "header.csv")], f"error: dataset file '{files / 'header.csv'}' has a header "
                                                 "(text, label) but no rows"),
      (["--dataset", str(files / "nolabel.csv")], "error: classification needs the label column 'label' "
                                                  f"(--label-column); {files / 'nolabel.csv'} has the columns "
                                                  "['text', 'sentiment']"),
      (["--dataset", str(files / "notext.csv")], "error: classification needs the text column 'text' (--text-column)"),
      (["--dataset", str(files / "qa.csv")], "error: model 'minilm' is an encoder: supervised fine-tuning needs a "
                                             "causal LM"),
      (["--resume", "--overwrite"], "error: resume and overwrite exclude each other"),
  ]
  for lr in ("nan", "-1", "inf", "0"):
    cases.append((["--lr", lr], "error: lr must be a positive finite number (or None for the method's default), got"))
  for argv, prefix in cases:
    _assert_one_line_error(*_run_main(capsys, [*argv, "--output", str(out)]), prefix)
    assert not out.exists(), argv  # checked before the output directory was touched
  # argparse's own errors are one line too (no usage block).
  _assert_one_line_error(*_run_main(capsys, ["--steps", "x"]),
                         "error: argument --steps: invalid int value: 'x' (see spra-jax finetune --help)")


def test_output_directory_errors_are_one_line(files, tmp_path, capsys, monkeypatch):
  good = ["--dataset", str(files / "good.csv")]
  # Un-creatable (its parent is a file) and not writable.
  _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(files / "a-file" / "run")]),
                         f"error: cannot create the output directory {files / 'a-file' / 'run'}: Not a directory")
  real_open = os.open

  def read_only(path, *args, **kwargs):  # what a read-only directory does (chmod cannot stop root, who runs CI)
    if str(path).startswith(str(tmp_path / "ro")):
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  (tmp_path / "ro").mkdir()
  with monkeypatch.context() as m:
    m.setattr(os, "open", read_only)
    _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(tmp_path / "ro")]),
                           f"error: the output directory {tmp_path / 'ro'} is not writable: Permission denied")

  # The guard: another run's directory, this run's directory, a directory that holds no run to resume.
  out = tmp_path / "run"
  out.mkdir()
  (out / "config.json").write_text(json.dumps({"density": 0.5}))
  _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(out)]),
                         f"error: {out} holds a different run (fields that differ: [")
  config = validate(FinetuneConfig(dataset=str(files / "good.csv"), output=str(out))).config
  (out / "config.json").write_text(json.dumps(config.identity()))
  _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(out)]),
                         f"error: {out} already holds this run; pass --resume to continue it or --overwrite")
  (out / "config.json").unlink()
  (out / "notes.txt").write_text("mine")
  _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(out), "--resume"]),
                         f"error: {out} has no config.json, so there is no run to resume there")

  # The lock: refused at once, naming the holder; free again once it is released.
  with OutputLock(out):
    _assert_one_line_error(*_run_main(capsys, [*good, "--output", str(out), "--resume"]),
                           f"error: {out} is in use by another job: pid {os.getpid()} on host ")
  with OutputLock(out) as lock:
    assert lock.stale is None  # a clean release leaves no note behind


def test_end_to_end_errors_exit_2_with_one_line_before_loading(files, tmp_path):
  """Three real `python -m spra_jax finetune` processes (run side by side): a config error, an unknown model, a lock."""
  locked = tmp_path / "locked"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
  cases = [
      (["--lr", "nan"], "error: lr must be a positive finite number"),
      (["--model", "minilmm"], "error: model 'minilmm' is unknown:"),
      (["--dataset", str(files / "good.csv"), "--output", str(locked)],
       f"error: {locked} is in use by another job: pid {os.getpid()} on host "),
  ]
  with OutputLock(locked):
    procs = [subprocess.Popen([sys.executable, "-m", "spra_jax", "finetune", "--output", str(tmp_path / "x"), *argv],
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in cases]
    results = [p.communicate(timeout=180) for p in procs]
  for p, (out, err), (_, prefix) in zip(procs, results, cases):
    _assert_one_line_error(p.returncode, out, err, prefix)
  assert not (tmp_path / "x").exists()


def _help_blocks(text):
  """The help of each option: {'--lr': 'the lines of its entry', ...}."""
  blocks, current = {}, None
  for line in text.splitlines():
    found = re.match(r"^  (-\w, )?(--[\w-]+)", line)
    if found:
      current = found.group(2)
      blocks[current] = line
    elif current and line.startswith("    "):
      blocks[current] += " " + line.strip()
    else:
      current = None
  return blocks


def test_help_shows_every_default_once(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "100")
  with pytest.raises(SystemExit) as done:
    cli.main(["finetune", "--help"])
  assert done.value.code == 0
  blocks = _help_blocks(capsys.readouterr().out)
  flags = {"--help", "--resume", "--overwrite", "--no-progress", "--distributed"}
  fields = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(FinetuneConfig)}
  assert fields <= set(blocks), fields - set(blocks)  # every config field has a flag (--lora-alpha included)
  for option, text in blocks.items():
    assert text.count("default") == (0 if option in flags else 1), text
  for option, default in {"--epochs": "1.0", "--batch-size": "32", "--density": "0.01", "--max-length": "64",
                          "--lora-alpha": "16.0", "--lora-rank": "8", "--eval-every": "100", "--warmup-ratio": "0.06",
                          "--output": "runs/finetune", "--method": "spra", "--model": "minilm"}.items():
    assert f"(default: {default})" in blocks[option], blocks[option]
  assert ("(default: the method's for the model's family: encoders spra 0.02, head 0.1, lora 0.003, full 0.0001; "
          "decoders spra 0.005, head 0.003, lora 0.003, full 0.0001)") in blocks["--lr"]


def test_default_lr_per_method_and_family(files):
  csv = str(files / "good.csv")
  for method in finetune_lib.METHODS:
    checked = validate(FinetuneConfig(dataset=csv, method=method))  # minilm: a BERT encoder
    assert (checked.family, checked.config.lr) == ("encoder", DEFAULT_LR["encoder"][method])
    assert checked.lr_source == f"the default of {method} for encoder models"
    checked = validate(FinetuneConfig(model=str(files / "llama"), dataset=csv, method=method))
    assert (checked.family, checked.config.lr) == ("decoder", DEFAULT_LR["decoder"][method])
  given = validate(FinetuneConfig(dataset=csv, lr=0.5))
  assert (given.config.lr, given.lr_source) == (0.5, "given")
  assert FinetuneConfig().lr is None  # the config keeps None; the job saves the resolved rate


def test_every_flag_reaches_the_config(monkeypatch, capsys):
  seen = {}

  def fake_finetune(config, **kwargs):
    seen.update(config=config, **kwargs)
    raise ValueError("stop here")

  monkeypatch.setattr(cli, "finetune", fake_finetune)
  wanted = FinetuneConfig(model="m", dataset="d.csv", task="sft", method="lora", density=0.2, distribution="bernoulli",
                          preset=None, include="a", exclude="b", full="c", lr=0.5, weight_decay=0.1, warmup_ratio=0.2,
                          steps=7, epochs=2.0, batch_size=3, max_length=9, eval_every=4, eval_examples=5,
                          test_examples=6, checkpoint_every=2, seed=11, lora_rank=4, lora_alpha=4.0, text_column="t",
                          label_column="y", prompt_column="p", response_column="r", mesh="auto", output="o")
  status = cli.main(["finetune", *cli_args(wanted), "--resume", "--no-progress"])
  assert status == 2 and capsys.readouterr().err == "error: stop here\n"
  assert seen["config"] == wanted and seen["resume"] is True and seen["progress"] is False


def test_ctrl_c_outside_training_exits_130_with_one_line(monkeypatch, capsys, tmp_path):
  """Ctrl-C before the loop (a model load, say): no traceback; the resume command once the run has a config.json."""
  def interrupted(config, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "finetune", interrupted)
  out = tmp_path / "run"
  assert cli.main(["finetune", "--output", str(out), "--overwrite"]) == 130
  assert capsys.readouterr().err == "interrupted: the run had not started; nothing was saved\n"
  out.mkdir()
  (out / "config.json").write_text("{}")
  assert cli.main(["finetune", "--output", str(out), "--overwrite"], prog="spra-jax") == 130
  assert capsys.readouterr().err == f"interrupted: resume with: spra-jax finetune --output {out} --resume\n"
