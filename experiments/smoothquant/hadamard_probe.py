"""Would an orthogonal (Hadamard) rotation of down_proj's input make static per-tensor int8 work?

Per-token abs-max of the input of layers.{5,11,28}.mlp.down_proj on 8 calibration sequences (float
model), before and after a block-diagonal Hadamard rotation (three blocks of 512 of the 1536 inputs,
what QuaRot's online rotation of that input does): the first token against the others, and the range
one per-tensor scale must span relative to the median token's.

Run: PYTHONPATH=tests:. .venv/bin/python experiments/smoothquant/hadamard_probe.py
"""

import torch
from conftest import compose_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.assets import embedded_model_dir
from pipeline.data import calibration_batches

LAYERS = (5, 11, 28)
BLOCK = 512


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def main() -> None:
    cfg = compose_cfg("data.calibration.num_samples=8")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), torch_dtype=torch.float32).eval()
    batches = calibration_batches(tokenizer, cfg["data"])
    seen = {}
    for i in LAYERS:
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0].detach())
        )
    with torch.no_grad():
        model(input_ids=batches, use_cache=False)
    h = hadamard(BLOCK)
    for i, x in seen.items():
        rotated = (x.reshape(*x.shape[:2], -1, BLOCK) @ h).reshape(x.shape)
        assert torch.allclose((rotated.reshape(*x.shape[:2], -1, BLOCK) @ h.T).reshape(x.shape), x, atol=1e-3)
        for name, t in (("plain", x), ("hadamard", rotated)):
            peak = t.abs().amax(-1)  # (sequence, position)
            first, rest = peak[:, 0].max().item(), peak[:, 1:]
            span = max(first, rest.max().item()) / rest.median().item()
            print(
                f"layers.{i}.mlp.down_proj {name:8s}: first token max {first:7.1f}; other tokens max "
                f"{rest.max().item():5.1f}, median {rest.median().item():5.2f}; "
                f"per-tensor range / median token {span:5.0f}x"
            )


if __name__ == "__main__":
    main()
