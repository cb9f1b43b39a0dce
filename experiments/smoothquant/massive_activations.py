"""Per-layer input abs-max by token position, float vs smoothed (alpha 0.5), on 8 calibration sequences.

Run: OMP_NUM_THREADS=1 PYTHONPATH=tests:. .venv/bin/python experiments/smoothquant/massive_activations.py
"""

import torch
from conftest import compose_cfg, layers_cfg
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import layers
from pipeline.algorithms import smoothquant
from pipeline.data import calibration_batches

MODEL = ".cache/models/smollm2-135m-instruct"


def worst_layers(model, names: list[str], batches: torch.Tensor, tag: str, top: int = 8) -> None:
    """Print the layers whose input peak is furthest above the median token's peak."""
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().float())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=batches)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, x in seen.items():
        token_max = x.abs().amax(-1)  # (batch, seq)
        channel_max = x.abs().reshape(-1, x.shape[-1]).amax(0)
        first, rest, median = float(token_max[:, 0].max()), float(token_max[:, 1:].max()), float(token_max.median())
        channel_ratio = float(channel_max.max() / channel_max.mean())
        rows.append((max(first, rest) / median, name, first, rest, median, channel_ratio))
    rows.sort(reverse=True)
    print(tag, "worst layers by max|x| / median token max|x|:")
    for ratio, name, first, rest, median, channel_ratio in rows[:top]:
        print(
            f"  {name:40s} max/med={ratio:8.1f} first token={first:8.2f} other tokens={rest:8.2f} "
            f"median={median:6.2f} channel max/mean={channel_ratio:6.1f}"
        )


def main() -> None:
    data_cfg = OmegaConf.to_container(compose_cfg("data.calibration.num_samples=8").data, resolve=True)
    batches = calibration_batches(AutoTokenizer.from_pretrained(MODEL), data_cfg)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    names = list(layers.select_layers(model, layers_cfg())[0])
    worst_layers(model, names, batches, "float")
    smoothquant.smooth_model(model, names, batches, 0.5)
    worst_layers(model, names, batches, "smoothed alpha=0.5")


if __name__ == "__main__":
    main()
