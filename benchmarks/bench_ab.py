"""A/B speed of the model against the model at another git revision, timed alternately in one process.

    python benchmarks/bench_ab.py REV [--quick]     (e.g. REV = HEAD~3 or a commit hash)

The model files of REV (custom_basic_transformer.py and, where it exists, fast_ops.py) are loaded from git
under other module names, beside the working tree's, and both train (dim 512, depth 6, batch 8 x 256, bf16
autocast, dropout 0.1, AdamW) and generate (batch 1, float32, cached, greedy) in turn, so load from other
processes hits both alike. Prints the fastest time of each, the working tree's as 'now' and REV's as 'then', and
the ratio now / then (> 1: the working tree is faster).
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer  # noqa: E402
from tokens import NUM_TOKENS, START_IDX  # noqa: E402

DIM, DEPTH, HEADS, DIM_HEAD = 512, 6, 8, 64


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
    path = Path(folder) / 'model_at_rev.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location('model_at_rev', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_step(wrapper_cls, net_cls, seq_len):
    torch.manual_seed(0)
    model = wrapper_cls(net_cls(NUM_TOKENS, DIM, DEPTH, HEADS, DIM_HEAD, seq_len, 0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, START_IDX, (8, seq_len + 1))

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = model(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def generation(wrapper_cls, net_cls, new_tokens):
    torch.manual_seed(0)
    model = wrapper_cls(net_cls(NUM_TOKENS, DIM, DEPTH, HEADS, DIM_HEAD, 512, 0.1)).eval()
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        old = model_module_at(args.rev, folder)
        repeats = 3 if args.quick else 6
        train = fastest({'now': train_step(AutoregressiveWrapper, MusicTransformer, 256),
                         'then': train_step(old.AutoregressiveWrapper, old.MusicTransformer, 256)}, repeats)
        tokens = 128 if args.quick else 512
        gen = fastest({'now': generation(AutoregressiveWrapper, MusicTransformer, tokens),
                       'then': generation(old.AutoregressiveWrapper, old.MusicTransformer, tokens)}, repeats // 2 + 1)
    print(f'# bench_ab.py: working tree vs {args.rev}, torch {torch.__version__}, {torch.get_num_threads()} threads')
    print(f'training step, batch 8 x 256, bf16: now {8 * 256 / train["now"]:,.0f} tokens/s, then '
          f'{8 * 256 / train["then"]:,.0f} tokens/s, now / then {train["then"] / train["now"]:.3f}x')
    print(f'generation, batch 1, {tokens} tokens, float32: now {tokens / gen["now"]:,.0f} tokens/s, then '
          f'{tokens / gen["then"]:,.0f} tokens/s, now / then {gen["then"] / gen["now"]:.3f}x')


if __name__ == '__main__':
    main()
