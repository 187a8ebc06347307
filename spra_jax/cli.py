"""The ``spra-jax`` command line (also ``python -m spra_jax``).

  spra-jax finetune --model minilm --dataset rotten-tomatoes --method spra --density 0.01

runs :func:`spra_jax.finetune.finetune` and ends by printing the test metrics
and a short table. ``spra-jax finetune --help`` lists every option with its
default.

Exit status: 0 when the run completes; 2 for a user error (a bad option, an
unknown model or dataset, a dataset without the needed columns, an output
directory that cannot be used or that another job holds), reported as one line
``error: ...`` on stderr before anything loads; 130 after Ctrl-C, with one line
saying where the checkpoint is and the command that resumes the run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from spra_jax.finetune import DEFAULT_LR, METHODS, FinetuneConfig, Interrupted, finetune
from spra_jax.precision import FLOAT_DTYPES

__all__ = ["main", "parser"]


def _nullable(value: str) -> str | None:
  return None if value.lower() in ("", "none") else value


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line, ``error: ...`` (no usage block), exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Adds ``(default: ...)`` to each option's help unless the help already says its default (once each)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
      return text
    return super()._get_help_string(action)


def _lr_help() -> str:
  rows = "; ".join(f"{family}s " + ", ".join(f"{m} {lr:g}" for m, lr in rates.items())
                   for family, rates in DEFAULT_LR.items())
  return f"AdamW's peak learning rate (default: the method's for the model's family: {rows})"


def parser() -> argparse.ArgumentParser:
  """The argument parser of ``spra-jax``."""
  d = FinetuneConfig()
  top = _Parser(prog="spra-jax", description="SpaRTA fine-tuning for JAX.")
  commands = top.add_subparsers(dest="command", required=True, metavar="command")
  ft = commands.add_parser("finetune", help="fine-tune a pretrained model on a dataset",
                           description="Fine-tune a pretrained model with SpaRTA, LoRA, the head only, or fully.",
                           formatter_class=_HelpFormatter)
  add = ft.add_argument
  add("--model", default=d.model,
      help="local checkpoint directory, .gguf file, hub id, or alias (minilm, smollm2-135m, gemma3-270m)")
  add("--dataset", default=d.dataset,
      help="shipped dataset (rotten-tomatoes, tweets, jeopardy), local CSV/JSON/Parquet file or hub name")
  add("--task", choices=("classification", "sft"), default=None,
      help="the task (default: sft for prompt/response or question/answer columns, else classification)")
  add("--method", choices=METHODS, default=d.method, help="what trains: a sparse random subset, the head, LoRA, all")
  add("--density", type=float, default=d.density, help="fraction of the eligible entries SpaRTA trains")
  add("--distribution", default=d.distribution, help="mask distribution (spra.masks.available())")
  add("--preset", type=_nullable, default=d.preset,
      help="placement preset: paper, all-linear, mlp, attention; none: every leaf")
  add("--include", default=None, help="regex of the leaves to sparsify (default: the preset's)")
  add("--exclude", default=None, help="regex of leaves never to sparsify (default: the preset's)")
  add("--full", default=None, help="regex of leaves to train fully (default: the preset's, the classification head)")
  add("--lr", type=float, default=None, help=_lr_help())
  add("--weight-decay", type=float, default=d.weight_decay, help="AdamW's weight decay")
  add("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of the steps warming up (then cosine decay)")
  add("--steps", type=int, default=None, help="training steps (default: from --epochs; wins over --epochs)")
  add("--epochs", type=float, default=d.epochs, help="passes over the training split")
  add("--batch-size", type=int, default=d.batch_size, help="examples per step")
  add("--max-length", type=int, default=d.max_length, help="tokens per example (truncated or padded)")
  add("--grad-accum-steps", type=int, default=d.grad_accum_steps,
      help="microbatches per step: gradients summed over batch-size / N rows at a time (same effective batch)")
  add("--sparse-backward", choices=("auto", "sampled", "dense"), default=d.sparse_backward,
      help="SpaRTA's weight gradients: only the k trained entries (sampled), the dense product then a gather "
           "(dense), or per layer by a cost model (auto); the result is the same")
  add("--param-dtype", choices=FLOAT_DTYPES, default=None,
      help="the weights' dtype (default: float32 on CPU, bfloat16 on GPU and TPU); SpaRTA keeps float32 deltas")
  add("--compute-dtype", choices=FLOAT_DTYPES, default=None,
      help="the dtype the model computes in (default: float32 on CPU, bfloat16 on GPU and TPU); losses are float32")
  add("--eval-every", type=int, default=d.eval_every, help="evaluate on the validation split every this many steps")
  add("--eval-examples", type=int, default=d.eval_examples, help="validation examples per evaluation (0: all)")
  add("--test-examples", type=int, default=d.test_examples, help="test examples of the final evaluation (0: all)")
  add("--checkpoint-every", type=int, default=d.checkpoint_every, help="save a resumable checkpoint every this many steps")
  add("--lora-rank", type=int, default=d.lora_rank, help="LoRA's rank")
  add("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA's scale numerator (the scale is alpha / rank)")
  add("--seed", type=int, default=d.seed, help="seeds the mask, the new head, the split and the data order")
  add("--text-column", default=d.text_column, help="the dataset's text column (classification)")
  add("--label-column", default=d.label_column, help="the dataset's label column (classification)")
  add("--prompt-column", default=None, help="the prompt column (sft; default: prompt, else question)")
  add("--response-column", default=None, help="the response column (sft; default: response, else answer)")
  add("--mesh", default=None, help="device mesh, e.g. data=2,tensor=4, or auto (default: one device)")
  add("--output", default=d.output, help="output directory")
  add("--resume", action="store_true", help="continue the run saved in --output")
  add("--overwrite", action="store_true", help="delete what --output holds and start over")
  add("--no-progress", action="store_true", help="no progress bar")
  add("--distributed", action="store_true",
      help="run on a multi-process JAX cluster: jax.distributed.initialize() (auto-detected on TPU, Slurm, Open MPI; "
           "or give the three options below); every process runs this same command")
  add("--coordinator-address", default=None, help="HOST:PORT of process 0 in a manual cluster (default: detected by --distributed)")
  add("--num-processes", type=int, default=None, help="processes in a manual cluster (default: detected by --distributed)")
  add("--process-id", type=int, default=None, help="this process's index in a manual cluster, 0 .. N-1 (default: detected by --distributed)")
  return top


def init_distributed(args: argparse.Namespace) -> None:
  """Joins the JAX cluster the command's ``--distributed`` options describe (nothing without ``--distributed``)."""
  manual = [args.coordinator_address, args.num_processes, args.process_id]
  if not args.distributed:
    if any(v is not None for v in manual):
      raise ValueError("--coordinator-address, --num-processes and --process-id need --distributed")
    return
  if any(v is not None for v in manual) and any(v is None for v in manual):
    raise ValueError("a manual cluster needs all of --coordinator-address, --num-processes and --process-id; "
                     f"got {args.coordinator_address!r}, {args.num_processes!r}, {args.process_id!r}")
  import jax

  # CPU processes exchange their collectives over gloo (accelerators use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id)


def summary_table(results: dict) -> str:
  """The markdown table the job ends with."""
  test = results["test"]
  rows = [("method", results.get("method", "")), ("task", results["task"])]
  rows += [(f"test {k}", f"{v:.4f}") for k, v in test.items()]
  if "majority" in results:
    rows.append(("majority-class rate (test)", f"{results['majority']:.4f}"))
  rows += [("trainable parameters", f"{results['trainable']:,} of {results['parameters']:,} "
            f"({100 * results['trainable'] / results['parameters']:.3f} %)"),
           ("optimizer state", f"{results['opt_state_bytes'] / 2**20:.2f} MiB")]
  if "lr" in results:
    rows.append(("learning rate", f"{results['lr']:g}"))
  if "param_dtype" in results:
    rows.append(("precision", f"{results['param_dtype']} weights, {results['compute_dtype']} compute"))
  rows += [("steps", str(results["steps"])), ("wall time", f"{results['seconds']:.0f} s"), ("adapter", results["adapter"])]
  width = max(len(r[0]) for r in rows)
  return "\n".join([f"| {'':<{width}} | |", f"|{'-' * (width + 2)}|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def _resume_command(prog: str, argv: Sequence[str]) -> str:
  """The command line that resumes the run ``argv`` started: the same options, ``--resume``, no ``--overwrite``."""
  kept = [a for a in argv if a not in ("--overwrite", "--resume")]
  return shlex.join([*shlex.split(prog), *kept, "--resume"])


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None, *, prog: str = "spra-jax", **finetune_kwargs: Any) -> int:
  """Entry point of ``spra-jax``; returns the exit status (0 done, 2 user error, 130 interrupted).

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).
    prog: how the command was started, for the resume command it prints.
    **finetune_kwargs: passed to :func:`spra_jax.finetune.finetune` (e.g. a
      ready ``model`` and ``tokenizer``, for programs that wrap the command).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(argv)
  if args.command != "finetune":
    return 0
  try:
    init_distributed(args)
    config = FinetuneConfig(
        model=args.model, dataset=args.dataset, task=args.task, method=args.method, density=args.density,
        distribution=args.distribution, preset=args.preset, include=args.include, exclude=args.exclude,
        full=args.full, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, eval_every=args.eval_every,
        grad_accum_steps=args.grad_accum_steps,
        sparse_backward=args.sparse_backward, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
        eval_examples=args.eval_examples, test_examples=args.test_examples, checkpoint_every=args.checkpoint_every,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed, text_column=args.text_column,
        label_column=args.label_column, prompt_column=args.prompt_column, response_column=args.response_column,
        mesh=args.mesh, output=args.output)
    results = finetune(config, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                       **finetune_kwargs)
  except (ValueError, FloatingPointError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    return 2
  except Interrupted as e:
    print(f"interrupted after step {e.step} of {e.total}: the checkpoint of step {e.step} is in {e.checkpoint}; "
          f"resume with: {_resume_command(prog, argv)}", file=sys.stderr, flush=True)
    return 130
  except KeyboardInterrupt:
    saved = (pathlib.Path(args.output) / "config.json").exists()
    hint = f"resume with: {_resume_command(prog, argv)}" if saved else "the run had not started; nothing was saved"
    print(f"interrupted: {hint}", file=sys.stderr, flush=True)
    return 130
  test = results["test"]
  print("test " + " ".join(f"{k} {v:.4f}" for k, v in test.items()))
  print(summary_table(results))
  print(json.dumps({"results": str(results["output"]) + "/results.json"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
