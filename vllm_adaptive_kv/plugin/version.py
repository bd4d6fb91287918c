"""The vLLM versions the glue is written against, and what loading the plugin does outside them.

The glue relies on private vLLM internals (tests/test_vllm_contract.py lists them), which
move between minor releases. So the plugin switches itself on only for the series it
was written and tested against, ``SUPPORTED_VLLM`` (a PEP 440 specifier; pyproject.toml's
``cpu`` / ``cuda`` extras repeat it and a test keeps them equal).

Outside it, ``register`` (plugin/__init__.py) installs nothing and vLLM runs as if the
package were not there, except that:

- one warning is logged (once per ``vllm serve``, not once per process: the first
  process marks the environment its engine and worker processes inherit);
- a command line that asks for a kv policy (``--kv-policy``, ``--kv-policy-config``,
  ``--additional-config`` naming ``kv_policy``) exits with status 1 and one line
  naming the installed version and the supported range, instead of argparse's
  "unrecognized arguments" or a silent vanilla run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

SUPPORTED_VLLM = ">=0.32,<0.33"  # vLLM 0.32.x, local builds (0.32.0+cpu) and dev builds included
SUPPORTED_VLLM_SERIES = "0.32.x"  # the same, as people say it
WARNED_ENV = "VLLM_ADAPTIVE_KV_UNSUPPORTED_VLLM_WARNED"  # set by the process that warned

POLICY_FLAGS = ("--kv-policy", "--kv-policy-config")
ADDITIONAL_CONFIG_FLAG = "--additional-config"

log = logging.getLogger("vllm.adaptive_kv")  # under "vllm" so vLLM's log handler prints it


def installed_vllm_version() -> str:
    """The version of the vLLM that is importable here (``vllm.__version__``)."""
    from vllm import __version__

    return __version__


def is_supported(version: str) -> bool:
    """Whether ``version`` is in ``SUPPORTED_VLLM``; an unparsable version is not."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    # prereleases=True admits dev builds of the series (0.32.1.dev3); "<0.33" still
    # refuses 0.33's own pre-releases (PEP 440).
    return SpecifierSet(SUPPORTED_VLLM).contains(parsed, prereleases=True)


def policy_argument(argv: Sequence[str]) -> str | None:
    """The command-line argument that asks for a kv policy, as written, or None.

    Read from the raw arguments because outside the supported range nothing adds
    ``--kv-policy`` to vLLM's parser. vLLM accepts ``_`` for ``-`` in flag names and
    both ``--flag value`` and ``--flag=value``; ``--additional-config`` counts when its
    JSON or dotted key names ``kv_policy``.
    """
    for index, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        flag, _, inline = arg.partition("=")
        flag = "--" + flag[2:].replace("_", "-")
        if flag in POLICY_FLAGS or flag == f"{ADDITIONAL_CONFIG_FLAG}.kv-policy":
            return arg
        if flag == ADDITIONAL_CONFIG_FLAG:
            value = inline or (argv[index + 1] if index + 1 < len(argv) else "")
            if names_kv_policy(value):
                return f"{arg} {value}" if not inline else arg
    return None


def names_kv_policy(value: str) -> bool:
    """Whether an ``--additional-config`` JSON value has a ``kv_policy`` key."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "kv_policy" in parsed


def unsupported_message(version: str, argument: str) -> str:
    """The one-line error for ``argument`` (a kv policy) asked of an unsupported vLLM."""
    return (f"vllm-adaptive-kv: error: {argument} needs vLLM {SUPPORTED_VLLM_SERIES} ({SUPPORTED_VLLM}), "
            f"but vLLM {version} is installed: install vLLM {SUPPORTED_VLLM_SERIES} (make setup does), "
            "or run without a kv policy")


def unsupported_warning(version: str) -> str:
    """The warning logged when the plugin loads into an unsupported vLLM."""
    return (f"vllm-adaptive-kv supports vLLM {SUPPORTED_VLLM_SERIES} ({SUPPORTED_VLLM}), but vLLM {version} "
            "is installed: the plugin installs nothing and vLLM runs unchanged (--kv-policy is unavailable)")


def check_vllm_version(argv: Sequence[str] | None = None) -> bool:
    """True when the installed vLLM is supported; else warn once, or exit if a policy was asked.

    ``argv`` defaults to ``sys.argv[1:]`` (engine and worker processes that
    multiprocessing spawns inherit the parent's, but the parent has exited by then).
    """
    version = installed_vllm_version()
    if is_supported(version):
        return True
    argument = policy_argument(sys.argv[1:] if argv is None else argv)
    if argument is not None:
        raise SystemExit(unsupported_message(version, argument))  # exit status 1, the message on stderr
    if not os.environ.get(WARNED_ENV):
        os.environ[WARNED_ENV] = "1"  # inherited by the engine and worker processes
        log.warning("%s", unsupported_warning(version))
    return False
