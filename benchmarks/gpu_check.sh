#!/usr/bin/env bash
# The prepared GPU check (issue 14): every head's bf16 and fp16 training step on one GPU, in under 10 minutes.
#
#   bash benchmarks/gpu_check.sh --output "$OUT/gpu_check.json"
#
# Installs nothing and downloads nothing: it runs benchmarks/gpu_check.py with the repository on PYTHONPATH (the
# package need not be installed there) and passes every argument on (see `--help`).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$python" ]]; then
    echo "gpu_check.sh: no python or python3 on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
# Fail fast, before the package is imported, where torch sees no GPU (the script itself says so too, for --device cuda).
if [[ " $* " != *" --device cpu "* && " $* " != *" --device=cpu "* ]]; then
    if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False for $python" \
            "(a CPU-only torch, no GPU, or no driver). Run it on the GPU machine, or pass --device cpu --tiny." >&2
        exit 2
    fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
