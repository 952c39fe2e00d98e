"""sampling.py: the int8 generation copy, prompts from MIDI files and writing samples."""

import torch

from sampling import Int8Linear, quantize_for_generation
from tests.conftest import random_tokens, tiny_model


def test_int8_copy_stays_close_to_the_float_model_and_leaves_it_untouched():
    model = tiny_model(depth=2, max_seq_len=16).eval()
    quantized = quantize_for_generation(model)
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 2 * 4 + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())
    x = random_tokens(2, 12)
    with torch.no_grad():
        reference, approx = model.net(x), quantized.net(x)
    assert (approx - reference).abs().max() < 0.05 * reference.abs().max()
    # cached and uncached generation agree for the quantized copy too
    prompt = random_tokens(2, 3)
    cached = quantized.generate(prompt, 30, temperature=0, use_cache=True)
    assert torch.equal(cached, quantized.generate(prompt, 30, temperature=0, use_cache=False))
