"""The plugin's engine-argument hooks: CLI flags, one-line refusals, vanilla runs unchanged.

Every refusal happens in ``from_cli_args`` / ``create_engine_config``, before an
engine starts, so these tests run real ``vllm serve`` processes and real
EngineArgs without loading a model. CLI cases run in a pool of two processes.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_adaptive_kv.core.policies import POLICY_NAMES

VLLM = pathlib.Path(sys.executable).with_name("vllm")
# Small enough that a success path would not be blocked by memory on a CI machine.
ENGINE_FLAGS = ["--kv-cache-memory-bytes", "134217728", "--max-model-len", "2048", "--dtype", "float32"]
ENGINE_KWARGS = dict(kv_cache_memory_bytes=134217728, max_model_len=2048, dtype="float32")


@pytest.fixture(scope="module")
def hooks():
    """The plugin module with its hooks installed, as vLLM's plugin loader would."""
    import vllm_adaptive_kv.plugin as plugin
    from vllm_adaptive_kv.plugin import engine_args

    plugin.register()
    return engine_args


# --- CLI (subprocesses) ---------------------------------------------------------------


def policy_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    bad = folder / "bad.yaml"
    bad.write_text("kv_policy: fastgen\nrecovery_ratio: [0.9\n")
    return {"bad": bad, "missing": folder / "missing.yaml"}


def cli_cases(model: str, files: dict[str, pathlib.Path]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (vllm arguments, substrings the last stderr line must hold)."""
    serve = ["serve", model, *ENGINE_FLAGS]
    return {
        "unknown_policy": ([*serve, "--kv-policy", "nope"], ["--kv-policy", "nope", "fastgen", "snapkv"]),
        "bad_hyperparameter": (
            [*serve, "--kv-policy", "fastgen", "--additional-config.recovery_ratio", "1.5"],
            ["recovery_ratio=1.5", "allowed", "(0, 1]"],
        ),
        "key_of_other_policy": (
            [*serve, "--kv-policy", "fastgen", "--additional-config.budget_ratio", "0.5"],
            ["budget_ratio", "kv_policy='fastgen'", "allowed", "recovery_ratio"],
        ),
        "bad_yaml": ([*serve, "--kv-policy-config", str(files["bad"])], [str(files["bad"]), "not valid YAML"]),
        "missing_file": (
            [*serve, "--kv-policy-config", str(files["missing"])],
            [str(files["missing"]), "does not exist"],
        ),
        "block_size": ([*serve, "--kv-policy", "fastgen", "--block-size", "24"], ["block_size=24", "allowed", ">= 16"]),
        "speculative": (
            [*serve, "--kv-policy", "fastgen", "--speculative-config",
             json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})],
            ["speculative", "allowed"],
        ),
        "fp8_kv_cache": ([*serve, "--kv-policy", "h2o", "--kv-cache-dtype", "fp8"], ["kv_cache_dtype='fp8'", "allowed"]),
        "pipeline_parallel": (
            [*serve, "--kv-policy", "fastgen", "--pipeline-parallel-size", "2"],
            ["pipeline_parallel_size=2", "allowed"],
        ),
    }


def run_vllm(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_runs(smollm2_dir, tmp_path_factory):
    """Every CLI case run once: name -> (CompletedProcess, expected substrings)."""
    cases = cli_cases(str(smollm2_dir), policy_files(tmp_path_factory.mktemp("policy_files")))
    help_runs = {
        "serve_help": ["serve", str(smollm2_dir), "--help=AdaptiveKV"],
        "run_batch_help": ["run-batch", "--help=AdaptiveKV"],
    }
    jobs = {**{name: args for name, (args, _) in cases.items()}, **help_runs}
    with ThreadPoolExecutor(max_workers=2) as pool:  # CI has 2 cores
        results = dict(zip(jobs, pool.map(run_vllm, jobs.values())))
    return {name: (results[name], cases.get(name, (None, []))[1]) for name in jobs}


@pytest.mark.engine  # the vllm CLI, in subprocesses
@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", ["serve_help", "run_batch_help"])
def test_help_lists_the_policy_flags(cli_runs, command):
    run, _ = cli_runs[command]
    assert run.returncode == 0, run.stderr[-2000:]
    assert "AdaptiveKV" in run.stdout
    assert "--kv-policy {" + ",".join(POLICY_NAMES) + "}" in run.stdout
    assert "--kv-policy-config FILE.yaml" in run.stdout


@pytest.mark.engine
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "case",
    ["unknown_policy", "bad_hyperparameter", "key_of_other_policy", "bad_yaml", "missing_file",
     "block_size", "speculative", "fp8_kv_cache", "pipeline_parallel"],
)
def test_refusal_is_one_stderr_line(cli_runs, case):
    run, expected = cli_runs[case]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0
    assert lines, "nothing on stderr"
    for text in expected:
        assert text in lines[-1], f"{text!r} not in last stderr line {lines[-1]!r}"
    assert not [line for line in lines if line.startswith("Traceback")], run.stderr[-3000:]


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_settings_errors_use_the_plugin_prefix_and_exit_1(cli_runs):
    """Settings refused after parsing print ``vllm-adaptive-kv: error:``; argparse ones exit 2."""
    run, _ = cli_runs["bad_hyperparameter"]
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("vllm-adaptive-kv: error: ")
    run, _ = cli_runs["unknown_policy"]
    assert run.returncode == 2


# --- from_cli_args (in process) ---------------------------------------------------------


def parse_engine_args(argv: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_cli_precedence_flag_over_additional_config_over_file(hooks, smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # from_cli_args installs one
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("kv_policy: streamingllm\nbudget_ratio: 0.4\nobservation_window: 16\n")
    engine_args = parse_engine_args(
        ["--model", str(smollm2_dir), "--kv-policy-config", str(policy_file), "--kv-policy", "h2o",
         "--additional-config.budget_ratio", "0.3", "--additional-config.other_plugin", "x"]
    )
    assert engine_args.additional_config == {
        "other_plugin": "x", "kv_policy": "h2o", "budget_ratio": 0.3, "recent_fraction": 0.5, "observation_window": 16,
        "compress_by_chunk": False,
    }


def test_policy_flags_are_added_once_per_parser(hooks):
    """AsyncEngineArgs.add_cli_args calls EngineArgs.add_cli_args; the group must not repeat."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = [a for a in parser._actions if {"--kv-policy", "--kv-policy-config"} & set(a.option_strings)]
    assert len(flags) == 2
    assert [g.title for g in parser._action_groups].count(hooks.GROUP_TITLE) == 1


def test_no_flags_leave_engine_args_as_vllm_makes_them(hooks, smollm2_dir):
    engine_args = parse_engine_args(["--model", str(smollm2_dir)])
    assert engine_args.additional_config == {}


# --- create_engine_config (in process, no engine) ----------------------------------------


def test_offline_bad_setting_raises_value_error_from_create_engine_config(hooks, smollm2_dir):
    from vllm import LLM

    with pytest.raises(ValueError, match=r"recovery_ratio=2 is invalid: allowed values") as caught:
        LLM(str(smollm2_dir), additional_config={"kv_policy": "fastgen", "recovery_ratio": 2}, **ENGINE_KWARGS)
    assert isinstance(caught.value, hooks.KVPolicyError)
    assert "create_engine_config_with_policy" in [entry.name for entry in caught.traceback]


def test_policy_switches_on_the_plugin(hooks, smollm2_dir):
    from vllm.engine.arg_utils import EngineArgs

    additional = {"kv_policy": "fastgen", "recovery_ratio": 0.9, "other_plugin": [1, 2]}
    engine_args = EngineArgs(model=str(smollm2_dir), additional_config=additional, **ENGINE_KWARGS)
    engine_args.create_engine_config()
    config = engine_args.create_engine_config()  # a second build accepts the plugin's own settings
    from vllm_adaptive_kv.core.policies import FastGen

    expected = {"kv_policy": "fastgen", "recovery_ratio": 0.9, "local_ratio": 0.3, "frequent_ratio": 0.3,
                "recent_window": FastGen.recent_window, "decode_protect": FastGen.decode_protect,
                "pool_kernel": FastGen.pool_kernel, "observation_window": 64, "compress_by_chunk": False}
    assert config.additional_config == {"other_plugin": [1, 2], **expected}
    assert hooks.policy_settings_of(config) == expected
    assert config.parallel_config.worker_cls == hooks.WORKERS["cpu"]
    assert config.kv_transfer_config.kv_connector == "AdaptiveKVConnector"
    assert config.kv_transfer_config.kv_connector_module_path == "vllm_adaptive_kv.plugin.connector"
    assert config.cache_config.enable_prefix_caching is False
    assert config.cache_config.block_size == hooks.DEFAULT_BLOCK_SIZE == 32
    assert config.scheduler_config.async_scheduling is False
    assert config.model_config.logits_processors == [hooks.VALIDATOR]
    from vllm_adaptive_kv.plugin.validation import server_policy_settings

    assert server_policy_settings() == expected  # the frontend's default for request checks


def test_without_policy_vllm_config_is_unchanged(hooks, smollm2_dir):
    from vllm.engine.arg_utils import EngineArgs

    def build(create):
        return create(EngineArgs(model=str(smollm2_dir), additional_config={"other_plugin": 1}, **ENGINE_KWARGS))

    hooked = build(EngineArgs.create_engine_config)
    vanilla = build(hooks.original_create_engine_config)
    assert EngineArgs.create_engine_config is hooks.create_engine_config_with_policy
    assert hooked.compute_hash() == vanilla.compute_hash()
    for part, field in [("parallel_config", "worker_cls"), ("cache_config", "enable_prefix_caching"),
                        ("cache_config", "block_size"), ("scheduler_config", "async_scheduling"),
                        ("model_config", "logits_processors")]:
        assert getattr(getattr(hooked, part), field) == getattr(getattr(vanilla, part), field), field
    assert hooked.kv_transfer_config is None and vanilla.kv_transfer_config is None
    assert hooked.additional_config == vanilla.additional_config == {"other_plugin": 1}
    assert hooks.policy_settings_of(hooked) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(worker_cls="my.Worker"), "worker_cls='my.Worker' is not supported.*allowed is worker_cls='auto'"),
        (dict(kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_both"}), "kv_transfer_config"),
        (dict(block_size=8), "block_size=8 is invalid.*powers of two >= 16"),
        (dict(additional_config={"kv_policy": "snapkv", "pool_kernel": 4}), "pool_kernel=4 is invalid.*odd"),
    ],
)
def test_engine_settings_refused_in_process(hooks, smollm2_dir, kwargs, message):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {"additional_config": {"kv_policy": "fastgen"}, **ENGINE_KWARGS, **kwargs}
    with pytest.raises(hooks.KVPolicyError, match=message):
        EngineArgs(model=str(smollm2_dir), **kwargs).create_engine_config()


def sliding_window_copy(smollm2_dir: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """The embedded model's config, edited to slide a 64-token window in every layer."""
    for item in smollm2_dir.iterdir():
        if item.name != "config.json" and item.is_file() and not item.name.startswith("."):
            (folder / item.name).symlink_to(item)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config.update(sliding_window=64, layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sliding_window_model_is_refused(hooks, smollm2_dir, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    model = sliding_window_copy(pathlib.Path(smollm2_dir), tmp_path)
    engine_args = EngineArgs(model=str(model), additional_config={"kv_policy": "fastgen"}, **ENGINE_KWARGS)
    with pytest.raises(hooks.KVPolicyError, match=r"sliding-window attention \(sliding_window=64.*allowed are"):
        engine_args.create_engine_config()
    model_config = EngineArgs(model=str(model), **ENGINE_KWARGS).create_model_config()
    assert hooks.sliding_window_of(model_config) == 64


def test_full_attention_model_passes_the_feature_check(hooks, smollm2_dir):
    from vllm.engine.arg_utils import EngineArgs

    model_config = EngineArgs(model=str(smollm2_dir), **ENGINE_KWARGS).create_model_config()
    assert hooks.model_feature_problem(model_config) is None


# --- request validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra_args, default, message",
    [
        ({"recovery_ratio": 2}, {"kv_policy": "fastgen"}, "recovery_ratio=2 is invalid"),
        ({"budget_ratio": 0.5}, {"kv_policy": "fastgen"}, "unknown hyperparameter.*budget_ratio"),
        ({"kv_policy": "nope"}, {"kv_policy": "fastgen"}, "kv_policy='nope' is unknown: allowed values"),
        ({"sink_tokens": -1}, None, "sink_tokens=-1 is invalid"),  # server default unknown
    ],
)
def test_validator_rejects_bad_request_settings(hooks, monkeypatch, extra_args, default, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive_kv.plugin import validation

    settings = None if default is None else hooks.validated_settings(default)
    monkeypatch.setattr(validation, "server_policy_settings", lambda: settings)
    with pytest.raises(VLLMValidationError, match=message):
        validation.RequestPolicyValidator.validate_params(SamplingParams(extra_args=extra_args))


def test_validator_accepts_good_and_foreign_keys(hooks, monkeypatch):
    from vllm import SamplingParams

    from vllm_adaptive_kv.plugin import validation

    monkeypatch.setattr(validation, "server_policy_settings", lambda: hooks.validated_settings({"kv_policy": "h2o"}))
    for extra_args in [None, {"someone_else": 7}, {"budget_ratio": 0.25}, {"kv_policy": "fastgen", "local_ratio": 0.1}]:
        validation.RequestPolicyValidator.validate_params(SamplingParams(extra_args=extra_args))


def test_validator_leaves_logits_alone(hooks):
    import torch

    from vllm_adaptive_kv.plugin.validation import RequestPolicyValidator

    processor = RequestPolicyValidator(None, torch.device("cpu"), False)
    logits = torch.randn(2, 5)
    assert processor.apply(logits) is logits and processor.is_argmax_invariant()
    processor.update_state(None)
