"""Tests for custom_basic_transformer.py on tiny models (the whole file runs in a few seconds on CPU)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom_basic_transformer import (  # noqa: E402
    AutoregressiveWrapper, CausalAttentionCPU, Int8Linear, MusicTransformer, RotaryQKV, apply_rotary_pos_emb,
    causal_attention, compile_model, dropout, dropout_mask, gelu_dropout, printModelParameters,
    quantize_for_generation, rotate_half, top_k, top_p)
from dataset import NUM_TOKENS, PAD_IDX  # noqa: E402

VOCAB = 40
PAD = VOCAB - 1


def tiny_model(depth=2, max_seq_len=16, dropout_p=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = MusicTransformer(num_tokens=VOCAB, dim=32, depth=depth, heads=4, dim_head=8, max_seq_len=max_seq_len,
                           dropout=dropout_p, **kwargs)
    return AutoregressiveWrapper(net, pad_value=PAD, ignore_index=PAD)


def random_tokens(*shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, shape, generator=generator)


def test_defaults_use_dataset_vocabulary_and_ignore_its_pad_token():
    model = AutoregressiveWrapper(MusicTransformer(dim=32, depth=1, heads=2, dim_head=8, max_seq_len=8))
    assert model.net.num_tokens == NUM_TOKENS
    assert model.pad_value == PAD_IDX and model.ignore_index == PAD_IDX
    assert model.max_seq_len == 8


def test_logits_shape_and_loss_accuracy_are_scalars():
    model = tiny_model()
    x = random_tokens(3, 9)
    assert model.net(x).shape == (3, 9, VOCAB)
    loss, acc = model(x)
    assert loss.shape == () and acc.shape == ()
    assert acc.dtype.is_floating_point and 0.0 <= acc.item() <= 1.0
    assert torch.isfinite(loss) and loss.requires_grad


def test_changing_a_future_token_never_changes_past_logits():
    model = tiny_model().eval()
    x = random_tokens(2, 12)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % PAD
    before, after = model.net(x), model.net(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize('right', [True, False])
def test_padding_is_excluded_from_loss_and_accuracy(right):
    model = tiny_model().eval()
    first = torch.tensor([[5]])
    logits = model.net(first)[0, 0]
    predicted = logits.argmax().item()
    target = predicted if right else (predicted + 1) % PAD
    # only the first target is real; the other nine are padding
    x = torch.tensor([[5, target] + [PAD] * 9])
    loss, acc = model(x)
    assert acc.item() == (1.0 if right else 0.0)
    expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
    torch.testing.assert_close(loss, expected)


def test_batch_of_only_padding_gives_zero_loss_that_backpropagates():
    model = tiny_model()
    loss, acc = model(torch.full((2, 6), PAD))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_state_dict_holds_parameters_only_and_round_trips():
    model = tiny_model().eval()
    state = model.state_dict()
    assert set(state) == {name for name, _ in model.named_parameters()}
    fresh = tiny_model(seed=7).eval()
    fresh.load_state_dict(state)
    x = random_tokens(2, 10)
    torch.testing.assert_close(fresh.net(x), model.net(x))


def test_rotary_tables_are_not_saved_even_after_generation_grows_them():
    model = tiny_model(max_seq_len=8)
    model.generate(torch.tensor([1, 2]), 20, temperature=0)
    assert model.net.rotary.cos.shape[0] >= 22
    assert not any('rotary' in key for key in model.state_dict())
    # grown tables are ordinary tensors: training still works after generation
    model.train()
    model(random_tokens(2, 9))[0].backward()


@pytest.mark.parametrize('new_tokens', [10, 45])  # inside max_seq_len 16, and well beyond it
@pytest.mark.parametrize('batch', [1, 3])
def test_greedy_generation_with_cache_equals_without(new_tokens, batch):
    model = tiny_model(depth=3, max_seq_len=16)
    prompt = random_tokens(batch, 4)
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (batch, new_tokens)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_uncached_inside_and_beyond_max_seq_len():
    model = tiny_model(depth=3, max_seq_len=16).eval()
    sequence = random_tokens(2, 50)
    net = model.net
    cache = net.new_cache(2)
    with torch.no_grad():
        cached = [net(sequence[:, :5], cache=cache)[:, -1]]
        cached += [net(sequence[:, t:t + 1], cache=cache)[:, -1] for t in range(5, 50)]
        uncached = [net(sequence[:, :t])[:, -1] for t in range(5, 51)]
    for step, (c, u) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(c, u, atol=1e-5, rtol=1e-5, msg=f'step {step}')


def test_prompt_longer_than_max_seq_len_fills_the_cache_correctly():
    model = tiny_model(depth=2, max_seq_len=8)
    prompt = random_tokens(2, 21)
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_single_layer_sliding_window_equals_reencoding_the_last_window():
    # with one layer, the cache of the last max_seq_len positions is exactly the seed's crop-and-re-encode
    model = tiny_model(depth=1, max_seq_len=8).eval()
    out = model.generate(torch.tensor([[3, 4]]), 30, temperature=0, return_prime=True)
    with torch.no_grad():
        for t in range(2, out.shape[1]):
            window = out[:, max(0, t - 8):t]
            assert model.net(window)[0, -1].argmax().item() == out[0, t].item()


def test_deeper_model_long_context_differs_from_reencoding_only_past_the_window():
    model = tiny_model(depth=3, max_seq_len=8).eval()
    sequence = random_tokens(1, 30)
    with torch.no_grad():
        inside = model.net(sequence[:, :8])[0, -1]
        full_inside = model.net(sequence)[0, 7]
        sliding = model.net(sequence)[0, -1]
        recoded = model.net(sequence[:, -8:])[0, -1]
    torch.testing.assert_close(inside, full_inside)
    assert not torch.allclose(sliding, recoded, atol=1e-4)


def test_generation_restores_train_mode_and_returns_ordinary_tensors():
    model = tiny_model(dropout_p=0.1)
    model.train()
    out = model.generate(torch.tensor([1, 2, 3]), 5)
    assert model.training and all(m.training for m in model.modules())
    assert out.shape == (5,) and out.dtype == torch.long and not out.is_inference()
    model.eval()
    model.generate(torch.tensor([1]), 3)
    assert not model.training


def test_return_prime_keeps_the_prompt():
    model = tiny_model()
    prompt = random_tokens(2, 3)
    out = model.generate(prompt, 4, temperature=0, return_prime=True)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)


def test_eos_stops_generation_and_pads_rows_that_finished():
    model = tiny_model().eval()
    prompt = random_tokens(2, 3)
    greedy = model.generate(prompt, 12, temperature=0)
    eos = greedy[0, 2].item()
    out = model.generate(prompt, 12, temperature=0, eos_token=eos)
    for row in range(2):
        hits = (greedy[row] == eos).nonzero()
        if len(hits):
            stop = hits[0].item()
            assert torch.equal(out[row, :stop + 1], greedy[row, :stop + 1])
            assert torch.all(out[row, stop + 1:] == PAD)
    if all((greedy[row] == eos).any() for row in range(2)):
        last_stop = max((greedy[row] == eos).nonzero()[0].item() for row in range(2))
        assert out.shape[1] == last_stop + 1


def test_bad_generation_arguments_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match='prompt'):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='prompt'):
        model.generate(torch.zeros(1, 1, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='temperature'):
        model.generate(torch.tensor([1]), 3, temperature=-1)


def test_filled_cache_refuses_several_tokens_at_once():
    model = tiny_model().eval()
    cache = model.net.new_cache(1)
    model.net(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match='one new token'):
        model.net(torch.tensor([[3, 4]]), cache=cache)


def first_step_logits(model, prompt):
    with torch.no_grad():
        return model.eval().net(prompt[None])[0, -1]


def test_top_k_sampling_only_draws_the_k_most_likely_tokens():
    model = tiny_model()
    prompt = torch.tensor([4, 9, 2])
    allowed = set(first_step_logits(model, prompt).topk(3).indices.tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, top_k=3)
    assert set(drawn.flatten().tolist()) <= allowed
    # the seed-style filter function: thres 0.9 of 40 tokens keeps ceil(4) of them
    allowed4 = set(first_step_logits(model, prompt).topk(4).indices.tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, filter_logits_fn=top_k, filter_thres=0.9)
    assert set(drawn.flatten().tolist()) <= allowed4


def test_top_p_sampling_only_draws_from_the_nucleus():
    model = tiny_model()
    prompt = torch.tensor([4, 9, 2])
    probs = (first_step_logits(model, prompt) / 2.0).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    # nucleus: tokens whose predecessors' mass is still below 0.3
    nucleus = set(order[(sorted_probs.cumsum(0) - sorted_probs) < 0.3].tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, top_p=0.3)
    assert set(drawn.flatten().tolist()) <= nucleus
    assert len(nucleus) < VOCAB


def test_filters_keep_the_expected_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isfinite(top_k(logits, k=2)).tolist() == [[False, True, False, True]]
    # probabilities ~ [0.03, 0.64, 0.09, 0.24]: 0.64 < 0.8 so the nucleus needs the second token too
    assert torch.isfinite(top_p(logits, thres=0.8)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p(logits, thres=0.5)).tolist() == [[False, True, False, False]]


def test_rotary_qkv_split_matches_rearrange_and_the_plain_rotary_formula():
    b, n, h, d = 2, 5, 3, 8
    torch.manual_seed(0)
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    q, k, v = RotaryQKV.apply(qkv, cos, sin, h)
    split = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q, apply_rotary_pos_emb(split[0], cos, sin))
    torch.testing.assert_close(k, apply_rotary_pos_emb(split[1], cos, sin))
    torch.testing.assert_close(v, split[2])
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(apply_rotary_pos_emb(split[0], cos, sin), split[0] * cos + rotate_half(split[0]) * sin)
    assert torch.autograd.gradcheck(lambda t: RotaryQKV.apply(t, cos, sin, h), (qkv,))
    # an output that gets no gradient counts as zero
    assert torch.autograd.gradcheck(lambda t: RotaryQKV.apply(t, cos, sin, h)[1], (qkv,))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_training_and_inference_paths_give_the_same_logits(dtype):
    # with gradients: RotaryQKV (and on bf16 our attention backward); without: the plain formula
    model = tiny_model(dropout_p=0.0)
    x = random_tokens(2, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        trained = model.net(x)
        with torch.no_grad():
            inferred = model.net(x)
    assert trained.requires_grad and not inferred.requires_grad
    # the same arithmetic in another order: float rounding only (a bf16 ulp of the logits is ~0.002)
    tolerance = {'rtol': 1e-5, 'atol': 1e-6} if dtype == torch.float32 else {'rtol': 2e-2, 'atol': 8e-3}
    torch.testing.assert_close(trained, inferred, **tolerance)


def relative_errors(grads, reference):
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, reference)]


@pytest.mark.parametrize('shape', [(2, 4, 37, 16), (3, 2, 100, 32), (3, 2, 300, 16)])  # the last: chunks of 5 and 1
def test_cpu_attention_backward_is_as_accurate_as_sdpa_flash(shape):
    # bf16 inputs at the scale of a trained model's scores; float64 SDPA gives the true gradients
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).mul(s).bfloat16() for s in (1.5, 1.5, 1.0))
    grad_out = torch.randn(shape, generator=generator).bfloat16()

    def run(attention, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        out.backward(grad_out.to(dtype))
        return out, [t.grad for t in inputs]

    sdpa = lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)  # noqa: E731
    _, exact = run(sdpa, torch.float64)
    flash_out, flash_grads = run(sdpa, torch.bfloat16)
    ours_out, ours_grads = run(causal_attention, torch.bfloat16)
    assert ours_out.grad_fn.name() == 'CausalAttentionCPUBackward'
    assert torch.equal(ours_out, flash_out)  # the forward is SDPA itself
    assert ours_grads[0].shape == shape
    for ours, flash in zip(relative_errors(ours_grads, exact), relative_errors(flash_grads, exact)):
        assert ours < max(1.2 * flash, 1e-3)


def test_cpu_attention_backward_takes_strided_inputs():
    generator = torch.Generator().manual_seed(1)
    q, k, v, grad_out = (torch.randn(2, 20, 3, 8, generator=generator).bfloat16() for _ in range(4))
    results = []
    for layout in (lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2).contiguous()):
        inputs = [layout(t).requires_grad_() for t in (q, k, v)]
        causal_attention(*inputs).backward(layout(grad_out))
        results.append([t.grad for t in inputs])
    for strided, contiguous in zip(*results):
        assert torch.equal(strided, contiguous)


def test_cpu_attention_backward_is_used_only_where_it_pays():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    # float32, attention dropout, no gradient, or past MAX_LEN: SDPA's own backward
    assert causal_attention(q, q, q).grad_fn.name() != 'CausalAttentionCPUBackward'
    q16 = q.detach().bfloat16().requires_grad_()
    assert causal_attention(q16, q16, q16, 0.1).grad_fn.name() != 'CausalAttentionCPUBackward'
    with torch.no_grad():
        assert causal_attention(q16, q16, q16).grad_fn is None
    long = torch.randn(1, 1, CausalAttentionCPU.MAX_LEN + 1, 4, dtype=torch.bfloat16, requires_grad=True)
    assert causal_attention(long, long, long).grad_fn.name() != 'CausalAttentionCPUBackward'


def test_dropout_keeps_expected_fraction_and_rescales():
    x = torch.ones(200_000)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert dropout(x, 0.1, False) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))


def test_dropout_masks_follow_torch_manual_seed_and_gradients_use_the_same_mask():
    x = torch.randn(4, 1000, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(7)
    a = dropout(x, 0.2, True)
    b = dropout(x, 0.2, True)
    torch.manual_seed(7)
    again = dropout(x, 0.2, True)
    assert a.dtype == torch.bfloat16 and torch.equal(a, again)
    assert not torch.equal(a != 0, b != 0)  # a fresh mask on every call
    a.sum().backward()
    expected = (a != 0).to(torch.bfloat16) * (1 / 0.8)
    torch.testing.assert_close(x.grad, expected)


def test_dropout_mask_is_one_stream_of_16_bit_lanes_whatever_its_size():
    # more than one block of 2^18 elements, and a length that is not a multiple of 4
    x = torch.zeros(3, (1 << 18) // 3 * 2 + 1)
    torch.manual_seed(11)
    seed = int(torch.randint(2 ** 63 - 1, (1,)))
    lanes = np.random.SFC64(seed).random_raw((x.numel() + 3) // 4).view(np.uint16)[:x.numel()]
    expected = torch.from_numpy(lanes >= round(0.3 * 65536)).float().view(x.shape)
    torch.manual_seed(11)
    assert torch.equal(dropout_mask(x, 0.3), expected)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gelu_dropout_equals_gelu_then_dropout(dtype):
    a = torch.randn(4, 300, dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 300, dtype=dtype)
    results = []
    for fused in (False, True):
        torch.manual_seed(5)
        out = gelu_dropout(a, 0.2, True) if fused else dropout(torch.nn.functional.gelu(a), 0.2, True)
        out.backward(grad)
        results.append((out.detach(), a.grad.clone()))
        a.grad = None
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert torch.equal(gelu_dropout(a, 0.2, False), torch.nn.functional.gelu(a))


def test_inplace_dropout_draws_the_same_mask_and_gradient():
    a = torch.randn(3, 500, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for inplace in (False, True):
        torch.manual_seed(3)
        out = dropout(torch.nn.functional.gelu(a), 0.25, True, inplace=inplace)
        out.sum().backward()
        results.append((out.detach(), a.grad.clone()))
        a.grad = None
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_training_mode_uses_dropout_and_eval_mode_is_deterministic():
    model = tiny_model(dropout_p=0.3, attn_dropout=0.3)
    x = random_tokens(2, 10)
    model.train()
    assert not torch.equal(model.net(x), model.net(x))
    model.eval()
    assert torch.equal(model.net(x), model.net(x))


def test_a_few_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(4, 17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(x)[0].item()
    for _ in range(30):
        optimizer.zero_grad()
        model(x)[0].backward()
        optimizer.step()
    assert model(x)[0].item() < first - 0.5


def test_cpu_bf16_autocast_forward_and_backward():
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(2, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, acc = model(x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_backward_called_under_bf16_autocast_gives_the_same_gradients():
    # autocast is meant for the forward only, but a training loop may call backward inside it too
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(2, 16)
    grads = []
    for backward_inside in (False, True):
        torch.manual_seed(0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = model(x)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for outside, inside in zip(*grads):
        assert torch.equal(outside, inside)


def test_print_model_parameters_counts_every_parameter(capsys):
    model = tiny_model()
    total = printModelParameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert f'{total:,}' in capsys.readouterr().out


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


def test_compile_model_keeps_state_dict_keys_and_trains():
    model = tiny_model()
    keys = set(model.state_dict())
    compiled = compile_model(model, backend='eager')  # the wrapping is under test, not inductor's codegen
    assert set(compiled.state_dict()) == keys
    loss, acc = compiled(random_tokens(2, 9))
    loss.backward()
    assert torch.isfinite(loss)


def test_generation_under_bf16_autocast_with_a_multi_token_prompt():
    # the training script samples inside its autocast context; cache writes must take bf16 keys/values
    model = tiny_model(max_seq_len=8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.generate(random_tokens(2, 5), 12, temperature=0)
    assert out.shape == (2, 12) and int(out.min()) >= 0 and int(out.max()) < VOCAB


def test_dropout_mask_buffer_is_per_thread():
    # the reused byte buffer must not be shared: two threads drawing at once would overwrite each other's
    # bytes between numpy's compare and torch's conversion
    import threading

    import custom_basic_transformer
    buffers = {}

    def draw(name):
        dropout_mask(torch.zeros(1000), 0.5)
        buffers[name] = custom_basic_transformer._mask_bytes.buffer

    draw('main')
    worker = threading.Thread(target=draw, args=('worker',))
    worker.start()
    worker.join()
    assert buffers['main'] is not buffers['worker']
    assert not np.shares_memory(buffers['main'], buffers['worker'])
