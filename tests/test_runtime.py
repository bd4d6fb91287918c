"""HeadCacheRuntime (pure core): engine steps over the head-page pool, no vLLM.

A fake "model" supplies random q/k/v per token; the runtime's attention output is
checked against dense causal attention over everything the request has seen
(full policy) and its bookkeeping against the pool audit (every policy).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vllm_adaptive_kv.core.attention import attention_path
from vllm_adaptive_kv.core.config import parse_policy_config
from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL, KVPool
from vllm_adaptive_kv.core.paging import PagePoolShortError
from vllm_adaptive_kv.core.policies import FastGen
from vllm_adaptive_kv.core.runtime import HeadCacheRuntime
from vllm_adaptive_kv.triton_kernels import HAS_TRITON

L, H, G, D, BS = 2, 2, 3, 16, 16
VOCAB = 50


# Every runtime test runs over both core attention paths: the torch reference and the
# Triton kernels (in the interpreter on CPU, natively on CUDA).
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed"))]


@pytest.fixture(params=PATHS)
def path(request):
    return request.param


def make_runtime(policy="full", num_pages=400, path="torch", **settings):
    pool = KVPool.allocate(num_pages, BS, D, torch.float32)
    flags = torch.zeros(VOCAB, dtype=torch.uint8)
    flags[0] = FLAG_SPECIAL
    flags[1:5] = FLAG_PUNCT
    return HeadCacheRuntime(pool, L, H, G, max_reqs=8, max_model_len=512, token_flags=flags,
                            default_settings={"kv_policy": policy, **settings}, attention=attention_path(path))


class FakeModel:
    """Random per-(request, position, layer) q/k/v, remembered for the dense check."""

    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.history = {}  # req -> list of (k [L, H, D], v [L, H, D])

    def step_inputs(self, reqs, counts, starts):
        q, k, v, pos = [], [], [], []
        for req, n, start in zip(reqs, counts, starts):
            for i in range(n):
                qi = torch.randn(L, H * G, D, generator=self.gen)
                ki = torch.randn(L, H, D, generator=self.gen)
                vi = torch.randn(L, H, D, generator=self.gen)
                self.history.setdefault(req, []).append((ki, vi))
                q.append(qi), k.append(ki), v.append(vi), pos.append(start + i)
        return torch.stack(q, 1), torch.stack(k, 1), torch.stack(v, 1), torch.tensor(pos)

    def dense(self, req, layer, q, upto):
        keys = torch.stack([kv[0][layer] for kv in self.history[req][: upto + 1]], 1).double()  # [H, N, D]
        vals = torch.stack([kv[1][layer] for kv in self.history[req][: upto + 1]], 1).double()
        qg = q.double().view(H, G, D)
        probs = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, keys) / math.sqrt(D), -1)
        return torch.einsum("hgn,hnd->hgd", probs, vals).reshape(H * G, D)


def run_step(rt, model, reqs, counts, starts, check=True):
    q, k, v, pos = model.step_inputs(reqs, counts, starts)
    token_ids = torch.randint(0, VOCAB, (pos.numel(),), generator=model.gen)
    meta = rt.plan_step(reqs, counts, pos, token_ids)
    for layer in range(L):
        out = torch.full_like(q[layer], float("nan"))
        rt.attend(layer, q[layer], k[layer], v[layer], out, meta, 1 / math.sqrt(D))
        if check:
            t = 0
            for req, n, start in zip(reqs, counts, starts):
                for i in range(n):
                    want = model.dense(req, layer, q[layer, t], start + i)
                    torch.testing.assert_close(out[t].double(), want, atol=1e-4, rtol=1e-4)
                    t += 1
    return rt.finish_step(meta)


def test_full_policy_matches_dense_attention_over_chunked_prefill_and_decode(path):
    rt, model = make_runtime("full", path=path), FakeModel()
    rt.add("a", prompt_len=37)
    rt.add("b", prompt_len=5)
    run_step(rt, model, ["a", "b"], [20, 5], [0, 0])  # a: first chunk, b: whole prompt
    run_step(rt, model, ["a", "b"], [17, 1], [20, 5])  # a: last chunk, b: decode
    for i in range(3):
        report = run_step(rt, model, ["b", "a"], [1, 1], [6 + i, 37 + i])  # order changes too
    a = report.requests["a"]
    assert a.tokens == 40 and a.slots_held == 40 * L * H  # nothing evicted
    assert a.pages_held == L * H * math.ceil(40 / BS)
    rt.cache.audit()
    rt.release(["a", "b"])
    assert rt.pages_in_use() == 0 and not rt.rows
    rt.cache.audit()


EVICTING = [
    ("fastgen", {"recovery_ratio": 0.5}),
    ("h2o", {"budget_ratio": 0.3}),
    ("streamingllm", {"budget_ratio": 0.3}),
    ("snapkv", {"budget_ratio": 0.3}),
]


# Every policy on both paths: the torch reference and the interpreted Triton kernels.
@pytest.mark.parametrize("policy,settings,path", [(*case, "torch") for case in EVICTING] + [
    pytest.param(*case, "triton", marks=PATHS[1].marks) for case in EVICTING])
def test_eviction_frees_pages_and_never_leaks(policy, settings, path):
    rt, model = make_runtime(policy, path=path, **settings), FakeModel(1)
    rt.add("a", prompt_len=70)
    rt.add("b", prompt_len=45)
    full_pages = L * H * math.ceil(70 / BS)
    first = run_step(rt, model, ["a", "b"], [40, 45], [0, 0], check=False)  # b's prompt ends
    report = run_step(rt, model, ["a", "b"], [30, 1], [40, 45], check=False)  # a's prompt ends
    a = report.requests["a"]
    assert a.tokens == 70 and a.slots_held < 70 * L * H and a.pages_held < full_pages  # pages really went back
    decisions = sum(first.head_policy_counts.values()) + sum(report.head_policy_counts.values())
    assert first.evicted_tokens > 0 and report.evicted_tokens > 0 and decisions == 2 * L * H
    assert report.pages_free == rt.cache.num_pages - rt.pages_in_use()
    rt.cache.audit()
    evicted = 0
    for i in range(BS + 2):  # decode: a re-eviction every BS tokens keeps lists bounded
        report = run_step(rt, model, ["a", "b"], [1, 1], [70 + i, 46 + i], check=False)
        evicted += report.evicted_tokens
        rt.cache.audit()
    assert evicted > 0 or policy == "fastgen"  # fastgen's full / special rungs may keep every new token
    assert report.requests["a"].slots_held < report.requests["a"].tokens * L * H
    rt.release(["a"])
    rt.cache.audit()
    rt.release(["b", "unknown"])
    assert rt.pages_in_use() == 0


# compress_by_chunk on the torch path for every policy, and FastGen on the Triton kernels.
@pytest.mark.parametrize("policy,settings,path", [(*case, "torch") for case in EVICTING] + [
    pytest.param(*EVICTING[0], "triton", marks=PATHS[1].marks)])
def test_compress_by_chunk_evicts_every_chunk_and_settles_rungs_at_the_prompt_end(policy, settings, path):
    rt, model = make_runtime(policy, path=path, compress_by_chunk=True, **settings), FakeModel(3)
    whole, whole_model = make_runtime(policy, path=path, **settings), FakeModel(3)  # the same tokens, unchunked rule
    for runtime in (rt, whole):
        runtime.add("a", prompt_len=320)
    row = rt.rows["a"]
    for start in (0, 128):  # two chunks short of the prompt's end
        report = run_step(rt, model, ["a"], [128], [start], check=False)
        held = run_step(whole, whole_model, ["a"], [128], [start], check=False).requests["a"].pages_held
        a = report.requests["a"]
        assert report.evicted_tokens > 0 and a.pages_held < held  # pages went back before the prompt ended
        assert a.tokens == start + 128 and not report.head_policy_counts  # no rung chosen yet
        pages = rt.cache.table[row][rt.cache.table[row] >= 0].long()
        assert not rt.pool.slot_score[pages].any()  # the next chunk's profile starts from zero
        assert rt.state[row].profile_rows() == 64  # the chunk's last observation_window rows
        rt.cache.audit()
    assert rt.chunk_evictions == 2 and whole.chunk_evictions == 0
    report = run_step(rt, model, ["a"], [64], [256], check=False)  # the prompt's end: rungs settle
    assert sum(report.head_policy_counts.values()) == L * H and rt.state[row].profiled
    for i in range(BS + 1):  # decode as usual, re-evictions included
        report = run_step(rt, model, ["a"], [1], [320 + i], check=False)
        rt.cache.audit()
    assert report.requests["a"].tokens == 320 + BS + 1
    rt.release(["a"])
    assert rt.pages_in_use() == 0
    rt.cache.audit()


def test_compress_by_chunk_observes_each_chunks_last_window_only():
    rt = make_runtime("fastgen", compress_by_chunk=True, observation_window=8)
    rt.add("a", prompt_len=30)  # its last window: [22, 30)
    st = rt.state[rt.rows["a"]]
    assert st.ends_chunk(12) and st.observation_start(12) == 4  # chunk [0, 12): its last 8 rows
    assert not st.ends_chunk(5) and st.observation_start(5) == 22  # shorter than a window: no eviction
    st.tokens = 12
    assert st.ends_chunk(10) and st.observation_start(10) == 14  # [12, 22) ends where the last window starts
    assert not st.ends_chunk(12) and st.observation_start(12) == 22  # reaches into it: the usual rule
    plain = make_runtime("fastgen", observation_window=8)
    plain.add("a", prompt_len=30)
    assert not plain.state[plain.rows["a"]].ends_chunk(12)
    assert plain.state[plain.rows["a"]].observation_start(12) == 22  # the prompt's last 8, whatever the chunk
    st.tokens = 30
    assert not st.ends_chunk(1) and st.observation_start(1) == 22  # decode: every later token, as without chunks


def test_compress_by_chunk_prompt_end_still_profiles_a_whole_window():
    rt, model = make_runtime("fastgen", compress_by_chunk=True, recovery_ratio=0.5), FakeModel(4)
    rt.add("a", prompt_len=320)  # window 64: the last window is [256, 320)
    row = rt.rows["a"]
    run_step(rt, model, ["a"], [128], [0], check=False)  # evicts
    run_step(rt, model, ["a"], [160], [128], check=False)  # ends at 288, inside the last window: no eviction
    assert rt.chunk_evictions == 1 and rt.pool.slot_score.sum() > 0  # [256, 288) scored, kept for the end
    report = run_step(rt, model, ["a"], [32], [288], check=False)  # a short tail ends the prompt
    assert rt.state[row].profiled and rt.state[row].profile_rows() == 64  # all of [256, 320), not 32 rows
    assert sum(report.head_policy_counts.values()) == L * H and rt.chunk_evictions == 1
    rt.release(["a"])
    assert rt.pages_in_use() == 0


def test_special_tokens_survive_fastgen(path):
    rt, model = make_runtime("fastgen", path=path, recovery_ratio=0.3), FakeModel(2)
    rt.add("a", prompt_len=64)
    q, k, v, pos = model.step_inputs(["a"], [64], [0])
    token_ids = torch.full((64,), 10)
    token_ids[[0, 17, 40]] = 0  # special
    meta = rt.plan_step(["a"], [64], pos, token_ids)
    for layer in range(L):
        rt.attend(layer, q[layer], k[layer], v[layer], torch.empty_like(q[layer]), meta, 0.25)
    rt.finish_step(meta)
    row = rt.rows["a"]
    for layer in range(L):
        for head in range(H):
            n = int(rt.cache.lens[row, layer, head])
            pages = rt.cache.table[row, layer, head, : math.ceil(n / BS)].long()
            kept = rt.pool.slot_pos[pages].reshape(-1)[:n].tolist()
            assert {0, 17, 40} <= set(kept) and kept == sorted(kept)
    # The per-head policy map is recorded for inspection (policy-map plots).
    names = rt.head_policies["a"]
    assert len(names) == L and all(len(heads) == H for heads in names)
    assert {n for heads in names for n in heads} <= set(FastGen.ladder)


def test_per_request_config_and_row_reuse():
    rt = make_runtime("full")
    cfg = parse_policy_config({"kv_policy": "h2o", "budget_ratio": 0.2})
    rt.add("x", 10, cfg)
    assert rt.state[rt.rows["x"]].config.name == "h2o"
    with pytest.raises(ValueError, match="already live"):
        rt.add("x", 10)
    for i in range(7):
        rt.add(f"r{i}", 3)
    with pytest.raises(RuntimeError, match="no free request row"):
        rt.add("one-too-many", 3)
    rt.release(["x"])
    rt.add("again", 3)


def list_scores(rt, row, layer, head):
    """Scores of the slots of one list, in logical order."""
    n = int(rt.cache.lens[row, layer, head])
    pages = rt.cache.table[row, layer, head, : math.ceil(n / BS)].long()
    return rt.pool.slot_score[pages].reshape(-1)[:n].clone()


def test_score_lists_follow_each_requests_policy(path):
    """The per-list score mask: every list of a scoring request during its prompt (profiling
    reads all heads), fastgen's ``scores_needed`` lists after it, all lists for h2o, none
    for full; masked-off lists gain no score while decoding."""
    rt, model = make_runtime("fastgen", path=path, recovery_ratio=0.5), FakeModel(4)
    rt.add("a", prompt_len=40)
    rt.add("b", prompt_len=30, config=parse_policy_config({"kv_policy": "full"}))
    rt.add("c", prompt_len=30, config=parse_policy_config({"kv_policy": "h2o", "budget_ratio": 0.5}))
    a, b, c = (rt.rows[r] for r in "abc")
    assert rt.score_lists[a].all() and not rt.score_lists[b].any() and rt.score_lists[c].all()
    run_step(rt, model, ["a", "b", "c"], [20, 30, 30], [0, 0, 0], check=False)  # b, c: prompt ends
    assert rt.score_lists[a].all() and rt.score_lists[c].all()  # a is still in its prompt
    run_step(rt, model, ["a", "b", "c"], [20, 1, 1], [20, 30, 30], check=False)  # a: prompt ends
    needed = FastGen().scores_needed(rt.choice[a])
    assert torch.equal(rt.score_lists[a], needed) and torch.equal(rt.state[a].score_heads, needed.cpu())
    # Decode: masked-off lists gain nothing. A mixed choice (rung 1 reads no scores, rung 2
    # does) makes both kinds of list appear whatever the random profile chose.
    mixed = torch.tensor([[1, 2], [2, 1]])
    needed = FastGen().scores_needed(mixed)
    rt.apply_choice([a], mixed[None])
    assert torch.equal(rt.score_lists[a], needed) and torch.equal(rt.state[a].score_heads, needed)
    before = {(layer, head): list_scores(rt, a, layer, head) for layer in range(L) for head in range(H)}
    run_step(rt, model, ["a", "b", "c"], [1, 1, 1], [40, 31, 31], check=False)
    for (layer, head), was in before.items():
        now = list_scores(rt, a, layer, head)[: was.numel()]
        assert torch.equal(now, was) != bool(needed[layer, head]), (layer, head)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_attend_reads_no_device_values(monkeypatch):
    """runtime.attend on the Triton path (write_kv, then paged_attention with query tiles,
    the layer's score mask and weights) reads no tensor value on the host: no sync."""
    import importlib

    from test_kernels import ATTENTION_KERNELS, FakeLaunches, forbid_host_reads

    rt, model = make_runtime("fastgen", path="triton", recovery_ratio=0.5), FakeModel(5)
    rt.add("a", prompt_len=40)
    rt.add("b", prompt_len=5)
    run_step(rt, model, ["a", "b"], [20, 5], [0, 0], check=False)  # real kernels; b profiled
    launches = FakeLaunches()
    launches.install(monkeypatch, importlib.import_module("vllm_adaptive_kv.triton_kernels.paged_attention"),
                     *ATTENTION_KERNELS)
    launches.install(monkeypatch, importlib.import_module("vllm_adaptive_kv.triton_kernels.write_kv"),
                     "_write_kv_kernel")
    q, k, v, pos = model.step_inputs(["a", "b"], [20, 1], [20, 5])
    meta = rt.plan_step(["a", "b"], [20, 1], pos, torch.zeros(21, dtype=torch.int64))
    assert meta.path.query_tiles is not None and meta.scoring.lists is rt.score_lists
    with forbid_host_reads():
        for layer in range(L):
            rt.attend(layer, q[layer], k[layer], v[layer], torch.empty_like(q[layer]), meta, 0.25)
    names = [name for name, _, _ in launches.calls]
    assert names.count("_write_kv_kernel") == L and "_paged_attention_kernel" in names
    main = next(consts for name, _, consts in launches.calls if name == "_paged_attention_kernel")
    assert main["TILED"] and main["SCORE_MASK"] and main["WEIGHTED"] and main["ACCUMULATE_SCORE"]


def plan(rt, reqs, counts):
    """plan_step with placeholder positions and token ids (bookkeeping tests, no attention)."""
    total = sum(counts)
    return rt.plan_step(reqs, counts, torch.arange(total), torch.full((total,), 10))


def test_short_step_raises_naming_the_request_and_moves_no_page():
    """A step whose reservation is short: PagePoolShortError names the request, the pages it
    asks for and the pages free; no page moved, no request's state advanced; once pages
    come back the same step runs."""
    rt = make_runtime("full", num_pages=10)  # L x H = 4 lists
    rt.add("a", prompt_len=30)
    rt.finish_step(plan(rt, ["a"], [30]))  # 2 pages per list: 8 held, 2 free
    rt.add("b", prompt_len=16)
    lens, table = rt.cache.lens.clone(), rt.cache.table.clone()
    with pytest.raises(PagePoolShortError) as err:
        plan(rt, ["a", "b"], [1, 16])  # a fills its pages (0 new), b opens 4
    assert str(err.value) == (
        "head page pool short: request 'b' asks for 4 pages, 2 free; no page was moved. The step was "
        "scheduled with fewer pages reserved than it needs (inside vLLM: the block reservation of "
        "vllm_adaptive_kv/plugin/spec.py)")
    assert int(rt.cache.num_free) == 2 and rt.cache.audit() == {"free": 2, "owned": 8}
    assert torch.equal(rt.cache.lens, lens) and torch.equal(rt.cache.table, table)
    assert rt.state[rt.rows["a"]].tokens == 30 and rt.state[rt.rows["b"]].tokens == 0
    rt.release(["a"])
    report = rt.finish_step(plan(rt, ["b"], [16]))
    assert report.requests["b"].pages_held == 4 and report.pages_free == 6
    rt.cache.audit()


def test_check_plan_reads_nothing_while_the_reservation_fits(monkeypatch):
    """The host bound (last report's counters vs a floor of the free stack) proves a fitting
    step without reading a tensor; only a step it cannot prove (here: a plan whose report
    never came, as after a forward pass that raised) reads the exact counts, once."""
    from test_kernels import forbid_host_reads

    rt = make_runtime("h2o", num_pages=64, budget_ratio=0.5)
    rt.add("a", prompt_len=40)
    rt.add("b", prompt_len=20)
    rt.finish_step(plan(rt, ["a", "b"], [40, 20]))  # both prompts end: evicted, reported
    exact = []
    real_check = rt.cache.check_allocate
    monkeypatch.setattr(rt.cache, "check_allocate", lambda *a, **k: exact.append(1) or real_check(*a, **k))
    states = [rt.state[rt.rows[r]] for r in ("a", "b")]
    rows_t, counts = torch.tensor([rt.rows["a"], rt.rows["b"]]), torch.tensor([1, 3])
    with forbid_host_reads():
        free_after = rt.check_plan(["a", "b"], states, [1, 3], rows_t, counts)
    assert not exact and free_after <= int(rt.cache.num_free) - int(rt.cache.pages_needed(
        rt.cache.lens[rows_t], counts[:, None, None]).sum())
    plan(rt, ["a", "b"], [1, 3])  # planned, never finished: the counters are stale
    plan(rt, ["a", "b"], [1, 1])
    assert len(exact) == 1
    assert rt._free_floor == int(rt.cache.num_free)  # the exact read resets the floor
    rt.cache.audit()


step_op = st.one_of(
    st.tuples(st.just("prompt"), st.integers(1, 60)),  # a new request's whole prompt
    st.tuples(st.just("decode"), st.integers(1, 3)),  # every running request, 1-3 tokens (as drafts)
    st.tuples(st.just("release"), st.integers(0, 7)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(step_op, min_size=1, max_size=20), num_pages=st.integers(4, 48),
       policy=st.sampled_from([("full", {}), ("h2o", {"budget_ratio": 0.3}),
                               ("streamingllm", {"budget_ratio": 0.5})]))
def test_every_step_is_checked_against_the_free_stack(ops, num_pages, policy):
    """Random prompts, decode steps and releases over a small pool, without a scheduler: a step
    raises PagePoolShortError exactly when its lists need more pages than are free, and then
    moves nothing; the host floor never exceeds the free stack, so a step the host bound lets
    through always fits; the pool audit stays clean."""
    rt = make_runtime(policy[0], num_pages=num_pages, **policy[1])
    live, names = [], iter(range(1000))
    for kind, arg in ops:
        if kind == "release":
            if live:
                rt.release([live.pop(arg % len(live))])
            continue
        if kind == "prompt":
            if len(live) == 8:
                continue
            req = f"r{next(names)}"
            rt.add(req, prompt_len=arg)
            live.append(req)
            reqs, counts = [req], [arg]
        else:
            reqs = [r for r in live if rt.state[rt.rows[r]].tokens]
            counts = [arg] * len(reqs)
        if not reqs:
            continue
        rows = torch.tensor([rt.rows[r] for r in reqs])
        need = int(rt.cache.pages_needed(rt.cache.lens[rows], torch.tensor(counts)[:, None, None]).sum())
        free = int(rt.cache.num_free)
        assert rt._free_floor <= free
        event("short" if need > free else "fits")
        if need > free:
            with pytest.raises(PagePoolShortError):
                plan(rt, reqs, counts)
            assert int(rt.cache.num_free) == free
        else:
            rt.finish_step(plan(rt, reqs, counts))
        rt.cache.audit()
    rt.release(live)
    assert int(rt.cache.num_free) == num_pages and rt._free_floor <= num_pages


def kept_positions(rt, row, layer, head):
    n = int(rt.cache.lens[row, layer, head])
    pages = rt.cache.table[row, layer, head, : math.ceil(n / BS)].long()
    return rt.pool.slot_pos[pages].reshape(-1)[:n].tolist()


def test_fastgen_young_tokens_survive_decode_eviction():
    """FastGen's variants inside the runtime: with every list on special+punct+frequent,
    decode_protect keeps each generated token until decode_protect later tokens exist, and
    recent_window keeps the last positions (prompt ones too); the paper's policy keeps
    neither, so it holds fewer tokens. The runtime passes each request's prompt length.
    Torch path only: keep masks do not depend on the attention path (the interpreted
    Triton path takes ~70 s for these 32 decode steps)."""
    rt, model = make_runtime("fastgen", recovery_ratio=0.5), FakeModel(6)
    configs = {
        "paper": parse_policy_config({"kv_policy": "fastgen-paper", "recovery_ratio": 0.5}),
        "protect": parse_policy_config({"kv_policy": "fastgen", "recovery_ratio": 0.5, "decode_protect": BS,
                                        "recent_window": 0}),
        "recent": parse_policy_config({"kv_policy": "fastgen", "recovery_ratio": 0.5, "recent_window": 5,
                                       "decode_protect": 0}),
    }
    reqs = list(configs)
    for req, config in configs.items():
        rt.add(req, prompt_len=40, config=config)
    run_step(rt, model, reqs, [40] * 3, [0] * 3, check=False)  # every prompt ends: profiled
    frequent = FastGen.ladder.index("special+punct+frequent")
    for req in reqs:
        row = rt.rows[req]
        rt.apply_choice([row], torch.full((1, L, H), frequent))
    for i in range(2 * BS):  # two decode evictions: at 56 and at 72 tokens
        run_step(rt, model, reqs, [1] * 3, [40 + i] * 3, check=False)
        rt.cache.audit()
    seq = 40 + 2 * BS
    held = {}
    for req in reqs:
        row = rt.rows[req]
        held[req] = 0
        for layer in range(L):
            for head in range(H):
                kept = set(kept_positions(rt, row, layer, head))
                held[req] += len(kept)
                if req == "protect":
                    assert set(range(seq - BS, seq)) <= kept, (layer, head)
                if req == "recent":
                    assert set(range(seq - 5, seq)) <= kept, (layer, head)
    assert held["paper"] < held["protect"] and held["paper"] < held["recent"]
    rt.release(reqs)
    assert rt.pages_in_use() == 0


def test_decode_reeviction_skips_full_lists_and_matches_every_list_keep_mask():
    """A decode re-eviction visits only the lists whose rung can drop a token, over the
    slots of the longest of them; each list keeps what its rung's keep mask over the whole
    request says (the rule applied to every list), and lists on ``full`` keep everything."""
    rt, model = make_runtime("fastgen", recovery_ratio=0.5), FakeModel(7)
    policy = rt.default_config.policy
    rt.add("a", prompt_len=45)
    rt.add("b", prompt_len=30)
    run_step(rt, model, ["a", "b"], [45, 30], [0, 0], check=False)  # both profiled
    full = FastGen.ladder.index("full")
    mixed = torch.tensor([[[full, 2], [3, full]], [[0, full], [full, full]]])  # [R, L, H]
    rows = [rt.rows["a"], rt.rows["b"]]
    rt.apply_choice(rows, mixed)
    assert [rt.state[r].evict_lists.numel() for r in rows] == [2, 1]
    for i in range(BS):  # the last step re-evicts both requests
        q, k, v, pos = model.step_inputs(["a", "b"], [1, 1], [45 + i, 30 + i])
        meta = rt.plan_step(["a", "b"], [1, 1], pos, torch.randint(5, VOCAB, (2,), generator=model.gen))
        for layer in range(L):
            rt.attend(layer, q[layer], k[layer], v[layer], torch.empty_like(q[layer]), meta, 0.25)
        if i < BS - 1:
            rt.finish_step(meta)
    assert all(rt.state[r].since_evict == BS for r in rows)
    states = [rt.state[r] for r in rows]
    lists = rt.cache.list_ids(torch.tensor(rows))
    per_row = L * H
    view = rt._slot_view(lists, [per_row] * 2, states, max(s.tokens for s in states))
    want = policy.keep_mask(view, rt.choice[torch.tensor(rows)].reshape(-1))  # every list
    before = [[kept_positions(rt, r, layer, head) for layer in range(L) for head in range(H)] for r in rows]
    report = rt.finish_step(meta)
    rt.cache.audit()
    held_before = sum(len(positions) for per_row_lists in before for positions in per_row_lists)
    assert 0 < report.evicted_tokens == held_before - int(rt.cache.lens[torch.tensor(rows)].sum())
    for i, r in enumerate(rows):
        for j in range(per_row):
            layer, head = divmod(j, H)
            expected = [p for p, keep in zip(before[i][j], want[i * per_row + j].tolist()) if keep]
            assert kept_positions(rt, r, layer, head) == expected, (r, layer, head)
            if mixed[i, layer, head] == full:
                assert expected == before[i][j]  # untouched
