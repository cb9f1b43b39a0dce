"""Cost to quantize the embedded model (SmolLM2-135M) on the compare protocol, per method.

    python -m benchmarks.quantize_embedded METHOD [METHOD ...] [--repeats 1]

For each method (a preset name, optionally with Hydra overrides after a colon, e.g.
``gptq:method.gptq.act_order=true``): load the float model, 32 calibration sequences of 256 tokens,
then time ``run.quantize_stage`` (model steps, block-by-block calibration, codes, finish steps: what a
run records as ``quantize_s``), with its per-step timings. The same process runs every method, in
turn, ``--repeats`` times; a SHA-256 of the quantized weights shows whether two commits or two
repeats computed the same model. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import load, run
from pipeline.data import calibration_batches
from pipeline.tune import CONF


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def time_method(spec: str) -> dict:
    name, _, extra = spec.partition(":")
    overrides = [f"method={name}", "data.calibration.num_samples=32", *filter(None, extra.split(","))]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        container = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    model, tokenizer = load.load_model(container["model"])
    batches = calibration_batches(tokenizer, container["data"])
    logged: dict[str, float] = {}
    start = time.perf_counter()
    run.quantize_stage(
        model, container, lambda: batches, int(container["seed"]), "auto", logged.update, lambda *_: None
    )
    seconds = time.perf_counter() - start
    steps = {k.removeprefix("quantize_s/"): round(v, 1) for k, v in logged.items() if k.startswith("quantize_s/")}
    return {"method": spec, "quantize_s": round(seconds, 1), "steps": steps, "weights": weights_digest(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeats):
        for spec in args.methods:
            print(json.dumps({**time_method(spec), "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
