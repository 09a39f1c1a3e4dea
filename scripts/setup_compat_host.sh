#!/usr/bin/env bash
# Sets up the second, newer ComfyUI host the compatibility tier (`make test-compat`) runs on:
#   .host/ComfyUI-0.33.0/   ComfyUI 0.33.0 unpacked from ../shared/hosts/ (sha256 verified)
#   .venv-compat/           a virtual environment that reuses .venv's packages (torch included) through a .pth
#                           file and holds only what 0.33.0 pins differently (frontend 1.49.6, comfy-kitchen, ...)
#   .host/compat-stubs/     a stand-in `torchaudio` for this test host only (no torchaudio matches torch 2.14.1;
#                           0.33's comfy.sd imports it unconditionally). Audio nodes fail when used; the pack
#                           uses none.
# Needs `make setup` first (the first environment). Idempotent, with stamps like scripts/setup_host.sh.
# Exit status 3 (and one line) when ../shared/hosts/ is absent, as in a user's clone.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=0.33.0
TARBALL_NAME=comfyui-0.33.0-783545f.tar.gz
TARBALL_SHA256=c776442158ddc28807ec8304e1cfb1260085610511b0b018410ac743e1e08657
HOSTS_DIR=${MEPG_SHARED_HOSTS:-$ROOT/../shared/hosts}
COMFY="$ROOT/.host/ComfyUI-$VERSION"
VENV="$ROOT/.venv-compat"
FIRST_VENV="$ROOT/.venv"
STUBS="$ROOT/.host/compat-stubs"

log() { printf '[setup-compat] %s\n' "$*"; }

if [ ! -f "$HOSTS_DIR/$TARBALL_NAME" ]; then
  echo "[setup-compat] no $TARBALL_NAME in $HOSTS_DIR (../shared/hosts is not part of a user's clone): compatibility tier skipped"
  exit 3
fi
[ -x "$FIRST_VENV/bin/python" ] || { echo "[setup-compat] $FIRST_VENV missing: run make setup first" >&2; exit 1; }

# 1. the ComfyUI tree
if [ ! -f "$COMFY/.mepg-unpacked-$TARBALL_SHA256" ]; then
  got=$(sha256sum "$HOSTS_DIR/$TARBALL_NAME" | cut -d' ' -f1)
  if [ "$got" != "$TARBALL_SHA256" ]; then
    echo "[setup-compat] sha256 mismatch for $HOSTS_DIR/$TARBALL_NAME: got $got, want $TARBALL_SHA256" >&2
    exit 1
  fi
  log "unpacking ComfyUI $VERSION into $COMFY"
  tmp=$(mktemp -d "$ROOT/.host/unpack.XXXXXX")
  tar -xzf "$HOSTS_DIR/$TARBALL_NAME" -C "$tmp"
  rm -rf "$COMFY"
  mv "$tmp/ComfyUI" "$COMFY"
  rm -rf "$tmp"
  rm -f "$COMFY/extra_model_paths.yaml"
  touch "$COMFY/.mepg-unpacked-$TARBALL_SHA256"
fi

# 2. the stand-in torchaudio: importable (ComfyUI imports it at start), every use raises saying why
mkdir -p "$STUBS/torchaudio"
cat > "$STUBS/torchaudio/__init__.py" <<'PYEOF'
"""Stand-in torchaudio for the MEPG compatibility test host only (no torchaudio build matches its torch).

Importing works; using anything raises, so an audio node fails loudly instead of computing garbage."""

__version__ = "0.0.0+mepg-test-stand-in"
__mepg_stand_in__ = True


def __getattr__(name):
    raise AttributeError(f"torchaudio.{name}: this test host has a stand-in torchaudio (no audio support)")
PYEOF
for sub in functional transforms; do
  cat > "$STUBS/torchaudio/$sub.py" <<PYEOF
"""Stand-in torchaudio.$sub (see the package docstring)."""


def __getattr__(name):
    raise AttributeError(f"torchaudio.$sub.{name}: this test host has a stand-in torchaudio (no audio support)")
PYEOF
done

# 3. the environment: own site-packages first, then the stand-ins, then the first environment's packages
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV (reusing $FIRST_VENV's packages, torch included)"
  base_py=$("$FIRST_VENV/bin/python" -c 'import sys; print(sys._base_executable)')
  "$base_py" -m venv --without-pip "$VENV"
fi
VPY="$VENV/bin/python"
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
first_site=$("$FIRST_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$STUBS" "$first_site" > "$site/mepg-reuse-first-venv.pth"
"$VPY" -c 'import torch, torchvision, torchaudio; assert torchaudio.__mepg_stand_in__' \
  || { echo "[setup-compat] $VENV cannot import torch from $FIRST_VENV" >&2; exit 1; }

# 4. ComfyUI 0.33.0's pins that differ from what .venv has (torch and torchvision come from .venv)
req_stamp="$VENV/.mepg-reqs-$(cat "$COMFY/requirements.txt" "$0" | sha256sum | cut -c1-16)"
if [ ! -f "$req_stamp" ]; then
  log "installing ComfyUI $VERSION's requirements (torch reused, torchaudio stood in)"
  "$FIRST_VENV/bin/python" -c 'import torch, torchvision
for m in (torch, torchvision): print(m.__name__ + "==" + m.__version__.split("+")[0])' \
    > "$ROOT/.host/compat-constraints.txt"
  grep -viE '^\s*torchaudio' "$COMFY/requirements.txt" > "$ROOT/.host/compat-requirements.txt"
  # pip (the first environment's, through the .pth) installs into this one; what .venv already satisfies is not installed again.
  "$VPY" -m pip install --quiet -c "$ROOT/.host/compat-constraints.txt" \
    -r "$ROOT/.host/compat-requirements.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VPY" -c 'import torch; assert torch.__file__.startswith("'"$first_site"'"), torch.__file__' \
    || { echo "[setup-compat] a second torch was installed into $VENV" >&2; exit 1; }
  rm -f "$VENV"/.mepg-reqs-*
  touch "$req_stamp"
fi
log "ready: python=$VPY comfyui=$COMFY ($(du -sh "$VENV" | cut -f1) in $VENV)"
