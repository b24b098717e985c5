"""Child-process entry point: `python -m slimserve.optimizers.worker REQUEST_JSON`.

Runs one optimization in the optimizer environment and prints its report on a line starting
with `SLIMSERVE_RESULT `. Started by `pipeline.optimize`, not meant to be called by hand."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .pipeline import RESULT_PREFIX
from .registry import parse


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    request = json.loads(argv[0])
    spec = parse(request["spec"])
    t0 = time.monotonic()
    report = spec.run(Path(request["base"]), Path(request["out"]))
    report["optimize_seconds"] = round(time.monotonic() - t0, 3)
    logging.getLogger("slimserve").info("%s finished in %.1f s", spec.method, report["optimize_seconds"])
    sys.stdout.write(RESULT_PREFIX + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
