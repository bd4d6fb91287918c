"""Helpers the apps (and the tests and scripts that drive vLLM) share.

Metrics: one rule for reading Prometheus samples, whether they come from a server's
``/metrics`` text (:func:`parse_metrics`) or from this process's registry after an
offline ``vllm.LLM`` run (:func:`registry_metrics`): sample values are summed by
sample name over label sets, except the labels named in ``by_labels``, whose values
are kept in the key (``name[value]``, in label-name order). ``*_created`` samples
(creation timestamps of counters and histograms) are skipped: summing them means
nothing.

Also: token counting with a model's own tokenizer, a free TCP port, a plain HTTP GET,
and what a results file records about the code and the machine.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

ADAPTIVE_PREFIX = "vllm_adaptive_kv:"

# name, optional {labels} (label values may hold '}' or escaped quotes), value.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


# --------------------------------------------------------------------------- metrics


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    return {m.group(1): re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
            for m in _LABEL.finditer(text)}


def sum_samples(samples: Iterable[tuple[str, dict[str, str], float]], prefix: str | None = None,
                by_labels: Iterable[str] = ()) -> dict[str, float]:
    """``(name, labels, value)`` samples -> {key: value summed over label sets}.

    ``prefix``: only samples whose name starts with it. ``by_labels``: labels kept in
    the key, ``name[value]`` per label present, in label-name order (for instance
    ``("le", "policy")`` gives ``..._bucket[0.5][full]``).
    """
    keep = sorted(set(by_labels))
    values: dict[str, float] = {}
    for name, labels, value in samples:
        if prefix is not None and not name.startswith(prefix):
            continue
        if name.endswith("_created"):
            continue
        key = name + "".join(f"[{labels[k]}]" for k in keep if k in labels)
        values[key] = values.get(key, 0.0) + value
    return values


def _text_samples(text: str, want_labels: bool):
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        yield match.group(1), _labels(match.group(2)) if want_labels else {}, value


def parse_metrics(text: str, prefix: str | None = None, by_labels: Iterable[str] = ()) -> dict[str, float]:
    """Prometheus text (a server's ``/metrics``) -> {sample key: value}; see :func:`sum_samples`.

    Comments and lines that are not samples are skipped; so are values that are not numbers.
    """
    by_labels = tuple(by_labels)
    return sum_samples(_text_samples(text, bool(by_labels)), prefix, by_labels)


def registry_metrics(prefix: str | None = ADAPTIVE_PREFIX, by_labels: Iterable[str] = (),
                     registry=None) -> dict[str, float]:
    """This process's Prometheus samples (default: the plugin's ``vllm_adaptive_kv:*``).

    An offline ``vllm.LLM`` publishes its metrics, ours included, in the frontend
    process's default registry; ``registry`` overrides it (tests).
    """
    if registry is None:
        from prometheus_client import REGISTRY as registry
    samples = ((s.name, s.labels, s.value) for family in registry.collect() for s in family.samples)
    return sum_samples(samples, prefix, by_labels)


def metrics_delta(before: dict, after: dict) -> dict[str, float]:
    """``after - before`` for every key of ``after`` (a key missing before counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# --------------------------------------------------------------------------- models and servers


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens of a text with the model's own tokenizer, special tokens not added."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


# --------------------------------------------------------------------------- results files


def git_commit() -> dict:
    """The checkout's commit and whether tracked files differ from it (None when unknown)."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


# CPU flags that decide how fast the model runs: bf16 is emulated without avx512_bf16
# or AMX, and vLLM's CPU attention picks its kernel from AMX / AVX-512 support.
KEY_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_info(lscpu_text: str | None = None) -> dict:
    """CPU model, flags (``lscpu``, else /proc/cpuinfo) and the key flags present."""
    if lscpu_text is None:
        try:
            lscpu_text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu_text = ""
    fields = dict(line.split(":", 1) for line in lscpu_text.splitlines() if ":" in line)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    if "flags" not in fields:  # no lscpu: the first processor of /proc/cpuinfo
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
        except OSError:
            pass
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name"), "flags": flags,
            "key_flags": [f for f in KEY_CPU_FLAGS if f in flags]}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None, "cpu": cpu_info()}
    for module in ("torch", "vllm"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001
            info[module] = None
    return info
