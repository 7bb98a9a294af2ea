#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs what is needed, then runs a job.
#   ./run.sh demo   the embedded default: teacher vs CD vs APT on real digits (outputs/demo/)
#   ./run.sh test   the test suite (what CI runs)
#   ./run.sh bench  the benchmark suite (--quick on CPU)
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[run.sh] creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "[run.sh] installing $TORCH_SPEC"
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    fi
    local stamp="$VENV/.apt-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "[run.sh] installing comfyui-apt and its test/demo extras"
        "$VENV/bin/python" -m pip install -q -e ".[test,demo]"
        touch "$stamp"
    fi
}

job="${1:-}"
shift || true
case "$job" in
    demo)
        setup
        exec "$VENV/bin/python" -m training.demo "$@"
        ;;
    test)
        setup
        set +e
        "$VENV/bin/python" -m pytest -q "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "[run.sh] pytest collected no tests: failing" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    bench)
        setup
        exec "$VENV/bin/python" -m bench "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test|bench [args...]" >&2
        exit 2
        ;;
esac
