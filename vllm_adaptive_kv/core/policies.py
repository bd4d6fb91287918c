"""Eviction policies: each computes a keep mask over ``[heads, slots]``.

A policy sees a batch of head lists padded to ``N`` slots (``SlotView``) and
returns ``keep: bool [H, N]``, False on padding. "Heads" here are any set of
head lists (requests x layers x kv heads flattened), so every policy is
vectorized over them; no policy loops over heads.

Budgets that scale with the sequence use the *current* sequence length
``seq_len`` (tokens seen so far, evicted ones included), as FastGen does:
``local`` keeps tokens within ``ceil(local_ratio * seq_len)`` of the newest one,
``frequent`` keeps the ``ceil(frequent_ratio * seq_len)`` highest-scoring slots.

FastGen's hybrids are unions, tried in the greedy order of ``FASTGEN_LADDER``::

    0 special
    1 special + punct
    2 special + punct + frequent
    3 special + punct + frequent + local
    4 full

A per-head choice is an index into that ladder (see ``FastGen.keep_mask``).

Beyond the paper, every compressed rung of ``FastGen`` may also keep two sets of
young tokens (both counted in the memory the head holds):

- ``recent_window``: the last ``recent_window`` positions of the sequence, prompt
  or generated (a fixed minimum local window, in tokens, not a ratio);
- ``decode_protect``: tokens generated after the prompt stay until
  ``decode_protect`` later tokens exist, so a new token is not judged by the
  attention it has had no time to gather (``SlotView.prompt_len``).

``fastgen`` keeps ``recent_window = 32`` by default, chosen by the rule in
docs/results.md (issue 15): at T = 0.95 on the embedded model it lowered the chat KL
to the full cache from 0.075 to 0.052 nats per token at the same retrieval accuracy,
while ``decode_protect`` (128) on top of it changed no output and stays 0. ``fastgen-paper``
(``FastGenPaper``) is FastGen with both at 0: the paper's policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .layout import FLAG_PUNCT, FLAG_SPECIAL


@dataclass
class SlotView:
    """What a policy sees of ``H`` head lists padded to ``N`` slots.

    flags     [H, N] uint8   FLAG_SPECIAL / FLAG_PUNCT bits
    positions [H, N] int     original token positions (any value on padding)
    scores    [H, N] float   accumulated attention (or observation-window scores)
    lengths   [H]    int     valid slots per list; slots >= length are padding
    seq_len   [H]    int     current sequence length (>= positions of valid slots + 1)
    prompt_len [H]   int     prompt length of each list's request; positions >= it were
                             generated. None: no generated token (``seq_len``).
    """

    flags: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor
    seq_len: torch.Tensor
    prompt_len: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.flags.shape
        if self.flags.dim() != 2:
            raise ValueError(f"flags must be [H, N], got shape {tuple(shape)}")
        for name in ("positions", "scores"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} shape {tuple(getattr(self, name).shape)} != flags shape {tuple(shape)}"
                )
        for name in ("lengths", "seq_len", "prompt_len"):
            if getattr(self, name) is not None and getattr(self, name).shape != shape[:1]:
                raise ValueError(f"{name} must be [H]={shape[0]}, got {tuple(getattr(self, name).shape)}")

    @property
    def generated(self) -> torch.Tensor:
        """[H, N] bool: slots holding tokens generated after the prompt."""
        start = self.seq_len if self.prompt_len is None else self.prompt_len
        return self.positions >= start[:, None]

    @property
    def valid(self) -> torch.Tensor:
        n = self.flags.shape[1]
        idx = torch.arange(n, device=self.flags.device)
        return idx[None, :] < self.lengths[:, None]


# --- shared selection logic -------------------------------------------------


def ratio_budget(ratio: float, seq_len: torch.Tensor) -> torch.Tensor:
    """``ceil(ratio * seq_len)`` per head, as int64 (exact for ratios like 0.3)."""
    return torch.ceil(seq_len.to(torch.float64) * ratio - 1e-9).clamp_min(0).to(torch.int64)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Keep the ``k[h]`` highest-scoring eligible slots of each row.

    Ties go to the lower slot index (a stable descending sort's order), so results are
    deterministic. scores [H, N], k [H], eligible [H, N] bool -> [H, N] bool.

    On the CPU a full sort of every row was most of the prompt-end eviction's time, so
    there the k-th value comes from ``topk`` and its ties are ranked by a running count
    (same result); elsewhere the sort stays, since ``topk`` needs ``k.max()`` on the host.
    """
    masked = scores.to(torch.float32).masked_fill(~eligible, float("-inf"))
    if masked.device.type == "cpu" and masked.shape[1] > 0:
        return eligible & _top_k_by_threshold(masked, k)
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (rank < k[:, None])


def _top_k_by_threshold(masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[H, N] bool: the slots a stable descending sort of ``masked`` ranks below ``k[h]``.

    With kth[h] the k-th largest value: every slot above it, then the slots equal to it
    in slot order until k is reached::

        masked 5 3 7 3 3 1, k = 3  ->  kth = 3, above = {7, 5}, ties 3 3 3 take 1 more
        keep   1 1 1 0 0 0
    """
    width = masked.shape[1]
    k = k.to(torch.int64).clamp(0, width)
    k_max, k_min = (int(v) for v in torch.stack([k.max(), k.clamp_min(1).min()]).tolist())
    if k_max == 0:
        return torch.zeros_like(masked, dtype=torch.bool)
    if width - k_min + 1 < k_max:
        # most slots stay (decode re-evictions keep all but a few): the k-th largest is the
        # (width - k + 1)-th smallest, and selecting the few smallest is the cheaper topk
        low = masked.topk(width - k_min + 1, dim=1, largest=False).values  # [H, .], ascending
        kth = low.gather(1, (width - k.clamp_min(1))[:, None])  # [H, 1]
    else:
        top = masked.topk(k_max, dim=1).values  # [H, k_max], descending
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # [H, 1]
    above = masked > kth
    ties = masked == kth
    wanted = (k - above.sum(1))[:, None]  # ties to take, lowest slots first
    keep = above | (ties & (ties.cumsum(1) <= wanted))
    return keep & (k > 0)[:, None]


def recent_mask(positions: torch.Tensor, seq_len: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Slots whose position is among the last ``window[h]`` of the sequence."""
    return positions >= (seq_len - window)[:, None]


def flag_mask(flags: torch.Tensor, bit: int) -> torch.Tensor:
    return (flags & bit) != 0


def _check_tokens(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are integers from 0 to {limit} (tokens)")


def _check_pool_kernel(value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % 2 == 0:
        raise ValueError(f"pool_kernel={value!r} is invalid: allowed values are odd integers >= 1")


def _check_ratio(name: str, value: float, *, allow_zero: bool = True) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    in_range = is_number and (value >= 0 if allow_zero else value > 0) and value <= 1
    if not in_range:
        allowed = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name}={value!r} is invalid: allowed values are numbers in {allowed}")


# --- the five FastGen components --------------------------------------------


class Policy(Protocol):
    """What every policy declares: its name, and whether its keep mask reads
    ``SlotView.scores`` (then the runtime accumulates attention into the slots)."""

    name: ClassVar[str]
    needs_scores: ClassVar[bool]

    def keep_mask(self, view: SlotView) -> torch.Tensor: ...


@dataclass(frozen=True)
class SpecialTokens:
    """Keep special tokens (BOS, chat-template markers)."""

    name: ClassVar[str] = "special"
    needs_scores: ClassVar[bool] = False

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        return view.valid & flag_mask(view.flags, FLAG_SPECIAL)


@dataclass(frozen=True)
class Punctuation:
    """Keep punctuation tokens."""

    name: ClassVar[str] = "punct"
    needs_scores: ClassVar[bool] = False

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        return view.valid & flag_mask(view.flags, FLAG_PUNCT)


@dataclass(frozen=True)
class Local:
    """Keep tokens within ``ratio * seq_len`` of the newest token."""

    ratio: float = 0.3
    name: ClassVar[str] = "local"
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_ratio("local_ratio", self.ratio)

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        window = ratio_budget(self.ratio, view.seq_len)
        return view.valid & recent_mask(view.positions, view.seq_len, window)


@dataclass(frozen=True)
class Frequent:
    """Keep the ``ratio * seq_len`` slots with the highest accumulated attention.

    ``pool_kernel`` > 1 ranks slots by the largest score within ``pool_kernel // 2``
    slots on each side (SnapKV's pooling), so the neighbours of a heavy token (the
    other pieces of a number, a name) rank with it; 1 ranks each slot by its own score.
    """

    ratio: float = 0.3
    pool_kernel: int = 1
    name: ClassVar[str] = "frequent"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_ratio("frequent_ratio", self.ratio)
        _check_pool_kernel(self.pool_kernel)

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        scores = view.scores
        if self.pool_kernel > 1:
            scores = max_pool_slots(scores.to(torch.float32).masked_fill(~view.valid, 0), self.pool_kernel)
        return top_k_mask(scores, ratio_budget(self.ratio, view.seq_len), view.valid)


@dataclass(frozen=True)
class Full:
    """Keep everything."""

    name: ClassVar[str] = "full"
    needs_scores: ClassVar[bool] = False

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        return view.valid


@dataclass(frozen=True)
class Union:
    """A hybrid: the union of its parts' keep masks."""

    parts: tuple
    name: ClassVar[str] = "union"

    @property
    def needs_scores(self) -> bool:
        return any(part.needs_scores for part in self.parts)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a hybrid needs at least one part")

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        keep = self.parts[0].keep_mask(view)
        for part in self.parts[1:]:
            keep = keep | part.keep_mask(view)
        return keep


# --- FastGen: per-head choice along the greedy ladder -----------------------

FASTGEN_LADDER = (
    "special",
    "special+punct",
    "special+punct+frequent",
    "special+punct+frequent+local",
    "full",
)


# Upper bound of the young-token windows, in tokens: a few pages of 32 at most, so a
# typo (a ratio such as 0.3, a length such as 3000) is named instead of keeping everything.
MAX_YOUNG_TOKENS = 1024


@dataclass(frozen=True)
class FastGen:
    """FastGen's hybrids; each head keeps the hybrid its profile chose.

    ``recovery_ratio`` (T) is the attention mass a chosen hybrid must recover;
    it is used by the profiler, not here. ``recent_window`` and ``decode_protect``
    (tokens, see the module docstring) add young tokens to every rung but ``full``;
    the profiler judges the rungs with them, so they also shape each head's choice.
    """

    recovery_ratio: float = 0.95
    local_ratio: float = 0.3
    frequent_ratio: float = 0.3
    recent_window: int = 32  # the default by docs/results.md's rule; 0 in fastgen-paper
    decode_protect: int = 0
    pool_kernel: int = 1  # the frequent rung's pooling (Frequent); 1 in fastgen-paper
    name: ClassVar[str] = "fastgen"
    ladder: ClassVar[tuple[str, ...]] = FASTGEN_LADDER
    needs_scores: ClassVar[bool] = True  # profiling reads the window's scores; frequent rungs keep adding
    chooses_per_head: ClassVar[bool] = True  # a per-list rung, profiled at the prompt's end (profiler.py)

    def __post_init__(self) -> None:
        _check_ratio("recovery_ratio", self.recovery_ratio, allow_zero=False)
        _check_ratio("local_ratio", self.local_ratio)
        _check_ratio("frequent_ratio", self.frequent_ratio)
        _check_tokens("recent_window", self.recent_window, MAX_YOUNG_TOKENS)
        _check_tokens("decode_protect", self.decode_protect, MAX_YOUNG_TOKENS)
        _check_pool_kernel(self.pool_kernel)

    def young_mask(self, view: SlotView) -> torch.Tensor:
        """[H, N] bool: the young tokens every compressed rung keeps (none for the paper's)."""
        young = torch.zeros_like(view.valid)
        if self.recent_window:
            window = torch.full_like(view.seq_len, self.recent_window)
            young |= recent_mask(view.positions, view.seq_len, window)
        if self.decode_protect:
            window = torch.full_like(view.seq_len, self.decode_protect)
            young |= view.generated & recent_mask(view.positions, view.seq_len, window)
        return view.valid & young

    def candidate_masks(self, view: SlotView) -> torch.Tensor:
        """Keep masks of every hybrid of the ladder: ``[C=5, H, N]`` bool.

        Each rung is a superset of the previous one, so the rung masks are
        cumulative ORs of the component masks (the young tokens in the first).
        """
        special = SpecialTokens().keep_mask(view) | self.young_mask(view)
        punct = Punctuation().keep_mask(view)
        frequent = Frequent(self.frequent_ratio, self.pool_kernel).keep_mask(view)
        local = Local(self.local_ratio).keep_mask(view)
        rungs = [special]
        for part in (punct, frequent, local):
            rungs.append(rungs[-1] | part)
        rungs.append(view.valid)
        return torch.stack(rungs)

    def keep_mask(self, view: SlotView, choice: torch.Tensor) -> torch.Tensor:
        """Keep mask of each head's chosen rung; ``choice [H]`` indexes FASTGEN_LADDER."""
        if choice.shape != view.lengths.shape:
            raise ValueError(f"choice must be [H]={view.lengths.shape[0]}, got {tuple(choice.shape)}")
        rungs = self.candidate_masks(view)
        index = choice.to(torch.int64).clamp(0, len(self.ladder) - 1)
        return rungs.gather(0, index[None, :, None].expand(1, *rungs.shape[1:]))[0]

    def rung_evicts(self, choice: torch.Tensor) -> torch.Tensor:
        """bool like ``choice``: lists whose rung can drop a token (every rung but ``full``)."""
        return choice != self.ladder.index("full")

    def scores_needed(self, choice: torch.Tensor) -> torch.Tensor:
        """bool like ``choice``: lists whose rung reads scores while decoding (frequent)."""
        scored = torch.tensor([i for i, name in enumerate(self.ladder) if "frequent" in name],
                              device=choice.device)
        return torch.isin(choice, scored)


@dataclass(frozen=True)
class FastGenPaper(FastGen):
    """The paper's FastGen (Ge et al., ICLR 2024) as a named setting: no young tokens.

    Same hyperparameters as ``fastgen``; ``recent_window``, ``decode_protect`` (0) and
    ``pool_kernel`` (1) exist only to say so and must keep those values.
    """

    recent_window: int = 0
    decode_protect: int = 0
    pool_kernel: int = 1
    name: ClassVar[str] = "fastgen-paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, paper in (("recent_window", 0), ("decode_protect", 0), ("pool_kernel", 1)):
            if getattr(self, key) != paper:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid for kv_policy='fastgen-paper': allowed "
                                 f"value is {paper} (the paper's FastGen; kv_policy='fastgen' takes {key})")


# --- baselines at a fixed KV budget -----------------------------------------


@dataclass(frozen=True)
class StreamingLLM:
    """Attention sinks plus a recent window; ``budget_ratio`` of seq_len in all."""

    budget_ratio: float = 0.5
    sink_tokens: int = 4
    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_ratio("budget_ratio", self.budget_ratio, allow_zero=False)
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens!r} is invalid: allowed values are integers >= 0")

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        budget = ratio_budget(self.budget_ratio, view.seq_len)
        num_sinks = budget.clamp_max(self.sink_tokens)
        sinks = view.positions < num_sinks[:, None]
        window = budget - num_sinks
        return view.valid & (sinks | recent_mask(view.positions, view.seq_len, window))


@dataclass(frozen=True)
class H2O:
    """Heavy hitters by accumulated attention plus a recent window."""

    budget_ratio: float = 0.5
    recent_fraction: float = 0.5
    name: ClassVar[str] = "h2o"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_ratio("budget_ratio", self.budget_ratio, allow_zero=False)
        _check_ratio("recent_fraction", self.recent_fraction)

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        budget = ratio_budget(self.budget_ratio, view.seq_len)
        recent_n = torch.ceil(budget.to(torch.float64) * self.recent_fraction).to(torch.int64)
        recent = view.valid & recent_mask(view.positions, view.seq_len, recent_n)
        heavy = top_k_mask(view.scores, budget - recent_n, view.valid & ~recent)
        return recent | heavy


@dataclass(frozen=True)
class SnapKV:
    """Observation-window scores, max-pooled over neighbours, plus the window itself.

    ``view.scores`` must hold the observation window's attention (the profiler's
    window statistics); pooling keeps clusters of neighbouring tokens together.
    """

    budget_ratio: float = 0.5
    window: int = 32
    pool_kernel: int = 7
    name: ClassVar[str] = "snapkv"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_ratio("budget_ratio", self.budget_ratio, allow_zero=False)
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window={self.window!r} is invalid: allowed values are integers >= 0")
        _check_pool_kernel(self.pool_kernel)

    def keep_mask(self, view: SlotView) -> torch.Tensor:
        budget = ratio_budget(self.budget_ratio, view.seq_len)
        window = torch.minimum(budget, torch.full_like(budget, self.window))
        recent = view.valid & recent_mask(view.positions, view.seq_len, window)
        pooled = max_pool_slots(view.scores.to(torch.float32).masked_fill(~view.valid, 0), self.pool_kernel)
        heavy = top_k_mask(pooled, budget - window, view.valid & ~recent)
        return recent | heavy


def max_pool_slots(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over a centred window of ``kernel`` slots along each row: [H, N] -> [H, N]."""
    if kernel == 1:
        return scores
    pooled = torch.nn.functional.max_pool1d(scores[:, None, :], kernel, stride=1, padding=kernel // 2)
    return pooled[:, 0, :]


POLICY_NAMES = ("full", "fastgen", "streamingllm", "h2o", "snapkv", "fastgen-paper")

_POLICY_CLASSES = {
    "full": Full,
    "fastgen": FastGen,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "fastgen-paper": FastGenPaper,
}


def make_policy(name: str, **hyperparameters):
    """Build a named policy; unknown names or keys give an error listing what is allowed."""
    if name not in _POLICY_CLASSES:
        raise ValueError(f"kv_policy={name!r} is unknown: allowed values are {', '.join(POLICY_NAMES)}")
    cls = _POLICY_CLASSES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for kv_policy={name!r}: "
            f"allowed keys are {', '.join(allowed) or '(none)'}"
        )
    return cls(**hyperparameters)
