"""The pure parts of `vllm-adaptive-kv eval` (no vLLM): scoring, fidelity metrics,
matched budgets, the rule that picks T, argument checks and the written outputs."""

from __future__ import annotations

import json

import pytest

from vllm_adaptive_kv.apps import eval as ev
from vllm_adaptive_kv.core.policies import FASTGEN_LADDER


# --- fidelity: agreement and first divergence -------------------------------------------

@pytest.mark.parametrize("ref, out, agreement, first", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, None),
    ([1, 2, 3, 4], [1, 2, 9, 4], 0.75, 2),
    ([1, 2, 3, 4], [9, 2, 3, 4], 0.75, 0),
    ([1, 2, 3, 4], [1, 2], 0.5, 2),          # stopped early: the missing tokens count as misses
    ([1, 2], [1, 2, 3, 4], 0.5, 2),          # ran on past the reference
    ([], [], 1.0, None),
    ([], [5], 0.0, 0),
])
def test_agreement_and_first_divergence(ref, out, agreement, first):
    assert ev.token_agreement(ref, out) == pytest.approx(agreement)
    assert ev.first_divergence(ref, out) == first


def test_agreement_counts_positions_not_a_shared_prefix():
    # one substituted token early on: the rest still agrees position by position
    ref = list(range(10))
    out = [0, 99] + list(range(2, 10))
    assert ev.token_agreement(ref, out) == pytest.approx(0.9)
    assert ev.first_divergence(ref, out) == 1


def test_score_fidelity_is_mean_agreement_in_percent():
    items = [ev.Item("a", {"prompt_tokens": 3}), ev.Item("b", {"prompt_tokens": 4})]
    quality, rows = ev.score_fidelity(items, [[1, 2], [1, 2, 3, 4]], [[1, 2], [1, 2, 0, 0]])
    assert quality == pytest.approx(75.0)
    assert [r["first_divergence"] for r in rows] == [None, 2]
    assert rows[1]["prompt_tokens"] == 4 and rows[1]["reference_tokens"] == 4


def test_score_answers_uses_each_items_checker():
    items = [ev.Item("a", {"answer": "12345"}, lambda t: "12345" in t),
             ev.Item("b", {"answer": "Pepper"}, lambda t: "Pepper" in t)]
    quality, rows = ev.score_answers(items, ["The pass key is 12345.", "It is Biscuit."])
    assert quality == pytest.approx(50.0)
    assert [r["correct"] for r in rows] == [True, False]
    assert rows[0]["output"] == "The pass key is 12345."


def test_accuracy_percent():
    assert ev.accuracy_percent([True, True, False, True]) == pytest.approx(75.0)
    assert ev.accuracy_percent([]) == 0.0


# --- matched memory ------------------------------------------------------------------------

def test_matched_budget_is_the_kept_fraction_rounded_and_in_range():
    assert ev.matched_budget(0.623456) == pytest.approx(0.6235)
    assert ev.matched_budget(1.0) == 1.0
    assert ev.matched_budget(0.0) == pytest.approx(0.0001)  # budget_ratio must be > 0
    with pytest.raises(ValueError, match="kept_fraction=1.5"):
        ev.matched_budget(1.5)
    with pytest.raises(ValueError, match="kept_fraction=-0.1"):
        ev.matched_budget(-0.1)


def test_corrected_budget_shifts_by_the_miss_and_stays_in_range():
    # a baseline at budget 0.69 that ended at 0.74 (its unevicted generated tail) for 0.69
    assert ev.corrected_budget(0.69, 0.69, 0.74) == pytest.approx(0.64)
    assert ev.corrected_budget(0.60, 0.62, 0.58) == pytest.approx(0.64)  # undershoot: more budget
    assert ev.corrected_budget(0.05, 0.05, 0.30) == pytest.approx(0.0001)  # never 0 or below
    assert ev.corrected_budget(0.98, 0.99, 0.90) == 1.0


def test_matched_setting_names_its_fastgen_point_and_is_a_valid_request():
    from vllm_adaptive_kv.core.config import request_policy_settings

    setting = ev.matched_settings("h2o", "fastgen T=0.95", 0.41237)
    assert setting.extra_args == {"kv_policy": "h2o", "budget_ratio": 0.4124}
    assert setting.matched_to == "fastgen T=0.95"
    resolved = request_policy_settings({"kv_policy": "full", "observation_window": 64}, setting.extra_args)
    assert resolved["kv_policy"] == "h2o" and resolved["budget_ratio"] == 0.4124


def test_fastgen_setting_is_a_valid_request():
    from vllm_adaptive_kv.core.config import request_policy_settings

    setting = ev.fastgen_setting(0.98)
    assert setting.label == "fastgen T=0.98"
    resolved = request_policy_settings({"kv_policy": "full"}, setting.extra_args)
    assert resolved["recovery_ratio"] == 0.98


# --- the rule that chooses T -----------------------------------------------------------------

def row(policy, passkey, chat, kept, ratio=None):
    """A result row with two tasks; ``kept`` is the same on both."""
    params = {"recovery_ratio": ratio} if ratio is not None else {}
    label = f"fastgen T={ratio}" if ratio is not None else policy
    tasks = {"passkey": {"quality": passkey, "kept_fraction": kept}, "chat": {"quality": chat, "kept_fraction": kept}}
    return {"label": label, "kv_policy": policy, "params": params, "tasks": tasks}


RULE_ROWS = [row("full", 100.0, 100.0, 1.0), row("fastgen", 80.0, 20.0, 0.4, 0.9),
             row("fastgen", 100.0, 97.0, 0.6, 0.95), row("fastgen", 100.0, 99.0, 0.7, 0.98),
             row("h2o", 100.0, 100.0, 0.3)]


def test_rule_picks_the_smallest_kv_within_the_loss():
    both = ("passkey", "chat")
    assert ev.choose_recovery_ratio(RULE_ROWS, 2.0, both)["params"]["recovery_ratio"] == 0.95  # loss 1.5
    assert ev.choose_recovery_ratio(RULE_ROWS, 50.0, both)["params"]["recovery_ratio"] == 0.9
    assert ev.choose_recovery_ratio(RULE_ROWS, 1.0, both)["params"]["recovery_ratio"] == 0.98
    assert ev.choose_recovery_ratio(RULE_ROWS, 0.1, both) is None  # baselines are never chosen


def test_rule_over_a_subset_of_tasks():
    # on passkey alone, T=0.95 and T=0.98 lose nothing; the smaller KV wins
    assert ev.choose_recovery_ratio(RULE_ROWS, 0.0, ("passkey",))["params"]["recovery_ratio"] == 0.95


def test_rule_choices_all_tasks_and_retrieval():
    choices = ev.rule_choices(RULE_ROWS, 1.0)
    assert [c["tasks"] for c in choices] == [["passkey", "chat"], ["passkey"]]
    assert choices[0]["recovery_ratio"] == 0.98 and choices[0]["mean_loss"] == pytest.approx(0.5)
    assert choices[0]["mean_kept_fraction"] == pytest.approx(0.7)
    assert choices[1]["recovery_ratio"] == 0.95 and choices[1]["mean_loss"] == 0.0
    none = ev.rule_choice(RULE_ROWS, 0.1, ("passkey", "chat"))
    assert none["chosen"] is None and none["recovery_ratio"] is None


def test_setting_row_means_over_tasks_and_drops_token_ids():
    results = {"passkey": {"quality": 100.0, "kept_fraction": 0.5, "token_ids": [[1]]},
               "chat": {"quality": 50.0, "kept_fraction": 0.7, "token_ids": [[2]]}}
    r = ev.setting_row(ev.fastgen_setting(0.9), results)
    assert r["mean_quality"] == pytest.approx(75.0) and r["mean_kept_fraction"] == pytest.approx(0.6)
    assert "token_ids" not in r["tasks"]["passkey"]


# --- metrics read from the registry ------------------------------------------------------------

def test_kept_fraction_of_needs_every_request():
    delta = {f"{ev.KEPT}_sum": 1.5, f"{ev.KEPT}_count": 3}
    assert ev.kept_fraction_of(delta, 3) == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="observed 3 requests, expected 4"):
        ev.kept_fraction_of(delta, 4)


def test_head_policy_counts_and_metric_delta():
    before = {f"{ev.HEAD_POLICY}[full]": 10.0, "x": 1.0}
    after = {f"{ev.HEAD_POLICY}[full]": 30.0, f"{ev.HEAD_POLICY}[special+punct]": 5.0, "x": 1.0}
    delta = ev.metric_delta(before, after)
    assert delta == {f"{ev.HEAD_POLICY}[full]": 20.0, f"{ev.HEAD_POLICY}[special+punct]": 5.0}
    assert ev.head_policy_counts(delta) == {"full": 20, "special+punct": 5}


def test_latest_head_map_matches_vllms_internal_ids():
    maps = {"3-aa": [["full"]], "13-bb": [["special"]], "3-cc": [["local"]]}
    assert ev.latest_head_map(maps, "3") == [["local"]]  # most recent entry for id 3
    assert ev.latest_head_map(maps, "13") == [["special"]]
    with pytest.raises(RuntimeError, match="request '4'"):
        ev.latest_head_map(maps, "4")


# --- command line --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--recovery-ratios", "0.9,1.5"], "'1.5' is invalid: allowed values are comma-separated numbers in (0, 1]"),
    (["--recovery-ratios", "0.9,x"], "'x' is invalid"),
    (["--baselines", "h2o,foo"], "'foo' is invalid: allowed values are comma-separated names from streamingllm, h2o, snapkv"),
    (["--tasks", "passkey,"], "'' is invalid"),
    (["--max-loss", "-1"], "--max-loss: -1.0 is invalid"),
    (["--kv-cache-mib", "8"], "--kv-cache-mib: 8 is invalid"),
    (["--prompts-per-task", "0"], "'0' is invalid: allowed values are integers from 1 to 16 (2 with --quick)"),
    (["--prompts-per-task", "six"], "'six' is invalid: allowed values are integers from 1 to 16"),
    (["--prompts-per-task", "17"], "--prompts-per-task: 17 is invalid: allowed values are integers from 1 to 16"),
    (["--quick", "--prompts-per-task", "3"],
     "--prompts-per-task: 3 is invalid: allowed values are integers from 1 to 2 with --quick"),
    (["--model", "llama-7b"], "--model: 'llama-7b' is invalid (neither a known model name nor a folder): allowed "
     "values are a model name from qwen2.5-coder-0.5b, smollm2 or a Hugging Face model folder holding config.json"),
])
def test_bad_arguments_name_the_value_and_what_is_allowed(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_full_and_quick():
    parser = ev.build_parser()
    full = ev.resolve_args(parser.parse_args([]), parser)
    assert full.recovery_ratios == [0.9, 0.95, 0.98, 0.99] and full.baselines == ["streamingllm", "h2o", "snapkv"]
    quick = ev.resolve_args(parser.parse_args(["--quick"]), parser)
    assert quick.recovery_ratios == [0.9] and quick.baselines == ["h2o"]
    assert ev.resolve_args(parser.parse_args(["--baselines", "snapkv,snapkv"]), parser).baselines == ["snapkv"]


def test_model_folder_without_config_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--model", str(tmp_path)])
    assert exc.value.code == 2
    assert f"--model: {str(tmp_path)!r} is invalid (a folder without config.json)" in capsys.readouterr().err


def test_model_and_prompts_per_task_defaults_and_accepted_values(tmp_path):
    parser = ev.build_parser()
    default = ev.resolve_args(parser.parse_args([]), parser)
    assert default.model == "smollm2" and default.prompts_per_task is None
    assert default.size == ev.FULL_SIZE and default.size.prompts is None  # unchanged: every prompt
    assert ev.resolve_args(parser.parse_args(["--prompts-per-task", "16"]), parser).size == ev.FULL_SIZE
    six = ev.resolve_args(parser.parse_args(["--model", "qwen2.5-coder-0.5b", "--prompts-per-task", "6"]), parser)
    assert six.model == "qwen2.5-coder-0.5b" and six.size.prompts == 6  # a known name: not prepared here
    assert six.size.lengths == ev.FULL_SIZE.lengths and six.size.answer_tokens == ev.FULL_SIZE.answer_tokens
    quick = ev.resolve_args(parser.parse_args(["--quick", "--prompts-per-task", "1"]), parser)
    assert quick.size == ev.QUICK_SIZE.with_prompts(1) and quick.size.prompts == 1
    (tmp_path / "config.json").write_text("{}")
    assert ev.resolve_args(parser.parse_args(["--model", str(tmp_path)]), parser).model == str(tmp_path)


def test_with_prompts_checks_its_range():
    assert ev.FULL_SIZE.max_prompts == 16 and ev.QUICK_SIZE.max_prompts == 2
    with pytest.raises(ValueError, match="prompts=17 is invalid: allowed values are integers from 1 to 16"):
        ev.FULL_SIZE.with_prompts(17)
    with pytest.raises(ValueError, match="prompts=0 is invalid"):
        ev.FULL_SIZE.with_prompts(0)


# --- a smaller suite: which prompts ------------------------------------------------------------

def test_spread_order_and_evenly():
    assert ev.spread_order(4) == [0, 3, 1, 2]
    assert ev.spread_order(1) == [0] and ev.spread_order(2) == [0, 1]
    assert sorted(ev.spread_order(7)) == list(range(7))
    assert ev.evenly(3, 8) == [0, 4, 7] and ev.evenly(1, 8) == [3] and ev.evenly(9, 8) == list(range(8))


@pytest.mark.parametrize("n", range(1, 17))
def test_retrieval_subset_is_n_distinct_cells_of_the_full_grid(n):
    full = ev.retrieval_cells(ev.FULL_SIZE)
    cells = ev.retrieval_cells(ev.FULL_SIZE.with_prompts(n))
    assert len(cells) == n == len(set(cells)) and set(cells) <= set(full)
    assert cells == sorted(cells)  # grid order, as in the full suite
    if n >= 2:  # both the shortest and the longest prompts, the shallowest and the deepest depths
        assert {li for li, _ in cells} >= {0, 3} and {di for _, di in cells} >= {0, 3}
    if n >= 4:  # every length and every depth
        assert {li for li, _ in cells} == {0, 1, 2, 3} and {di for _, di in cells} == {0, 1, 2, 3}


def test_retrieval_subset_of_eight_has_each_length_and_depth_twice():
    cells = ev.retrieval_cells(ev.FULL_SIZE.with_prompts(8))
    assert sorted(li for li, _ in cells) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(di for _, di in cells) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("n, questions, docs", [
    (1, [3], []), (2, [3], [3]), (3, [0, 7], [3]), (6, [0, 4, 7], [0, 4, 7]), (16, list(range(8)), list(range(8))),
])
def test_chat_picks_half_questions_half_passages(n, questions, docs):
    assert ev.chat_picks(ev.FULL_SIZE.with_prompts(n)) == (questions, docs)


class FakeTokenizer:
    """Words as tokens and a visible chat template: enough to build a suite without a model."""

    class Encoding:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=True):
        return self.Encoding(text.split())

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<user> " + messages[0]["content"] + " <assistant>"


def test_smaller_suite_holds_the_full_suites_prompts():
    tok = FakeTokenizer()
    full = ev.build_suite(tok, ev.FULL_SIZE, ev.CORE_TASKS)
    six = ev.build_suite(tok, ev.FULL_SIZE.with_prompts(6), ev.CORE_TASKS)
    for task in ev.CORE_TASKS:
        assert len(full[task]) == 16 and len(six[task]) == 6
        full_texts = [item.text for item in full[task]]
        assert all(item.text in full_texts for item in six[task]), task  # same seeds, same prompts
        assert all(item.text.startswith("<user> ") for item in six[task])  # the tokenizer's chat template
    ev.check_fits(full, ev.FULL_SIZE, 2048, lambda t: len(t.split()))
    with pytest.raises(ValueError, match=r"tokens \+ 20 output tokens > max_model_len 1024"):
        ev.check_fits(full, ev.FULL_SIZE, 1024, lambda t: len(t.split()))


def test_resolve_model_reads_layers_and_heads_of_a_folder(tmp_path):
    config = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "hidden_size": 896, "max_position_embeddings": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    folder, info = ev.resolve_model(str(tmp_path))
    assert folder == str(tmp_path.resolve()) and info["display"] == tmp_path.name
    assert (info["layers"], info["q_heads"], info["kv_heads"], info["head_dim"]) == (24, 14, 2, 64)
    assert ev.engine_max_len(info) == 1024  # the model's context is shorter than the suite's 2048
    assert ev.engine_max_len({"max_position_embeddings": 32768}) == ev.MAX_MODEL_LEN


def qwen_dir():
    from vllm_adaptive_kv.model import model_dir

    folder = model_dir("qwen2.5-coder-0.5b")
    if not (folder / ".complete.json").exists():
        pytest.skip("qwen2.5-coder-0.5b is not converted on this machine (vllm-adaptive-kv model prepare ...)")
    return folder


def test_second_models_tokenizer_and_template_build_a_fitting_suite():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_dir()))
    size = ev.FULL_SIZE.with_prompts(6)
    suite = ev.build_suite(tok, size, ev.CORE_TASKS)
    assert {task: len(items) for task, items in suite.items()} == {"passkey": 6, "needle": 6, "chat": 6}
    ruler = ev.build_suite(tok, ev.FULL_SIZE.with_prompts(1), ev.RULER_TASKS)  # answer prefixes end these
    ev.check_fits(ruler, ev.FULL_SIZE, ev.MAX_MODEL_LEN, lambda t: len(tok(t).input_ids))
    for items in suite.values():
        assert all(item.text.startswith("<|im_start|>system") and item.text.endswith("<|im_start|>assistant\n")
                   for item in items)
    ev.check_fits(suite, size, ev.MAX_MODEL_LEN, lambda t: len(tok(t).input_ids))
    lengths = [item.info["prompt_tokens"] for item in suite["passkey"]]
    assert max(lengths) > 1800 and min(lengths) < 700  # measured in the model's own tokens


def test_from_json_rejects_other_files(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"schema_version": 99}')
    with pytest.raises(SystemExit):
        ev.main(["--from-json", str(bad), "--out-dir", str(tmp_path)])
    assert "is not a results.json of schema version 1" in capsys.readouterr().err


# --- outputs from a synthetic result ---------------------------------------------------------------

def synthetic_results() -> dict:
    def task(q, k):
        prompt = {"prompt_tokens": 980, "depth": 0.5, "correct": q == 100.0, "agreement": q / 100,
                  "first_divergence": None if q == 100 else 3}
        return {"quality": q, "kept_fraction": k, "seconds": 1.0, "requests": 1, "head_policies": {},
                "prompts": [prompt]}

    settings = [
        {"label": "full", "kv_policy": "full", "params": {}, "matched_to": None,
         "tasks": {"passkey": task(100.0, 1.0), "chat": task(100.0, 1.0)}, "mean_quality": 100.0,
         "mean_kept_fraction": 1.0},
        {"label": "fastgen T=0.90", "kv_policy": "fastgen", "params": {"recovery_ratio": 0.9}, "matched_to": None,
         "tasks": {"passkey": task(50.0, 0.5), "chat": task(60.0, 0.6)}, "mean_quality": 55.0,
         "mean_kept_fraction": 0.55},
        {"label": "h2o @ fastgen T=0.90", "kv_policy": "h2o",
         "params": {"passkey": {"budget_ratio": 0.5}, "chat": {"budget_ratio": 0.6}}, "matched_to": "fastgen T=0.90",
         "tasks": {"passkey": task(40.0, 0.52), "chat": task(70.0, 0.61)}, "mean_quality": 55.0,
         "mean_kept_fraction": 0.565},
    ]
    heads = [[FASTGEN_LADDER[(layer + h) % 5] for h in range(3)] for layer in range(30)]
    return {"schema_version": ev.SCHEMA_VERSION, "model": "test-model",
            "tasks": {"passkey": {"prompts": 1}, "chat": {"prompts": 1}}, "settings": settings,
            "policy_maps": [{"recovery_ratio": 0.9, "prompt_type": "code", "prompt_tokens": 10, "heads": heads}],
            "choices": ev.rule_choices(settings, 2.0), "seconds": 1.0}


def test_write_outputs_table_plots_and_json(tmp_path):
    results = synthetic_results()
    paths = ev.write_outputs(results, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["policy_map.png", "quality_chat.png", "quality_passkey.png", "results.json", "results.md"]
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "results.md").read_text()
    assert "| fastgen T=0.90 | recovery_ratio=0.9 | 50.0 | 50.0 | 60.0 | 60.0 | 55.0 | 55.0 |" in md
    assert "| h2o @ fastgen T=0.90 | budget_ratio per task = FastGen's kept fraction |" in md
    assert "| full | 100.0 | 1/1 | - |" in md  # chat fidelity table: identical output
    assert "no fastgen setting qualifies" in md
    assert "## passkey accuracy by length" in md and "| fastgen T=0.90 | 0 (0/1) |" in md
    assert "| setting | ~1000 tok |" in md and "| setting | depth 0.5 |" in md


def test_policy_map_of_another_layer_and_head_count(tmp_path):
    results = synthetic_results()
    heads = [[FASTGEN_LADDER[(layer * 2 + h) % 5] for h in range(2)] for layer in range(24)]  # 24 x 2, like Qwen
    results["policy_maps"] = [{"recovery_ratio": r, "prompt_type": kind, "prompt_tokens": 10, "heads": heads}
                              for r in (0.9, 0.95) for kind in ("passkey", "code")]
    paths = ev.write_outputs(results, tmp_path)
    assert (tmp_path / "policy_map.png") in paths
    assert (tmp_path / "policy_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_json_redraws_without_a_run(tmp_path):
    src = tmp_path / "in"
    ev.write_outputs(synthetic_results(), src)
    out = tmp_path / "out"
    assert ev.main(["--from-json", str(src / "results.json"), "--out-dir", str(out)]) == 0
    assert (out / "results.md").read_text() == (src / "results.md").read_text()
    assert (out / "policy_map.png").exists()


def test_cli_delegates_eval_and_keeps_its_errors(capsys):
    from vllm_adaptive_kv.apps import cli

    assert "eval" in cli.DELEGATES
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--tasks", "summaries"])
    assert exc.value.code == 2
    assert "'summaries' is invalid: allowed values are comma-separated names from passkey, needle, chat" \
        in capsys.readouterr().err


# --- FastGen variants, RULER tasks and kvpress rows (no engine, no kvpress venv) --------------


def test_variants_name_their_settings_and_bad_values():
    assert ev.fastgen_setting(0.95).label == "fastgen T=0.95"
    paper = ev.fastgen_setting(0.9, "paper")
    assert paper.label == "fastgen-paper T=0.90" and paper.extra_args == {"kv_policy": "fastgen-paper",
                                                                          "recovery_ratio": 0.9}
    window = ev.fastgen_setting(0.95, "recent_window=32+decode_protect=16")
    assert window.label == "fastgen[recent_window=32,decode_protect=16] T=0.95"
    assert window.extra_args == {"kv_policy": "fastgen", "recent_window": 32, "decode_protect": 16,
                                 "recovery_ratio": 0.95}
    chunked = ev.fastgen_setting(0.9, "compress_by_chunk=true")
    assert chunked.label == "fastgen[compress_by_chunk=True] T=0.90"
    assert chunked.extra_args == {"kv_policy": "fastgen", "compress_by_chunk": True, "recovery_ratio": 0.9}
    for bad, message in [("recent_window=-1", "recent_window=-1 is invalid"),
                         ("compress_by_chunk=yes", "compress_by_chunk='yes' is not a number, true or false"),
                         ("recent_window=true", "recent_window=True is invalid"),
                         ("recent_windows=8", "unknown hyperparameter.*recent_windows"),
                         ("recent_window", "allowed values are default, paper or key=value"),
                         ("recovery_ratio=0.9", "set by --recovery-ratios")]:
        with pytest.raises(ValueError, match=message):
            ev.parse_variant(bad)
    parser = ev.build_parser()
    args = ev.resolve_args(parser.parse_args(["--variants", "paper,default,paper", "--tasks", "ruler,chat"]), parser)
    assert args.variants == ["paper", "default"] and args.tasks == [*ev.RULER_TASKS, "chat"]
    assert ev.resolve_args(parser.parse_args(["--quick"]), parser).tasks == list(ev.QUICK_TASKS)
    assert parser.parse_args(["--max-num-batched-tokens", "256"]).max_num_batched_tokens == 256
    assert parser.parse_args([]).max_num_batched_tokens is None
    assert ev.step_budget(None) == {} and ev.step_budget(1024)["max_num_seqs"] == 256
    assert ev.step_budget(64) == {"max_num_batched_tokens": 64, "max_num_seqs": 64}
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-num-batched-tokens", "8"])


def test_ruler_items_score_partial_credit():
    tok = FakeTokenizer()
    size = ev.replace(ev.QUICK_SIZE, ruler_tokens=400, ruler_prompts=3)
    suite = ev.build_suite(tok, size, ("niah_multivalue", "qa"))
    assert [len(v) for v in suite.values()] == [3, 3]
    item = suite["niah_multivalue"][0]
    assert item.text.startswith("<user> ") and item.text.endswith("mentioned in the provided text are")
    quality, rows = ev.score_answers([item], [" and ".join(item.info["answers"][:2])])
    assert quality == pytest.approx(50.0) and rows[0]["score"] == 0.5 and rows[0]["correct"] is False
    assert ev.task_max_tokens("cwe", size) == 120 and ev.task_max_tokens("passkey", size) == size.answer_tokens
    assert ev.task_metric("qa").endswith("(part) %") and ev.task_metric("vt").endswith("(all) %")


def test_press_compression_ends_at_the_kept_fraction():
    for kept, p, g in [(0.6, 1800, 20), (0.45, 300, 64), (0.9, 40, 64)]:
        ratio = ev.press_compression(kept, p, g)
        if 0 < ratio < 0.95:
            assert ev.press_kept(ratio, p, g) == pytest.approx(kept, abs=1e-3)
    assert ev.press_compression(0.3, 40, 64) == 0.95  # generated tokens alone exceed the budget: capped
    assert ev.press_compression(1.0, 500, 10) == 0.0


def kvpress_fixture():
    """A two-task suite, vLLM rows for full and one matched FastGen point, and a driver output."""
    items = {"passkey": [ev.Item("p0", {"prompt_tokens": 1000, "answer": "12345"}, lambda t: "12345" in t)],
             "chat": [ev.Item("c0", {"prompt_tokens": 200})]}
    full = {"label": "full", "kv_policy": "full", "matched_to": None,
            "tasks": {"passkey": {"kept_fraction": 1.0, "prompts": [{"output_tokens": 10}]},
                      "chat": {"kept_fraction": 1.0, "prompts": [{"reference_tokens": 4, "output_tokens": 4}]}}}
    fastgen = {"label": "fastgen T=0.95", "kv_policy": "fastgen", "matched_to": None,
               "tasks": {"passkey": {"kept_fraction": 0.6}, "chat": {"kept_fraction": 0.7}}}
    h2o = {"label": "h2o @ fastgen T=0.95", "kv_policy": "h2o", "matched_to": "fastgen T=0.95", "tasks": {}}
    return items, [full, fastgen, h2o]


def test_kvpress_jobs_and_rows_from_a_driver_output():
    suite, rows = kvpress_fixture()
    jobs, index = ev.kvpress_jobs("/models/x", suite, ev.QUICK_SIZE, rows, ["snapkv", "adakv_snapkv"], "float32",
                                  fidelity=True)
    assert [p["id"] for p in jobs["prompts"]] == ["fastgen T=0.95|passkey|0", "fastgen T=0.95|chat|0"]
    passkey, chat = jobs["prompts"]
    assert passkey["compression"]["snapkv"] == ev.press_compression(0.6, 1000, 10) and not passkey["fidelity"]
    assert chat["fidelity"] and chat["max_tokens"] == ev.QUICK_SIZE.chat_tokens
    result = lambda job, press, cr, ids, text, **kw: {  # noqa: E731
        "id": job, "press": press, "compression_ratio": cr, "output_ids": ids, "text": text, "prompt_tokens": 1000,
        "kept_after_prefill": 1.0 if press in ("none", "adakv_snapkv") else 1 - cr, "seconds": 0.5, **kw}
    forced = {"nll": 1.0, "kl": 0.0, "forced_agreement": 1.0, "forced_tokens": 4}
    out = {"versions": {"kvpress": "0.5.5"}, "results": [
        result("fastgen T=0.95|passkey|0", "none", 0.0, [1], "The key is 12345."),
        result("fastgen T=0.95|passkey|0", "snapkv", 0.4, [1], "The key is 123."),
        result("fastgen T=0.95|passkey|0", "adakv_snapkv", 0.4, [1], "12345"),
        result("fastgen T=0.95|chat|0", "none", 0.0, [5, 6, 7, 8], "a b c d", **forced),
        result("fastgen T=0.95|chat|0", "snapkv", 0.3, [5, 6, 0, 0], "a b", **{**forced, "nll": 1.5, "kl": 0.2,
                                                                              "forced_agreement": 0.75}),
        result("fastgen T=0.95|chat|0", "adakv_snapkv", 0.3, [5, 6, 7, 8], "a b c d", **forced),
    ]}
    new = ev.kvpress_rows(out, index, suite, ["snapkv", "adakv_snapkv"])
    assert [r["label"] for r in new] == ["transformers full (kvpress venv)", "kvpress:snapkv @ fastgen T=0.95",
                                         "kvpress:adakv_snapkv @ fastgen T=0.95"]
    ref, snap, ada = new
    assert ref["tasks"]["passkey"]["quality"] == 100.0 and ref["tasks"]["chat"]["quality"] == 100.0
    assert snap["tasks"]["passkey"]["quality"] == 0.0 and snap["tasks"]["chat"]["quality"] == 50.0
    assert snap["tasks"]["chat"]["nll"] == 1.5 and snap["tasks"]["chat"]["forced_agreement"] == 75.0
    assert snap["tasks"]["passkey"]["kept_fraction"] == pytest.approx(ev.press_kept(0.4, 1000, 1))
    assert snap["matched_to"] == "fastgen T=0.95" and not snap["masked"] and ada["masked"]
    assert ada["tasks"]["passkey"]["kept_after_prefill"] == 1.0  # masked: nothing freed
    results = {"model": "m", "tasks": {"passkey": {}, "chat": {}}, "settings": rows[:1] + new}
    rows[0]["tasks"] = {t: {"quality": 100.0, "kept_fraction": 1.0, "prompts": [
        {"first_divergence": None, "correct": True, "prompt_tokens": 1000, "depth": 0.5}]} for t in ("passkey", "chat")}
    rows[0].update({"params": {}, "mean_quality": 100.0, "mean_kept_fraction": 1.0})
    table = ev.markdown_table(results)
    assert "masks keys, frees no memory" in table and "head-wise presses (kvzip, adakv_*) mask keys" in table
    assert "| kvpress:snapkv @ fastgen T=0.95 | 1.500 | +50.0% | 0.200 |" not in ev.divergence_table(results)
    assert "| 75.0 | 1.500 | +50.0% | 0.200 |" in ev.divergence_table(results)  # vs transformers' own full


def test_kvpress_driver_and_setup_script_help_run_without_kvpress():
    import subprocess
    import sys

    driver = ev.REPO / "vllm_adaptive_kv" / "apps" / "kvpress_driver.py"
    proc = subprocess.run([sys.executable, str(driver), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "JOBS.json" in proc.stderr
    assert set(ev.KVPRESS_PRESSES) == set(__import__("runpy").run_path(str(driver))["PRESS_NAMES"])
    script = ev.REPO / "scripts" / "kvpress_setup.sh"
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "transformers < 5.3" in proc.stdout
    proc = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True, timeout=60,
                          env={"KVPRESS_VENV": "/nonexistent/venv", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "not set up" in proc.stderr


# --- the default variant's rule --------------------------------------------------------------

def _row(label, policy, passkey, needle, chat_kept, kls):
    chat = {"quality": 50.0, "kept_fraction": chat_kept, "kl": sum(kls) / len(kls),
            "prompts": [{"kl": k} for k in kls]}
    return {"label": label, "kv_policy": policy, "matched_to": None,
            "tasks": {"passkey": {"quality": passkey}, "needle": {"quality": needle}, "chat": chat}}


def test_variant_rule_takes_the_lowest_kl_among_eligible_only_when_clearly_lower():
    full = _row("full", "full", 100.0, 75.0, 1.0, [0.0] * 4)
    paper = _row("fastgen-paper T=0.95", "fastgen-paper", 100.0, 75.0, 0.70, [0.10, 0.20, 0.10, 0.20])
    better = _row("fastgen[recent_window=32] T=0.95", "fastgen", 100.0, 74.0, 0.70, [0.05, 0.10, 0.06, 0.11])
    too_big = _row("fastgen[recent_window=128] T=0.95", "fastgen", 100.0, 75.0, 0.80, [0.0] * 4)
    forgets = _row("fastgen[local_ratio=0.5] T=0.95", "fastgen", 87.5, 75.0, 0.60, [0.0] * 4)
    choice = ev.variant_choice([full, paper, better, too_big, forgets])
    assert choice["eligible"] == [better["label"], paper["label"]]  # sorted by KL; the others break a bar
    assert choice["chosen"] == better["label"] and choice["kl_gain_over_paper"] == pytest.approx(0.07)
    noisy = _row("fastgen[recent_window=16] T=0.95", "fastgen", 100.0, 75.0, 0.70, [0.0, 0.30, 0.0, 0.22])
    choice = ev.variant_choice([full, paper, noisy])  # lower on average, but within the prompts' spread
    assert choice["best"] == noisy["label"] and choice["chosen"] == paper["label"]
    assert ev.variant_choice([full, better]) is None  # no paper row: nothing to compare with
    assert ev.variant_choice([full, too_big, forgets, paper | {"tasks": forgets["tasks"]}])["chosen"] is None


def test_variant_rule_breaks_a_tie_by_fewer_hyperparameters():
    full = _row("full", "full", 100.0, 75.0, 1.0, [0.0] * 3)
    paper = _row("fastgen-paper T=0.95", "fastgen-paper", 100.0, 75.0, 0.70, [0.2] * 3)
    both = _row("fastgen[recent_window=32,decode_protect=128] T=0.95", "fastgen", 100.0, 75.0, 0.70, [0.1] * 3)
    window = _row("fastgen[recent_window=32] T=0.95", "fastgen", 100.0, 75.0, 0.70, [0.1] * 3)
    both["params"] = {"recent_window": 32, "decode_protect": 128, "recovery_ratio": 0.95}
    window["params"] = {"recent_window": 32, "recovery_ratio": 0.95}
    assert ev.variant_choice([full, paper, both, window])["chosen"] == window["label"]


def test_kvpress_driver_runs_a_prompt_its_press_refuses_uncompressed(monkeypatch):
    """kvpress's SnapKV asserts the prompt is longer than its window: such a prompt runs
    without the press, with ratio 0 (its memory counted as kept) and the error recorded,
    instead of failing every other prompt of the run."""
    import contextlib
    import runpy

    from vllm_adaptive_kv.model import model_dir

    folder = model_dir("smollm2")  # the embedded model, prepared by `make setup`
    driver = runpy.run_path(str(ev.REPO / "vllm_adaptive_kv" / "apps" / "kvpress_driver.py"))

    @contextlib.contextmanager
    def refusing(model):
        raise AssertionError("Query length 41 should be greater than the window size 64")
        yield

    monkeypatch.setitem(driver["run"].__globals__, "make_press", lambda name, ratio: refusing)
    out = driver["run"]({"model": str(folder), "threads": 1, "presses": ["snapkv"], "prompts": [
        {"id": "chat/0", "text": "a short question", "max_tokens": 3, "fidelity": False,
         "compression": {"snapkv": 0.4}}]})
    none, snap = out["results"]
    assert snap["press"] == "snapkv" and snap["compression_ratio"] == 0.0 and snap["kept_after_prefill"] == 1.0
    assert "window size 64" in snap["press_error"] and "press_error" not in none
    assert snap["output_ids"] == none["output_ids"]  # uncompressed: the reference's own tokens


def test_partial_results_record_the_command_as_typed(tmp_path):
    # the CLI hands main() the arguments after "eval"; sys.argv still starts with "eval"
    import argparse

    from vllm_adaptive_kv.apps.eval import save_partial

    args = argparse.Namespace(out_dir=str(tmp_path), argv=["--tasks", "passkey", "--quick"])
    save_partial(args, [{"label": "full"}])
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert saved["command"] == "vllm-adaptive-kv eval --tasks passkey --quick"
    assert saved["settings"] == [{"label": "full"}]
