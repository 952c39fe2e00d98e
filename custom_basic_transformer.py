"""The decoder-only RoPE transformer and its autoregressive wrapper (loss, accuracy, cached generation).

Architecture as the original project: token embedding -> dropout -> pre-LayerNorm decoder blocks (rotary
multi-head attention, GELU feed-forward, residual dropout) -> LayerNorm -> logits. One code path for CPU, CUDA
and MPS: attention goes through scaled_dot_product_attention with is_causal=True, so no dense mask is built in
training (unless tune_mask asks for one) and the fused kernels run wherever the device has them. The speed
pieces (dropout, gelu_dropout, rotary_qkv, causal_attention, masked_attention, embedding_sum) come from
fast_ops.py, each equal to its plain torch expression.

Context longer than max_seq_len (only reached by generation) uses sliding-window attention: in every layer a
position attends to itself and the max_seq_len - 1 positions before it. That is what a key/value cache of the
last max_seq_len positions computes at one position per new token, and net(x) computes exactly the same for
any length, so cached and uncached generation agree beyond max_seq_len too. The original re-encoded the last
max_seq_len tokens from scratch every step; with more than one layer that cannot be cached (the cached keys of
deeper layers have seen tokens that have left the window), so it is not what we compute. With depth 1 the two
coincide (tests/test_model.py checks both statements).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from fast_ops import causal_attention, dropout, embedding_sum, gelu_dropout, masked_attention, rotary_qkv
from kv_cache import KVCache, StaticKVCache
from repeat_memory import REPEAT_MAX_STRENGTH, extend_match, repeat_mix
from tokens import LABEL_RANGES, NUM_TOKENS, PAD_IDX, START_IDX, TOKEN_RANGES, time_steps

ROTARY_TABLE_POSITIONS = 4096  # rotary tables cover at least this many positions (longer: computed per call)
CLOCK_STEPS = 8       # tune_clock: time steps (32 ms each in 'ms' timing) a clock reading spans
CLOCK_READINGS = 192  # tune_clock: readings 0 .. CLOCK_READINGS - 1 (the last: that long or longer), then 'unknown'
LENGTH_DROPOUT = 0.3  # tune_length: a training tune is not told its length with this chance, so it can be left unsaid
UNTOLD = CLOCK_READINGS + 1  # tune_length: the row of a tune told nothing (CLOCK_READINGS: its end is not in view)
KEY_FIRST, KEY_LAST = TOKEN_RANGES['key']  # tune_key: the header's key ids, 12 major tonics then 12 minor
PITCHED = (TOKEN_RANGES['melody'][0], TOKEN_RANGES['harmony'][1])  # tune_key: pitch ids with a pitch class (no drums)
NO_DEGREE = 24  # tune_key: the row of a token that is not a pitch, or whose tune's key is not in view
LABEL_IDS = LABEL_RANGES[-1][1] - KEY_FIRST + 1  # rows of the label table: every header id


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding

class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embedding, sized once at construction.

    Tables are computed in float64 on the CPU (MPS has no float64) and stored as float32 buffers with
    persistent=False, so a state_dict holds parameters only. Exact tables matter for cached generation: cached
    keys are rotated at their absolute positions and only relative offsets must survive rounding. The buffers
    never change shape (DDP broadcasts buffers and torch.compile specialises on their shapes); positions past
    the table, reached only by long generation, are computed for that call alone.
    """

    def __init__(self, dim, positions, base=10000):
        super().__init__()
        self.dim = dim
        self.base = base
        cos, sin = self._tables(0, positions)
        self.register_buffer('cos', cos, persistent=False)
        self.register_buffer('sin', sin, persistent=False)

    def _tables(self, start, end):
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
        angles = torch.arange(start, end, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # halves match rotate_half's halves
        return angles.cos().float(), angles.sin().float()

    def forward(self, start, length):
        """cos, sin of shape (length, dim) for positions start .. start + length - 1."""
        end = start + length
        if end <= self.cos.shape[0]:
            return self.cos[start:end], self.sin[start:end]
        cos, sin = self._tables(start, end)
        return cos.to(self.cos.device), sin.to(self.sin.device)


# ----------------------------------------------------------------------------------------------------------
# The tune clock: how long ago the tune began

def clock_reading(since, elapsed, window, past_window=False):
    """The clock embedding's row: elapsed time steps in CLOCK_STEPS readings, or CLOCK_READINGS ('unknown') where
    the tune's start token is window or more positions back, or was never seen. past_window (a tune_labels model):
    the clock reads on however far back the start token lies, 'unknown' only where elapsed is negative (not known:
    elapsed_from_head)."""
    reading = torch.div(elapsed, CLOCK_STEPS, rounding_mode='floor').clamp(max=CLOCK_READINGS - 1)
    known = elapsed >= 0 if past_window else since < window
    return torch.where(known, reading, torch.full_like(reading, CLOCK_READINGS))


def tune_clock(seq, window):
    """For each position of seq (b, n): (since, elapsed), the positions since the last start token at or before it
    (at most window; window where there is none) and the time steps of the time-delta tokens after that start
    token, its own included. Both (b, n), int64."""
    n = seq.shape[1]
    positions = torch.arange(n, device=seq.device).expand_as(seq)
    last_start = torch.where(seq == START_IDX, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    since = torch.where(last_start >= 0, positions - last_start, torch.full_like(positions, window)).clamp(max=window)
    steps = time_steps(seq).cumsum(dim=1)
    at_start = steps.gather(1, last_start.clamp(min=0))
    return since, torch.where(last_start >= 0, steps - at_start, steps)


def elapsed_from_head(seq, elapsed, head=None):
    """tune_clock's elapsed (b, n) of seq with the positions before seq's first start token counted from their tune's
    start token: head (b, HEAD_SLOTS), whose last slot holds the time steps of that tune before seq (-1 or no head:
    not known, and elapsed is -1 there)."""
    before = torch.cumsum(seq == START_IDX, dim=1) == 0
    steps = torch.full_like(seq[:, :1], -1) if head is None else head[:, -1:]
    return torch.where(before, torch.where(steps >= 0, steps + elapsed, -1), elapsed)


def time_left(seq):
    """For each position of seq (b, n): (known, left), whether its tune's end (the next start token) lies in seq, and
    the time steps of the time-delta tokens after it up to that end. Both (b, n)."""
    n = seq.shape[1]
    positions = torch.arange(n, device=seq.device).expand_as(seq)
    starts = torch.where(seq == START_IDX, positions, torch.full_like(positions, n))
    at_or_after = starts.flip(1).cummin(1).values.flip(1)
    after = torch.cat((at_or_after[:, 1:], torch.full_like(at_or_after[:, :1], n)), dim=1)
    steps = time_steps(seq).cumsum(dim=1)
    return after < n, steps.gather(1, (after - 1).clamp(max=n - 1)) - steps


def left_reading(known, left):
    """The length embedding's row: time steps left in CLOCK_STEPS readings, or CLOCK_READINGS (the end is not in
    view); a negative left is UNTOLD (a tune not told its length)."""
    reading = torch.div(left, CLOCK_STEPS, rounding_mode='floor').clamp(min=0, max=CLOCK_READINGS - 1)
    reading = torch.where(known, reading, torch.full_like(reading, CLOCK_READINGS))
    return torch.where(known & (left < 0), torch.full_like(reading, UNTOLD), reading)


def clock_after(since, elapsed, token, window):
    """(since, elapsed) of one new token (b,) after a position whose clock was (since, elapsed), each (b,); an elapsed
    not known (negative) stays so until the next start token."""
    start = token == START_IDX
    since = torch.where(start, torch.zeros_like(since), (since + 1).clamp(max=window))
    moved = torch.where(elapsed < 0, elapsed, elapsed + time_steps(token))
    elapsed = torch.where(start, torch.zeros_like(elapsed), moved)
    return since, elapsed


def asked_left(length, elapsed):
    """Time steps left of the length asked (b, 1) after elapsed (b, n); -1 (told nothing) where length is negative."""
    return torch.where(length >= 0, (length - elapsed).clamp(min=0), -1)


# ----------------------------------------------------------------------------------------------------------
# The tune key: each pitch's scale degree in the key its tune's header names

def tune_keys(seq, since, window):
    """For each position of seq (b, n), since (b, n) positions after its tune's start token (tune_clock): the key its
    tune's header names (0-11 major on tonic C..B, 12-23 minor), or -1 where the header names no key or, as for the
    clock, that start token is window or more positions back or not in seq. A header's key comes right after the start
    token (condition.header)."""
    n = seq.shape[1]
    positions = torch.arange(n, device=seq.device).expand_as(seq)
    token = seq.gather(1, (positions - since + 1).clamp(min=0, max=n - 1))
    known = (since >= 1) & (since < window) & (token >= KEY_FIRST) & (token <= KEY_LAST)
    return torch.where(known, token - KEY_FIRST, torch.full_like(token, -1))


def key_after(key, since, token, window):
    """The tune key (b,) after one new token (b,) that lies since (b,) positions after its tune's start token."""
    key = torch.where((since == 1) & (token >= KEY_FIRST) & (token <= KEY_LAST), token - KEY_FIRST, key)
    return torch.where((token == START_IDX) | (since >= window), torch.full_like(key, -1), key)


def degree_reading(seq, key):
    """The key embedding's row of each token of seq (b, n): a pitch's scale degree above its tune's tonic, 0-11 in a
    major key and 12-23 in a minor one; NO_DEGREE for any other token and where the key (b, n; tune_keys) is -1."""
    pitched = (seq >= PITCHED[0]) & (seq <= PITCHED[1]) & (key >= 0)
    degree = ((seq - PITCHED[0]) % 128 - key % 12) % 12 + 12 * (key >= 12)
    return torch.where(pitched, degree, torch.full_like(degree, NO_DEGREE))


# ----------------------------------------------------------------------------------------------------------
# The tune's labels: its header's ids, wherever its start token lies

def tune_labels(seq, head=None):
    """For each position of seq (b, n): the header ids of its tune at or before it, one slot per kind of
    LABEL_RANGES (b, n, 3), -1 where the tune has none of that kind. head (b, HEAD_SLOTS): first the slots of the tune
    in progress before seq's first position (its header lies before seq: a training window cut from inside a tune, or
    generation past the window), for the positions before seq's first start token; None: none."""
    n = seq.shape[1]
    positions = torch.arange(n, device=seq.device).expand_as(seq)
    last_start = torch.where(seq == START_IDX, positions, -1).cummax(dim=1).values
    slots = []
    for kind, (first, last) in enumerate(LABEL_RANGES):
        # header ids come only right after their tune's start token: the last one of a kind at or before a position
        # is its tune's when it lies after that tune's start token
        at = torch.where((seq >= first) & (seq <= last), positions, -1).cummax(dim=1).values
        label = torch.where(at > last_start, seq.gather(1, at.clamp(min=0)), -1)
        if head is not None:
            label = torch.where((last_start < 0) & (at < 0), head[:, kind:kind + 1].expand_as(label), label)
        slots.append(label)
    return torch.stack(slots, dim=-1)


def labels_after(labels, token):
    """The label slots (b, 3) after one new token (b,): a start token clears them, a header id fills its kind's."""
    filled = torch.stack([(token >= first) & (token <= last) for first, last in LABEL_RANGES], dim=-1)
    labels = torch.where(filled, token[:, None].expand_as(labels), labels)
    return torch.where((token == START_IDX)[:, None], torch.full_like(labels, -1), labels)


def key_of_labels(labels):
    """tune_keys's key (0-23, -1 none) from label slots (..., 3): the key slot's id."""
    key = labels[..., 0]
    return torch.where(key >= 0, key - KEY_FIRST, -1)


# ----------------------------------------------------------------------------------------------------------
# The model

def attention_mask(n, window, device, tunes=None):
    """Boolean mask, True where a query may attend: causal and at most window - 1 back; (n, n).

    With tunes (b, n), each position's tune number, also only within the query's own tune: (b, 1, n, n), the
    block-diagonal causal mask of packed training windows.
    """
    offset = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    mask = (offset >= 0) & (offset < window)
    if tunes is not None:
        mask = mask & (tunes[:, None, :, None] == tunes[:, None, None, :])
    return mask


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout  # attention-probability dropout; non-zero forces SDPA's slower math path on CPU
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, cos, sin, window, cache=None, layer=0, mask=None):
        n = x.shape[1]
        q, k, v = rotary_qkv(self.to_qkv(x), cos, sin, self.heads)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            cache.store(layer, k, v)
        if cache is not None and n == 1:
            k, v, filled = cache.window(layer)  # one query sees only its past: no causal mask needed
            out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=filled)
        elif mask is None and n <= window:
            out = causal_attention(q, k, v, dropout_p)
        else:
            mask = attention_mask(n, window, x.device) if mask is None else mask
            out = masked_attention(q, k, v, mask, dropout_p)
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

    def forward(self, x, cos, sin, window, cache=None, layer=0, mask=None):
        attended = self.attn(self.attn_norm(x), cos, sin, window, cache, layer, mask)
        x = x + dropout(attended, self.dropout, self.training)
        return x + dropout(self.ff(self.ff_norm(x)), self.dropout, self.training)


class MusicTransformer(nn.Module):
    """Decoder-only transformer: net(x) -> logits (b, n, num_tokens).

    dropout applies after the embedding, inside the feed-forward and on both residual branches (as the
    original). attn_dropout is the original's dropout on attention probabilities; it defaults to 0 because on
    CPU any attention dropout makes scaled_dot_product_attention leave its flash kernel for the math path.
    Pass attn_dropout=dropout for the original's exact dropout placement.
    """

    def __init__(self, num_tokens=NUM_TOKENS, dim=512, depth=6, heads=8, dim_head=64, max_seq_len=1024,
                 dropout=0.1, attn_dropout=0.0, prev_tokens=0, tune_clock=False, tune_length=False, tune_key=False,
                 tune_labels=False):
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        self.token_emb = nn.Embedding(num_tokens, dim)
        # each position also gets the embeddings of the prev_tokens tokens before it (one table a distance, zero
        # across a tune's start): a key then says 'what came just before me', which one attention layer can match
        # against the query's recent tokens, the first half of copying a motif (an induction head)
        self.prev_tokens = prev_tokens
        self.prev_emb = nn.Embedding(prev_tokens * num_tokens, dim) if prev_tokens else None
        # with tune_clock each position also gets an embedding of the time since its tune's start token (in
        # CLOCK_STEPS readings; 'unknown' when that token is a window or more back): how far into a tune it is, and so
        # where its bars and its end fall, is otherwise a sum over every duration before it that attention must do
        self.tune_clock = tune_clock
        self.clock_emb = nn.Embedding(CLOCK_READINGS + 1, dim) if tune_clock else None
        # with tune_length each position also gets an embedding of the time left to its tune's last note: in training
        # read from the window where the tune's end lies in it (LENGTH_DROPOUT of the tunes are told nothing, a row
        # of its own, so that 'not told' is not learnt as 'the end is out of view, far off'), in generation from the
        # length asked (generate's length) less the clock, or 'not told'
        self.tune_length = tune_length
        self.length_emb = nn.Embedding(UNTOLD + 1, dim) if tune_length else None
        # with tune_key each pitch also gets an embedding of its scale degree in the key its tune's header names (while
        # the tune's start token is in view, as the clock): where a tune stands against its home note is otherwise
        # the difference of two far-apart tokens that attention must fetch and subtract at every note
        self.tune_key = tune_key
        self.key_emb = nn.Embedding(NO_DEGREE + 1, dim) if tune_key else None
        # with tune_labels each position also gets the embeddings of its tune's header ids (key, meter and style),
        # wherever its start token lies, and tune_key reads its key from them: a tune longer than the window otherwise
        # forgets what it was asked, its key, and (guidance compares it with a tune asked nothing) its guidance, once
        # its header has left the window. Training windows cut from inside a tune are given its header (head).
        self.tune_labels = tune_labels
        self.labels_emb = nn.Embedding(LABEL_IDS, dim) if tune_labels else None
        self.rotary = RotaryEmbedding(dim_head, max(max_seq_len, ROTARY_TABLE_POSITIONS))
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

    def new_cache(self, batch, device=None, dtype=None, static=False):
        """A KVCache; static=True a StaticKVCache, static='compile' one whose step is compiled too."""
        weight = self.token_emb.weight
        shape = (self.depth, batch, self.heads, self.max_seq_len, self.dim_head, device or weight.device,
                 dtype or weight.dtype)
        return StaticKVCache(*shape, compile_step=static == 'compile') if static else KVCache(*shape)

    def forward(self, x, cache=None, start=None, tunes=None, prev=None, clock=None, left=None, length=None,
                degrees=None, head=None, labels=None):
        """Logits for tokens x (b, n).

        Without a cache, x's first token sits at position `start` (default 0). With a cache, x continues
        the cached positions: either the prompt into an empty cache, or one new token per call. tunes (b, n),
        each position's tune number, keeps attention inside each tune (packed windows; no cache). prev
        (b, prev_tokens): the tokens just before x, oldest first, -1 where there is none (default: none; a cache
        remembers its own). clock (b, n): a tune_clock model's clock readings of x when x continues tokens it does
        not hold (readings_of; default: read from x alone; a cache keeps its own). A tune_length model: length (b,),
        the time steps the last tune of each row is asked to last (to its last onset; None: not asked), and left
        (b, n) its readings of x where x continues tokens it does not hold (readings_of). degrees (b, n): a tune_key
        model's key embedding rows of x, likewise. A tune_labels model: head (b, HEAD_SLOTS), the label slots of the
        tune in progress before x and its time steps before x (tune_labels, elapsed_from_head; None: none; a cache
        keeps its own), or labels (b, n, 3), x's slots where x continues tokens it does not hold (readings_of).
        """
        if cache is not None:
            if start is not None and start != cache.length:
                raise ValueError(f'cache holds {cache.length} positions, got start={start}')
            if cache.length > 0 and x.shape[1] != 1:
                raise ValueError('a filled cache takes one new token per call')
            start = cache.length
        start = start or 0
        cos, sin = self.rotary(start, x.shape[1]) if cache is None else cache.angles(self.rotary, x.shape[1])
        h = self.token_emb(x)
        if self.prev_tokens:
            if cache is not None and cache.length:
                prev = cache.last
            if prev is None:
                prev = torch.full_like(x[:, :1], -1).expand(-1, self.prev_tokens)
            seq = torch.cat((prev, x), dim=1)
            h = h + self.previous_embedding(seq)
            if cache is not None:
                cache.remember(seq[:, -self.prev_tokens:])
        if self.tune_labels:
            if labels is None:
                labels = self.label_readings(x, cache, head)
            h = h + embedding_sum((labels - KEY_FIRST).clamp(min=0), self.labels_emb.weight, labels >= 0)
            if self.tune_key and degrees is None:
                degrees = degree_reading(x, key_of_labels(labels))
        if self.tune_clock or self.tune_length or (self.tune_key and degrees is None):
            since, elapsed = self.tune_times(x, cache, head)
            if self.tune_clock:
                h = h + self.clock_emb(self.clock_readings(since, elapsed) if clock is None else clock)
            if self.tune_length:
                h = h + self.length_emb(self.left_readings(x, cache, elapsed, length) if left is None else left)
            if self.tune_key and degrees is None:
                degrees = self.key_readings(x, cache, since)
        if self.tune_key:
            h = h + self.key_emb(degrees)
        h = dropout(h, self.dropout, self.training, inplace=True)
        mask = None if tunes is None else attention_mask(x.shape[1], self.max_seq_len, x.device, tunes)
        for layer, block in enumerate(self.blocks):
            h = block(h, cos, sin, self.max_seq_len, cache, layer, mask)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.to_logits(self.norm(h))

    def tune_times(self, x, cache, head=None):
        """(since, elapsed) of x's positions (tune_clock), each (b, n); a cache's clock moves on to x's last token. A
        tune_labels model counts the positions before x's first start token from head (elapsed_from_head)."""
        window = self.max_seq_len
        if cache is not None and cache.length:
            since, elapsed = (t[:, None] for t in clock_after(*cache.clock, x[:, 0], window))
        else:
            since, elapsed = tune_clock(x, window)
            if self.tune_labels:
                elapsed = elapsed_from_head(x, elapsed, head)
        if cache is not None:
            cache.remember_clock(since[:, -1], elapsed[:, -1])
        return since, elapsed

    def clock_readings(self, since, elapsed):
        """The clock embedding's rows (clock_reading); a tune_labels model's clock reads on past the window, as its
        labels do."""
        return clock_reading(since, elapsed, self.max_seq_len, past_window=self.tune_labels)

    def left_readings(self, x, cache, elapsed, length):
        """The length embedding's rows for x (b, n), elapsed its clock (tune_times)."""
        if cache is not None and cache.length:  # one new token: the length asked less the clock, while its tune lasts
            if cache.target is None:
                return torch.full_like(x, CLOCK_READINGS)
            return left_reading(x != START_IDX, asked_left(cache.target[:, None], elapsed))
        known, left = time_left(x)
        tune = torch.cumsum(x == START_IDX, dim=1)
        if length is not None:  # the last tune of each row is asked to last `length` (negative: told nothing)
            last = tune == tune[:, -1:]
            known, left = known | last, torch.where(last, asked_left(length[:, None], elapsed), left)
            if cache is not None:
                cache.remember_target(length)
        elif self.training:  # LENGTH_DROPOUT of the tunes are not told their length
            told = torch.rand(x.shape[0], x.shape[1] + 1, device=x.device) >= LENGTH_DROPOUT
            left = torch.where(told.gather(1, tune), left, -1)
        return left_reading(known, left)

    def label_readings(self, x, cache, head):
        """The label slots of x (b, n, 3); a cache's slots move on to x's last token."""
        if cache is not None and cache.length:
            labels = labels_after(cache.labels, x[:, 0])[:, None]
        else:
            labels = tune_labels(x, head)
        if cache is not None:
            cache.remember_labels(labels[:, -1])
        return labels

    def key_readings(self, x, cache, since):
        """The key embedding's rows for x (b, n), since its clock's positions since each tune's start (tune_times)."""
        if cache is not None and cache.length:
            key = key_after(cache.key, since[:, 0], x[:, 0], self.max_seq_len)[:, None]
        else:
            key = tune_keys(x, since, self.max_seq_len)
        if cache is not None:
            cache.remember_key(key[:, -1])
        return degree_reading(x, key)

    def readings_of(self, out, start, length):
        """The clock, left, degrees and labels arguments for out[:, start:]: its clock, length, key and label readings
        with out's tokens before start counted (None where x alone tells them)."""
        if start == 0 or not (self.tune_clock or self.tune_length or self.tune_key or self.tune_labels):
            return None, None, None, None
        labels = tune_labels(out) if self.tune_labels else None
        since, elapsed = self.tune_times(out, None)
        clock = self.clock_readings(since, elapsed)[:, start:] if self.tune_clock else None
        left = self.left_readings(out, None, elapsed, length)[:, start:] if self.tune_length else None
        key = key_of_labels(labels) if self.tune_labels else tune_keys(out, since, self.max_seq_len)
        degrees = degree_reading(out, key)[:, start:] if self.tune_key else None
        return clock, left, degrees, None if labels is None else labels[:, start:]

    def tokens_before(self, out, start):
        """The prev argument for out[:, start:]: the prev_tokens tokens before it, -1 where out has none."""
        if not self.prev_tokens or start == 0:
            return None
        have = out[:, max(0, start - self.prev_tokens):start]
        return torch.cat((torch.full_like(out[:, :self.prev_tokens - have.shape[1]], -1), have), dim=1)

    def previous_embedding(self, seq):
        """Sum over d = 1..prev_tokens of the distance-d table's embedding of the token d before each of the last
        n positions of seq (b, prev_tokens + n); a token counts only if it exists (>= 0) and belongs to the same
        tune: no start token lies after it, up to and including the position."""
        k, n = self.prev_tokens, seq.shape[1] - self.prev_tokens
        tune = torch.cumsum(seq == START_IDX, dim=1)
        distance = torch.arange(1, k + 1, device=seq.device)
        columns = torch.arange(k, k + n, device=seq.device)[:, None] - distance  # (n, k): where each token d before is
        before = seq[:, columns]
        keep = (before >= 0) & (tune[:, columns] == tune[:, k:, None])
        return embedding_sum(before.clamp(min=0) + (distance - 1) * self.num_tokens, self.prev_emb.weight, keep)


# ----------------------------------------------------------------------------------------------------------
# Sampling filters

def top_k(logits, thres=0.9, k=None):
    """Keep the k largest logits per row (k defaults to the top (1 - thres) fraction, as in the original)."""
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
# Training loss and generation

def unlikelihood(logits, avoid, floor=None):
    """Summed -log(1 - p(avoided)) over the positions with a token to avoid; p(avoided) is the probability the
    logits give the avoided tokens together, from log-sum-exps so that a small one stays exact. With a floor,
    max(0, log p(avoided) - log floor) instead: its pull does not fade as p(avoided) gets small, and stops at the
    floor."""
    rows = avoid.any(dim=-1)
    picked, avoided = logits[rows], avoid[rows]
    log_p = picked.masked_fill(~avoided, float('-inf')).logsumexp(-1) - picked.logsumexp(-1)
    if floor is not None:
        return F.relu(log_p - math.log(floor)).sum()
    return -torch.log(-torch.expm1(log_p.clamp(max=-1e-6))).sum()


class AutoregressiveWrapper(nn.Module):
    def __init__(self, net, pad_value=PAD_IDX, ignore_index=PAD_IDX):
        super().__init__()
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.pad_value = pad_value
        self.ignore_index = ignore_index

    def forward(self, x, tune_mask=False, avoid=(), head=None):
        """(loss, accuracy) of predicting x[:, 1:] from x[:, :-1], both over non-ignored targets only.

        A batch with no countable target gives loss 0 (still attached to the graph, so backward works and
        changes nothing) and accuracy 0, instead of the NaN a plain mean would give. tune_mask: x is a packed
        window and each position attends only within its own tune (a tune begins at its start token).
        avoid: (mask, weight, floor) terms, mask a bool (rows, positions, tokens) of the tokens the model should
        not give the next position: the loss adds weight * unlikelihood(...) of each term (-log(1 - their summed
        probability) at each such position, or its floored form), over the same count of targets as the
        cross-entropy. head (b, HEAD_SLOTS): a tune_labels model's head of the tune in progress before x
        (MusicTransformer.forward).
        """
        inputs, targets = x[:, :-1], x[:, 1:]
        tunes = torch.cumsum(inputs == START_IDX, dim=1) if tune_mask else None
        logits = self.net(inputs, tunes=tunes, head=head).float()  # loss in float32 also under bf16 autocast
        counted = targets != self.ignore_index
        count = counted.sum().clamp(min=1)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=self.ignore_index, reduction='sum')
        correct = ((logits.argmax(dim=-1) == targets) & counted).sum()
        for mask, weight, floor in avoid:
            loss_sum = loss_sum + weight * unlikelihood(logits, mask & counted[..., None], floor)
        return loss_sum / count, (correct / count).detach()

    @torch.inference_mode()
    def _generate(self, prompt, seq_len, temperature, filter_logits_fn, filter_thres, top_k_count, top_p_thres,
                  use_cache, eos_token, allowed_next, repeat_memory, on_token, static_cache, force, constrain,
                  strength, unconditioned, length):
        b, n = prompt.shape
        match = torch.zeros_like(prompt[:, :0])  # the repeat memory's suffix matches, a column per earlier position
        if repeat_memory:
            for length in range(2, n + 1):
                match = extend_match(match, prompt[:, :length])
        out = prompt
        done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
        device_type = prompt.device.type
        # under autocast keys and values come in the autocast dtype: cache them in it
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        new_cache = lambda: self.net.new_cache(b, dtype=dtype, static=static_cache) if use_cache else None
        cache = new_cache()
        # the same tokens after the prompt without its header, in a cache of their own (classifier-free guidance)
        guided, guided_cache = (unconditioned, new_cache()) if unconditioned is not None else (None, None)
        # uncached: tokens further back than depth * (window - 1) cannot reach the last position
        reach = self.net.depth * (self.max_seq_len - 1) + 1

        def next_logits(seq, cache, step):
            if cache is not None:
                if step == 0:
                    return self.net(seq, cache=cache, length=length)[:, -1]
                return cache.decode(self.net, seq[:, -1:])
            start = max(0, seq.shape[1] - reach)
            clock, left, degrees, labels = self.net.readings_of(seq, start, length)
            return self.net(seq[:, start:], start=start, prev=self.net.tokens_before(seq, start), clock=clock,
                            left=left, length=length, degrees=degrees, labels=labels)[:, -1]

        for step in range(seq_len):
            logits = next_logits(out, cache, step).float()
            if guided is not None:  # log p(x | nothing asked) + strength * (log p(x | asked) - log p(x | nothing))
                plain = next_logits(guided, guided_cache, step).float().log_softmax(dim=-1)
                logits = plain + strength * (logits.log_softmax(dim=-1) - plain)
            allowed = None if allowed_next is None else allowed_next[out[:, -1]]
            if allowed is not None:  # only tokens that may follow the one before
                logits = logits.masked_fill(~allowed, float('-inf'))
            limit = None if constrain is None else constrain(out)
            if limit is not None:  # a row the limit would leave without a token keeps what it has
                limit = limit | ~(limit & (logits > float('-inf'))).any(dim=-1, keepdim=True)
                logits = logits.masked_fill(~limit, float('-inf'))
                allowed = limit if allowed is None else allowed & limit
            if temperature > 0:
                # the largest logit moved to 0 first: a tiny temperature then gives -inf, never inf - inf
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
            if repeat_memory:
                logits = repeat_mix(logits.softmax(dim=-1), out, match, repeat_memory, allowed, eos_token).log()
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                if filter_logits_fn is not None:
                    logits = filter_logits_fn(logits, thres=filter_thres)
                if top_k_count is not None:
                    logits = top_k(logits, k=top_k_count)
                if top_p_thres is not None:
                    logits = top_p(logits, thres=top_p_thres)
                token = torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)
            if force is not None:
                token = force(out, token)
            if eos_token is not None:
                token = token.masked_fill(done, self.pad_value)
                done = done | (token == eos_token)
            out = torch.cat((out, token[:, None]), dim=-1)
            if guided is not None:
                guided = torch.cat((guided, token[:, None]), dim=-1)
            if on_token is not None:
                on_token(out)
            if repeat_memory:
                match = extend_match(match, out)
            if eos_token is not None and bool(done.all()):
                break
        return out

    def generate(self, prompt, seq_len, temperature=1.0, filter_logits_fn=None, filter_thres=0.9,
                 return_prime=False, top_k=None, top_p=None, use_cache=True, eos_token=None, allowed_next=None,
                 repeat_memory=0.0, on_token=None, static_cache=False, force=None, constrain=None, guidance=1.0,
                 unconditioned=None, length=None, end_guidance=None):
        """Sample seq_len new tokens after prompt (n,) or (b, n); returns (b, seq_len), (seq_len,) for 1-d.

        temperature 0 is greedy. top_k (a count), top_p (a probability) and filter_logits_fn(logits,
        thres=filter_thres) filter before sampling. allowed_next, a (num_tokens, num_tokens) bool table, limits
        each new token to those its row for the token before allows (greedy too). With eos_token, a row's tokens
        after its eos are pad_value and generation stops early (fewer than seq_len columns) once every row has
        produced it. repeat_memory in [0, 0.5] mixes the (tempered) distribution with the piece's own continuations
        where its last notes repeat earlier ones (repeat_mix), before the filters; 0 is off.
        on_token(out), when given, sees the (b, n + tokens so far) output after every new token: a progress bar, or
        the part generated before a Ctrl-C. It changes nothing that is drawn.
        force(out, token), when given, returns the tokens to append in place of the (b,) drawn ones (accompany.py
        places given notes so); the next token's allowed_next row is that of the token it returns.
        constrain(out), when given, returns None or a (b, num_tokens) bool tensor of the tokens each row's next draw
        may take besides allowed_next's limit (voice_leading.py); a row it would leave no token is drawn without it.
        unconditioned, a (b, m) prompt: each row's prompt without its conditioning header, for classifier-free
        guidance: every draw takes log p(x | unconditioned) + guidance * (log p(x | prompt) - log p(x | unconditioned))
        before the grammar and the filters (guidance 1 is the plain model, above 1 leans further towards what the
        header asks; each token then costs a second forward pass). Without it guidance is not used.
        end_guidance (None: guidance) is the strength for eos_token alone, the draw that ends a tune: its tonic is
        the header's key, so the end leans towards it while the notes keep guidance's strength.
        length, for a model with tune_length: (b,) or a number, the time steps each row's tune is asked to last to its
        last onset (None or negative: not asked).
        static_cache decodes with a StaticKVCache (the same tokens; replayed from a CUDA graph on a GPU);
        static_cache='compile' also compiles its step (fused kernels; one compile of tens of seconds per process).
        The model's train/eval mode is restored afterwards.
        """
        if prompt.dim() not in (1, 2) or prompt.shape[-1] == 0:
            raise ValueError(f'prompt must be (n,) or (b, n) with n >= 1, got shape {tuple(prompt.shape)}')
        if temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f'top_p must be in (0, 1] (None = off), got {top_p}')
        if not 0 <= repeat_memory <= REPEAT_MAX_STRENGTH:
            raise ValueError(f'repeat_memory must be in [0, {REPEAT_MAX_STRENGTH}] (0 = off), got {repeat_memory}')
        if not guidance >= 0:
            raise ValueError(f'guidance must be at least 0 (1 = off), got {guidance}')
        end_guidance = guidance if end_guidance is None else end_guidance
        if not end_guidance >= 0:
            raise ValueError(f'end_guidance must be at least 0 (1 = off, None = guidance), got {end_guidance}')
        if unconditioned is not None and (unconditioned.dim() != prompt.dim() or unconditioned.shape[-1] == 0
                                          or unconditioned.shape[:-1] != prompt.shape[:-1]):
            raise ValueError(f'unconditioned must hold a prompt for each row of prompt {tuple(prompt.shape)}, '
                             f'got shape {tuple(unconditioned.shape)}')
        if top_k is not None and top_k < 1:
            raise ValueError(f'top_k must be at least 1 (None = off), got {top_k}')
        if allowed_next is not None:
            size = (self.net.num_tokens, self.net.num_tokens)
            if not torch.is_tensor(allowed_next) or allowed_next.shape != size or allowed_next.dtype != torch.bool:
                got = (f'a {allowed_next.dtype} tensor of shape {tuple(allowed_next.shape)}'
                       if torch.is_tensor(allowed_next) else f'a {type(allowed_next).__name__}')
                raise ValueError(f'allowed_next must be a torch bool tensor of shape {size}, got {got}')
            empty = (~allowed_next.any(dim=-1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f'allowed_next allows no token after token {empty[0]} '
                                 f'({len(empty)} such row{"s" if len(empty) > 1 else ""})')
        one_dim = prompt.dim() == 1
        prompt = prompt[None] if one_dim else prompt
        strength = None
        if unconditioned is not None and (guidance != 1 or (eos_token is not None and end_guidance != 1)):
            unconditioned = (unconditioned[None] if one_dim else unconditioned).to(prompt.device)
            # each token's guidance, the end's apart; a fixed (num_tokens,) row, as a CUDA graph's inputs must be
            strength = torch.full((self.net.num_tokens,), float(guidance), device=prompt.device)
            if eos_token is not None:
                strength[eos_token] = end_guidance
        else:
            unconditioned = None
        if length is not None or self.net.tune_length:  # a tune_length model not asked one is told nothing (-1)
            length = torch.as_tensor(-1 if length is None else length, device=prompt.device).long()
            length = length.expand(prompt.shape[0])
        was_training = self.training
        self.eval()
        try:
            out = self._generate(prompt, seq_len, temperature, filter_logits_fn, filter_thres, top_k, top_p,
                                 use_cache, eos_token,
                                 None if allowed_next is None else allowed_next.to(prompt.device), repeat_memory,
                                 on_token, static_cache, force, constrain, strength, unconditioned, length)
        finally:
            self.train(was_training)
        out = out.clone()  # an ordinary tensor, usable outside inference mode
        out = out if return_prime else out[:, prompt.shape[1]:]
        return out[0] if one_dim else out


def printModelParameters(model, table=False):
    """Print the parameter count in one line (each parameter's shape and count too with table=True); return it."""
    total = 0
    for name, param in model.named_parameters():
        if table:
            print(f'{name:50s} {str(tuple(param.shape)):20s} {param.numel():>12,}')
        total += param.numel()
    print(f'Total parameters: {total:,} ({total / 1e6:.2f}M)')
    return total


if __name__ == '__main__':
    model = AutoregressiveWrapper(MusicTransformer(max_seq_len=256))
    printModelParameters(model, table=True)
