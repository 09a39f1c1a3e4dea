#!/usr/bin/env bash
# The GPU checks, in minutes, on a CUDA machine (the CI machines have none): on each host this checkout has
# set up (ComfyUI 0.3.75 in .venv; 0.33.0 in .venv-compat after `make setup-compat`), where 0.33 loads
# checkpoints as a dynamic-VRAM ModelPatcherDynamic:
#   1. the contract tests of the MoE patch, its composition with ComfyUI (LoRAs, hooks, merges, saves, the
#      non-dynamic delegate) and gate training, on the tiny models, on the GPU (MEPG_DEVICE=cuda);
#   2. tools/gpu_check.py: random-weight SDXL-size UNets through the host's own loader, the MoE patch with two
#      experts, forced expert == that expert, experts on the GPU while sampling and off it after unloading,
#      and timings (plain vs two-expert mixture).
# Results: test-artifacts/gpu-check/ (JUnit XML per host and gpu_check_<version>.json). Exit status: 0 all
# passed, 1 a check failed, 2 no CUDA device.
#   bash scripts/gpu_check.sh [--quick]     # --quick: 512 px, 4 steps, one repeat
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/test-artifacts/gpu-check}
SIZE=1024 STEPS=8 REPEATS=2
[ "${1:-}" = "--quick" ] && { SIZE=512 STEPS=4 REPEATS=1; }
mkdir -p "$OUT"

if [ ! -x .venv/bin/python ]; then
  echo "[gpu-check] .venv missing: run make setup (and make setup-compat for the second host) first" >&2
  exit 1
fi
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "[gpu-check] no CUDA device visible to torch: nothing to check here"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/[gpu-check] gpu: /'

TESTS=(tests/contract/test_moe_patch.py tests/contract/test_composition.py tests/contract/test_gate_training.py)
status=0
run_host() {  # name python [env...]
  local name=$1 py=$2; shift 2
  echo "[gpu-check] == ComfyUI $name: contract tests on the GPU"
  env MEPG_DEVICE=cuda "$@" MEPG_HOST_WORK_DIR="$ROOT/.host/gpu-$name" MEPG_ARTIFACTS="$OUT/$name" \
    timeout 900 "$py" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --junitxml="$OUT/contract_$name.xml" \
    || status=1
  echo "[gpu-check] == ComfyUI $name: SDXL-size random weights"
  env MEPG_DEVICE=cuda "$@" MEPG_HOST_WORK_DIR="$ROOT/.host/gpu-$name" \
    timeout 900 "$py" tools/gpu_check.py --out "$OUT" --size "$SIZE" --steps "$STEPS" --repeats "$REPEATS" \
    || status=1
}

run_host 0.3.75 .venv/bin/python
if [ -x .venv-compat/bin/python ] && [ -d .host/ComfyUI-0.33.0 ]; then
  run_host 0.33.0 .venv-compat/bin/python MEPG_COMFYUI_DIR="$ROOT/.host/ComfyUI-0.33.0"
else
  echo "[gpu-check] ComfyUI 0.33.0 not set up (make setup-compat): its dynamic-VRAM path was NOT checked"
  status=1
fi
echo "[gpu-check] results in $OUT; status $status"
exit $status
