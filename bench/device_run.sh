#!/usr/bin/env bash
# One prepared GPU session (one H100/H200) for the README's Performance figures, the real Wan shapes
# in bf16, everything written to $OUT (the device tool brings back at most 8 files; this makes 8):
#   OUT=/some/dir bash bench/device_run.sh      # at most ~10 minutes (limits: 580 s); typically ~7
# Each part has its own time limit and rewrites its JSON after every case, so a part that hangs,
# runs out of memory or hits its limit costs only its own slot. In order of importance:
#   1. inference        one-step DiT: 1.3B 480p/720p, 14B 720p, SDPA backends and choices   (160 s)
#   2. trainer_scaling  one APT iteration, 1.3B 480p, FSDP2 + bf16 + AC                     (140 s)
#   3. r1_cost          D step, aR1 vs exact R1, 1.3B 480p x 1 and x 81 frames              (120 s)
#   4. inference_compiled  torch.compile of each block, 1.3B 480p: compile time and speed    (80 s)
#   5. sfv_cost         D step, APT's D vs SF-V's (frozen half), 1.3B 480p x 81 and x 1 frame (80 s)
# Then the GPU baseline from what finished: $OUT/baseline_gpu.json (copy it to bench/).
# REHEARSE=1 runs the same parts with --rehearse (stand-in sizes, CPU) and writes no baseline:
# tests/bench checks the script that way before a device session is spent on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 APT_BENCH_RESULTS="$OUT"
LOG="$OUT/log.txt"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')"
    echo "cpus $(nproc)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

part() {  # part SECONDS ARGS...: one benchmark under its own time limit, its output in the log
    local limit="$1"
    shift
    echo "=== $* (limit ${limit} s) ===" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$PY" "$@" ${REHEARSE:+--rehearse} 2>&1 | tee -a "$LOG"
    echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s: $* ===" | tee -a "$LOG"
}

part 160 -m bench.inference --no-cpu
part 140 -m bench.trainer_scaling
part 120 -m bench.r1_cost
part 80 -m bench.inference --only-compiled --name inference_compiled
part 80 -m bench.sfv_cost
if [ -z "${REHEARSE:-}" ]; then
    "$PY" -m bench --collect "$OUT" --write-baseline "$OUT/baseline_gpu.json" 2>&1 | tee -a "$LOG"
else
    "$PY" -m bench --collect "$OUT" 2>&1 | tee -a "$LOG"
fi
