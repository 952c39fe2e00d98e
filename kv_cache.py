"""The key/value caches of generation: KVCache (grows with the sequence) and StaticKVCache (fixed buffers, so a GPU
can replay one captured CUDA graph per token). MusicTransformer.new_cache builds them; the model file stays about
the model.
"""

import torch

from fast_ops import capture_cuda_graph


class KVCache:
    """Rotated keys and values of the last `size` positions of every layer, in ring buffers.

    A single new query attends to every filled slot; the order of keys does not matter to softmax attention,
    so the ring never has to be shifted when the window slides. The cache holds the compute dtype (bf16 under
    autocast), so no cached window is converted per token.
    """

    def __init__(self, depth, batch, heads, size, dim_head, device, dtype):
        shape = (depth, batch, heads, size, dim_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.size = size
        self.length = 0  # positions seen so far = absolute position of the next token
        self.last = None  # (b, prev_tokens) the last tokens seen, for models with a previous-token embedding
        self.clock = None  # (since, elapsed) of the last position seen, each (b,), for models with a tune clock
        self.target = None  # (b,) the time steps each row's tune is asked to last, for models told a tune's length
        self.key = None  # (b,) the key of each row's last tune (-1: none), for models with a tune key
        self.labels = None  # (b, 3) the header ids of each row's last tune (-1: none), for models with tune labels

    def store(self, layer, k, v):
        """Write k, v (b, h, n, d) of the n positions after the cached ones, keeping only the last `size`."""
        n = k.shape[2]
        if n == 1:
            slot = self.length % self.size
            self.keys[layer, :, :, slot] = k[:, :, 0]
            self.values[layer, :, :, slot] = v[:, :, 0]
            return
        keep = min(n, self.size)
        slots = torch.arange(self.length + n - keep, self.length + n, device=k.device) % self.size
        self.keys[layer].index_copy_(2, slots, k[:, :, n - keep:].to(self.keys.dtype))
        self.values[layer].index_copy_(2, slots, v[:, :, n - keep:].to(self.values.dtype))

    def window(self, layer):
        """Keys and values a new query attends to, and a mask of them (None: all)."""
        filled = min(self.length + 1, self.size)  # includes the position being decoded
        return self.keys[layer, :, :, :filled], self.values[layer, :, :, :filled], None

    def angles(self, rotary, n):
        """cos, sin of the n positions after the cached ones."""
        return rotary(self.length, n)

    def remember(self, last):
        self.last = last

    def remember_clock(self, since, elapsed):
        self.clock = (since, elapsed)

    def remember_key(self, key):
        self.key = key

    def remember_labels(self, labels):
        self.labels = labels

    def remember_target(self, length):
        self.target = length.clone()

    def advance(self, n):
        self.length += n

    def decode(self, net, tokens):
        """Logits (b, num_tokens) of the one new token a row in tokens (b, 1), after the cached positions."""
        return net(tokens, cache=self)[:, -1]


class StaticKVCache(KVCache):
    """A KVCache whose one-token step runs the same operations on the same buffers at every position.

    The position lives in a tensor: the new key and value go to slot position % size by index_copy_, the query
    attends to all size slots with the unwritten ones masked out, and the rotary angles are a row of the table
    picked by the position tensor. No shape and no Python number changes between tokens, so on a GPU decode
    captures the step once as a CUDA graph and replays it for every further token (fast_ops.capture_cuda_graph);
    elsewhere the same step runs uncaptured. Positions past the rotary table, reached only by generation longer
    than ROTARY_TABLE_POSITIONS, take KVCache's angles, uncaptured. A prompt (more than one token) is stored as
    KVCache stores it.

    compile_step=True runs the step through torch.compile before capturing it: a replayed graph still launches
    every kernel of the step, and a one-row step is a few hundred tiny kernels, so fusing them is what is left to
    gain once the launches from Python are gone. It costs one compile per process (tens of seconds); on a CPU the
    compiled step runs uncaptured.
    """

    def __init__(self, depth, batch, heads, size, dim_head, device, dtype, compile_step=False):
        super().__init__(depth, batch, heads, size, dim_head, device, dtype)
        self.compile_step = compile_step
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # == length, on the device
        self.slots = torch.arange(size, device=device)
        self.filled = None  # (1, size) bool: the slots written so far, set per step
        self.graph = self.tokens = self.logits = None  # the captured step, its input and output (CUDA)

    def angles(self, rotary, n):
        if n > 1:
            return super().angles(rotary, n)
        self.filled = (self.slots <= self.position)[None]  # includes the position being decoded
        if self.length >= rotary.cos.shape[0]:
            return super().angles(rotary, n)
        return rotary.cos.index_select(0, self.position), rotary.sin.index_select(0, self.position)

    def store(self, layer, k, v):
        if k.shape[2] > 1:
            return super().store(layer, k, v)
        slot = self.position % self.size
        self.keys[layer].index_copy_(2, slot, k.to(self.keys.dtype))
        self.values[layer].index_copy_(2, slot, v.to(self.values.dtype))

    def window(self, layer):
        return self.keys[layer], self.values[layer], self.filled

    def remember(self, last):
        if self.last is None:
            self.last = last.clone()
        else:
            self.last.copy_(last)

    def remember_clock(self, since, elapsed):
        if self.clock is None:
            self.clock = (since.clone(), elapsed.clone())
        else:
            self.clock[0].copy_(since)
            self.clock[1].copy_(elapsed)

    def remember_key(self, key):
        if self.key is None:
            self.key = key.clone()
        else:
            self.key.copy_(key)

    def remember_labels(self, labels):
        if self.labels is None:
            self.labels = labels.clone()
        else:
            self.labels.copy_(labels)

    def advance(self, n):
        self.length += n
        self.position.add_(n)

    def decode(self, net, tokens):
        if self.length >= net.rotary.cos.shape[0] or (self.keys.device.type != 'cuda' and not self.compile_step):
            return super().decode(net, tokens)
        # the step reads its position from self.position alone: self.length only picks branches that go the same
        # way at every decoded position, so the step runs with length 1 and a compiled step's guards never change
        length, self.length = self.length, 1
        if self.keys.device.type != 'cuda':
            logits = compiled_step()(tokens.contiguous(), self, net)  # strides of a view of out change per token
            self.length = length + 1
            return logits
        if self.graph is None:
            # capturing runs the step twice (warm-up, capture): every buffer it writes is put back afterwards
            buffers = [t for t in (self.keys, self.values, self.position, self.last, self.key, self.labels,
                                       *(self.clock or ()))
                       if t is not None]
            saved = [t.clone() for t in buffers]
            self.tokens = tokens.clone()
            step = compiled_step() if self.compile_step else decode_step
            self.graph, self.logits = capture_cuda_graph(lambda: step(self.tokens, self, net))
            for t, copy in zip(buffers, saved):
                t.copy_(copy)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.length = length + 1
        return self.logits.clone()  # the graph rewrites its output at the next replay


def decode_step(tokens, cache, net):
    """The logits (b, num_tokens) of one new token per row after the cached positions."""
    return net(tokens, cache=cache)[:, -1]


_compiled = []  # torch.compile(decode_step), made on first use: importing this module compiles nothing


def compiled_step():
    """decode_step through torch.compile (one compiled graph per model and shape, kept by torch's own cache)."""
    if not _compiled:
        _compiled.append(torch.compile(decode_step, dynamic=False))
    return _compiled[0]
