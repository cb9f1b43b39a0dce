"""The GPU check for a session that has a CUDA GPU (none has had one yet: UNTESTED on a GPU).

    bash benchmarks/gpu_check.sh          # the smoke experiment with device=cuda, then this
    python -m benchmarks.gpu_check [--shapes 1b,8b] [--out experiments/gpu/README.md]

Random-init Llama-shaped models built from a config on the GPU in bf16 (the numbers they compute are
meaningless; the time and memory are real): the Llama-3.2-1B and Llama-3.1-8B shapes. Each is decoded
as bf16, int4 (group 128, symmetric, bf16 scales: the layout tinygemm computes exactly) and 2-bit
(group 64: dequant on CUDA), at batch 1 and 32, eager and compiled (``CompiledDecoder``, CUDA graphs),
after a warm-up that waits for the clocks (``profile.settle``). Sized for ~10 minutes on an H100/H200
(the 8B compiled rows dominate: drop them with --no-compile-8b). Writes a markdown table with the
kernel each layer ran, tokens/s (median and range over repeats), peak GPU memory and provenance.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import memory_peak, quantize, tracking
from pipeline.generation import CompiledDecoder, greedy
from pipeline.profile import settle
from pipeline.quant.linear import QuantLinear
from pipeline.tune import CONF

SHAPES = {  # from the published config.json files
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False),
}
COMMON = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
VARIANTS = {
    "bf16": None,
    "int4 g128": ["method=group_wise", "method.symmetric=true", "method.scale_dtype=bfloat16", "method.group_size=128"],
    "2-bit g64": ["method=group_wise", "method.bits=2"],  # RTN: the algorithm does not change the speed
}
PROMPT, DECODE, REPEATS = 64, 32, 3
SETTLE = {"tolerance_pct": 3.0, "min_s": 2.0, "max_s": 30.0}
OUT = Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "README.md"


def build(shape: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**COMMON, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            return LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def quantized(model: torch.nn.Module, overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    quantize.quantize_model(model, cfg["method"], cfg["layers"])
    used = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return ", ".join(used)


def tok_s(run, batch: int) -> tuple[float, float, float]:
    times = [run().decode_s for _ in range(REPEATS)]
    rates = [batch * DECODE / t for t in times]
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-compile-8b", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.gpu_check needs a CUDA GPU (torch sees none)")
    rows = []
    for shape in args.shapes.split(","):
        for variant, overrides in VARIANTS.items():
            start = time.perf_counter()
            model = build(shape)
            kernel = quantized(model, overrides) if overrides else "bf16 F.linear"
            prep_s = time.perf_counter() - start
            for batch in (1, 32):
                prompt = torch.randint(0, COMMON["vocab_size"], (batch, PROMPT), device="cuda")
                settle(model, prompt, DECODE, SETTLE)
                memory_peak.reset_peak("cuda")
                eager = tok_s(lambda m=model, p=prompt: greedy(m, p, DECODE + 1)[0], batch)
                compiled, compile_s = (float("nan"),) * 3, float("nan")
                if not (shape == "8b" and args.no_compile_8b):
                    decoder = CompiledDecoder(model, batch, PROMPT + DECODE + 1, mode="reduce-overhead")
                    decoder(prompt, DECODE + 1)
                    compile_s = decoder.compile_s
                    compiled = tok_s(lambda d=decoder, p=prompt: d(p, DECODE + 1)[0], batch)
                    del decoder
                peak = memory_peak.peak_mb("cuda")
                rows.append((shape, variant, kernel, batch, eager, compiled, compile_s, peak, prep_s))
                print(rows[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    gpu = tracking.gpu_provenance()
    prov = tracking.provenance()
    fmt = lambda r: f"{r[0]:.0f} ({r[1]:.0f}-{r[2]:.0f})" if r[0] == r[0] else "-"  # noqa: E731
    lines = [
        "# GPU check: random-init Llama shapes, bf16 vs int4 vs 2-bit, eager vs compiled decode",
        "",
        f"`python -m benchmarks.gpu_check --shapes {args.shapes}` · commit {prov['git.commit'][:10]} · "
        f"{gpu.get('host.gpu')} (driver {gpu.get('host.gpu_driver')}, CUDA {gpu.get('host.cuda')}), "
        f"torch {torch.__version__} · prompt {PROMPT}, {DECODE} decode steps, {REPEATS} repeats after a settle "
        f"warm-up · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| shape | weights | kernels | batch | eager tok/s (range) | compiled tok/s (range) | compile s "
        "| peak GPU MiB | build+quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, variant, kernel, batch, eager, compiled, compile_s, peak, prep_s in rows:
        lines.append(
            f"| {shape} | {variant} | {kernel} | {batch} | {fmt(eager)} | {fmt(compiled)} | {compile_s:.0f} "
            f"| {peak:.0f} | {prep_s:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
