"""Child-process entry point: `python -m slimserve.optimizers.build.worker REQUEST_JSON`.

Runs one optimization in the optimizer environment and prints its report on a line starting
with `SLIMSERVE_RESULT `. Started by `pipeline.optimize`, not meant to be called by hand."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from slimserve.optimizers.build.build_report import BuildReport, QualityReport
from slimserve.optimizers.quality import HeldOut, perplexity
from slimserve.optimizers.registry import code_versions, parse

RESULT_PREFIX = "SLIMSERVE_RESULT "  # starts the report line on stdout (pipeline.optimize reads it)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    request = json.loads(argv[0])
    spec = parse(request["spec"])
    t0 = time.monotonic()
    log = logging.getLogger("slimserve")
    expected, own = request.get("code"), code_versions(spec)
    if expected and expected != own:
        # The cache key names the serving environment's code versions; building with other code
        # would store an artifact under a key that does not describe it.
        log.error(
            "this environment (%s) runs other slimserve code for %s than the one that asked for the build "
            "(versions %s, expected %s): install the same slimserve in both environments",
            sys.executable, spec.method, own, expected,
        )
        return 3
    base, out = Path(request["base"]), Path(request["out"])
    log.info("step: optimize (%s)", spec.method)
    facts = spec.run(base, out)
    optimize_seconds = round(time.monotonic() - t0, 3)
    log.info("%s finished in %.1f s", spec.method, optimize_seconds)
    measured = {}
    if request.get("held_out"):
        t1 = time.monotonic()
        log.info("step: quality (perplexity of base and variant on held-out text)")
        held_out = HeldOut.model_validate(request["held_out"])
        base_ppl, ppl = perplexity(base, held_out), perplexity(out, held_out)
        measured["quality"] = QualityReport(
            held_out=held_out.model_dump(), base_perplexity=round(base_ppl, 4), perplexity=round(ppl, 4),
            ppl_ratio=round(ppl / base_ppl, 4), seconds=round(time.monotonic() - t1, 3),
        )
        log.info("quality: perplexity %.2f vs base %.2f (ratio %.3f)", ppl, base_ppl, ppl / base_ppl)
    # Checked here too: a method's facts that do not fit the report fail in the build's own log.
    report = BuildReport.model_validate({**facts, "optimize_seconds": optimize_seconds, **measured})
    sys.stdout.write(RESULT_PREFIX + json.dumps(report.to_json_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
