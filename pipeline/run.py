"""One run: load -> calibrate -> quantize -> evaluate -> profile, recorded in MLflow.

Every check that can fail on bad input runs before the MLflow run starts or before the first
expensive stage. An exception ends the MLflow run as FAILED with whatever it had logged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import (
    calibrate,
    device,
    energy,
    evaluate,
    export,
    generation,
    kept,
    layers,
    peaks,
    profile,
    published_grid,
    quantize,
    reference_store,
    shipping,
    steps,
    tasks,
    tracking,
)
from pipeline.algorithms.sequential import check_offload
from pipeline.data import calibration_batches
from pipeline.load import check_fits, load_model, resolve_model_path
from pipeline.quant import kernels

log = logging.getLogger(__name__)
# MLflow keeps a run's name in a VARCHAR(250): PostgreSQL refuses a longer one (sqlite does not check).
RUN_NAME_MAX = 250
Probe = Callable[[torch.nn.Module, torch.Tensor, evaluate.Scores], None]


def check_method(method: Mapping) -> None:
    """Validate a method config without a model (steps and their options, bits, symmetry, granularity,
    activations)."""
    steps.check_steps(method)
    if not steps.quantizes(method):
        return
    quantize.weight_spec(method)
    quantize.check_granularity(method)
    quantize.activation_quant(method)
    act = method.get("activations")
    if act and act["mode"] == "static" and act["observer"] not in calibrate.OBSERVERS:
        raise ValueError(f"unknown observer {act['observer']!r}; allowed: {', '.join(calibrate.OBSERVERS)}")


def check_kernels(container: Mapping, run_device: torch.device) -> None:
    """``kernels`` names a registered kernel that runs on the run's device; sets the int4 row threshold."""
    preference = container["kernels"]
    if preference not in kernels.PREFERENCES:
        raise ValueError(f"kernels must be one of {', '.join(kernels.PREFERENCES)}, got {preference!r}")
    if preference != "auto":
        refusal = kernels.device_refusal(kernels.BY_NAME[preference], run_device)
        if refusal is not None:
            raise ValueError(f"kernels={preference} {refusal.replace('the layer', 'this run')}: use kernels=auto")
    kernels.set_small_batch_rows(container.get("kernel_small_batch_rows", kernels.DEFAULT_SMALL_BATCH_ROWS))


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    extra = [o for o in overrides if not o.startswith(("method=", "experiment=", "model="))]
    return " ".join([f"{cfg.model.name}/{cfg.method.name}", *extra])


def fit_run_name(name: str) -> str:
    """``name`` cut to what every MLflow store keeps (the full overrides are the run's tag and params)."""
    return name if len(name) <= RUN_NAME_MAX else name[: RUN_NAME_MAX - 3] + "..."


def translate_legacy_method(cfg: DictConfig) -> None:
    """A ``method.algorithm`` config (``+method.algorithm=X``, an old run's) rewritten in ``cfg`` as
    ``method.steps`` (``steps.with_steps``, which logs what it translated), so the run logs what runs."""
    if "algorithm" not in cfg.method:
        return
    translated = steps.with_steps(OmegaConf.to_container(cfg.method, resolve=True))
    with open_dict(cfg):
        cfg.method = translated


def prepare(cfg: DictConfig, overrides: list[str]) -> tuple[str, str, dict[str, str], str]:
    """Every check that needs no model, then the MLflow experiment: (experiment id, run name, tags, model path).

    Resolves ``device`` and ``model.dtype`` in ``cfg`` first (pipeline/device.py), and translates a
    legacy ``method.algorithm`` into ``method.steps``."""
    translate_legacy_method(cfg)
    run_device = device.resolve(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    method = container["method"]
    check_method(method)
    check_kernels(container, run_device)
    quantize.check_storage(container["layers"])
    check_offload(container["offload"])
    shipping.check_tracking(container["tracking"])
    evaluate.check_protocol(container["eval"], None)
    task_cfg = container["eval"]["tasks"]
    if task_cfg["names"]:
        tasks.check_arguments(
            list(task_cfg["names"]), task_cfg["limit"], task_cfg["num_fewshot"], task_cfg["batch_size"]
        )
        tasks.check_data_package()
    if container["profile"]["enabled"]:
        energy.check_config(container["profile"]["energy"])  # a forced counter this machine lacks: fail now
        profile.check_reference_mode(container["profile"])
    model_path = resolve_model_path(container["model"])
    check_fits(container["model"], container["device"])
    on_grid = published_grid.config_on_published_grid(container, model_path)
    if on_grid:
        log.warning(
            "%s sits on the grid %s's weights were published on (%s): it reproduces the checkpoint and "
            "says nothing about the method",
            method["name"],
            cfg.model.name,
            published_grid.describe(container["model"]),
        )
    experiment_id = tracking.setup(container["tracking"])
    name = cfg.tracking.run_name or run_name(cfg, list(overrides))
    tags = {
        "method": method["name"],
        "family": method["family"],
        "algorithm": steps.describe_steps(method),  # what runs, step by step; method.steps is a param
        "bits": str(method["bits"]),
        "granularity": str(method["granularity"]),
        "model": cfg.model.name,
        "overrides": " ".join(overrides),
        "on_published_grid": str(on_grid).lower(),
        **{str(k): str(v) for k, v in (container["tracking"].get("tags") or {}).items()},
    }
    return experiment_id, name, tags, model_path


def run(cfg: DictConfig, overrides: list[str] = (), log_file: Path | None = None) -> dict[str, float]:
    translate_legacy_method(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    experiment_id, name, tags, model_path = prepare(cfg, list(overrides))
    seeds = list(cfg.repeat_seeds)
    if not seeds:
        return tracked_run(cfg, experiment_id, name, tags, model_path, log_file)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeat_seeds must be distinct, got {seeds}")
    name = fit_run_name(name)
    # the parent alone carries `repeats` (the report and readers tell it from its per-seed children by it)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={**tags, "repeats": str(seeds)}) as parent:
        try:
            mlflow.log_params({**tracking.flatten(container), **tracking.provenance()})
            results = []
            # Each seed once, then the first seed again: its spread says whether a rerun is exact.
            for seed in [*seeds, seeds[0]]:
                child = cfg.copy()
                child.seed = seed
                results.append(
                    tracked_run(child, experiment_id, f"{name} seed={seed}", {**tags, "seed": str(seed)}, model_path)
                )
            aggregated = aggregate_repeats(results[:-1])
            aggregated.update(
                {f"{k}_same_seed_spread": abs(results[0][k] - results[-1][k]) for k in results[0] if k != "run_id"}
            )
            mlflow.log_metrics(aggregated)
            return {**aggregated, "run_id": parent.info.run_id}
        finally:
            if log_file is not None and log_file.exists():
                mlflow.log_artifact(str(log_file))


def aggregate_repeats(results: list[dict]) -> dict[str, float]:
    """``<metric>_mean`` and ``<metric>_std`` (sample std) over repeats, for metrics all of them have."""
    keys = set.intersection(*(set(r) for r in results)) - {"run_id"}
    out = {}
    for key in sorted(keys):
        values = torch.tensor([float(r[key]) for r in results], dtype=torch.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std()) if len(values) > 1 else 0.0
    return out


def tracked_run(
    cfg: DictConfig,
    experiment_id: str,
    name: str,
    tags: dict,
    model_path: str,
    log_file: Path | None = None,
    probe: Probe | None = None,
) -> dict[str, float]:
    """One MLflow run (nested when a parent run is active) around the stages.

    ``probe(model, tokens, reference)`` runs right after quantization (tuning prunes there).
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(cfg.seed)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=fit_run_name(name), tags=tags, nested=nested) as active:
        try:
            mlflow.log_params(
                {**tracking.flatten(container), **tracking.provenance(), "model.resolved_path": model_path}
            )
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            if cfg.model.caveat:
                mlflow.set_tag("caveat", cfg.model.caveat)
            metrics = _stages(cfg, container, model_path, probe)
            log.info("run %s finished: %s", active.info.run_id, {k: round(v, 4) for k, v in metrics.items()})
            return {**metrics, "run_id": active.info.run_id}
        finally:
            if log_file is not None and log_file.exists():
                mlflow.log_artifact(str(log_file))


def _stages(cfg: DictConfig, container: dict, model_path: str, probe: Probe | None = None) -> dict[str, float]:
    """The stages in order. Each metric is logged as soon as it exists, so a failure keeps it."""
    method, eval_cfg = container["method"], container["eval"]
    metrics: dict[str, float] = {}

    def record(new: Mapping[str, float]) -> None:
        metrics.update(new)
        mlflow.log_metrics(dict(new))

    device = container["device"]
    start = time.perf_counter()
    with peaks.stage("load", record, device):
        model, tokenizer = load_model(container["model"], device)
    record({"load_s": time.perf_counter() - start})
    bos = evaluate.resolve_bos(tokenizer, eval_cfg["bos"])
    evaluate.check_protocol(eval_cfg, getattr(model.config, "max_position_embeddings", None), bos)
    mlflow.log_params(evaluate.protocol_params(eval_cfg, bos))
    quantizing = steps.quantizes(method)
    if quantizing:
        # not kept in a variable: a reference here would keep every float layer alive through the run
        layers.check_group_size(method, layers.select_layers(model, container["layers"])[0])
        quantize.check_embeddings(model, container["layers"])
    n_params, ref_bytes = profile.parameter_footprint(model)

    tokens = evaluate.evaluation_tokens(tokenizer, eval_cfg, container["data"])
    store = reference_store.resolve_store(eval_cfg, evaluate.vocab_size(model))
    mlflow.log_param("eval.reference_store_used", store.name)
    cache = evaluate.reference_cache_path(model_path, cfg.model.dtype, eval_cfg, container["data"], bos, store)
    prompts, new_tokens = list(eval_cfg["generation"]["prompts"]), int(eval_cfg["generation"]["new_tokens"])
    start = time.perf_counter()
    with peaks.stage("reference", record, device):  # computed, or read from the cache
        reference = evaluate.load_or_compute_reference(cache, model, tokens, eval_cfg, bos, store)
        reference_extra, reference_docs = _reference_extras(cache, model, tokenizer, tokens, eval_cfg, cfg.seed, bos)
        reference_generations = _reference_generations(cache, model, tokenizer, prompts, new_tokens)
    record({"reference_s": time.perf_counter() - start})
    reference_timing = None
    if cfg.profile.enabled and quantizing:
        profile_mode = profile.reference_mode(container["profile"], ref_bytes, torch.device(device))
        mlflow.log_param("profile.reference_used", profile_mode)
        if profile_mode == "before_quantize":  # time the float model now: no second copy at the profile stage
            start = time.perf_counter()
            with peaks.stage("profile_reference", record, device):
                reference_timing = profile.time_reference(model, tokens, container["profile"])
            record({"profile_reference_s": time.perf_counter() - start})
    if quantizing:
        # Its distribution (up to eval.reference_cache_max_mb) is not needed while quantizing: it waits in
        # its cache file, not in memory, and is read back below.
        reference = None

    tracking.log_dataset(tokens, "evaluation", container["data"])
    records = quantize_stage(
        model,
        container,
        lambda: _calibration_batches(tokenizer, container["data"]),
        cfg.seed,
        cfg.kernels,
        record,
    )
    _log_layer_table(records)
    mlflow.set_tag("kept_layers", kept.describe_kept(model))  # what the method left float, and how it is stored
    record(
        {
            "dequant_layers": float(sum(r.kernel == "dequant" for r in records)),
            **profile.memory_metrics(model, n_params, ref_bytes),
            **layers.coverage_metrics(model),  # the share of the decoder that bits_per_weight covers
        }
    )
    if quantizing:
        record(shipping.tag_hash(model))
        mlflow.set_tags(export.tags(export.of_model(model)))
        reference = evaluate.read_reference(cache, tokens, eval_cfg, bos)
    if probe is not None:
        probe(model, tokens, reference)

    with peaks.stage("evaluate", record, device):
        start = time.perf_counter()
        scores = reference if not quantizing else evaluate.score(model, tokens, eval_cfg, bos, reference=reference)
        record(evaluate.compare(scores, reference, eval_cfg["ci"]))
        record({f"ref_{k}": v for k, v in reference_extra.items()})
        if prompts:
            generated = (
                generation.generate(model, tokenizer, prompts, new_tokens) if quantizing else reference_generations
            )
            mlflow.log_dict(
                generation.samples(tokenizer, prompts, generated, reference_generations), "generations.json"
            )
            record(generation.agreement(generated, reference_generations))
        docs = reference_docs
        if quantizing:
            docs = {}
            _extras(model, tokenizer, tokens, eval_cfg, cfg.seed, record, bos, docs)
        else:
            record(reference_extra)
        if "acc_avg" in metrics:
            ci = eval_cfg["ci"]
            record({"acc_drop_pct": tasks.acc_drop_pct(metrics["acc_avg"], reference_extra["acc_avg"])})
            record(tasks.acc_drop_interval(docs, reference_docs, int(ci["resamples"]), int(ci["seed"])))
            mlflow.log_param("eval.tasks.ci_method", tasks.ci_method(int(ci["resamples"]), int(ci["seed"])))
    record({"eval_s": time.perf_counter() - start})
    # the evaluate stage's figures also under the names runs have always logged
    record({"rss_start_mb": metrics["rss_start_mb/evaluate"], "peak_rss_mb": metrics["peak_rss_mb/evaluate"]})
    if cfg.profile.enabled:
        start = time.perf_counter()
        with peaks.stage("profile", record, device):
            if not quantizing:
                reference_model = model
            elif reference_timing is None:  # profile.reference resolved to reload
                reference_model = load_model(container["model"], device)[0]
            else:
                reference_model = reference_timing
            speed, energy_source = profile.profile_metrics(model, reference_model, tokens, container["profile"])
            del reference_model
        mlflow.set_tag("energy_source", energy_source)
        record(speed)
        mode = "before_quantize" if reference_timing is not None else "reload"
        mlflow.log_param("profile.ci_method", profile.ci_method(container["profile"], mode))
        record({"profile_s": time.perf_counter() - start})
    if quantizing:
        with peaks.stage("ship", record, device):
            shipped = shipping.ship(model, container, model_path, mlflow.active_run().info.run_id, metrics)
        record(shipped)
    return metrics


def _calibration_batches(tokenizer, data_cfg: dict) -> torch.Tensor:
    batches = calibration_batches(tokenizer, data_cfg)
    tracking.log_dataset(batches, "calibration", data_cfg)
    corpus = data_cfg["calibration"]["corpus"]
    if corpus == data_cfg["evaluation"]["corpus"]:  # disjoint documents, but the evaluation's domain
        log.warning("calibrating on the evaluation corpus %r (its calibration half: no shared document)", corpus)
        mlflow.set_tag("calibration", f"on the evaluation corpus {corpus} (disjoint documents)")
    return batches


def quantize_stage(
    model: torch.nn.Module,
    container: dict,
    make_batches: Callable[[], torch.Tensor],
    seed: int,
    kernels: str,
    record: Callable[[Mapping[str, float]], None],
    log_step: Callable[[int, dict], None] | None = None,
) -> list[quantize.LayerRecord]:
    """Calibrate (if the method needs it), run the method's steps in order (its model steps, e.g.
    QAT's train, here; its block and codes steps in ``quantize_model``; its finish steps, e.g. e2e,
    here again); the per-layer table.

    The one path from a config to quantized weights: a run and ``pipeline.export``'s rebuild both
    take it, so a rebuild reproduces the run's weights (and its ``weights_sha256``).
    """
    method = container["method"]
    torch.manual_seed(seed)
    selected, _ = layers.select_layers(model, container["layers"], check_coverage=steps.quantizes(method))
    stats = batches = None
    device = next(model.parameters()).device  # where it was loaded; a rebuild's config may predate `device`
    if steps.needs_calibration(method):  # False for the fp reference
        start = time.perf_counter()
        with peaks.stage("calibrate", record, device):
            batches = make_batches()
        record({"calibrate_s": time.perf_counter() - start})
    start = time.perf_counter()
    # GPTQ and AWQ calibrate block by block inside quantize_model: their forward passes count here.
    with peaks.stage("quantize", record, device):
        # the float model as loaded, for a finish step that distills from it (a second copy in memory)
        teacher = copy.deepcopy(model).eval() if steps.needs_teacher(method) else None
        prepared = _run_model_steps(model, selected, method, batches, seed, log_step)
        if prepared.metrics:
            record(prepared.metrics)
        if mlflow.active_run() is not None:  # a run's (a rebuild by pipeline.export has none to add to)
            for artifact, content in prepared.artifacts.items():
                mlflow.log_dict(content, artifact)
        act = method.get("activations")
        if act and act["mode"] == "static":  # after the model steps: ranges observed on what they left
            stats_start = time.perf_counter()
            stats = calibrate.collect_activation_stats(model, list(selected), batches, seed=seed)
            record({"activation_stats_s": time.perf_counter() - stats_start})
        del selected  # so that each float layer is freed as quantize_model replaces it
        timings: dict[str, float] = {}
        block_metrics: dict[str, float] = {}
        records = quantize.quantize_model(
            model,
            method,
            container["layers"],
            stats,
            kernels=kernels,
            calibration=batches,
            offload=container.get("offload"),  # absent from configs logged before it existed: none
            timings=timings,
            prepared=prepared,
            metrics=block_metrics,
        )
        del stats  # its activation samples; reset_peak_rss collects and trims before the eval peak
        finished = _run_finish_steps(model, teacher, method, batches, seed, log_step)
        del teacher
    record({"quantize_s": time.perf_counter() - start, **{f"quantize_s/{k}": v for k, v in timings.items()}})
    if block_metrics:
        record(block_metrics)
    if finished.metrics:
        record(finished.metrics)
    return records


def _extras(model, tokenizer, tokens, eval_cfg: dict, seed: int, record, bos: int | None, docs: dict) -> None:
    """Context-length perplexity and zero-shot tasks, each only if configured, handed to ``record``;
    the tasks' per-document scores go to ``docs``."""
    if eval_cfg["context_lengths"]:
        per_batch = int(eval_cfg["batch_size"]) * int(eval_cfg["context"])
        record(evaluate.perplexity_by_context(model, tokens, list(eval_cfg["context_lengths"]), per_batch, bos))
    task_cfg = eval_cfg["tasks"]
    if task_cfg["names"]:
        tasks.evaluate_tasks(
            model,
            tokenizer,
            list(task_cfg["names"]),
            task_cfg["limit"],
            int(task_cfg["num_fewshot"]),
            int(task_cfg["batch_size"]),
            seed,
            on_task=record,
            per_document=docs,
        )


def _reference_extras(
    cache: Path, model, tokenizer, tokens, eval_cfg: dict, seed: int, bos: int | None
) -> tuple[dict[str, float], dict]:
    """The reference's extras and its per-document task scores, cached per (reference cache, extras config)."""
    if not eval_cfg["context_lengths"] and not eval_cfg["tasks"]["names"]:
        return {}, {}
    key = {"ctx": eval_cfg["context_lengths"], "tasks": eval_cfg["tasks"], "seed": seed, "per_document": True}
    path = _beside(cache, "extras", key)

    def compute() -> dict:
        out: dict[str, float] = {}
        docs: dict = {}
        _extras(model, tokenizer, tokens, eval_cfg, seed, out.update, bos, docs)
        return {"metrics": out, "per_document": docs}

    cached = evaluate.cached_json(path, compute)
    return cached["metrics"], cached["per_document"]


def _reference_generations(cache: Path, model, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """The reference's greedy generations (token ids), cached per (reference cache, prompts, length)."""
    if not prompts:
        return []
    path = _beside(cache, "generations", {"prompts": prompts, "new_tokens": new_tokens})
    return evaluate.cached_json(path, lambda: generation.generate(model, tokenizer, prompts, new_tokens))


def _beside(cache: Path, kind: str, key: dict) -> Path:
    """A JSON cache next to the reference logits, named by what it was computed from."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache.with_name(f"{cache.stem}-{kind}-{digest}.json")


def _run_finish_steps(model, teacher, method: dict, batches, seed: int, log_step: Callable | None) -> steps.ModelResult:
    """The method's finish steps in order (e2e): they change the packed layers' stored values."""
    result = steps.ModelResult()
    context = steps.FinishContext(
        model=model,
        teacher=teacher,
        method=method,
        batches=batches,
        seed=seed,
        log_step=log_step or (lambda step, m: mlflow.log_metrics(m, step=step)),
    )
    for step in steps.method_steps(method):
        if isinstance(step, steps.FinishStep):
            result.metrics.update(step.run(context).metrics)
    return result


def _run_model_steps(
    model,
    selected: dict,
    method: dict,
    batches,
    seed: int,
    log_step: Callable | None,
) -> steps.ModelResult:
    """The method's model steps in order (QAT's train): they change the float model before quantization."""
    result = steps.ModelResult()
    model_steps = [s for s in steps.method_steps(method) if isinstance(s, steps.ModelStep)]
    if not model_steps:
        return result
    context = steps.ModelContext(
        model=model,
        selected=selected,
        method=method,
        spec=quantize.weight_spec(method),
        batches=batches,
        seed=seed,
        log_step=log_step or (lambda step, m: mlflow.log_metrics(m, step=step)),
    )
    for step in model_steps:
        ran = step.run(context)
        result.metrics.update(ran.metrics)
        result.fixed_grid_layers |= ran.fixed_grid_layers
        result.input_scales.update(ran.input_scales)
        result.layer_overrides += ran.layer_overrides
        result.artifacts.update(ran.artifacts)
    return result


def _log_layer_table(records: list[quantize.LayerRecord]) -> None:
    rows = [r.as_dict() for r in records]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    mlflow.log_table(columns, "layers.json")
    used = sorted({r.kernel for r in records if r.kernel})
    mlflow.set_tag("kernels", ",".join(used) or "none")
