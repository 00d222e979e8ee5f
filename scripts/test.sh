#!/usr/bin/env bash
# README command 2: set up from nothing (pack venv + test-only oracle venvs), then run the whole
# test suite against a real ComfyUI.
#   bash scripts/test.sh            everything (what CI runs: .ci/run)
#   bash scripts/test.sh --quick    the quick tier: pytest -m "not slow" (docs/tests.md)
# Other arguments go to pytest. Fails on any failure and on zero tests collected (pytest exit 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then QUICK=1; else args+=("$a"); fi
done
now_ds() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 100000)); }  # tenths of a second
t0=$(now_ds)
took() { local d=$(( $(now_ds) - t0 )); echo "$((d / 10)).$((d % 10)) s"; }

# 1. The pack's venv and ComfyUI first: the steps below read it (the oracle venv links its torch
#    files) or install into it (Playwright).
bash "$ROOT/scripts/setup.sh"
. "$ROOT/.rt/env.sh"

# 2. The rest of the set-up is independent and runs side by side (each with its own log under
#    .rt/logs; the log is printed if the step fails). Only one apt-get can hold dpkg's lock, so
#    Node.js and Chromium come from one apt-get call. The Playwright pip install writes into the
#    pack's venv, which oracles.sh reads (its distributions, to link torch), so it runs before
#    oracles.sh starts; apt-get and comfy-cli overlap both.
LOGS="$ROOT/.rt/logs"
mkdir -p "$LOGS"
names=(); pids=()
bg() {  # bg NAME COMMAND...: run in the background, output to .rt/logs/NAME.log
  local name=$1; shift
  echo "[test] $name: started in the background (log: $LOGS/$name.log)" >&2
  "$@" >"$LOGS/$name.log" 2>&1 &
  names+=("$name"); pids+=("$!")
}

# Node.js runs the web panel's own tests (tests/web); tests/test_browser.py drives Debian's
# Chromium with Playwright for Python (Playwright cannot download its own browser here; the system
# one is launched). Debian's packages are enough.
apt_pkgs=()
command -v node >/dev/null 2>&1 || apt_pkgs+=(nodejs)
if ! command -v chromium >/dev/null 2>&1 && [ -z "${RT_CHROMIUM:-}" ]; then apt_pkgs+=(chromium); fi
install_apt() {
  local SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@"
}
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  bg apt install_apt "${apt_pkgs[@]}"
fi

# comfy-cli (the registry's tool: tests run `comfy node validate` and `comfy node pack`) in a
# venv of its own, so its dependencies stay out of ComfyUI's
CLI_VENV="$ROOT/.rt/comfy-cli"
CLI_PIN="comfy-cli==1.23.0"
install_cli() {
  rm -rf "$CLI_VENV"
  "${PYTHON:-python3}" -m venv "$CLI_VENV"
  "$CLI_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$CLI_PIN"
  echo "$CLI_PIN" > "$CLI_VENV/.rewardtune-pin"
}
if [ "$(cat "$CLI_VENV/.rewardtune-pin" 2>/dev/null)" != "$CLI_PIN" ]; then
  bg comfy-cli install_cli
fi

if ! "$RT_VENV/bin/python" -c "import playwright" >/dev/null 2>&1; then
  echo "[test] installing Playwright for Python into $RT_VENV for the browser tests" >&2
  "$RT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "playwright==1.65.2"
fi

# test-only reference packages (image-reward) in venvs of their own
bg oracles bash "$ROOT/scripts/oracles.sh"

failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "[test] ${names[$i]}: done" >&2
  else
    rc=$?
    echo "[test] ${names[$i]} failed (exit $rc); its log, $LOGS/${names[$i]}.log:" >&2
    sed 's/^/    /' "$LOGS/${names[$i]}.log" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || { echo "[test] set-up failed" >&2; exit 1; }
echo "[test] set-up done in $(took)" >&2

cd "$ROOT"
if [ "$QUICK" -eq 1 ]; then
  args=(-m "not slow" "${args[@]}")
  echo "[test] quick tier: pytest -m \"not slow\" (the whole suite: bash scripts/test.sh)" >&2
fi
set +e
"$RT_VENV/bin/python" -m pytest "${args[@]}"
rc=$?
set -e
echo "[test] pytest exited $rc after $(took) in all" >&2
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
