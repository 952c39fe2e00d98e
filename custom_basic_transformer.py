"""The decoder-only RoPE transformer and its autoregressive wrapper (loss, accuracy, cached generation).

Architecture as the seed: token embedding -> dropout -> pre-LayerNorm decoder blocks (rotary multi-head
attention, GELU feed-forward, residual dropout) -> LayerNorm -> logits. One code path for CPU, CUDA and MPS:
attention always goes through scaled_dot_product_attention with is_causal=True, so no dense mask is built
during training and the fused kernels run wherever the device has them. Where profiling on CPU found
torch's own ops slow, our pieces take over, each tested against the plain version: on CPU only, dropout
masks (dropout_mask), the feed-forward's GELU + dropout (GeluDropout) and, under bf16, the attention backward
(CausalAttentionCPU, whose forward is still SDPA's flash kernel); on every device, the q/k/v split with
rotary embedding in training (RotaryQKV).

Context longer than max_seq_len (only reached by generation) uses sliding-window attention: in every layer a
position attends to itself and the max_seq_len - 1 positions before it. That is what a key/value cache of the
last max_seq_len positions computes at one position per new token, and net(x) computes exactly the same for
any length, so cached and uncached generation agree beyond max_seq_len too. The seed instead re-encoded the
last max_seq_len tokens from scratch every step; with more than one layer that cannot be cached (the cached
keys of deeper layers have seen tokens that have left the window) so it is not what we compute. With depth 1
the two coincide (tests/test_model.py checks both statements).
"""

import copy
import math
import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dataset import NUM_TOKENS, PAD_IDX


# ----------------------------------------------------------------------------------------------------------
# Small helpers

# .buffer: a numpy bool array reused for every mask, one per thread (a mask's bytes live only until torch has
# converted them, but two threads drawing at once must not share it)
_mask_bytes = threading.local()


def dropout_mask(x, p):
    """Tensor of x's shape, dtype and (CPU) device: 0 where dropped (probability p), 1 where kept.

    Profiled on CPU, torch's dropout spent most of its time drawing one random number per element from its
    Mersenne twister (~7 ns each) and in elementwise ops on boolean masks, which are not vectorised (a
    where() or bool->bf16 conversion is ~6x slower than a bf16 multiply). Here numpy's SFC64 generator
    gives 64 random bits per draw, about 3x faster, split into four 16-bit lanes: an element is kept when its
    lane is at least round(p * 65536), so the masks are Bernoulli(1 - p) up to p being rounded to a multiple
    of 1/65536. numpy compares into a reused byte buffer, which torch turns into x's dtype with a vectorised
    copy. Bits are drawn in blocks of 2^18 elements because a fresh multi-megabyte array costs page faults
    (in a training step, a fresh 8 MB tensor's first pass took several times its in-cache time); the blocks
    continue one stream, so the mask does not depend on the block size.
    The seed comes from torch's generator: torch.manual_seed and a checkpoint's RNG state decide every mask.
    """
    n = x.numel()
    if getattr(_mask_bytes, 'buffer', None) is None or _mask_bytes.buffer.size < n:
        _mask_bytes.buffer = np.empty(n, dtype=np.bool_)
    keep = _mask_bytes.buffer[:n]
    generator = np.random.SFC64(int(torch.randint(2 ** 63 - 1, (1,))))
    threshold = round(p * 65536)
    for start in range(0, n, 1 << 18):
        part = keep[start:start + (1 << 18)]
        lanes = generator.random_raw((len(part) + 3) // 4).view(np.uint16)[:len(part)]
        np.greater_equal(lanes, threshold, out=part)
    return torch.from_numpy(keep.view(np.uint8)).to(x.dtype).view(x.shape)


def dropout_scale(p):
    """What inverted dropout multiplies kept elements by (all elements are dropped when p is 1)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def dropout(x, p, training, inplace=False):
    """Inverted dropout: x * mask / (1 - p), with dropout_mask's cheap masks on CPU.

    x * mask * scale is two plain multiplies forward and two backward. CUDA and MPS keep torch's fused
    kernel, and so does torch.compile, which cannot trace numpy's generator. inplace=True overwrites x (two
    fewer allocations): only for a fresh tensor that its producer does not keep for backward, such as an
    embedding's output, and not a view (a Linear's 3-d output is one).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != 'cpu' or torch.compiler.is_compiling():  # (compiled graphs draw masks themselves)
        return F.dropout(x, p, True, inplace)
    keep = dropout_mask(x, p)
    return (x.mul_(keep) if inplace else x * keep).mul_(dropout_scale(p))  # the second reuses the first's tensor


class GeluDropout(torch.autograd.Function):
    """dropout(gelu(a)) given the mask: one new tensor forward and one backward, where autograd makes three.

    The feed-forward's hidden activations are the largest tensors of a step, and on CPU each fresh one costs
    page faults as well as a pass over memory. Backward computes grad * mask * scale into one new tensor and
    gelu's backward overwrites it in place.
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
    if not training or p == 0.0 or a.device.type != 'cpu' or torch.compiler.is_compiling():
        return dropout(F.gelu(a), p, training)
    return GeluDropout.apply(a, dropout_mask(a, p), dropout_scale(p))


def top_k(logits, thres=0.9, k=None):
    """Keep the k largest logits per row (k defaults to the top (1 - thres) fraction, seed style)."""
    if k is None:
        k = max(1, math.ceil((1 - thres) * logits.shape[-1]))
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))


def top_p(logits, thres=0.9):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches thres."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach thres; the most likely token is always kept
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= thres
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float('-inf'))


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding

class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embedding, grown on demand for positions past max_seq_len.

    Tables are computed in float64 on the CPU (MPS has no float64) and stored as float32 buffers with
    persistent=False, so a state_dict holds parameters only. Exact tables matter for cached generation:
    cached keys are rotated at their absolute positions and only relative offsets must survive rounding.
    """

    def __init__(self, dim, max_seq_len, base=10000):
        super().__init__()
        self.dim = dim
        self.base = base
        cos, sin = self._tables(max_seq_len)
        self.register_buffer('cos', cos, persistent=False)
        self.register_buffer('sin', sin, persistent=False)

    def _tables(self, length):
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # halves match rotate_half's halves
        return angles.cos().float(), angles.sin().float()

    def forward(self, start, length):
        """cos, sin of shape (length, dim) for positions start .. start + length - 1."""
        end = start + length
        if end > self.cos.shape[0]:
            # ordinary tensors even when grown during generation, so training can use them afterwards
            with torch.inference_mode(False):
                cos, sin = self._tables(max(end, 2 * self.cos.shape[0]))
                self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self.cos[start:end], self.sin[start:end]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def swap_halves(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """Rotate x (..., n, dim) by the angles of its n positions; cos/sin (n, dim) broadcast over the rest.

    The plain formula, used by generation. Training uses RotaryQKV, which computes the same for q and k
    with fewer passes over memory (tests/test_model.py checks that the two agree, values and gradients).
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
    backward reads. Autograd of rearrange, rotary and split makes about four times as many tensors, and
    every fresh multi-megabyte tensor costs page faults on CPU.
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


# ----------------------------------------------------------------------------------------------------------
# Key/value cache for generation

class KVCache:
    """Rotated keys and values of the last `size` positions of every layer, in ring buffers.

    A single new query attends to every filled slot; the order of keys does not matter to softmax
    attention, so the ring never has to be shifted when the window slides.
    """

    def __init__(self, depth, batch, heads, size, dim_head, device, dtype):
        shape = (depth, batch, heads, size, dim_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.size = size
        self.length = 0  # positions seen so far = absolute position of the next token

    def store(self, layer, k, v, start):
        """Write k, v (b, h, n, d) of positions start .. start + n - 1, keeping only the last `size`."""
        n = k.shape[2]
        keep = min(n, self.size)
        slots = [(start + i) % self.size for i in range(n - keep, n)]
        if keep == 1:
            self.keys[layer, :, :, slots[0]] = k[:, :, -1]
            self.values[layer, :, :, slots[0]] = v[:, :, -1]
        else:
            index = torch.tensor(slots, device=k.device)
            # under autocast k, v arrive in bf16/fp16 while the cache has the parameters' dtype
            self.keys[layer].index_copy_(2, index, k[:, :, n - keep:].to(self.keys.dtype))
            self.values[layer].index_copy_(2, index, v[:, :, n - keep:].to(self.values.dtype))

    def window(self, layer):
        filled = min(self.length + 1, self.size)  # includes the position being decoded
        return self.keys[layer, :, :, :filled], self.values[layer, :, :, :filled]


class CausalAttentionCPU(torch.autograd.Function):
    """Causal self-attention whose forward is SDPA's flash kernel and whose backward is ours (CPU only).

    Profiled on CPU, SDPA's flash backward was 14% of a training step: ~22 ms per layer at batch 8 x 256
    tokens, running at under 10% of the bf16 matmul peak. For short sequences the plain formulas are faster
    (1.35x at 256 tokens, 2x at 100): recompute the probabilities P = softmax(q k^T * scale) chunk by chunk,
    then dv = P^T do, ds = P * (dp - rowsum(dp * P)) with dp = do v^T (softmax's backward), dq = ds k * scale,
    dk = ds^T q * scale. Scores, P and ds stay in float32, as in the flash kernels, so the gradients are
    as accurate as flash's; the four big products run in the inputs' dtype (bf16 under autocast). Chunks
    of (batch x head) slices hold about 2^19 scores, so they stay in cache, and nothing of size n x n is
    kept between forward and backward. Used for bf16 (autocast) only, and up to MAX_LEN tokens: in float32
    or for longer sequences flash's backward was as fast or faster here.
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
    """scaled_dot_product_attention(q, k, v, is_causal=True), with our faster backward on CPU where it pays."""
    if (q.device.type == 'cpu' and q.dtype == torch.bfloat16 and dropout_p == 0.0
            and q.shape[-2] == k.shape[-2] <= CausalAttentionCPU.MAX_LEN
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling()):
        return CausalAttentionCPU.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def sliding_window_mask(n, window, device):
    """(n, n) boolean mask, True where a query may attend: causal and at most window - 1 back."""
    offset = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    return (offset >= 0) & (offset < window)


# ----------------------------------------------------------------------------------------------------------
# Model

class MultiHeadAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout  # attention-probability dropout; non-zero forces SDPA's slower math path on CPU
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, rotary, window, start=0, cache=None, layer=0):
        n = x.shape[1]
        cos, sin = rotary(start, n)
        qkv = self.to_qkv(x)
        if torch.is_grad_enabled() and qkv.requires_grad:
            q, k, v = RotaryQKV.apply(qkv, cos, sin, self.heads)
        else:  # generation: the plain formula on views, the fewest ops per new token
            qkv = split_qkv(qkv, self.heads)
            q, k = apply_rotary_pos_emb(qkv[:2], cos, sin).unbind(0)
            v = qkv[2]
        dropout_p = self.dropout if self.training else 0.0

        if cache is not None:
            cache.store(layer, k, v, start)
        if cache is not None and n == 1:
            # one query sees only its past: no mask needed
            k, v = cache.window(layer)
            out = F.scaled_dot_product_attention(q, k, v)
        elif n <= window:
            out = causal_attention(q, k, v, dropout_p)
        else:
            mask = sliding_window_mask(n, window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.to_out(rearrange(out, 'b h n d -> b n (h d)'))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.fc_in = nn.Linear(dim, mult * dim)
        self.fc_out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        return self.fc_out(gelu_dropout(self.fc_in(x), self.dropout, self.training))


class DecoderBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, dropout=0.0, attn_dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dim_head, attn_dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, rotary, window, start=0, cache=None, layer=0):
        attended = self.attn(self.attn_norm(x), rotary, window, start, cache, layer)
        x = x + dropout(attended, self.dropout, self.training)
        return x + dropout(self.ff(self.ff_norm(x)), self.dropout, self.training)


class MusicTransformer(nn.Module):
    """Decoder-only transformer: net(x) -> logits (b, n, num_tokens).

    dropout applies after the embedding, inside the feed-forward and on both residual branches (seed).
    attn_dropout is the seed's dropout on attention probabilities; it defaults to 0 because on CPU any
    attention dropout makes scaled_dot_product_attention leave its flash kernel for the math path. Pass
    attn_dropout=dropout for the seed's exact dropout placement.
    """

    def __init__(self, num_tokens=NUM_TOKENS, dim=512, depth=6, heads=8, dim_head=64, max_seq_len=1024,
                 dropout=0.1, attn_dropout=0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.rotary = RotaryEmbedding(dim_head, max_seq_len)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, dim_head, dropout, attn_dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch, device=None, dtype=None):
        weight = self.token_emb.weight
        return KVCache(self.depth, batch, self.heads, self.max_seq_len, self.dim_head,
                       device or weight.device, dtype or weight.dtype)

    def forward(self, x, cache=None, start=None):
        """Logits for tokens x (b, n).

        Without a cache, x's first token sits at position `start` (default 0). With a cache, x continues
        the cached positions: either the prompt into an empty cache, or one new token per call.
        """
        if cache is not None:
            if start is not None and start != cache.length:
                raise ValueError(f'cache holds {cache.length} positions, got start={start}')
            if cache.length > 0 and x.shape[1] != 1:
                raise ValueError('a filled cache takes one new token per call')
            start = cache.length
        start = start or 0
        h = dropout(self.token_emb(x), self.dropout, self.training, inplace=True)
        for layer, block in enumerate(self.blocks):
            h = block(h, self.rotary, self.max_seq_len, start, cache, layer)
        if cache is not None:
            cache.length += x.shape[1]
        return self.to_logits(self.norm(h))


# ----------------------------------------------------------------------------------------------------------
# Training loss and generation

class AutoregressiveWrapper(nn.Module):
    def __init__(self, net, pad_value=PAD_IDX, ignore_index=PAD_IDX):
        super().__init__()
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.pad_value = pad_value
        self.ignore_index = ignore_index

    def forward(self, x):
        """(loss, accuracy) of predicting x[:, 1:] from x[:, :-1], both over non-ignored targets only.

        A batch with no countable target gives loss 0 (still attached to the graph, so backward works and
        changes nothing) and accuracy 0, instead of the NaN a plain mean would give.
        """
        inputs, targets = x[:, :-1], x[:, 1:]
        logits = self.net(inputs).float()  # loss in float32 also under bf16 autocast
        counted = targets != self.ignore_index
        count = counted.sum().clamp(min=1)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=self.ignore_index, reduction='sum')
        correct = ((logits.argmax(dim=-1) == targets) & counted).sum()
        return loss_sum / count, (correct / count).detach()

    @torch.inference_mode()
    def _generate(self, prompt, seq_len, temperature, filter_logits_fn, filter_thres, top_k_count, top_p_thres,
                  use_cache, eos_token):
        b, n = prompt.shape
        out = prompt
        done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
        cache = self.net.new_cache(b) if use_cache else None
        # uncached: tokens further back than depth * (window - 1) cannot reach the last position
        reach = self.net.depth * (self.max_seq_len - 1) + 1
        for step in range(seq_len):
            if use_cache:
                logits = self.net(out if step == 0 else out[:, -1:], cache=cache)[:, -1]
            else:
                start = max(0, out.shape[1] - reach)
                logits = self.net(out[:, start:], start=start)[:, -1]
            logits = logits.float()
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if filter_logits_fn is not None:
                    logits = filter_logits_fn(logits, thres=filter_thres)
                if top_k_count is not None:
                    logits = top_k(logits, k=top_k_count)
                if top_p_thres is not None:
                    logits = top_p(logits, thres=top_p_thres)
                token = torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
            if eos_token is not None:
                token = token.masked_fill(done, self.pad_value)
                done = done | (token == eos_token)
            out = torch.cat((out, token[:, None]), dim=-1)
            if eos_token is not None and bool(done.all()):
                break
        return out

    def generate(self, prompt, seq_len, temperature=1.0, filter_logits_fn=None, filter_thres=0.9,
                 return_prime=False, top_k=None, top_p=None, use_cache=True, eos_token=None):
        """Sample seq_len new tokens after prompt (n,) or (b, n); returns (b, seq_len), (seq_len,) for 1-d.

        temperature 0 is greedy. top_k (a count), top_p (a probability) and filter_logits_fn(logits,
        thres=filter_thres) filter before sampling. With eos_token, a row's tokens after its eos are
        pad_value and generation stops early (fewer than seq_len columns) once every row has produced it.
        The model's train/eval mode is restored afterwards.
        """
        if prompt.dim() not in (1, 2) or prompt.shape[-1] == 0:
            raise ValueError(f'prompt must be (n,) or (b, n) with n >= 1, got shape {tuple(prompt.shape)}')
        if temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        one_dim = prompt.dim() == 1
        prompt = prompt[None] if one_dim else prompt
        was_training = self.training
        self.eval()
        try:
            out = self._generate(prompt, seq_len, temperature, filter_logits_fn, filter_thres, top_k, top_p,
                                 use_cache, eos_token)
        finally:
            self.train(was_training)
        out = out.clone()  # an ordinary tensor, usable outside inference mode
        out = out if return_prime else out[:, prompt.shape[1]:]
        return out[0] if one_dim else out


class Int8Linear(nn.Module):
    """Inference-only stand-in for nn.Linear: int8 weights with one scale per output row.

    Batch-1 decoding reads every weight once per token, so it is bound by memory traffic. torch's CPU
    int8 kernel (_weight_int8pack_mm) is fast only for a single row of bf16 activations (here ~6x faster than
    a float32 matrix-vector product); every other case goes through a float32 matmul of the dequantized
    weight. Outputs are float32 either way.
    """

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale)
        self.register_buffer('scale_bf16', scale.bfloat16())  # converted once, not once per token
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1 and flat.device.type == 'cpu':
            out = torch._weight_int8pack_mm(flat.bfloat16(), self.weight, self.scale_bf16).float()
        else:
            out = F.linear(flat.float(), self.weight.float()) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], -1)


def quantize_for_generation(model):
    """A copy of model (wrapper or net) with every Linear replaced by Int8Linear, in eval mode.

    Only for generation: the copy cannot be trained. Its outputs differ from the float model by the int8
    rounding of the weights (up to 0.4% of each row's largest weight) and, for batch-1 decoding on CPU,
    the bf16 rounding of activations; so its batch-1 cached and uncached outputs agree only approximately.
    """
    model = copy.deepcopy(model).float().eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def compile_model(model, backend='inductor'):
    """Compile the wrapper's training forward in place: state_dict keys and eager generate are unchanged.

    Off by default in training: whether it pays is measured by benchmarks/bench_model.py.
    """
    model.forward = torch.compile(model.forward, backend=backend)
    return model


def printModelParameters(model):
    """Print each parameter's shape and count and the total; return the total."""
    total = 0
    for name, param in model.named_parameters():
        print(f'{name:50s} {str(tuple(param.shape)):20s} {param.numel():>12,}')
        total += param.numel()
    print(f'Total parameters: {total:,}')
    return total


if __name__ == '__main__':
    model = AutoregressiveWrapper(MusicTransformer(max_seq_len=256))
    printModelParameters(model)
