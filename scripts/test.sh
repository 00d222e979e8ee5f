#!/usr/bin/env bash
# README command 2: set up from nothing (pack venv + test-only oracle venvs), then run the whole
# test suite against a real ComfyUI.
# Fails on any failure and on zero tests collected (pytest exit 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# test-only reference packages (image-reward) in venvs of their own
bash "$ROOT/scripts/oracles.sh"
# comfy-cli (the registry's tool: tests run `comfy node validate` and `comfy node pack`) in a
# venv of its own, so its dependencies stay out of ComfyUI's
CLI_VENV="$ROOT/.rt/comfy-cli"
CLI_PIN="comfy-cli==1.23.0"
if [ "$(cat "$CLI_VENV/.rewardtune-pin" 2>/dev/null)" != "$CLI_PIN" ]; then
  echo "[test] installing $CLI_PIN into $CLI_VENV" >&2
  rm -rf "$CLI_VENV"
  "${PYTHON:-python3}" -m venv "$CLI_VENV"
  "$CLI_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$CLI_PIN"
  echo "$CLI_PIN" > "$CLI_VENV/.rewardtune-pin"
fi
# Node.js runs the web panel's own tests (tests/web); Debian's package is enough
if ! command -v node >/dev/null 2>&1; then
  echo "[test] installing Node.js (apt-get install nodejs) for the web panel tests" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nodejs >/dev/null
fi
. "$ROOT/.rt/env.sh"
# tests/test_browser.py drives Debian's Chromium with Playwright for Python (Playwright cannot
# download its own browser here; the system one is launched). ~1 min when both are missing.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${RT_CHROMIUM:-}" ]; then
  echo "[test] installing Chromium (apt-get install chromium) for the browser tests" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! "$RT_VENV/bin/python" -c "import playwright" >/dev/null 2>&1; then
  echo "[test] installing Playwright for Python into $RT_VENV for the browser tests" >&2
  "$RT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "playwright==1.65.2"
fi
cd "$ROOT"
set +e
"$RT_VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
