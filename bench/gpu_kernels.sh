#!/usr/bin/env bash
# One device call of bench/gpu_kernels.py on a lent GPU (issue 27). On a fresh machine it first
# installs what bench/gpu_prepare.sh made (the stack's parts already copied to /tmp/stk, one per
# earlier call; .whl-opt and .gpu-tok carried in this one) while the 8B model is made on the GPU;
# then it runs the settings until SECONDS have passed since it started.
#   bash bench/gpu_kernels.sh SECONDS [gpu_kernels.py options]
set -uo pipefail
LIMIT=${1:?usage: gpu_kernels.sh SECONDS [options]}; shift
T0=$SECONDS
OUT=${OUT:-/tmp/kout}; WORK=/tmp/kbench
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 SLIMSERVE_OPTIMIZER_PYTHON=/tmp/optpy
if [ ! -f /tmp/stack.done ]; then
  rm -f /tmp/models.imported
  python3 bench/gpu_kernels.py --tokenizer .gpu-tok --work $WORK --out "$OUT" --phases models --deadline-s 300 \
    --imported-marker /tmp/models.imported > "$OUT/models.log" 2>&1 &
  MP=$!
  for _ in $(seq 120); do { [ -f /tmp/models.imported ] || ! kill -0 $MP 2>/dev/null; } && break; sleep 1; done
  { time bash bench/gpu_setup.sh; } > "$OUT/setup.log" 2>&1; echo "gpu_setup rc=$?" >> "$OUT/setup.log"
  wait $MP
  python3 -c "import vllm" && touch /tmp/stack.done
  echo "install + model: $((SECONDS - T0)) s" | tee -a "$OUT/setup.log"
fi
python3 bench/gpu_kernels.py --tokenizer .gpu-tok --work $WORK --out "$OUT" --deadline-s $((LIMIT - (SECONDS - T0))) "$@" \
  2>&1 | tee "$OUT/kernels.log"
df -h /tmp | tail -1
