"""The CUDA attention path inside real vLLM, on CPU, through Triton's interpreter.

``VLLM_ADAPTIVE_KV_CPU_ATTENTION=triton`` makes the CPU worker run the runtime's
Triton path (write_kv, paged attention with scores, compaction): the kernels the
CUDA worker runs, interpreted. The interpreter costs milliseconds per program, so
the model is a tiny seeded Llama built locally (2 layers, 2 KV heads of dim 64,
the embedded model's tokenizer), saved once to the model cache:

- ``--kv-policy full`` through the Triton path = vanilla vLLM, token for token;
- ``fastgen`` runs to the end, evicts, and leaves every page free;
- the torch path (``VLLM_ADAPTIVE_KV_CPU_ATTENTION=torch``) equals vanilla too.
"""

from __future__ import annotations

import gc
import json
import os
import shutil

import pytest

from vllm_adaptive_kv.apps.common import metrics_delta, registry_metrics

pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

TINY_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 3 + "Count: one, two, three,",
    "def fibonacci(n):\n    # return the n-th Fibonacci number\n",
    "Paris is the capital of France; Rome is the capital of",
]
MAX_TOKENS = 6


def build_tiny_llama(folder, tokenizer_dir, seed: int = TINY_SEED) -> None:
    """A random Llama with the embedded model's vocabulary, written with save_pretrained.

    Weights are drawn wider than the usual init (std 0.2) so greedy choices are
    clear-cut: near-ties would let float rounding pick between tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, tmp / name)
    tmp.rename(folder)


@pytest.fixture(scope="module")
def tiny_llama(smollm2_dir):
    from vllm_adaptive_kv.model import cache_root

    folder = cache_root() / "models" / f"tiny-llama-seed{TINY_SEED}"
    if not (folder / "config.json").exists():
        build_tiny_llama(folder, smollm2_dir)
    return folder


def run_engine(model_dir, policy):
    from vllm import LLM, SamplingParams

    extra = ({"block_size": 32, "enable_prefix_caching": False} if policy is None
             else {"additional_config": {"kv_policy": policy, "recovery_ratio": 0.5}
                   if policy == "fastgen" else {"kv_policy": policy}})
    llm = LLM(str(model_dir), dtype="float32", max_model_len=512, kv_cache_memory_bytes=16 << 20,
              enforce_eager=True, seed=0, disable_log_stats=False, **extra)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        before = registry_metrics()
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        evicted = metrics_delta(before, registry_metrics()).get("vllm_adaptive_kv:evicted_tokens_total", 0)
        state = llm.collective_rpc("adaptive_kv_state") if policy is not None else None
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "state": state, "evicted": evicted}
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def runs(tiny_llama):
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 on CPU machines"
    results = {"vanilla": run_engine(tiny_llama, None)}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ADAPTIVE_KV_CPU_ATTENTION", "torch")  # read by the spawned worker
        results["torch-full"] = run_engine(tiny_llama, "full")
        env.setenv("VLLM_ADAPTIVE_KV_CPU_ATTENTION", "triton")
        results["full"] = run_engine(tiny_llama, "full")
        results["fastgen"] = run_engine(tiny_llama, "fastgen")
    return results


def test_triton_full_matches_vanilla_token_for_token(runs):
    vanilla, full = runs["vanilla"]["tokens"], runs["full"]["tokens"]
    print(f"vanilla {vanilla}\nfull    {full}")
    assert all(len(t) == MAX_TOKENS for t in vanilla)
    assert full == vanilla
    assert {s["attention_path"] for s in runs["full"]["state"]} == {"triton"}


def test_torch_path_inside_vllm_matches_vanilla(runs):
    """The third CPU path (the kernels' torch reference), in the same engine harness."""
    assert runs["torch-full"]["tokens"] == runs["vanilla"]["tokens"]
    assert {s["attention_path"] for s in runs["torch-full"]["state"]} == {"torch"}


@pytest.mark.parametrize("policy", ["full", "fastgen"])
def test_triton_path_frees_every_page(runs, policy):
    (state,) = runs[policy]["state"]
    assert all(len(t) == MAX_TOKENS for t in runs[policy]["tokens"])
    assert state["live_requests"] == [] and state["pages_in_use"] == 0
    assert state["free"] == state["num_pages"]
    if policy == "fastgen":
        assert runs[policy]["evicted"] > 0  # the Triton compaction kernel really ran
