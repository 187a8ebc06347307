"""The study: does sparse random adaptation match LoRA at an equal number of trainable parameters?

This runner regenerates ``examples/RESULTS.md`` and its plots from scratch. It
fine-tunes shipped pretrained models on shipped labelled text, offline, and
writes three tables:

* Table 1 (encoder): all-MiniLM-L6-v2 with a new classification head on Rotten
  Tomatoes (2 classes) and on the tweets (3 classes): full fine-tuning, head
  only, LoRA at two ranks on the paper's projections (attention value and
  output), SpaRTA at the densities that give exactly LoRA's trainable counts,
  and SpaRTA at 0.1 %, 1 % and 5 % of those projections.
* Table 2 (decoder, the paper's setting): SmolLM2-135M with a classification
  head on Rotten Tomatoes: SpaRTA with the paper's preset (V and O sparse, the
  head fully trained) against LoRA on the same projections at the same count,
  and full fine-tuning.
* Table 3 (ablation at a fixed budget): MiniLM on Rotten Tomatoes, every row
  training the same number of entries (1 % of the V/O projections): which
  entries (uniform, Bernoulli, whole rows, whole columns, random 16x16 tiles,
  largest / smallest pretrained magnitude, Fisher top-k over a few batches) and
  where (V/O, all linear layers, MLP only).

Protocol. Each row's learning rate is tuned on validation accuracy with seed 0
over the same three-point grid around the method's customary value (x 1/3,
x 1, x 3, see ``LR_CENTRES``); the best one then runs with seeds 1 and 2, and
the tables report the test metrics over the three seeds (mean +- std). A seed
draws the mask, the new head, LoRA's initialisation and the order of the
training data; the train / validation / test split is fixed (split seed 0), so
every run is scored on the same examples.

Caching. Every run's configuration and metrics are saved as one JSON file in
``<output>/runs/`` (named by a hash of the configuration), written atomically.
A rerun skips finished runs, so an interrupted study resumes where it stopped
and ``--render-only`` rebuilds the tables and plots instantly from the files.

Run:
  python examples/study --workers 2     # the full study (about 75 minutes on 2 CPU cores)
  python examples/study --render-only   # tables and plots from the saved runs
  python examples/study --smoke --output /tmp/smoke --results /tmp/smoke/RESULTS.md   # a check of the pipeline in minutes
"""

from .cli import main, parse_args
from .plan import FULL_SCALES, LR_CENTRES, LR_FACTORS, SEEDS, SMOKE_SCALES, Row, Scale, lora_count, plan, resolve_density
from .render import render, summarize
from .runs import Lab, best_lr, row_records, run_row, work
from .store import Store

__all__ = ["FULL_SCALES", "LR_CENTRES", "LR_FACTORS", "SEEDS", "SMOKE_SCALES", "Lab", "Row", "Scale", "Store", "best_lr",
           "lora_count", "main", "parse_args", "plan", "render", "resolve_density", "row_records", "run_row",
           "summarize", "work"]
