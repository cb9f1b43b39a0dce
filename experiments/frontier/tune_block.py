"""Reconstruction's rates on one real block: the held-out block output error on the exported grid,
relative to round to nearest's, for each (clipping lr, weight lr, epochs) given.

The embedded model in float32, 32 calibration sequences of 256 tokens (the compare protocol's); the
block's inputs are the float model's; 24 sequences train, 8 are held out.

Run: PYTHONPATH=tests:. .venv/bin/python experiments/frontier/tune_block.py BLOCK BITS GROUP LR,WEIGHT_LR,EPOCHS ...
e.g. ... tune_block.py 20 2 32 0.1,0.02,10 0.1,None,10
"""

import copy
import sys
import time

import torch
from conftest import compose_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.algorithms import reconstruct
from pipeline.algorithms.sequential import _first_block_inputs, block_output, decoder_blocks
from pipeline.assets import embedded_model_dir
from pipeline.data import calibration_batches
from pipeline.layers import float_weight
from pipeline.quant.primitives import QuantSpec, block_size_for, fake_quantize


def mean_error(block, state, targets) -> float:
    with torch.no_grad():
        errors = [float((block_output(block, h, kw) - t).pow(2).mean()) for (h, kw), t in zip(state, targets)]
    return sum(errors) / len(errors)


def main(index: int, bits: int, group: int, configs: list[str]) -> None:
    torch.manual_seed(0)
    cfg = compose_cfg("data.calibration.num_samples=32")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), torch_dtype=torch.float32).eval()
    _, blocks = decoder_blocks(model)
    with torch.no_grad():
        state = _first_block_inputs(model, blocks[0], calibration_batches(tokenizer, cfg["data"]), 8)
        for block in blocks[:index]:
            state = [(block_output(block, h, kw), kw) for h, kw in state]
        block = blocks[index]
        targets = [block_output(block, h, kw) for h, kw in state]
    spec = QuantSpec(bits=bits, symmetric=False)
    modules = dict(block.named_modules())
    layers = {}
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear):
            w = float_weight(module).float()
            layers[name] = (w, spec, block_size_for(w.shape, "group", group))
    rtn = copy.deepcopy(block)
    with torch.no_grad():
        for name, (w, s, size) in layers.items():
            dict(rtn.named_modules())[name].weight.copy_(fake_quantize(w, s, size))
    train, held = slice(0, 3), slice(3, 4)  # batches of 8 sequences
    rtn_held = mean_error(rtn, state[held], targets[held])
    for config in configs:
        lr, weight_lr, epochs = (None if v == "None" else float(v) for v in config.split(","))
        options = {"epochs": int(epochs), "lr": lr, "weight_lr": weight_lr, "micro_batch": 4, "init": 4.0}
        start = time.perf_counter()
        results, _ = reconstruct.reconstruct_block(
            block, layers, state[train], targets[train], {**options, "target": "block"}
        )
        held_out = reconstruct.exported_block_error(block, layers, results, state[held], targets[held], {})
        print(
            f"block {index} int{bits} g{group} lr={lr} weight_lr={weight_lr} epochs={int(epochs)}: "
            f"held-out error / rtn {held_out / rtn_held:.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
