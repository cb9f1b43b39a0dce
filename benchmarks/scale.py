"""Memory and time of a whole run on a Llama-shaped random-init model, stage by stage.

    nice python -m benchmarks.scale --shape llama_3_2_1b [--samples 16 --seq-len 512 --eval-tokens 2048] [override ...]

Runs ``python -m pipeline model=<shape> method=gptq method.group_size=128 offload.weights=disk`` (GPTQ W4
g128, bf16 weights, the blocks waiting for calibration on disk)
in a child process, so the run is the pipeline's own (same configs, same MLflow contract) and its
peak RSS is its own. Then reads the run back from its MLflow store and writes ``<out>/<shape>.json``
and a Markdown table: peak RSS per stage (``peak_rss_mb/<stage>``), its ratio to the model's bf16
weight bytes, and each stage's seconds. Random weights: the accuracy numbers are meaningless, memory
and time are real. Extra arguments are Hydra overrides passed on to the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from pipeline import peaks
from pipeline.load import weight_bytes_estimate
from pipeline.tracking import provenance

REPO = Path(__file__).resolve().parent.parent
TIMES = ("load_s", "reference_s", "profile_reference_s", "calibrate_s", "quantize_s", "eval_s", "profile_s")


def run_overrides(args: argparse.Namespace, store: Path) -> list[str]:
    return [
        f"model={args.shape}",
        "model.dtype=bfloat16",
        f"method={args.method}",
        "method.group_size=128",
        f"data.calibration.num_samples={args.samples}",
        f"data.calibration.seq_len={args.seq_len}",
        f"eval.tokens={args.eval_tokens}",
        f"eval.kl_tokens={args.eval_tokens}",
        "eval.context=512",
        "eval.stride=512",
        f"eval.batch_size={args.eval_batch}",
        "eval.generation.new_tokens=8",
        "profile.prompt_tokens=16",
        "profile.decode_tokens=4",
        "profile.batch_sizes=[1]",
        "profile.repeats=2",
        "profile.bandwidth.repeats=2",
        f"tracking.uri=sqlite:///{store}/mlflow.db",
        "tracking.experiment=scale",
        "tracking.log_model=false",
        f"offload.weights={args.offload}",
        f"offload.folder={args.store}",
        f"hydra.run.dir={store}/outputs",
        *args.overrides,
    ]


def table(result: dict) -> str:
    weight_mb = result["bf16_weight_bytes"] / 2**20
    m = result["metrics"]
    rows = ["| stage | peak RSS (MiB) | x bf16 weights | starts from (MiB) |", "|---|---:|---:|---:|"]
    for stage in peaks.STAGES:
        if f"peak_rss_mb/{stage}" in m:
            peak = m[f"peak_rss_mb/{stage}"]
            rows.append(f"| {stage} | {peak:,.0f} | {peak / weight_mb:.2f} | {m[f'rss_start_mb/{stage}']:,.0f} |")
    rows += ["", "| stage | seconds |", "|---|---:|"]
    rows += [f"| {key.removesuffix('_s')} | {m[key]:,.0f} |" for key in TIMES if key in m]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama_3_2_1b", help="a conf/model preset built from a config")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-batch", type=int, default=1, help="evaluation windows per forward")
    parser.add_argument("--method", default="gptq", help="a conf/method preset (group size 128 is set)")
    parser.add_argument("--offload", default="disk", help="offload.weights: none | cpu | disk")
    parser.add_argument("--store", type=Path, default=REPO / ".cache" / "scale")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "scale")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed on to the run")
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", *run_overrides(args, args.store)]
    print(" ".join(cmd), flush=True)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    if done.returncode != 0:
        sys.exit(f"the run failed (exit {done.returncode}); its log is under {args.store}/outputs")
    mlflow.set_tracking_uri(f"sqlite:///{args.store}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["scale"], output_format="list", max_results=1)
    model_cfg = {"source": "config", "shape": run.data.params["model.shape"], "config": None, "init_seed": 0}
    result = {
        "command": " ".join(["python -m benchmarks.scale", *sys.argv[1:]]),
        "run_command": " ".join(cmd[1:]),
        "run_id": run.info.run_id,
        "wall_s": wall,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "bf16_weight_bytes": weight_bytes_estimate({**model_cfg, "dtype": "bfloat16"}),
        "provenance": {k: v for k, v in provenance().items() if k.startswith(("git.", "host.", "pkg.torch"))},
        "metrics": run.data.metrics,
    }
    result["peak_over_bf16_weights"] = max(v for k, v in run.data.metrics.items() if k.startswith("peak_rss_mb/")) / (
        result["bf16_weight_bytes"] / 2**20
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.shape}-{args.method}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(table(result))
    print(f"highest stage peak = {result['peak_over_bf16_weights']:.2f} x bf16 weights; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
