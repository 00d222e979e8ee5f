#!/usr/bin/env bash
# README command 2: set up from nothing (pack venv + test-only oracle venvs), then run the whole
# test suite against a real ComfyUI.
# Fails on any failure and on zero tests collected (pytest exit 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# test-only reference packages (image-reward) in venvs of their own
bash "$ROOT/scripts/oracles.sh"
. "$ROOT/.rt/env.sh"
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
