"""The run cache: one JSON record per run, named by a hash of its configuration."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from .plan import run_id


class Store:
  """``<output>/runs/<id>.json`` per run, written by rename so a killed run never leaves half a file."""

  def __init__(self, output: pathlib.Path):
    self.dir = output / "runs"
    self.dir.mkdir(parents=True, exist_ok=True)

  def get(self, spec: dict[str, Any]) -> dict[str, Any] | None:
    path = self.dir / f"{run_id(spec)}.json"
    if not path.exists():
      return None
    record = json.loads(path.read_text())
    return record if record["config"] == spec else None

  def put(self, spec: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    record = {"id": run_id(spec), "config": spec, **metrics}
    tmp = self.dir / f".{record['id']}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, self.dir / f"{record['id']}.json")
    return record
