"""Where one decoded token's time goes: the embedded model, quantized by a method preset, under torch.profiler.

    python -m benchmarks.decode_profile [method=group_wise] [any Hydra override ...]

Quantizes as ``python -m pipeline`` would (same config; calibration when the method needs it),
prefills ``profile.prompt_tokens`` tokens and profiles ``profile.decode_tokens`` decode steps at batch 1
on ``profile.threads`` threads after a warm-up, and prints: milliseconds per token (the profiler adds
overhead), the share spent inside quantized layers' forwards and the lm_head, the share outside any
operator (Python, module dispatch), and the top operators by self time. Prints only; nothing is logged.
"""

from __future__ import annotations

import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import DynamicCache

from pipeline import calibrate, layers, quantize
from pipeline.data import calibration_batches
from pipeline.device import torch_threads
from pipeline.evaluate import evaluation_tokens
from pipeline.generation import greedy
from pipeline.load import load_model
from pipeline.quant.linear import QuantLinear
from pipeline.steps import needs_calibration
from pipeline.tune import CONF


def _label_forwards(model: torch.nn.Module) -> None:
    """Wrap quantized layers' and the lm_head's forwards in profiler ranges."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, QuantLinear) or module is head:
            label = "lm_head" if module is head else f"QuantLinear[{module.kernel}]"
            forward = module.forward

            def labelled(*args, _forward=forward, _label=label, **kwargs):
                with record_function(_label):
                    return _forward(*args, **kwargs)

            module.forward = labelled


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    torch.manual_seed(cfg["seed"])
    method = cfg["method"]
    model, tokenizer = load_model(cfg["model"])
    stats = batches = None
    if needs_calibration(method):
        batches = calibration_batches(tokenizer, cfg["data"])
        act = method.get("activations")
        if act and act["mode"] == "static":
            selected, _ = layers.select_layers(model, cfg["layers"])
            stats = calibrate.collect_activation_stats(model, list(selected), batches, seed=cfg["seed"])
    quantize.quantize_model(model, method, cfg["layers"], stats, kernels=cfg["kernels"], calibration=batches)
    _label_forwards(model)
    prompt = evaluation_tokens(tokenizer, cfg["eval"], cfg["data"])[: cfg["profile"]["prompt_tokens"]][None]
    steps = int(cfg["profile"]["decode_tokens"])
    with torch_threads(int(cfg["profile"]["threads"])), torch.no_grad():
        greedy(model, prompt, steps + 1)  # warm-up
        # greedy's loop, with only the decode steps under the profiler
        cache = DynamicCache(config=model.config)
        next_ids = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                next_ids = model(input_ids=next_ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            wall_ms = 1000 * (time.perf_counter() - start)
    events = prof.key_averages()
    labelled = {e.key: e for e in events if e.key.startswith(("QuantLinear[", "lm_head"))}
    print(f"{method['name']}: {wall_ms / steps:.2f} ms/token over {steps} decode steps (under the profiler)")
    for label, event in sorted(labelled.items()):
        print(
            f"  inside {label}: {100 * event.cpu_time_total / 1000 / wall_ms:.1f}% ({event.count // steps} calls/token)"
        )
    op_ms = sum(e.self_cpu_time_total for e in events if e.key not in labelled) / 1000
    print(f"  outside any operator (Python, module dispatch): {100 * (1 - op_ms / wall_ms):.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main(sys.argv[1:])
