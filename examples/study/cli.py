"""The study's command line: plan, run (in worker processes), render."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

from . import __doc__ as DOC
from .plan import FULL_SCALES, SECOND_DECODER, SMOKE_SCALES, Row, plan
from .render import render
from .runs import run_workers, work
from .store import Store

HERE = pathlib.Path(__file__).resolve().parents[1]  # examples/


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--output", default=str(HERE / "results" / "study"), help="run records and plots")
  ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown page to write")
  ap.add_argument("--discussion", default=str(HERE / "results" / "study_discussion.md"),
                  help="a hand-written reading of the numbers, included in the page when the file exists")
  ap.add_argument("--smoke", action="store_true", help="a tiny study (2 steps, 8 examples) that checks the pipeline")
  ap.add_argument("--decoder", default="smollm2-135m", help="the Table 2 model (an alias or a local checkpoint)")
  ap.add_argument("--second-decoder", default=SECOND_DECODER,
                  help="a second Table 2 model, SpaRTA against LoRA only ('' for none)")
  ap.add_argument("--tables", default="1,2,3", help="which tables to run, e.g. 1,3")
  ap.add_argument("--workers", type=int, default=1, help="parallel single-threaded worker processes")
  ap.add_argument("--render-only", action="store_true", help="no training: render from the saved runs")
  ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def selected_rows(args) -> list[Row]:
  wanted = {f"Table {t.strip()}" for t in args.tables.split(",") if t.strip()}
  unknown = wanted - {"Table 1", "Table 2", "Table 3"}
  if unknown:
    raise SystemExit(f"--tables takes numbers among 1, 2, 3; got {args.tables!r}")
  rows = plan(smoke=args.smoke, decoder=args.decoder, second_decoder=args.second_decoder or None)
  return [r for r in rows if r.table.split(":")[0] in wanted]


def _without(argv: Sequence[str], flag: str) -> list[str]:
  """``argv`` less ``flag`` and its value (``--flag V`` or ``--flag=V``)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + "="):
      out.append(a)
  return out


def main(argv=None) -> str:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  scales = SMOKE_SCALES if args.smoke else FULL_SCALES
  output = pathlib.Path(args.output)
  store = Store(output)
  rows = selected_rows(args)
  if args.worker is not None:
    work(rows, store, scales, claims=output / "claims",
         log=lambda s: print(f"[worker {args.worker}] {s}", flush=True))
    return ""
  if not args.render_only:
    t0 = time.perf_counter()
    if args.workers > 1:
      run_workers(_without(argv, "--workers"), args.workers, output / "claims")
    else:
      work(rows, store, scales)
    print(f"study finished in {time.perf_counter() - t0:.0f} s")
  text = render(rows, store, scales, pathlib.Path(args.results), output,
                discussion=pathlib.Path(args.discussion) if args.discussion else None, decoder=args.decoder)
  print(text)
  print(f"wrote {args.results}")
  return text
