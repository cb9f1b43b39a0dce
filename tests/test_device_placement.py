"""Device plumbing, tested on the CPU through the same code path a GPU takes.

The trap: the model sits on the CPU (the device given explicitly) while torch's default device is
``meta``. A stage that makes a tensor without saying where (``torch.zeros(n)``, ``torch.arange(n)``)
gets a meta tensor, and the first op that mixes it with the model's CPU tensors fails; one that
moves its inputs to the model's device and makes helpers there runs as usual. Inputs (tokens,
batches) are made on the CPU before the trap, as the data stage makes them.
"""

import contextlib

import pytest
import torch
from conftest import layers_cfg, method_cfg, tiny_llama

from pipeline import calibrate, evaluate, generation, layers, quantize, steps, train
from pipeline.device import module_device
from pipeline.reference_store import FULL

EVAL = {"context": 32, "stride": 32, "kl_tokens": 16, "batch_size": 2}


@contextlib.contextmanager
def default_device_trap():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _batches(n=4, length=32, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed), device="cpu")


def test_the_trap_catches_a_tensor_made_without_a_device():
    model = tiny_llama()
    with default_device_trap(), pytest.raises((RuntimeError, NotImplementedError)):
        model(input_ids=_batches()[:1]).logits + torch.zeros(1, 32, 512)


@pytest.mark.parametrize(
    "name", ["group_wise", "ptq_static", "ptq_dynamic", "gptq", "activation_aware", "lowrank_w4", "w3_group"]
)
def test_every_stage_keeps_its_tensors_on_the_models_device(name):
    model = tiny_llama()
    method = method_cfg(name)
    batches, tokens = _batches(), _batches(2, 64, seed=1).reshape(-1)
    names = list(layers.select_layers(model, layers_cfg())[0])
    with default_device_trap():
        reference = evaluate.score(model, tokens, EVAL, store=FULL)
        stats = None
        if steps.needs_calibration(method) and method.get("activations"):
            stats = calibrate.collect_activation_stats(model, names, batches, seed=0)
        quantize.quantize_model(model, method, layers_cfg(), stats, calibration=batches)
        scores = evaluate.score(model, tokens, EVAL, reference=reference)  # the KL against it, window by window
        generated = generation.greedy(model, tokens[:8].reshape(1, 8), 4)
    assert module_device(model).type == "cpu"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert len(generated[0].tokens) == 4 and torch.isfinite(scores.nll).all()


def test_qat_trains_on_the_models_device():
    model = tiny_llama()
    method = method_cfg("qat", "method.train.steps=2", "method.train.batch_size=2", "method.train.loss=ce")
    selected = layers.select_layers(model, layers_cfg())[0]
    spec = quantize.weight_spec(method)
    with default_device_trap():
        fakes = train.prepare(model, selected, method, True, layers.float_weight, spec)
        losses = train.fit(model, fakes, _batches(), method["train"], seed=0)
    assert len(losses) == 2
