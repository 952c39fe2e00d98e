"""Which generation path to take by default, per batch size: speed and a quality gate, measured in one run.

    python benchmarks/bench_sampling.py CHECKPOINT [--tokens 256]

Paths on the CPU: the float32 model, the float32 model under bf16 autocast, a bf16 copy of the weights, and the
int8 copy (sampling.quantize_for_generation). Speed: cached generation from the start token at batch 1 and 16
(top-p 0.95 for every path alike), timed alternately, fastest of three. Quality
gate: each path's teacher-forced validation NLL on the checkpoint's validation windows must be within 0.5% of the
float32 model's. The last row times the float32 model with the scripts' default sampling (every token, no top-p,
the grammar constraint, the repeat memory at its default): what those defaults cost in speed.
"""

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import MIDI_Dataset, load_corpus  # noqa: E402
from runtime import Machine, evaluate_split, load_model, resolve_data_path  # noqa: E402
from sampling import REPEAT_MEMORY, quantize_for_generation  # noqa: E402
from tokens import START_IDX, grammar_table  # noqa: E402

DEFAULTS = 'float32, default sampling'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint')
    parser.add_argument('--tokens', type=int, default=256, help='new tokens per timed generation')
    args = parser.parse_args()
    model, ckpt = load_model(args.checkpoint)
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    paths = {  # name: (model, autocast dtype or None)
        'float32': (model, None),
        'float32 + bf16 autocast': (model, torch.bfloat16),
        'bf16 weights': (bf16_weights, None),
        'int8 copy': (quantize_for_generation(model), None),
    }
    cfg = ckpt['args']
    _, val_seqs, _ = load_corpus(resolve_data_path(cfg['data_path']), ckpt['tokenization'], cfg['cache_dir'],
                                 cfg['min_notes'], cfg['val_fraction'], verbose=False)
    val_ds = MIDI_Dataset(val_seqs, cfg['seq_len'], rand_start=False)
    print(f'# {args.checkpoint}: step {ckpt["step"]}, dim {cfg["dim"]} x {cfg["depth"]}, {len(val_ds)} validation '
          f'windows; torch {torch.__version__}, {torch.get_num_threads()} threads')
    nll = {}
    for name, (net, dtype) in paths.items():
        # bf16 weights compute in bf16 themselves; the others in float32 or under autocast
        machine = Machine(torch.device('cpu'), dtype or torch.float32)
        nll[name] = evaluate_split(net, val_ds, 32, machine)[0]
    times = {}
    table = grammar_table()
    for batch in (1, 16):
        prompt = torch.full((batch, 1), START_IDX)

        def run(net, dtype, **sampling):
            context = torch.autocast('cpu', dtype=dtype) if dtype else nullcontext()
            with context:
                net.generate(prompt, args.tokens, temperature=1.0, **(sampling or {'top_p': 0.95}))
        runs = {name: (lambda n=n, d=d: run(n, d)) for name, (n, d) in paths.items()}
        runs[DEFAULTS] = lambda: run(model, None, allowed_next=table, repeat_memory=REPEAT_MEMORY)
        for fn in runs.values():
            fn()
        best = {name: float('inf') for name in runs}
        for _ in range(3):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        times[batch] = best
    print(f'{"path":26s} {"val NLL":>8s} {"vs fp32":>8s} {"gate":>5s} {"batch 1 tok/s":>14s} {"batch 16 tok/s":>15s}')
    for name in times[1]:
        gate = ''
        if name in nll:
            change = nll[name] / nll['float32'] - 1
            gate = f'{nll[name]:8.4f} {change:+8.2%} {"ok" if abs(change) <= 0.005 else "FAIL":>5s}'
        print(f'{name:26s} {gate:>23s} {args.tokens / times[1][name]:14,.0f} {16 * args.tokens / times[16][name]:15,.0f}')


if __name__ == '__main__':
    main()
