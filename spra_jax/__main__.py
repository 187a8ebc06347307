"""``python -m spra_jax finetune ...``: the same as the ``spra-jax`` command."""

import shlex
import sys

from spra_jax.cli import main

sys.exit(main(prog=shlex.join([sys.executable, "-m", "spra_jax"])))
