"""Data pipeline speed: first tokenization of a folder (parallel), cached loading, and the time a training step
waits for data compared with the default model's step time on this machine.

    python benchmarks/bench_data.py [FOLDER]     (default: the bundled Essen folk songs)
"""

import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from dataset import MIDI_Dataset, collate_fn, load_corpus  # noqa: E402
from runtime import BUNDLED_DATASET, build_model  # noqa: E402
from token_cache import find_midi_sources  # noqa: E402
from tokens import tokenization_settings  # noqa: E402

# custom_training.Args's model and data defaults, which the default run trains with (a script imports no script)
DEFAULTS = {'seq_len': 100, 'dim': 512, 'depth': 6, 'heads': 8, 'dim_head': 64, 'dropout': 0.1, 'batch_size': 2,
            'grad_accum': 2, 'lr': 3e-4, 'min_notes': 16, 'val_fraction': 0.05, 'aug_range': 2, 'seed': 42}


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else str(BUNDLED_DATASET)
    args = SimpleNamespace(**DEFAULTS)
    settings = tokenization_settings()
    n_files = len(find_midi_sources(folder))
    print(f'folder {folder}: {n_files} MIDI files; {os.cpu_count()} CPU cores; torch {torch.__version__}')
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        train, val, summary = load_corpus(folder, settings, cache, args.min_notes, args.val_fraction, verbose=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_corpus(folder, settings, cache, args.min_notes, args.val_fraction, verbose=False)
        cached = time.perf_counter() - t0
    tokens = summary['train_tokens'] + summary['val_tokens']
    print(f'first tokenization (parallel): {first:6.2f} s  {n_files / first:10,.0f} files/s  {tokens / first:12,.0f} tokens/s')
    print(f'cached load:                   {cached:6.2f} s  {n_files / cached:10,.0f} files/s  {tokens / cached:12,.0f} tokens/s')
    print(f'cache speed-up: {first / cached:.1f}x')

    # time waiting for data vs the default model's training step (seed Args, bf16 autocast on CPU)
    ds = MIDI_Dataset(train, args.seq_len, aug=True, aug_range=args.aug_range, seed=args.seed)
    batches = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).split(args.batch_size)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate_fn, generator=torch.Generator())
    it = iter(loader)
    n_micro = 200
    t0 = time.perf_counter()
    micro = [next(it) for _ in range(n_micro)]
    data_time = (time.perf_counter() - t0) / n_micro * args.grad_accum

    model = build_model(vars(args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = 20

    def step(i):
        for j in range(args.grad_accum):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss, _ = model(micro[(i * args.grad_accum + j) % n_micro])
            (loss / args.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    step_time = (time.perf_counter() - t0) / steps
    print(f'default model step (dim {args.dim}, depth {args.depth}, batch {args.batch_size} x {args.grad_accum} '
          f'x {args.seq_len} tokens, bf16): {step_time * 1000:.1f} ms')
    print(f'data per step ({args.grad_accum} micro-batches): {data_time * 1000:.2f} ms = '
          f'{100 * data_time / (step_time + data_time):.2f}% of the step (goal < 5%)')


if __name__ == '__main__':
    main()
