#!/usr/bin/env bash
# The prepared GPU check (UNTESTED on a GPU: no session has had one). On a CUDA machine, from the
# repository root: the smoke experiment on the GPU, then the Llama-shape decode table in
# experiments/gpu/README.md. About 10 minutes on an H100/H200; pass --no-compile-8b if short of time.
set -euo pipefail
PY=${PY:-.venv/bin/python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to torch')"
timeout 240 $PY -m pipeline experiment=smoke device=cuda tracking.experiment=gpu_smoke
timeout 540 $PY -m benchmarks.gpu_check "$@"
