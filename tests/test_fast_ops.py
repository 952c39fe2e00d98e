"""fast_ops.py: every speed piece against its plain torch counterpart, values and gradients."""

import numpy as np
import pytest
import torch

import fast_ops
from custom_basic_transformer import attention_mask
from fast_ops import (
    CausalAttentionCPU,
    MaskedAttentionCPU,
    RotaryQKV,
    apply_rotary_pos_emb,
    causal_attention,
    dropout,
    dropout_mask,
    embedding_sum,
    gelu_dropout,
    masked_attention,
    rotate_half,
    visible_key_spans,
)


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


def tune_mask_of(starts, n):
    """The model's packed-window mask (b, 1, n, n) for rows whose tunes begin at the given positions."""
    begins = torch.zeros(len(starts), n, dtype=torch.long)
    for row, positions in enumerate(starts):
        begins[row, positions] = 1
    return attention_mask(n, n, 'cpu', torch.cumsum(begins, dim=1))


TUNE_LAYOUTS = {  # rows of tune starts in a window of 200 tokens (chunks of 64 queries: the last one 8 rows)
    'tunes beginning at chunk edges': [[64, 128], [0, 192]],
    'one tune a window': [[], [0]],
    'many short tunes': [list(range(0, 200, 3)), list(range(1, 200, 7))],
    'rows unlike each other': [[100], list(range(5, 200, 50))],
}


@pytest.mark.parametrize('layout', TUNE_LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_masked_attention_matches_sdpa_with_the_tune_mask(layout, dtype):
    # float32: SDPA's own values to float tolerance; bf16: as close to float64 SDPA as SDPA's bf16 flash kernel
    starts = TUNE_LAYOUTS[layout]
    shape = (len(starts), 2, 200, 16)
    mask = tune_mask_of(starts, shape[2])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).mul(s) for s in (1.5, 1.5, 1.0))
    grad_out = torch.randn(shape, generator=generator)

    def run(attention, dtype):
        inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, mask)
        out.backward(grad_out.to(dtype))
        return out, [out] + [t.grad for t in inputs]

    sdpa = lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    ours_out, ours = run(masked_attention, dtype)
    assert ours_out.grad_fn.name() == 'MaskedAttentionCPUBackward'
    _, plain = run(sdpa, dtype)
    if dtype == torch.float32:
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        return
    _, exact = run(sdpa, torch.float64)
    for error, sdpa_error in zip(relative_errors(ours, exact), relative_errors(plain, exact)):
        assert error < max(1.2 * sdpa_error, 1e-3)


def test_masked_attention_leaves_out_the_keys_no_query_of_a_chunk_sees():
    mask = tune_mask_of([[64, 128], [64, 150]], 200)
    # queries 64-127 see no key before 64 in either batch row; queries 128-191 reach back to row 1's tune at 64,
    # the last 8 queries to row 0's at 128
    assert visible_key_spans(mask, 64) == [(slice(0, 64), slice(0, 64)), (slice(64, 128), slice(64, 128)),
                                           (slice(128, 192), slice(64, 192)), (slice(192, 256), slice(128, 200))]
    causal = attention_mask(100, 100, 'cpu')
    assert visible_key_spans(causal, 64) == [(slice(0, 64), slice(0, 64)), (slice(64, 128), slice(0, 100))]


def test_masked_attention_is_used_only_where_it_pays():
    mask = tune_mask_of([[3]], 8)
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    assert masked_attention(q, q, q, mask).grad_fn.name() == 'MaskedAttentionCPUBackward'
    # attention dropout, no gradient, an additive float mask, or past MAX_LEN: SDPA itself
    assert masked_attention(q, q, q, mask, 0.1).grad_fn.name() != 'MaskedAttentionCPUBackward'
    with torch.no_grad():
        assert masked_attention(q, q, q, mask).grad_fn is None
    additive = torch.zeros(8, 8).masked_fill(~mask[0, 0], float('-inf'))
    assert masked_attention(q, q, q, additive).grad_fn.name() != 'MaskedAttentionCPUBackward'
    keys_only = torch.tensor([[True] * 6 + [False] * 2])  # one row for every query: SDPA, and its values
    out = masked_attention(q, q, q, keys_only)
    assert out.grad_fn.name() != 'MaskedAttentionCPUBackward'
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keys_only))
    n = MaskedAttentionCPU.MAX_LEN + 1
    long = torch.randn(1, 1, n, 4, requires_grad=True)
    assert masked_attention(long, long, long, attention_mask(n, n, 'cpu')).grad_fn.name() != \
        'MaskedAttentionCPUBackward'


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


def test_dropout_mask_buffer_is_per_thread():
    # the reused byte buffer must not be shared: two threads drawing at once would overwrite each other's
    # bytes between numpy's compare and torch's conversion
    import threading

    buffers = {}

    def draw(name):
        dropout_mask(torch.zeros(1000), 0.5)
        buffers[name] = fast_ops._mask_bytes.buffer

    draw('main')
    worker = threading.Thread(target=draw, args=('worker',))
    worker.start()
    worker.join()
    assert buffers['main'] is not buffers['worker']
    assert not np.shares_memory(buffers['main'], buffers['worker'])


def test_embedding_sum_equals_looking_up_masking_and_summing():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(50, 16, generator=generator).requires_grad_()
    idx = torch.randint(0, 50, (3, 7, 9), generator=generator)
    keep = torch.rand(3, 7, 9, generator=generator) < 0.7
    grad = torch.randn(3, 7, 16, generator=generator)
    plain = lambda i, w, k: (torch.nn.functional.embedding(i, w) * k[..., None]).sum(-2)  # noqa: E731
    results = []
    for sum_of_embeddings in (embedding_sum, plain):
        out = sum_of_embeddings(idx, weight, keep)
        out.backward(grad)
        results.append((out.detach(), weight.grad))
        weight.grad = None
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
