"""The fine-tuning job: SpaRTA, LoRA, head-only or full fine-tuning on a dataset.

The package's modules, bottom up: ``config`` (:class:`FinetuneConfig`, the
default learning rates), ``checks`` (:func:`validate`, everything checked
before loading), ``rundir`` (the output directory: lock, guard, logs, plot) and
``job`` (:class:`Job` and the loop, :func:`finetune`).

:func:`finetune` runs a whole job from a :class:`FinetuneConfig`: it loads a
pretrained model and a dataset, trains with the chosen method, evaluates on
held-out data every ``eval_every`` steps (accuracy, MCC and F1 for
classification; loss and response-token accuracy for supervised fine-tuning),
writes metrics as JSON lines and a PNG of the curves, checkpoints for resume,
saves the adapter, and ends with the test metrics. ``spra-jax finetune`` (see
:mod:`spra_jax.cli`) is its command line.

Methods:

* ``spra``: the lean path (:func:`spra.lean_step`) over a random mask of
  ``density`` (placed by ``preset`` or ``include``/``exclude``/``full``
  rules); the classification head trains fully.
* ``head``: only the classification head trains.
* ``lora``: LoRA adapters of ``lora_rank`` on the preset's projections.
* ``full``: every parameter trains.

The methods themselves (losses, trainers, evaluation, the schedule) live in
:mod:`spra_jax.recipes`; this module owns the config, the loop and the output
directory.

Everything that decides the result lives in the config, which is saved as
``config.json`` in the output directory; resuming refuses a directory written
by a run with a different config.

Default learning rates. ``lr=None`` (no ``--lr``) means the method's default
for the model's family (:data:`DEFAULT_LR`, :func:`default_lr`); the job prints
the rate it uses and stores it in ``config.json`` and ``results.json``:

===========  ======  ======  ======  ======
family       spra    head    lora    full
===========  ======  ======  ======  ======
``encoder``  2e-2    1e-1    3e-3    1e-4
``decoder``  5e-3    3e-3    3e-3    1e-4
===========  ======  ======  ======  ======

They come from the study in ``examples/RESULTS.md`` (short runs on MiniLM and
SmolLM2-135M; rates tuned on validation). Encoders (BERT): head, LoRA and full
fine-tuning are the rates that won on MiniLM; SpaRTA's 2e-2 is the demo's (the
study's winners were 1e-2 at 5 % density and 3e-2 at 1 %). Decoders (Llama
family): SmolLM2's winners were at the top of their grids (SpaRTA 9e-3, LoRA
3e-3, full 9e-5), so LoRA and full take those; SpaRTA takes 5e-3, between the
grid's 3e-3 and 9e-3 and the rate ``examples/sft.py`` fine-tunes SmolLM2 with;
head-only is the study's untuned centre. A model passed in whose family is not
known uses the encoder row for classification and the decoder row for SFT.

Checks before loading. :func:`validate` checks everything that can be checked
without loading the model or the data (the config's values, the mesh against
the devices, that the model exists, the dataset's file and columns), and the
output directory is locked and guarded next; only then does the model load.

The output directory is locked for the whole run (:class:`OutputLock`, an
``flock`` on ``<output>/.lock``): a second job on the same directory is refused
at once, with the holder's pid, host and start time. A lock left by a job that
was killed needs no cleaning: the kernel releases an ``flock`` when its process
ends, so the next run takes it over (and says so).

Ctrl-C (SIGINT) during training stops after the current step: the job saves a
checkpoint of that step, waits for it and raises :class:`Interrupted` (the
command prints where the checkpoint is and the command that resumes it, and
exits with status 130). A second Ctrl-C stops at once.
"""

from spra_jax.finetune.checks import Validated, validate
from spra_jax.finetune.config import DEFAULT_LR, FinetuneConfig, default_lr, parse_mesh
from spra_jax.finetune.job import Interrupted, Job, finetune
from spra_jax.finetune.rundir import OutputLock, plot_curves
from spra_jax.recipes import METHODS
__all__ = ["DEFAULT_LR", "METHODS", "FinetuneConfig", "Interrupted", "Job", "OutputLock", "Validated", "default_lr",
           "finetune", "parse_mesh", "plot_curves", "validate"]
