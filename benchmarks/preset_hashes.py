"""Weights hash of every method preset on a slice of the embedded model, to prove a refactor keeps them.

Quantizes the embedded SmolLM2 (first 2 decoder blocks, float32, CPU) with each ``conf/method`` preset
through ``run.quantize_stage`` (QAT: 3 steps; 4 random calibration sequences of 64 tokens, seed 3) and
writes, per preset, the sha256 of the quantized state (``checkpoint.model_sha256``, what
``shipping.tag_hash`` tags), the ``algorithm`` tag and the summed layer errors. Run it before and after
a change and compare the JSONs (about 8 minutes on 2 CPU cores):

    .venv/bin/python -m benchmarks.preset_hashes /tmp/before.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import checkpoint, run, steps
from pipeline.load import load_model
from pipeline.tune import CONF


def _container(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        container = OmegaConf.to_container(compose("config", overrides=["device=cpu", *overrides]), resolve=True)
    container["model"]["dtype"] = "float32"
    return container


def main(out: Path) -> None:
    base, _ = load_model(_container()["model"], "cpu")
    base.model.layers = torch.nn.ModuleList(list(base.model.layers)[:2])
    base.config.num_hidden_layers = 2
    batches = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(3))
    hashes = {}
    for path in sorted((CONF / "method").glob("*.yaml")):
        container = _container(f"method={path.stem}")
        if container["method"].get("train"):
            container["method"]["train"]["steps"] = 3
        model = copy.deepcopy(base)
        start = time.perf_counter()
        records = run.quantize_stage(
            model,
            container,
            lambda: batches,
            0,
            "auto",
            lambda _: None,
            log_step=lambda *_: None,
        )
        hashes[path.stem] = {
            "sha256": checkpoint.model_sha256(model),
            "tag": steps.describe_steps(container["method"]),
            "n": len(records),
            "err_sum": sum(round(r.rel_error, 7) for r in records if r.rel_error is not None),
        }
        print(path.stem, hashes[path.stem], f"{time.perf_counter() - start:.1f}s", flush=True)
    out.write_text(json.dumps(hashes, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
