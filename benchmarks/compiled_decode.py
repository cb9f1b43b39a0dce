"""Eager vs compiled decode (static KV cache + torch.compile), float reference vs a quantized model.

    python -m benchmarks.compiled_decode [method=group_wise] [profile.repeats=5] [any Hydra override ...]

Loads the model twice (the reference as loaded, and one quantized as ``python -m pipeline`` would),
builds a ``CompiledDecoder`` for each (the compile time is reported), then per repeat decodes
``profile.decode_tokens`` tokens after a ``profile.prompt_tokens`` prompt at batch 1 with each of
the four (reference / model x eager / compiled), in that order, on ``profile.threads`` threads.
Ratios are taken per repeat and summarized as the median with a 95% Student-t interval on the logs
(``pipeline.stats``), as the profile stage does. Compiled and eager generations must agree token for
token (checked). Writes experiments/compiled_decode/README.md (``--out`` to change) and prints it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import calibrate, device, layers, quantize, stats, steps, tracking
from pipeline.data import calibration_batches
from pipeline.device import torch_threads
from pipeline.evaluate import evaluation_tokens
from pipeline.generation import CompiledDecoder, greedy
from pipeline.load import load_model
from pipeline.tune import CONF

OUT = Path(__file__).resolve().parents[1] / "experiments" / "compiled_decode" / "README.md"


def _quantized(cfg: dict) -> torch.nn.Module:
    method = cfg["method"]
    model, tokenizer = load_model(cfg["model"], cfg["device"])
    stats_ = batches = None
    if steps.needs_calibration(method):
        batches = calibration_batches(tokenizer, cfg["data"])
        act = method.get("activations")
        if act and act["mode"] == "static":
            selected, _ = layers.select_layers(model, cfg["layers"])
            stats_ = calibrate.collect_activation_stats(model, list(selected), batches, seed=cfg["seed"])
    quantize.quantize_model(model, method, cfg["layers"], stats_, kernels=cfg["kernels"], calibration=batches)
    return model


def _interval(ratios: list[float]) -> str:
    low, high = stats.log_ratio_t_interval(ratios)
    return f"{statistics.median(ratios):.2f}x [{low:.2f}, {high:.2f}]"


def main(args: list[str]) -> None:
    out = OUT
    if "--out" in args:
        i = args.index("--out")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2 :]
    overrides = args or ["method=group_wise"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose("config", overrides=overrides)
    device.resolve(composed)
    cfg = OmegaConf.to_container(composed, resolve=True)
    torch.manual_seed(cfg["seed"])
    prof = cfg["profile"]
    reference, tokenizer = load_model(cfg["model"], cfg["device"])
    model = _quantized(cfg)
    new_tokens, repeats = int(prof["decode_tokens"]) + 1, int(prof["repeats"])
    prompt = evaluation_tokens(tokenizer, cfg["eval"], cfg["data"])[: int(prof["prompt_tokens"])][None]
    mode = "reduce-overhead" if cfg["device"].startswith("cuda") else None
    names = ("ref eager", "ref compiled", "model eager", "model compiled")
    decode_s: dict[str, list[float]] = {n: [] for n in names}
    with torch_threads(int(prof["threads"])):
        runners = {"ref eager": lambda p: greedy(reference, p, new_tokens)[0]}
        runners["model eager"] = lambda p: greedy(model, p, new_tokens)[0]
        compiled = {}
        for name, m in (("ref compiled", reference), ("model compiled", model)):
            compiled[name] = CompiledDecoder(m, 1, prompt.shape[1] + new_tokens, mode)
            first = compiled[name](prompt, new_tokens)[0]  # compiles
            runners[name] = lambda p, d=compiled[name]: d(p, new_tokens)[0]
            eager = runners[name.replace("compiled", "eager")](prompt)
            if first.tokens != eager.tokens:
                raise AssertionError(f"{name}: compiled decode {first.tokens} != eager {eager.tokens}")
        for _ in range(int(prof["warmup"])):
            for name in names:
                runners[name](prompt)
        for _ in range(repeats):
            for name in names:
                decode_s[name].append(runners[name](prompt).decode_s)
    steps = new_tokens - 1
    ms = {n: 1000 * statistics.median(v) / steps for n, v in decode_s.items()}

    def ratio(a: str, b: str) -> str:  # how many times faster b is than a
        return _interval([x / y for x, y in zip(decode_s[a], decode_s[b], strict=True)])

    prov = tracking.provenance()
    lines = [
        "# Eager vs compiled decode (static KV cache + torch.compile)",
        "",
        f"Command: `python -m benchmarks.compiled_decode {' '.join(overrides)}` · commit {prov['git.commit'][:10]}"
        f"{' (dirty)' if prov['git.dirty'] == 'True' else ''} · host {prov['host.processor']}, "
        f"{prof['threads']} thread(s) · device {cfg['device']} · model {cfg['model']['name']} ({cfg['model']['dtype']})"
        f" · method {cfg['method']['name']} · prompt {prof['prompt_tokens']} tokens, {steps} decode steps at batch 1, "
        f"{repeats} repeats after {prof['warmup']} warm-up, torch.compile mode {mode or 'default'}, "
        f"at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Median ms per decoded token (median over repeats):",
        "",
        "| | eager | compiled | compiled speed-up vs eager (95% CI) | compile time |",
        "|---|---|---|---|---|",
        f"| reference ({cfg['model']['dtype']}) | {ms['ref eager']:.1f} | {ms['ref compiled']:.1f} | "
        f"{ratio('ref eager', 'ref compiled')} | {compiled['ref compiled'].compile_s:.0f} s |",
        f"| {cfg['method']['name']} | {ms['model eager']:.1f} | {ms['model compiled']:.1f} | "
        f"{ratio('model eager', 'model compiled')} | {compiled['model compiled'].compile_s:.0f} s |",
        "",
        f"{cfg['method']['name']} speed-up vs the reference: eager {ratio('ref eager', 'model eager')}, "
        f"compiled {ratio('ref compiled', 'model compiled')}.",
        "",
        "Per repeat the four run in the order reference eager, reference compiled, model eager, model "
        "compiled; each ratio is taken within a repeat. Compiled generations equal the eager ones token "
        "for token (checked).",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
