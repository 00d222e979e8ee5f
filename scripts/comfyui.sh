#!/usr/bin/env bash
# Start the set-up ComfyUI with this pack (CPU unless you pass other flags), e.g. to open the UI at
# http://127.0.0.1:8188 and load example_workflows/. All state goes to .rt/comfy (models, output …).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
. "$ROOT/.rt/env.sh"
exec "$RT_VENV/bin/python" "$COMFYUI_DIR/main.py" --base-directory "$RT_COMFY_BASE" \
  --database-url "sqlite:///$RT_COMFY_BASE/user/comfyui.db" "${@:---cpu}"
