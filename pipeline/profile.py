"""Profile stage: memory as stored, and speed as a ratio to the reference in the same process.

Memory counts every weight the model keeps: packed codes, scales, zero points and biases of
quantized layers plus all other parameters (tied tensors once). Kernel-specific layouts that a
layer builds for speed are reported apart, as ``kernel_cache_bytes``.

Speed: a prefill of ``prompt_tokens`` then ``decode_tokens`` greedy steps with a KV cache, with
``threads`` threads, ``repeats`` times after warm-up. Each repeat times the reference, the quantized
model, then the reference again (A, Q, B). Per repeat, the paired ratio is mean(A, B) / Q (the
reference on both sides cancels a linear drift) and the noise ratio is A / B (the reference against
itself). ``speedup_vs_ref`` is the median paired ratio; ``*_ci_low/high`` its 95% Student-t interval
over repeats (on logs; needs ``repeats >= 2``); ``speed_noise_pct`` = 100 * |median(A / B) - 1|, what
the reference reads against itself in the same process; ``speedup_is_win`` = 1.0 only when the
interval's low end clears 1 + that noise. Times are medians over repeats.

``profile_metrics`` adds what the same windows used (``usage_metrics``: CPU seconds always, energy
from a counter or, labelled ``_est``, an estimate; ``pipeline.energy``), the decode's
memory-bandwidth floor (``floor_metrics``; ``pipeline.bandwidth``) and the cost per million tokens
(``cost_metrics``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from pipeline import bandwidth, energy, stats
from pipeline.cost import usd_per_1m_tokens
from pipeline.device import module_device, torch_threads
from pipeline.generation import CompiledDecoder, Generation, greedy
from pipeline.layers import embedding_modules, storage_ptr
from pipeline.progress import progress
from pipeline.quant.embedding import QuantEmbedding
from pipeline.quant.linear import QuantLinear

log = logging.getLogger(__name__)


def _unique_parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    seen = set()
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            yield p


def _stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """What one module stores of the model's weights: a quantized layer's buffers (packed codes, scales,
    zero points, bias, low-rank factors...), any other module's own parameters."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return list(module.buffers(recurse=False))
    return list(module.parameters(recurse=False))


def _bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the tensors not counted yet (a tied or shared tensor once, by its data pointer)."""
    total = 0
    for t in tensors:
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _table_numel(module: nn.Module) -> int:
    if isinstance(module, QuantLinear):
        return module.out_features * module.in_features
    if isinstance(module, QuantEmbedding):
        return module.num_embeddings * module.embedding_dim
    return module.weight.numel()


def memory_metrics(model: nn.Module, reference_param_count: int, reference_bytes: int) -> dict[str, float]:
    """Memory as stored, against fp16 and against the reference as loaded (``reference_*``: its weight
    count and bytes, ``parameter_footprint``).

    Everything stored counts, each tensor once, in its real dtype: ``embedding_bytes`` (input
    embedding and lm_head, float or quantized; a tied table once), ``quantized_bytes`` (the layers the
    method quantized: codes, scales, zero points, biases, low-rank factors) and ``kept_bytes`` (the
    rest: norms, excluded layers, ...), which sum to ``weight_bytes``. ``bits_per_weight`` and
    ``layers_reduction_vs_fp16_pct`` are over the method's quantized layers (embeddings aside);
    ``mem_reduction_vs_fp16_pct`` over the whole model.
    """
    embeddings = embedding_modules(model).modules()
    seen: set[int] = set()
    embedding_bytes = _bytes([t for m in embeddings for t in _stored_tensors(m)], seen)
    embedding_weights = sum({storage_ptr(m): _table_numel(m) for m in embeddings}.values())  # tied once
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear) and not any(m is e for e in embeddings)]
    quant_bytes = _bytes([t for m in qlayers for t in _stored_tensors(m)], seen)
    quant_weights = sum(m.in_features * m.out_features for m in qlayers)
    kept_bytes = _bytes([t for m in model.modules() for t in _stored_tensors(m)], seen)
    weight_bytes = embedding_bytes + quant_bytes + kept_bytes
    metrics = {
        "weight_bytes": float(weight_bytes),
        "weight_mb": weight_bytes / 2**20,
        "embedding_bytes": float(embedding_bytes),
        "quantized_bytes": float(quant_bytes),
        "kept_bytes": float(kept_bytes),
        "bits_per_weight_model": 8 * weight_bytes / reference_param_count,
        "compression_ratio": reference_bytes / weight_bytes,
        "mem_reduction_vs_fp16_pct": 100 * (1 - weight_bytes / (2 * reference_param_count)),
        "kernel_cache_bytes": float(sum(m.kernel_cache_bytes for m in model.modules() if isinstance(m, QuantLinear))),
        "quantized_layers": float(len(qlayers)),
    }
    if embedding_weights:
        metrics["embedding_bits_per_weight"] = 8 * embedding_bytes / embedding_weights
    # Over quantized layers; a model with none reports its parameters' own width.
    if quant_weights:
        metrics["bits_per_weight"] = 8 * quant_bytes / quant_weights
    else:
        metrics["bits_per_weight"] = 8 * weight_bytes / reference_param_count
    # The article's "memory reduction" is against FP16; over quantized layers it isolates the method
    # from what the method leaves alone (the embeddings, norms).
    metrics["layers_reduction_vs_fp16_pct"] = 100 * (1 - metrics["bits_per_weight"] / 16)
    return metrics


def parameter_footprint(model: nn.Module) -> tuple[int, int]:
    """(number of weights, bytes) of a float model, tied tensors counted once."""
    params = list(_unique_parameters(model))
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


# -- peak RSS -----------------------------------------------------------------------------------
_CLEAR_REFS = Path("/proc/self/clear_refs")


def release_freed_memory() -> bool:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without it the allocator keeps what earlier stages, or earlier runs of a multirun, freed, and a
    peak measured from there counts it: ptq_static's evaluation started from 6.9 GB of RSS left by
    its calibration (1.4 GB with the trim), and weight_only run after it in the same multirun
    reported a 7.2 GB peak (4.1 GB with the trim). False where the C library has no ``malloc_trim``.
    """
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def reset_peak_rss() -> float:
    """Linux: release freed memory, then reset this process's high-water mark (writing 5 to
    clear_refs resets VmHWM). Returns the RSS the measurement starts from, in MB."""
    if not _CLEAR_REFS.exists():
        raise RuntimeError("peak RSS measurement needs Linux /proc/self/clear_refs")
    if not release_freed_memory():
        log.warning("no malloc_trim in this C library: peak RSS may include memory freed before the stage")
    _CLEAR_REFS.write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


# -- speed --------------------------------------------------------------------------------------
REFERENCE_MODES = ("auto", "reload", "before_quantize")
# auto reloads the float model for interleaved timing when its weights take at most this share of the
# device's total memory (a machine property, so the same config on the same machine picks the same way)
RELOAD_MAX_SHARE = 0.25


def check_reference_mode(cfg: Mapping) -> None:
    if cfg["reference"] not in REFERENCE_MODES:
        raise ValueError(f"profile.reference must be one of {', '.join(REFERENCE_MODES)}, got {cfg['reference']!r}")


def reference_mode(cfg: Mapping, float_bytes: int, device: torch.device) -> str:
    """``profile.reference`` resolved: ``reload`` (a second float model, timed interleaved with the
    quantized one: paired) or ``before_quantize`` (the model itself timed before it is quantized: no
    second copy, unpaired). ``auto`` reloads when the float weights fit ``RELOAD_MAX_SHARE`` of the
    device's total memory."""
    check_reference_mode(cfg)
    if cfg["reference"] != "auto":
        return cfg["reference"]
    total = (
        torch.cuda.get_device_properties(device).total_memory
        if device.type == "cuda"
        else psutil.virtual_memory().total
    )
    return "reload" if float_bytes <= RELOAD_MAX_SHARE * total else "before_quantize"


@dataclass
class ReferenceTiming:
    """The float model's timings, taken before quantization (``profile.reference=before_quantize``):
    per batch, ``runs`` (``ref_a`` and ``ref_b``, back to back per repeat), ``compiled`` (the same,
    decode seconds of the compiled loop, and ``compile_s``), and the bytes a decode step reads."""

    runs: dict[int, dict[str, list[Generation]]]
    compiled: dict[int, dict[str, list[float] | float]]
    settle_runs: dict[int, int]
    bytes_read_per_token: int


def profile_metrics(
    model: nn.Module, reference: nn.Module | ReferenceTiming, tokens: torch.Tensor, cfg: Mapping
) -> tuple[dict[str, float], str]:
    """The profile stage's numbers and the ``energy_source`` tag: the memory bandwidth, speed with CPU time
    and energy over the same windows, the bandwidth floor of decode and the cost per token.

    ``reference``: the float model (timed interleaved), or its ``ReferenceTiming`` from before quantization."""
    meter = energy.meter_for(model, cfg["energy"])
    with torch_threads(int(cfg["threads"])):  # the floor's bandwidth with the decode's thread count
        gb_s = bandwidth.read_bandwidth_gb_s(
            int(cfg["bandwidth"]["buffer_mb"]), int(cfg["bandwidth"]["repeats"]), module_device(model)
        )
    metrics = speed_metrics(model, reference, tokens, cfg, meter)
    batches = list(cfg["batch_sizes"])
    ref_bytes = (
        reference.bytes_read_per_token
        if isinstance(reference, ReferenceTiming)
        else bandwidth.bytes_read_per_token(reference)
    )
    metrics |= floor_metrics(metrics, batches, gb_s, bandwidth.bytes_read_per_token(model), ref_bytes)
    metrics |= cost_metrics(metrics, batches, float(cfg["cost"]["usd_per_hour"]))
    return metrics, meter.source


def _suffix(batch: int) -> str:
    return "" if batch == 1 else f"_b{batch}"


def floor_metrics(
    speed: Mapping[str, float], batch_sizes: list[int], gb_s: float, bytes_read: int, bytes_read_ref: int
) -> dict[str, float]:
    """``mem_bandwidth_gb_s``, ``decode_bytes_per_token``, ``decode_floor_ms`` (the time to read them) and,
    per batch, ``decode_vs_floor`` = measured ms per decode step / floor (a step reads the weights once at
    any batch); each with ``_ref`` for the reference."""
    out = {"mem_bandwidth_gb_s": gb_s}
    for tag, n_bytes in (("", bytes_read), ("_ref", bytes_read_ref)):
        floor = bandwidth.floor_ms(n_bytes, gb_s)
        out |= {f"decode_bytes_per_token{tag}": float(n_bytes), f"decode_floor_ms{tag}": floor}
        for batch in batch_sizes:
            step_ms = 1000 * batch / speed[f"decode_tok_s{tag}{_suffix(batch)}"]
            out[f"decode_vs_floor{tag}{_suffix(batch)}"] = step_ms / floor
    return out


def cost_metrics(speed: Mapping[str, float], batch_sizes: list[int], usd_per_hour: float) -> dict[str, float]:
    """``usd_per_1m_tokens`` (and ``_ref``) per batch: the machine's price over the measured decode throughput."""
    names = [f"{tag}{_suffix(batch)}" for batch in batch_sizes for tag in ("", "_ref")]
    return {f"usd_per_1m_tokens{n}": usd_per_1m_tokens(usd_per_hour, speed[f"decode_tok_s{n}"]) for n in names}


def _check_timing(cfg: Mapping) -> tuple[int, int, int, int]:
    """(prompt_tokens, decode_tokens, warmup, repeats) of ``profile``."""
    repeats = int(cfg["repeats"])
    if repeats < 1:
        raise ValueError(f"profile.repeats must be at least 1 (2 or more for intervals), got {repeats}")
    if repeats < 2:
        log.warning("profile.repeats=1: speed-ups are logged without intervals or a win/noise verdict")
    return int(cfg["prompt_tokens"]), int(cfg["decode_tokens"]), int(cfg["warmup"]), repeats


def _prompt(tokens: torch.Tensor, batch: int, prompt_len: int) -> torch.Tensor:
    if tokens.numel() < batch * prompt_len:
        raise ValueError(f"profile needs {batch * prompt_len} prompt tokens, only {tokens.numel()} available")
    return tokens[: batch * prompt_len].reshape(batch, prompt_len)


def _timed(
    order: list[tuple[str, nn.Module]], prompt: torch.Tensor, cfg: Mapping, meter: energy.Meter | None, label: str
) -> dict[str, list[Generation]]:
    """Each model of ``order`` in turn per repeat (after ``warmup`` untimed repeats): their generations."""
    _, decode_tokens, warmup, repeats = _check_timing(cfg)
    runs: dict[str, list[Generation]] = {key: [] for key, _ in order}
    for i in progress(range(warmup + repeats), label, "repeat"):
        for key, m in order:
            run = greedy(m, prompt, decode_tokens + 1, meter)[0]  # decode_tokens steps after the prefill's token
            if i >= warmup:
                runs[key].append(run)
    return runs


def _settle(model: nn.Module, prompt: torch.Tensor, cfg: Mapping) -> int | None:
    """Warm an idle GPU up before timing on it (``settle``); None on a CPU."""
    if module_device(model).type != "cuda":
        return None
    return settle(model, prompt, int(cfg["decode_tokens"]), cfg["settle"])


def time_reference(reference: nn.Module, tokens: torch.Tensor, cfg: Mapping) -> ReferenceTiming:
    """``profile.reference=before_quantize``: time the float model now, reference A then B per repeat,
    so that the profile stage needs no second copy of it once the model is quantized."""
    meter = energy.meter_for(reference, cfg["energy"])
    prompt_len = _check_timing(cfg)[0]
    timing = ReferenceTiming({}, {}, {}, bandwidth.bytes_read_per_token(reference))
    with torch_threads(int(cfg["threads"])):
        for batch in cfg["batch_sizes"]:
            prompt = _prompt(tokens, batch, prompt_len)
            settled = _settle(reference, prompt, cfg)
            if settled is not None:
                timing.settle_runs[batch] = settled
            order = [("ref_a", reference), ("ref_b", reference)]
            timing.runs[batch] = _timed(
                order, prompt, cfg, meter, f"profile batch {batch}: reference before quantizing"
            )
            if cfg.get("compiled"):
                timing.compiled[batch] = _compiled_times({"ref": reference}, ["ref_a", "ref_b"], prompt, cfg)
    return timing


def speed_metrics(
    model: nn.Module,
    reference: nn.Module | ReferenceTiming,
    tokens: torch.Tensor,
    cfg: Mapping,
    meter: energy.Meter | None = None,
) -> dict[str, float]:
    """Speed against the reference per batch size: interleaved A, Q, B per repeat (module docstring) when
    ``reference`` is a model; against its timings from before quantization when it is a ``ReferenceTiming``
    (then ``Q`` is timed alone now, and the ratios are unpaired: the two were timed minutes apart).

    For each batch (suffix ``""`` at 1, ``_b<batch>`` otherwise): ``prefill_ms``, ``decode_tok_s``
    and the reference's (``_ref``), ``speedup_vs_ref`` (decode) and ``prefill_speedup_vs_ref`` with
    ``_ci_low``/``_ci_high``, ``speed_noise_pct``/``prefill_speed_noise_pct`` and
    ``speedup_is_win``/``prefill_speedup_is_win``. With a ``meter``, also CPU time and energy per
    token over the same windows (``usage_metrics``).
    """
    prompt_len, decode_tokens, _, _ = _check_timing(cfg)
    before = reference if isinstance(reference, ReferenceTiming) else None
    metrics = {}
    with torch_threads(int(cfg["threads"])):
        for batch in cfg["batch_sizes"]:
            prompt = _prompt(tokens, batch, prompt_len)
            suffix = _suffix(batch)
            if before is None:
                settled = _settle(reference, prompt, cfg)  # an idle GPU clocks down: time it once it is up
                order = [("ref_a", reference), ("quant", model), ("ref_b", reference)]
                runs = _timed(order, prompt, cfg, meter, f"profile batch {batch}: repeats (ref, model, ref)")
            else:
                settled = _settle(model, prompt, cfg)
                if batch in before.settle_runs:
                    metrics[f"settle_runs_ref{suffix}"] = float(before.settle_runs[batch])
                quant = _timed([("quant", model)], prompt, cfg, meter, f"profile batch {batch}: repeats (model)")
                runs = {**before.runs[batch], **quant}
            if settled is not None:
                metrics[f"settle_runs{suffix}"] = float(settled)
            metrics |= _speed_from_runs(runs, batch * decode_tokens, suffix)
            if meter is not None:
                metrics |= usage_metrics(runs, batch * decode_tokens, batch * prompt_len, suffix, meter)
            if cfg.get("compiled"):
                if before is None:
                    times = _compiled_times(
                        {"ref": reference, "quant": model}, ["ref_a", "quant", "ref_b"], prompt, cfg
                    )
                else:
                    times = {**before.compiled[batch], **_compiled_times({"quant": model}, ["quant"], prompt, cfg)}
                metrics |= compiled_metrics(times, batch * decode_tokens, suffix)
    return metrics


def _speed_from_runs(runs: Mapping[str, list[Generation]], decoded: int, suffix: str) -> dict[str, float]:
    """Throughput, prefill time and the speed-up ratios of ``runs`` (ref_a, quant, ref_b per repeat)."""
    metrics = {}
    timings = {key: [(r.prefill_s, r.decode_s) for r in value] for key, value in runs.items()}
    for phase, prefix in ((1, ""), (0, "prefill_")):
        ref_a = [t[phase] for t in timings["ref_a"]]
        ref_b = [t[phase] for t in timings["ref_b"]]
        quant = [t[phase] for t in timings["quant"]]
        ref = [(a + b) / 2 for a, b in zip(ref_a, ref_b, strict=True)]
        if phase == 1:
            metrics[f"decode_tok_s{suffix}"] = decoded / statistics.median(quant)
            metrics[f"decode_tok_s_ref{suffix}"] = decoded / statistics.median(ref)
        else:
            metrics[f"prefill_ms{suffix}"] = 1000 * statistics.median(quant)
            metrics[f"prefill_ms_ref{suffix}"] = 1000 * statistics.median(ref)
        metrics |= _ratio_metrics(
            f"{prefix}speedup_vs_ref{suffix}",
            f"{prefix}speed_noise_pct{suffix}",
            f"{prefix}speedup_is_win{suffix}",
            ref_a,
            quant,
            ref_b,
        )
    return metrics


def _compiled_times(
    models: Mapping[str, nn.Module], order: list[str], prompt: torch.Tensor, cfg: Mapping
) -> dict[str, list[float] | float]:
    """Decode seconds of a static-KV-cache, compiled loop (``CompiledDecoder``; on a GPU with CUDA graphs,
    ``mode="reduce-overhead"``) per key of ``order`` (``ref_a``/``ref_b`` time ``models["ref"]``) and
    repeat, and each model's first-call compile seconds (``compile_s`` / ``compile_s_ref``)."""
    _, decode_tokens, warmup, repeats = _check_timing(cfg)
    first = next(iter(models.values()))
    mode = "reduce-overhead" if module_device(first).type == "cuda" else None
    length, new_tokens = prompt.shape[1] + decode_tokens + 1, decode_tokens + 1
    decoders = {key: CompiledDecoder(m, prompt.shape[0], length, mode) for key, m in models.items()}
    for decoder in decoders.values():
        decoder(prompt, new_tokens)  # compiles
    times: dict[str, list[float] | float] = {key: [] for key in order}
    for i in progress(range(warmup + repeats), f"profile batch {prompt.shape[0]}, compiled: repeats", "repeat"):
        for key in order:
            decode_s = decoders["quant" if key == "quant" else "ref"](prompt, new_tokens)[0].decode_s
            if i >= warmup:
                times[key].append(decode_s)
    for key, decoder in decoders.items():
        times["compile_s" if key == "quant" else "compile_s_ref"] = decoder.compile_s
    return times


def compiled_metrics(times: Mapping[str, list[float] | float], decoded: int, suffix: str) -> dict[str, float]:
    """From ``_compiled_times``: ``decode_tok_s_compiled`` and ``_ref_compiled``, ``speedup_vs_ref_compiled``
    with its interval, noise and win, and ``compile_s`` / ``compile_s_ref`` (each with the batch suffix)."""
    ref = [(a + b) / 2 for a, b in zip(times["ref_a"], times["ref_b"], strict=True)]
    return {
        f"decode_tok_s_compiled{suffix}": decoded / statistics.median(times["quant"]),
        f"decode_tok_s_ref_compiled{suffix}": decoded / statistics.median(ref),
        f"compile_s{suffix}": times["compile_s"],
        f"compile_s_ref{suffix}": times["compile_s_ref"],
        **_ratio_metrics(
            f"speedup_vs_ref_compiled{suffix}",
            f"speed_noise_pct_compiled{suffix}",
            f"speedup_is_win_compiled{suffix}",
            times["ref_a"],
            times["quant"],
            times["ref_b"],
        ),
    }


def settle(model: nn.Module, prompt: torch.Tensor, decode_tokens: int, settle_cfg: Mapping) -> int:
    """Decode until two successive runs agree within ``tolerance_pct`` (at least ``min_s`` seconds of
    warm-up, at most ``max_s``): a GPU that was idle clocks up over a second or more (an idle H200 reads
    345 MHz, and a short warm-up read bf16 at 16 tok/s instead of 48). Returns the runs it took; logs
    whether it settled."""
    tolerance, min_s, max_s = (float(settle_cfg[k]) for k in ("tolerance_pct", "min_s", "max_s"))
    start, runs, last = time.perf_counter(), 0, None
    while True:
        now = greedy(model, prompt, decode_tokens + 1)[0].decode_s
        runs += 1
        elapsed = time.perf_counter() - start
        agreed = last is not None and abs(now / last - 1) * 100 <= tolerance
        if (agreed and elapsed >= min_s) or elapsed >= max_s:
            how = "settled" if agreed else f"did NOT settle within {max_s:.0f} s"
            log.info(
                "profile warm-up %s after %d runs (%.1f s; last two decodes %.4f s, %.4f s)",
                how,
                runs,
                elapsed,
                last or now,
                now,
            )
            return runs
        last = now


def usage_metrics(
    runs: Mapping[str, list[Generation]], decode_tokens: int, prefill_tokens: int, suffix: str, meter: energy.Meter
) -> dict[str, float]:
    """CPU seconds and energy per token over the timed windows of ``runs`` (ref_a, quant, ref_b per repeat).

    Per phase (``""`` decode per generated token, ``prefill_`` per prompt token): ``cpu_s_per_token``
    / ``cpu_s_per_prefill_token`` and ``_ref``, with ``cpu_saving_vs_ref`` (ref / model, intervals and
    noise as for the speed-up). Measured energy (a counter): ``energy_j_per_token``,
    ``energy_j_per_prefill_token``, ``_ref``, ``energy_saving_vs_ref``. Without a counter only the
    estimate, under its own names: ``energy_j_per_token_est`` (= CPU seconds * watts per core) and
    ``energy_j_per_prefill_token_est``, ``_ref`` after ``_est``; its ratio would be the CPU ratio.
    """
    out = {}
    for phase, count, per in (("decode", decode_tokens, "token"), ("prefill", prefill_tokens, "prefill_token")):
        prefix = "" if phase == "decode" else "prefill_"
        usage = {key: [getattr(r, f"{phase}_usage") for r in value] for key, value in runs.items()}
        keys = ("ref_a", "quant", "ref_b")
        quantities = [("cpu_s", "cpu", [[u.cpu_s for u in usage[k]] for k in keys])]
        if meter.measured:
            quantities.append(("energy_j", "energy", [[u.energy_j for u in usage[k]] for k in keys]))
        for unit, ratio_name, (ref_a, quant, ref_b) in quantities:
            ref = [(a + b) / 2 for a, b in zip(ref_a, ref_b, strict=True)]
            model_value, ref_value = statistics.median(quant) / count, statistics.median(ref) / count
            out[f"{unit}_per_{per}{suffix}"] = model_value
            out[f"{unit}_per_{per}_ref{suffix}"] = ref_value
            if unit == "cpu_s" and not meter.measured:
                out[f"energy_j_per_{per}_est{suffix}"] = model_value * meter.watts_per_core
                out[f"energy_j_per_{per}_est_ref{suffix}"] = ref_value * meter.watts_per_core
            if min(quant) <= 0 or min(ref_b) <= 0:
                # A counter that did not move in a window (too short for its resolution): no ratio to take.
                log.warning("%s%s: a window read no %s; no %s ratio", phase, suffix, unit, ratio_name)
                continue
            out |= _ratio_metrics(
                f"{prefix}{ratio_name}_saving_vs_ref{suffix}",
                f"{prefix}{ratio_name}_noise_pct{suffix}",
                f"{prefix}{ratio_name}_saving_is_win{suffix}",
                ref_a,
                quant,
                ref_b,
            )
    return out


def _ratio_metrics(
    name: str, noise_name: str, win_name: str, ref_a: list[float], quant: list[float], ref_b: list[float]
) -> dict[str, float]:
    """From per-repeat costs (seconds, CPU seconds, joules): ``name`` = median of mean(A, B) / model, its
    interval, ``noise_name`` (the reference against itself, A / B) and ``win_name``."""
    paired = [(a + b) / 2 / q for a, q, b in zip(ref_a, quant, ref_b, strict=True)]
    self_ratios = [a / b for a, b in zip(ref_a, ref_b, strict=True)]
    noise = abs(statistics.median(self_ratios) - 1.0)
    out = {name: statistics.median(paired), noise_name: 100.0 * noise}
    if len(paired) >= 2:
        low, high = stats.log_ratio_t_interval(paired)
        out |= {f"{name}_ci_low": low, f"{name}_ci_high": high, win_name: 1.0 if low > 1.0 + noise else 0.0}
    return out


def ci_method(cfg: Mapping, mode: str = "reload") -> str:
    """How the speed-ups and their intervals were taken under the resolved ``profile.reference`` ``mode``."""
    tail = (
        "95% Student-t interval on the log ratios; noise = |median(ref A / ref B) - 1|; a win needs ci_low > 1 + noise"
    )
    if mode == "before_quantize":
        return (
            f"unpaired: reference A, B back to back per repeat before quantizing, the model alone after; speed-up = "
            f"median over {cfg['repeats']} repeats of mean(ref)/model matched by repeat index; {tail}"
        )
    return (
        f"per repeat: reference, model, reference; speed-up = median of mean(ref)/model over {cfg['repeats']} repeats, "
        f"{tail}"
    )
