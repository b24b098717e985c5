#!/usr/bin/env bash
# One device call's worth of bench/gpu_serving.py on the lent GPU: PHASES, seconds allowed, and
# any further options of gpu_serving.py.
#   bash bench/gpu_run.sh models,bare 500
#   bash bench/gpu_run.sh slim_cold 560 --variants bf16,w4a16
set -uo pipefail
export SLIMSERVE_OPTIMIZER_PYTHON=/tmp/optpy SLIMSERVE_HOME=/tmp/bench/home PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
python3 bench/gpu_serving.py --tokenizer .gpu-tok --work /tmp/bench --out "${OUT:-/tmp}" --phases "$1" --deadline-s "$2" "${@:3}" 2>&1 | tee "${OUT:-/tmp}/bench.log"
for f in /tmp/bench/*.log; do echo "=== $f"; tail -n 60 "$f"; done > "${OUT:-/tmp}/server_logs_tail.txt" 2>/dev/null
df -h /tmp | tail -1; nvidia-smi --query-gpu=memory.used --format=csv
