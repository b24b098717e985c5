#!/usr/bin/env bash
# Here, on a host with a package registry: prepares everything a registry-less lent GPU machine
# needs for the bench/gpu_*.py runs, as three ignored folders of the checkout (see .gitignore):
#   .gpu-stack/  vLLM 0.26.0 + ray[serve,llm] 2.58.1 as checked wheels cut into 60 MiB parts
#                p.aa .. p.ah, plus install.sh (made by ../shared/gpu/fetch.sh; one part per device
#                call, see ../shared/gpu/README.md)
#   .whl-opt/    llm-compressor and the wheels the image and the stack lack (~3 MiB), installed
#                on the device into /tmp/opt by bench/gpu_setup.sh (the optimizer environment)
#   .gpu-tok/    SmolLM2's tokenizer files (no weights), the tokenizer of the random-weight models
#                of bench/gpu_serving.py and bench/gpu_kernels.py
# Then on the device: carry each .gpu-stack part in its own call (`mkdir -p /tmp/stk && cp
# .gpu-stack/p.aX /tmp/stk/`), back to back, and in the last call carry the last part, .whl-opt
# and .gpu-tok and run `bash bench/gpu_setup.sh` (docs/BENCHMARKS.md, "GPU speed and cold start").
#   usage: bash bench/gpu_prepare.sh [--skip-stack]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SLIMSERVE_GPU_SHARED:-../shared/gpu}
HOME_DIR=${SLIMSERVE_HOME:-$PWD/.cache/slimserve}
TOK_SRC=$HOME_DIR/models/SmolLM2-135M-Instruct

for d in .gpu-stack .whl-opt .gpu-tok; do
  git check-ignore -q "$d/" || { echo "$d/ is not ignored by git: add /$d/ to .gitignore first" >&2; exit 1; }
done

# 1. The serving stack (454 MiB, every sha256 checked by fetch.sh).
if [[ ${1:-} != --skip-stack ]]; then
  "$SHARED/fetch.sh" .gpu-stack
fi

# 2. The optimizer wheels: llm-compressor with the compressed-tensors it wants (vLLM 0.26 pins
#    0.17.0, so they go to a separate --target on the device), and the three wheels neither the
#    image nor the stack has (datasets: `import llmcompressor` imports it; multiprocess: needed by
#    datasets; auto-round: imported by llmcompressor's modifiers). The rest of llm-compressor's
#    needs (loguru, pydantic, dill, transformers, accelerate, ...) come from the image or the stack.
rm -rf .whl-opt && mkdir -p .whl-opt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .whl-opt \
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 multiprocess==0.70.19 auto-round==0.15.1

# 3. The tokenizer: the files of the SmolLM2 folder `make setup` builds, without its weights.
[[ -f $TOK_SRC/tokenizer.json ]] || { echo "no $TOK_SRC/tokenizer.json: run \`make setup\` first" >&2; exit 1; }
rm -rf .gpu-tok && mkdir -p .gpu-tok
for f in tokenizer.json tokenizer_config.json chat_template.jinja config.json generation_config.json; do
  cp "$TOK_SRC/$f" .gpu-tok/
done

du -sh .gpu-stack .whl-opt .gpu-tok 2>/dev/null || true
ls .whl-opt
