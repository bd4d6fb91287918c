"""Without a kv policy, the installed plugin changes nothing in vLLM.

On a supported vLLM the plugin replaces three EngineArgs methods at class level in
every process (vLLM has no other hook for CLI flags). Without a policy each must hand
back exactly what vLLM's own method does. Checked in process (parser, engine args;
tests/test_plugin_cli.py checks the built VllmConfig) and end to end: a vanilla
``vllm serve`` with the plugin loaded answers token for token like one without it
(``VLLM_PLUGINS`` leaves it out; tests/test_version_guard.py shows that it does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_adaptive_kv.apps.common import free_port, http_get

VLLM = str(Path(sys.executable).parent / "vllm")
OUR_FLAGS = {"--kv-policy", "--kv-policy-config"}


@pytest.fixture(scope="module")
def hooks():
    import vllm_adaptive_kv.plugin as plugin
    from vllm_adaptive_kv.plugin import engine_args

    plugin.register()
    assert engine_args._ORIGINALS, "the hooks are not installed, so there is nothing to compare"
    return engine_args


# --- in process -------------------------------------------------------------------------------


def parser_with(add_cli_args):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return add_cli_args(FlexibleArgumentParser())


def described(action) -> tuple:
    return (tuple(action.option_strings), action.dest, repr(action.default), repr(action.choices), action.nargs,
            action.required, action.help)


def test_without_policy_the_parser_is_vllms_plus_our_two_flags(hooks):
    from vllm.engine.arg_utils import EngineArgs

    hooked = parser_with(EngineArgs.add_cli_args)
    vanilla = parser_with(hooks._ORIGINALS["add_cli_args"])
    ours = [a for a in hooked._actions if OUR_FLAGS & set(a.option_strings)]
    assert [described(a) for a in hooked._actions if a not in ours] == [described(a) for a in vanilla._actions]
    assert sorted(s for a in ours for s in a.option_strings) == sorted(OUR_FLAGS)
    assert all(a.default is None for a in ours)


def test_without_policy_from_cli_args_returns_vllms_engine_args(hooks, monkeypatch):
    from vllm.engine.arg_utils import AsyncEngineArgs

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # would show if the hook installed one
    hook = sys.excepthook
    argv = ["--model", "some/model", "--max-model-len", "512", "--additional-config", '{"other_plugin": 1}',
            "--enable-prefix-caching", "--block-size", "64"]
    namespace = parser_with(AsyncEngineArgs.add_cli_args).parse_args(argv)
    hooked = AsyncEngineArgs.from_cli_args(namespace)
    vanilla = hooks._ORIGINALS["from_cli_args"](AsyncEngineArgs, namespace)
    assert hooked == vanilla and type(hooked) is type(vanilla) is AsyncEngineArgs
    assert hooked.additional_config == {"other_plugin": 1} and hooked.block_size == 64
    assert sys.excepthook is hook


# --- `vllm serve` with and without the plugin ---------------------------------------------------

# Small, so two servers fit beside each other.
SERVE_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(32 << 20),
               "--max-num-seqs", "4", "--enforce-eager", "--served-model-name", "smollm2"]
START_S = 900
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.\n",
           "1, 2, 3, 5, 8, 13,"]


def other_general_plugins() -> str:
    from importlib.metadata import entry_points

    return ",".join(e.name for e in entry_points(group="vllm.general_plugins") if e.name != "adaptive_kv")


def start_server(model: str, log: Path, plugins: str | None):
    """``vllm serve`` with every general plugin (plugins=None) or only ``plugins``."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    port = free_port()
    cmd = [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), *SERVE_FLAGS]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc, base: str, log: Path) -> None:
    deadline = time.time() + START_S
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(base + "/health")
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not come up in {START_S} s:\n{log.read_text()[-3000:]}")


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def answers(base: str) -> list[dict]:
    """Token ids and text of greedy and seeded-sampled completions and one chat, one request at a time."""
    out = []
    for prompt in PROMPTS:
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7, "n": 2}):
            reply = post(base + "/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": 24,
                                                    "return_token_ids": True, **sampling})
            out += [{"prompt": prompt, **sampling, "text": c["text"], "token_ids": c["token_ids"],
                     "finish_reason": c["finish_reason"]} for c in reply["choices"]]
    chat = post(base + "/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24,
        "temperature": 0})
    out.append({"chat": chat["choices"][0]["message"]["content"], "usage": chat["usage"]})
    return out


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    """The same answers from `vllm serve` with the plugin loaded ("with") and left out ("without")."""
    folder = tmp_path_factory.mktemp("inert")
    started = time.time()
    servers = {name: start_server(str(smollm2_dir), folder / f"{name}.log", plugins)
               for name, plugins in (("with", None), ("without", other_general_plugins()))}
    try:
        for name, (proc, base) in servers.items():
            wait_healthy(proc, base, folder / f"{name}.log")
        up = time.time()
        # One server at a time, one request at a time: the same batches on both.
        result = {name: {"answers": answers(base), "metrics": http_get(base + "/metrics")}
                  for name, (_, base) in servers.items()}
        result["timing"] = {"start_s": up - started, "requests_s": time.time() - up}
        yield result
    finally:
        for proc, _ in servers.values():
            stop(proc)


@pytest.mark.engine
# Two servers, 9 requests each (276 completion tokens): 340-383 s here on 2 cores shared
# with other test runs (load ~20); an idle machine needs a fraction of that, one ~10x
# slower about this much.
@pytest.mark.timeout(1800)
def test_vanilla_serve_is_the_same_with_the_plugin_loaded(served):
    with_plugin, without = served["with"]["answers"], served["without"]["answers"]
    tokens = sum(len(a.get("token_ids", ())) for a in with_plugin)
    print(f"inert serve: {len(with_plugin)} answers, {tokens} completion tokens compared, {served['timing']}")
    assert len(with_plugin) == len(without) == len(PROMPTS) * 3 + 1
    for ours, theirs in zip(with_plugin, without):
        assert ours == theirs, f"with the plugin loaded: {ours}\nwithout it: {theirs}"
    assert tokens >= 200  # tokens really compared
    # No policy, so no connector: none of the plugin's metrics exist.
    assert "vllm_adaptive_kv:" not in served["with"]["metrics"]
