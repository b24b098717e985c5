#!/usr/bin/env bash
# On a lent GPU machine without registry access (see docs/BENCHMARKS.md, "GPU serving"): installs
# the carried serving stack (vLLM 0.26.0 + Ray 2.58.1, ../shared/gpu), slimserve itself, and the
# optimizer environment (llm-compressor wheels in .whl-opt, installed into /tmp/opt and used
# through /tmp/optpy, the SLIMSERVE_OPTIMIZER_PYTHON of bench/gpu_run.sh). A host with a registry
# runs `make setup-gpu` instead.
set -euo pipefail
bash .gpu-stack/install.sh /tmp/stk
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
python3 -m pip install -q --no-index --no-deps --target /tmp/opt .whl-opt/*.whl
printf '#!/bin/sh\nPYTHONPATH=/tmp/opt${PYTHONPATH:+:$PYTHONPATH} exec python3 "$@"\n' > /tmp/optpy
chmod +x /tmp/optpy
/tmp/optpy -c "import llmcompressor, compressed_tensors as ct; print('optimizer env: llmcompressor', llmcompressor.__version__, 'compressed-tensors', ct.__version__)"
python3 -c "import slimserve.serve.app, compressed_tensors as ct; print('serving env ok, compressed-tensors', ct.__version__)"
