#!/usr/bin/env bash
# README command 1: set up from nothing, then run the example workflows headless on the toy world.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
. "$ROOT/.rt/env.sh"
exec "$RT_VENV/bin/python" "$ROOT/scripts/demo.py" "$@"
