"""``python examples/study``: runs the study (see the package docstring, or ``--help``)."""

import pathlib
import sys

if not __package__:  # run as a directory: make the package importable by its name
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from study.cli import main
else:
  from .cli import main

main()
