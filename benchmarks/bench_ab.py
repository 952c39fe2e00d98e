"""A/B speed of the model against the model at another git revision, timed alternately in one process.

    python benchmarks/bench_ab.py REV [--quick] [--threads 1]     (e.g. REV = HEAD~3 or a commit hash)

The model files of REV (custom_basic_transformer.py and, where it exists, fast_ops.py) are loaded from git
under other module names, beside the working tree's, and both train and generate in turn, so load from other
processes hits both alike: the default model (dim 512, depth 6, batch 8 x 256, bf16 autocast, dropout 0.1) and
the quick CPU recipe's (dim 128, depth 4, 9 previous tokens, batch 16 x 256 packed with the tune mask, dropout 0)
each train with fused AdamW and generate one row (float32, cached, greedy). Prints the fastest time of each, the
working tree's as 'now' and REV's as 'then', and the ratio now / then (> 1: the working tree is faster).
Training runs in bf16 autocast, as training picks on a CPU with bf16 instructions; each training row also gives
its model FLOP/s as a share of a bf16 matmul anchor timed in the same run. glibc's malloc keeps freed memory as in
training (runtime.keep_freed_memory).
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer  # noqa: E402
from runtime import keep_freed_memory  # noqa: E402
from tokens import NUM_TOKENS, START_IDX  # noqa: E402

MODELS = {  # name: (dim, depth, heads, dim_head, dropout, prev_tokens, batch)
    'default model': (512, 6, 8, 64, 0.1, 0, 8),
    'quick recipe': (128, 4, 2, 64, 0.0, 9, 16),
}


def model_module_at(rev, folder):
    """custom_basic_transformer of revision rev, imported as 'model_at_rev' (with its fast_ops, if it had one)."""
    def show(path):
        done = subprocess.run(['git', 'show', f'{rev}:{path}'], cwd=ROOT, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None
    fast_ops = show('fast_ops.py')
    source = show('custom_basic_transformer.py')
    if source is None:
        sys.exit(f'{rev}: no custom_basic_transformer.py there')
    if fast_ops is not None:
        (Path(folder) / 'fast_ops_at_rev.py').write_text(fast_ops)
        source = source.replace('from fast_ops import', 'from fast_ops_at_rev import')
        sys.path.insert(0, folder)
    # revisions before tokens.py took the vocabulary out of dataset.py import its constants from there
    source = source.replace('from dataset import', 'from tokens import')
    path = Path(folder) / 'model_at_rev.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location('model_at_rev', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(wrapper_cls, net_cls, shape, seq_len):
    dim, depth, heads, dim_head, dropout, prev_tokens, _ = shape
    torch.manual_seed(0)
    extra = {'prev_tokens': prev_tokens} if prev_tokens else {}
    return wrapper_cls(net_cls(NUM_TOKENS, dim, depth, heads, dim_head, seq_len, dropout, **extra))


def train_step(wrapper_cls, net_cls, shape, seq_len):
    model = build(wrapper_cls, net_cls, shape, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, START_IDX, (shape[-1], seq_len + 1))
    packed = bool(shape[5])  # the quick recipe trains on packed windows with the tune mask
    if packed:
        for row in range(shape[-1]):  # a tune starts every 100 tokens, at another place in each row
            x[row, row * 37 % 100::100] = START_IDX

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = model(x, tune_mask=True) if packed else model(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def model_flops(shape, seq_len):
    """Matmul FLOPs of a training step: 6 x parameters (embeddings excluded) x tokens, plus causal attention."""
    dim, depth, _, _, _, _, batch = shape
    tokens = batch * seq_len
    params = depth * 12 * dim * dim + dim * NUM_TOKENS  # per layer: q, k, v, out (4 dim^2) and the 4x feed-forward
    return 6 * params * tokens + 3 * 2 * depth * tokens * seq_len * dim


def matmul_anchor(repeats=5, size=2048):
    a, b = torch.randn(size, size).bfloat16(), torch.randn(size, size).bfloat16()
    a @ b
    return 2 * size ** 3 / fastest({'mm': lambda: a @ b}, repeats)['mm']


def generation(wrapper_cls, net_cls, shape, new_tokens):
    model = build(wrapper_cls, net_cls, shape, 512).eval()
    prompt = torch.full((1, 1), START_IDX)
    return lambda: model.generate(prompt, new_tokens, temperature=0.0)


def fastest(runs, repeats):
    for fn in runs.values():
        fn()
    times = {name: float('inf') for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('rev', help='git revision to compare with')
    parser.add_argument('--quick', action='store_true', help='fewer repeats and tokens')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training runs
    repeats = 3 if args.quick else 6
    tokens = 128 if args.quick else 512
    results = {}
    anchor = matmul_anchor()
    with tempfile.TemporaryDirectory() as folder:
        old = model_module_at(args.rev, folder)
        for name, shape in MODELS.items():
            train = fastest({'now': train_step(AutoregressiveWrapper, MusicTransformer, shape, 256),
                             'then': train_step(old.AutoregressiveWrapper, old.MusicTransformer, shape, 256)}, repeats)
            gen = fastest({'now': generation(AutoregressiveWrapper, MusicTransformer, shape, tokens),
                           'then': generation(old.AutoregressiveWrapper, old.MusicTransformer, shape, tokens)},
                          repeats // 2 + 1)
            results[name] = train, gen
    anchor = max(anchor, matmul_anchor())  # at the start and the end: the less disturbed of the two
    print(f'# bench_ab.py: working tree vs {args.rev}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'load average {os.getloadavg()[0]:.1f}, bf16 matmul anchor {anchor / 1e9:,.0f} GFLOP/s')
    lines = []
    for name, (train, gen) in results.items():
        shape = MODELS[name]
        batch_tokens = shape[-1] * 256
        share = {side: model_flops(shape, 256) / seconds / anchor for side, seconds in train.items()}
        lines += [f'{name}: training step, batch {shape[-1]} x 256, bf16: now {batch_tokens / train["now"]:,.0f} '
                  f'tokens/s ({share["now"]:.0%} of the matmul anchor), then {batch_tokens / train["then"]:,.0f} '
                  f'tokens/s ({share["then"]:.0%}), now / then {train["then"] / train["now"]:.3f}x',
                  f'{name}: generation, batch 1, {tokens} tokens, float32: now {tokens / gen["now"]:,.0f} tokens/s, '
                  f'then {tokens / gen["then"]:,.0f} tokens/s, now / then {gen["then"] / gen["now"]:.3f}x']
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
