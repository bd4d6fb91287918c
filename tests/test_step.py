"""The step boundary objects and the attention-path registry (pure core, no vLLM)."""

import pytest
import torch

from vllm_adaptive_kv.core.attention import TorchAttention, TritonAttention, attention_path
from vllm_adaptive_kv.core.layout import KVPool
from vllm_adaptive_kv.core.paging import PagedHeadCache
from vllm_adaptive_kv.core.step import RequestReport


def test_request_report_merges_ranks_by_the_fuller_rank():
    """TP ranks hold different heads of one request: the scheduler must fit the fuller
    rank's pages, kept slots add up, and every rank saw the same tokens."""
    rank0 = RequestReport(pages_held=12, full_lists=3, slots_held=300, tokens=128)
    rank1 = RequestReport(pages_held=9, full_lists=5, slots_held=250, tokens=128)
    merged = rank0.merge(rank1)
    assert merged == RequestReport(pages_held=12, full_lists=5, slots_held=550, tokens=128)
    assert rank1.merge(rank0) == merged


def test_attention_paths_by_name_and_layout_checks():
    assert isinstance(attention_path("torch"), TorchAttention)
    assert isinstance(attention_path("triton"), TritonAttention)
    with pytest.raises(ValueError, match="'cuda-graphs' is unknown: allowed values are torch, triton"):
        attention_path("cuda-graphs")
    pool = KVPool.allocate(4, 16, 8, torch.float32, k_transposed=True)
    cache = PagedHeadCache(4, 16, 1, 1, 2, 1)
    with pytest.raises(ValueError, match="k_transposed=False"):
        TritonAttention().bind(pool, cache)  # the kernels read K row by row
    TorchAttention(k_transposed=True).bind(pool, cache)  # the reference reads both layouts


def test_policies_declare_whether_they_score():
    from vllm_adaptive_kv.core.policies import POLICY_NAMES, FastGen, make_policy

    needs = {name: make_policy(name).needs_scores for name in POLICY_NAMES}
    assert needs == {"full": False, "fastgen": True, "streamingllm": False, "h2o": True, "snapkv": True,
                     "fastgen-paper": True}
    choice = torch.arange(len(FastGen.ladder))
    assert FastGen().scores_needed(choice).tolist() == ["frequent" in rung for rung in FastGen.ladder]
