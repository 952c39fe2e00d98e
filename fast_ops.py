"""The model's speed pieces: each function here equals a plain torch expression and only runs it faster.

The model calls dropout, gelu_dropout, rotary_qkv, causal_attention, masked_attention and embedding_sum and
never branches on the device; the choice of implementation happens here. Torch's own versions of dropout, of
attention's backward (and with a mask its forward) and of a sum of embedding lookups are slow on the CPU
(benchmarks/README.md has the profile): there our kernels run (attention's where it pays, see causal_attention and
masked_attention), while on CUDA and MPS, and inside torch.compile, dropout, gelu_dropout, causal_attention,
masked_attention and embedding_sum run the plain torch expressions. rotary_qkv is torch ops on every device: in
training one autograd function that writes q, k and v contiguous in two passes each way, where autograd's split
and rotation make about four times as many tensors; in generation the plain formula on views.
capture_cuda_graph serves the static KV cache's generation step on a GPU. tests/test_fast_ops.py checks every
piece against its plain counterpart, values and gradients.

    dropout(x, p, training)          == F.dropout(x, p, training) in distribution
    gelu_dropout(a, p, training)     == F.dropout(F.gelu(a), p, training) in distribution
    rotary_qkv(qkv, cos, sin, heads) == q, k rotated by apply_rotary_pos_emb, and v, split from the fused projection
    causal_attention(q, k, v, p)     == F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    masked_attention(q, k, v, m, p)  == F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)
    embedding_sum(idx, weight, keep) == (F.embedding(idx, weight) * keep[..., None]).sum(-2)
    capture_cuda_graph(fn)           == fn() replayed: a graph and fn's output, rewritten by each graph.replay()
"""

import threading

import numpy as np
import torch
import torch.nn.functional as F


def _plain_torch(x):
    """Where the plain expression runs: GPUs have fused kernels, and compiled graphs draw their own masks."""
    return x.device.type != 'cpu' or torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------
# Dropout: masks from numpy's SFC64 generator, 16 bits an element, into a reused byte buffer

# .buffer: a numpy bool array reused for every mask, one per thread (a mask's bytes live only until torch has
# converted them, but two threads drawing at once must not share it)
_mask_bytes = threading.local()
_MASK_BLOCK = 1 << 18  # elements drawn at a time: a block's bits stay in cache


def dropout_mask(x, p):
    """Tensor of x's shape, dtype and (CPU) device: 0 where dropped (probability p), 1 where kept.

    Torch's CPU dropout draws one Mersenne-twister number per element and works on boolean masks, whose
    elementwise ops are not vectorised. Here one 64-bit SFC64 draw gives four 16-bit lanes, and an element is
    kept when its lane is at least round(p * 65536): Bernoulli(1 - p) with p rounded to a multiple of 1/65536.
    numpy compares into a reused byte buffer (a fresh multi-megabyte array costs page faults) that torch turns
    into x's dtype. The blocks continue one stream, so the mask does not depend on the block size, and the
    stream's seed comes from torch's generator: torch.manual_seed decides every mask.
    """
    n = x.numel()
    if getattr(_mask_bytes, 'buffer', None) is None or _mask_bytes.buffer.size < n:
        _mask_bytes.buffer = np.empty(n, dtype=np.bool_)
    keep = _mask_bytes.buffer[:n]
    generator = np.random.SFC64(int(torch.randint(2 ** 63 - 1, (1,))))
    threshold = round(p * 65536)
    for start in range(0, n, _MASK_BLOCK):
        part = keep[start:start + _MASK_BLOCK]
        lanes = generator.random_raw((len(part) + 3) // 4).view(np.uint16)[:len(part)]
        np.greater_equal(lanes, threshold, out=part)
    return torch.from_numpy(keep.view(np.uint8)).to(x.dtype).view(x.shape)


def dropout_scale(p):
    """What inverted dropout multiplies kept elements by (all elements are dropped when p is 1)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def dropout(x, p, training, inplace=False):
    """Inverted dropout, x * mask / (1 - p).

    inplace=True overwrites x (two fewer allocations): only for a fresh tensor that its producer does not keep
    for backward, such as an embedding's output, and not a view (a Linear's 3-d output is one).
    """
    if not training or p == 0.0:
        return x
    if _plain_torch(x):
        return F.dropout(x, p, True, inplace)
    keep = dropout_mask(x, p)
    return (x.mul_(keep) if inplace else x * keep).mul_(dropout_scale(p))  # the second reuses the first's tensor


class GeluDropout(torch.autograd.Function):
    """dropout(gelu(a)) given the mask: one new tensor forward and one backward, where autograd makes three.

    The feed-forward's hidden activations are the largest tensors of a step. Backward computes
    grad * mask * scale into one new tensor and gelu's backward overwrites it in place.
    """

    @staticmethod
    def forward(ctx, a, keep, scale):
        ctx.save_for_backward(a, keep)
        ctx.scale = scale
        return F.gelu(a).mul_(keep).mul_(scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, keep = ctx.saved_tensors
        grad_hidden = torch.mul(grad, keep).mul_(ctx.scale)
        return torch.ops.aten.gelu_backward.grad_input(grad_hidden, a, grad_input=grad_hidden), None, None


def gelu_dropout(a, p, training):
    """dropout(F.gelu(a), p, training), the feed-forward's activation."""
    if not training or p == 0.0 or _plain_torch(a):
        return dropout(F.gelu(a), p, training)
    return GeluDropout.apply(a, dropout_mask(a, p), dropout_scale(p))


# ----------------------------------------------------------------------------------------------------------
# Rotary embedding applied while splitting the fused q/k/v projection

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def swap_halves(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """Rotate x (..., n, dim) by the angles of its n positions; cos/sin (n, dim) broadcast over the rest.

    The standard half rotation: dimension i pairs with i + dim/2, matching tables whose halves repeat.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def split_qkv(qkv, heads):
    """The fused projection (b, n, 3 * h * d) as a (3, b, h, n, d) view: q, k, v along the first dimension."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


class RotaryQKV(torch.autograd.Function):
    """Split the fused projection (b, n, 3 * h * d) into rotated q, k and plain v, each (b, h, n, d) contiguous.

    rotate_half(x) * sin == swap_halves(x) * signed_sin with signed_sin = cat(-sin1, sin2), a table-sized
    tensor, so x needs no negation: q and k are written by one multiply and one addcmul straight into a
    contiguous tensor, which the attention kernels read without copies. rotate_half is linear with
    transpose -rotate_half, so the gradient of x is g * cos + swap_halves(g) * swap_halves(signed_sin), the
    same two passes, written with v's gradient straight into the (b, n, 3 * h * d) layout the projection's
    backward reads. Autograd of split and rotation makes about four times as many tensors.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads):
        x = split_qkv(qkv, heads)
        cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        sin1, sin2 = sin.chunk(2, dim=-1)
        signed_sin = torch.cat((-sin1, sin2), dim=-1)
        qk = torch.mul(x[:2], cos, out=torch.empty(x[:2].shape, dtype=qkv.dtype, device=qkv.device))
        qk.addcmul_(swap_halves(x[:2]), signed_sin)
        ctx.save_for_backward(cos, swap_halves(signed_sin))
        q, k = qk.unbind(0)
        return q, k, x[2].contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, swapped_signed_sin = ctx.saved_tensors
        grads = [grad_q, grad_k, grad_v]
        b, h, n, d = next(g.shape for g in grads if g is not None)
        grad_qkv = torch.empty(b, n, 3 * h * d, dtype=cos.dtype, device=cos.device)
        into = split_qkv(grad_qkv, h)
        for i, grad in enumerate(grads):
            if grad is None:
                into[i].zero_()
            elif i == 2:
                into[2].copy_(grad)
            else:
                torch.mul(grad, cos, out=into[i]).addcmul_(swap_halves(grad), swapped_signed_sin)
        return grad_qkv, None, None, None


def rotary_qkv(qkv, cos, sin, heads):
    """q, k, v (each (b, h, n, d)) from the fused projection, q and k rotated by apply_rotary_pos_emb."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        return RotaryQKV.apply(qkv, cos, sin, heads)
    # generation: the plain formula on views, the fewest ops per new token
    x = split_qkv(qkv, heads)
    q, k = apply_rotary_pos_emb(x[:2], cos, sin).unbind(0)
    return q, k, x[2]


# ----------------------------------------------------------------------------------------------------------
# Causal attention: SDPA's flash forward, and on CPU under bf16 our backward

class CausalAttentionCPU(torch.autograd.Function):
    """Causal self-attention whose forward is SDPA's flash kernel and whose backward is ours (CPU, bf16).

    SDPA's CPU flash backward runs far below the matmul peak. For the short sequences of this model the plain
    formulas are faster: recompute P = softmax(q k^T * scale) chunk by chunk, then dv = P^T do,
    ds = P * (dp - rowsum(dp * P)) with dp = do v^T (softmax's backward), dq = ds k * scale, dk = ds^T q * scale.
    Scores, P and ds stay in float32, as in the flash kernels, so the gradients are as accurate as flash's; the
    four big products run in the inputs' dtype. Chunks of (batch x head) slices hold about 2^19 scores, so they
    stay in cache, and nothing of size n x n is kept between forward and backward. Up to MAX_LEN tokens: past
    it, and in float32, flash's backward is as fast or faster (benchmarks/README.md).
    """

    MAX_LEN = 512

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        b, h, n, d = q.shape
        scale = d ** -0.5
        q, k, v, grad_out = (t.reshape(b * h, n, d) for t in (q, k, v, grad_out.to(q.dtype)))
        grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (q, k, v))
        future = torch.full((n, n), float('-inf'), device=q.device).triu(1)  # added to scores: causal
        chunk = max(1, 2 ** 19 // (n * n))
        with torch.autocast('cpu', enabled=False):  # a backward called under autocast must keep these dtypes
            for i in range(0, b * h, chunk):
                c = slice(i, i + chunk)
                probs = torch.baddbmm(future, q[c].float(), k[c].float().transpose(1, 2), alpha=scale).softmax(-1)
                torch.bmm(probs.to(q.dtype).transpose(1, 2), grad_out[c], out=grad_v[c])
                grad_probs = torch.bmm(grad_out[c], v[c].transpose(1, 2)).float()
                grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).to(q.dtype)
                torch.mul(torch.bmm(grad_scores, k[c]), scale, out=grad_q[c])
                torch.mul(torch.bmm(grad_scores.transpose(1, 2), q[c]), scale, out=grad_k[c])
        return grad_q.view(b, h, n, d), grad_k.view(b, h, n, d), grad_v.view(b, h, n, d)


def causal_attention(q, k, v, dropout_p=0.0):
    """F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)."""
    if (not _plain_torch(q) and q.dtype == torch.bfloat16 and dropout_p == 0.0
            and q.shape[-2] == k.shape[-2] <= CausalAttentionCPU.MAX_LEN
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return CausalAttentionCPU.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


# ----------------------------------------------------------------------------------------------------------
# Masked attention (packed windows' tune mask): only the blocks of scores a mask can leave visible

def visible_key_spans(mask, chunk):
    """[(query rows, key columns)] of slices: for each chunk of query rows, the columns from the first to the last
    one any of its rows may attend to in any batch row (the rest is masked for all of them)."""
    n = mask.shape[-1]
    seen = mask.reshape(-1, mask.shape[-2], n).view(torch.uint8).amax(0)  # bytes: torch's bool any is slow
    spans = []
    for start in range(0, seen.shape[0], chunk):
        columns = seen[start:start + chunk].amax(0).nonzero()
        first, last = (int(columns[0]), int(columns[-1])) if len(columns) else (0, 0)
        spans.append((slice(start, start + chunk), slice(first, last + 1)))
    return spans


class MaskedAttentionCPU(torch.autograd.Function):
    """Self-attention under a boolean mask, computing scores only where the mask can leave some visible (CPU).

    With an explicit mask SDPA's CPU flash kernel computes all n x n scores, while a causal mask hides over half
    of them, and its backward runs far below the matmul peak. Here each chunk of CHUNK queries multiplies only
    by the keys of visible_key_spans (causally never those after the chunk, and with the tune mask none before
    the earliest tune start of its rows), in plain bmm: scores and softmax in float32, as in the flash kernels,
    the products with v in the inputs' dtype. The float32 probabilities of those blocks are kept for the
    backward (dv = P^T do, ds = softmax's backward of dp = do v^T, dq = ds k * scale, dk = ds^T q * scale), so
    nothing is recomputed; dk and dv add the chunks' parts in float32. Up to MAX_LEN tokens, where the kept
    blocks stay a few tens of megabytes a layer.
    """

    CHUNK = 64
    MAX_LEN = 512

    @staticmethod
    def forward(ctx, q, k, v, mask):
        b, h, n, d = q.shape
        scale = d ** -0.5
        spans = visible_key_spans(mask, MaskedAttentionCPU.CHUNK)
        hidden = ~mask
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        out = torch.empty_like(q)
        probs = []
        with torch.autocast('cpu', enabled=False):  # under autocast bmm would take the float32 scores to bf16
            q32, k32 = q.float(), k.float()
            for rows, columns in spans:
                scores = torch.bmm(q32[:, rows], k32[:, columns].transpose(1, 2))
                scores.view(b, h, *scores.shape[1:]).masked_fill_(hidden[..., rows, columns], float('-inf'))
                p = scores.mul_(scale).softmax(-1)
                out[:, rows] = torch.bmm(p.to(v.dtype), v[:, columns])
                probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.spans = spans
        return out.view(b, h, n, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        shape, dtype = grad_out.shape, q.dtype
        scale = q.shape[-1] ** -0.5
        grad_out = grad_out.to(dtype).reshape(q.shape)
        grad_q = torch.empty_like(q)
        grad_k, grad_v = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        with torch.autocast('cpu', enabled=False):  # a backward called under autocast must keep these dtypes
            for (rows, columns), p in zip(ctx.spans, probs):
                grad_v[:, columns] += torch.bmm(p.to(dtype).transpose(1, 2), grad_out[:, rows])
                grad_probs = torch.bmm(grad_out[:, rows], v[:, columns].transpose(1, 2)).float()
                grad_scores = torch._softmax_backward_data(grad_probs, p, -1, p.dtype).to(dtype)
                grad_q[:, rows] = torch.bmm(grad_scores, k[:, columns]).mul_(scale)
                grad_k[:, columns] += torch.bmm(grad_scores.transpose(1, 2), q[:, rows])
        return grad_q.view(shape), grad_k.mul_(scale).to(dtype).view(shape), grad_v.to(dtype).view(shape), None


def masked_attention(q, k, v, mask, dropout_p=0.0):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), mask boolean (True: may
    attend) and broadcast over (b, h, n, n), every query seeing at least one key."""
    if (not _plain_torch(q) and mask.dtype == torch.bool and dropout_p == 0.0
            and q.dtype in (torch.bfloat16, torch.float32) and q.dtype == k.dtype == v.dtype
            and q.shape == k.shape == v.shape and q.shape[-2] <= MaskedAttentionCPU.MAX_LEN
            and mask.dim() <= 4 and mask.shape[-2:] == q.shape[-2:-1] * 2  # a row of the mask for every query
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return MaskedAttentionCPU.apply(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------
# A sum of embeddings: one embedding_bag instead of a lookup, a product and a sum per term

def embedding_sum(idx, weight, keep):
    """(F.embedding(idx, weight) * keep[..., None]).sum(-2): rows of weight summed over idx's last dimension,
    those where the boolean keep is False left out.

    On the CPU embedding_bag adds the kept rows in one pass each way, in the same order as the plain sum, without
    the (..., k, dim) tensor of looked-up rows or a lookup per term.
    """
    if _plain_torch(weight):
        return (F.embedding(idx, weight) * keep[..., None]).sum(-2)
    flat = idx.reshape(-1, idx.shape[-1])
    out = F.embedding_bag(flat, weight, per_sample_weights=keep.reshape(flat.shape).to(weight.dtype), mode='sum')
    return out.view(*idx.shape[:-1], weight.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs: one capture, then every call is one launch

def capture_cuda_graph(fn):
    """(graph, out): out = fn() captured as a CUDA graph; graph.replay() reruns its kernels on the same tensors
    and rewrites out in place.

    Replay sees the current values of the tensors fn read, never new tensors or Python numbers, so fn must read
    its inputs from tensors the caller keeps and refills. fn runs twice, on a side stream to warm up (lazy
    kernel setup and the allocator's first requests must not happen during capture), then captured: anything
    fn writes outside its output is written twice and is the caller's to restore.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
