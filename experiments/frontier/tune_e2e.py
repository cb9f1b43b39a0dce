"""The e2e step's learning rate on the embedded model: KL to the float model on held-out calibration
sequences after training the stored scales of a 2-bit model, for each (lr, steps) given.

The embedded model in float32, 32 calibration sequences of 256 tokens (the compare protocol's); the
base is quantized once with the given method's steps (default w2_group: AWQ + GPTQ act-order, int2
g32); then for each config a copy trains on 24 sequences (batch 4, kd) and is scored on the other 8.
The evaluation text (Wikipedia) is never read.

Run: PYTHONPATH=tests:. .venv/bin/python experiments/frontier/tune_e2e.py METHOD LR,STEPS ...
e.g. ... tune_e2e.py w2_group 1e-4,100 3e-4,100
"""

import copy
import sys
import time

import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import run, train
from pipeline.algorithms import e2e
from pipeline.assets import embedded_model_dir
from pipeline.data import calibration_batches


@torch.no_grad()
def held_out_kl(model, teacher, ids) -> float:
    losses = [
        float(train.distillation_loss(model(input_ids=b[None]).logits, teacher(input_ids=b[None]).logits)) for b in ids
    ]
    return sum(losses) / len(losses)


def main(method: str, configs: list[str]) -> None:
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(compose_cfg(f"method={method}", "data.calibration.num_samples=32"), resolve=True)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    teacher = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), torch_dtype=torch.float32).eval()
    batches = calibration_batches(tokenizer, cfg["data"])
    train_ids, held_out = batches[:24], batches[24:]
    base = copy.deepcopy(teacher)
    start = time.perf_counter()
    run.quantize_stage(base, cfg, lambda: batches, 0, "auto", lambda _m: None, log_step=lambda *_: None)
    seconds, kl = time.perf_counter() - start, held_out_kl(base, teacher, held_out)
    print(f"{method}: quantized in {seconds:.0f} s; held-out KL {kl:.4f}")
    for config in configs:
        lr, steps = config.split(",")
        options = {"steps": int(steps), "batch_size": 4, "lr": float(lr), "warmup_fraction": 0.1}
        options |= {"max_grad_norm": 1.0, "loss": "kd"}
        model = copy.deepcopy(base)
        start = time.perf_counter()
        metrics = e2e.train_step_sizes(model, teacher, train_ids, options, seed=0)
        print(
            f"lr {lr} steps {steps}: held-out KL {held_out_kl(model, teacher, held_out):.4f} "
            f"(train loss {metrics['e2e_loss_first']:.3f} -> {metrics['e2e_loss_last']:.3f}, "
            f"scale change {metrics['e2e_scale_change']:.4f}, {time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
