#!/usr/bin/env bash
# One prepared GPU session (H100/H200) for the Performance figures: the suite on the real Wan shapes,
# everything written to $OUT (the device tool brings back at most 8 files: this makes 7).
#   OUT=/some/dir bash bench/device_run.sh            # budget: about 7 minutes on one H200
# Order: the one-step DiT forward (1.3B 480p/720p, 14B 720p, SDPA backends, torch.compile of the
# 480p case), then the APT iteration (FSDP2 + bf16 + AC), then aR1 vs exact R1. Each benchmark
# writes its JSON as soon as it ends, so a session cut short still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    nproc
} > "$OUT/machine.txt" 2>&1
timeout "${SUITE_TIMEOUT_S:-480}" "$PY" -m bench --compile --out "$OUT" --write-baseline "$OUT/baseline_gpu.json" 2>&1 \
    | tee "$OUT/log.txt"
echo "suite exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
