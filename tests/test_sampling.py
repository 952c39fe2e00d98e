"""sampling.py: the int8 copy generation uses, against the float model and against its own dequantized path.
(The choice of that copy is tested in test_runtime.py, writing samples and audio in test_generate.py.)"""

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


def int8_kernel_calls(monkeypatch):
    """A list that receives the activation shape of every call of torch's one-row int8 kernel from now on."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, '_weight_int8pack_mm', lambda x, *rest: calls.append(tuple(x.shape)) or kernel(x, *rest))
    return calls


def test_one_row_int8_kernel_equals_the_dequantized_matmul_to_bf16_rounding(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear(linear)
    calls = int8_kernel_calls(monkeypatch)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        one_row = layer(x)
        assert calls == [(1, 64)]
        two_rows = layer(x.expand(2, 1, 64))  # more than one row: the float32 matmul of the dequantized weight
        assert calls == [(1, 64)]
        exact = torch.nn.functional.linear(x, layer.weight.float() * layer.scale[:, None], layer.bias)
        float_layer = linear(x)
    assert one_row.shape == (1, 1, 48) and one_row.dtype == torch.float32
    torch.testing.assert_close(two_rows[:1], exact, rtol=1e-5, atol=1e-5)
    # the kernel takes activations and scales in bf16 (8 bits of mantissa) and gives a bf16 result
    assert (one_row - exact).abs().max() <= 0.01 * exact.abs().max()
    assert (one_row - float_layer).abs().max() <= 0.02 * float_layer.abs().max()  # and int8 weights: 0.4% a row


def test_cached_one_token_steps_of_the_int8_copy_run_the_kernel_and_match_its_uncached_logits(monkeypatch):
    model = tiny_model(depth=2, max_seq_len=16).eval()
    quantized = quantize_for_generation(model)
    calls = int8_kernel_calls(monkeypatch)
    x = random_tokens(1, 10)
    with torch.no_grad():
        cache = quantized.net.new_cache(1)
        quantized.net(x[:, :6], cache=cache)  # the prompt: six rows, the dequantized path
        assert calls == []
        steps = torch.cat([quantized.net(x[:, i:i + 1], cache=cache)[:, -1] for i in range(6, 10)])
        plain = quantized.net(x)[0, 6:]  # ten rows at once: the dequantized path
    assert len(calls) == 4 * (2 * 4 + 1) and set(calls) == {(1, 32), (1, 128)}  # every Linear, every step
    assert (steps - plain).abs().max() <= 0.02 * plain.abs().max()
