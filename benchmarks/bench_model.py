"""Speed of custom_basic_transformer.py against x-transformers and a matmul anchor, all measured in this run.

    python benchmarks/bench_model.py
    python benchmarks/bench_model.py --quick    # fewer repeats and tokens, no torch.compile
    python benchmarks/bench_model.py --mfu --device cuda   # training FLOP/s at batch 32 x 1,024, eager and compiled
    python benchmarks/bench_model.py --profile --device cpu  # where a CPU training step's time goes, by kind of op
    python benchmarks/bench_model.py --attention --device cpu  # one layer's attention under the tune mask
    python benchmarks/bench_model.py --malloc   # CPU training steps with glibc's malloc defaults and as training runs

Configuration everywhere: dim 512, depth 6, heads 8, dim_head 64, vocab 836. Timed runs of the models being
compared alternate (ours, theirs, ours, ...) and the fastest of each is printed, so load from other
processes hits both sides alike; the load average is printed too. Generation is also timed with one thread:
on a busy machine every multi-threaded small op can wait a scheduler slice for its second thread. Ratios, not
absolute figures, are the comparable output. CPU training runs in the precision training picks there (bf16
autocast with bf16 instructions, float32 without). On a CUDA machine the same tables follow for the GPU,
training in bf16 and fp16. Every training step uses the training script's optimizer (runtime.build_optimizer, fused
AdamW) and its memory setting (runtime.keep_freed_memory). --threads 1 avoids the waits of a second thread for a
scheduler slice on a machine shared with others.
"""

import argparse
import os
import platform
import runpy
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer, attention_mask  # noqa: E402
from runtime import build_model, build_optimizer, choose_device, compile_model, keep_freed_memory  # noqa: E402
from sampling import quantize_for_generation  # noqa: E402
from tokens import NUM_TOKENS, PAD_IDX, START_IDX  # noqa: E402

DIM, DEPTH, HEADS, DIM_HEAD = 512, 6, 8, 64
BATCH, TRAIN_LEN = 8, 256
GEN_LEN = 512  # new tokens, and max_seq_len, for generation
GRAPHED = 'ours, static cache + CUDA graph, bf16'
GRAPHED_COMPILED = 'ours, static cache + CUDA graph, compiled'
MFU_BATCH, MFU_LEN = 32, 1024  # a realistic GPU batch
ROOT = Path(__file__).resolve().parents[1]


def ours(max_seq_len, dropout=0.1, attn_dropout=0.0):
    net = MusicTransformer(NUM_TOKENS, DIM, DEPTH, HEADS, DIM_HEAD, max_seq_len, dropout, attn_dropout)
    return AutoregressiveWrapper(net)


def theirs(max_seq_len, dropout=0.1):
    from x_transformers import AutoregressiveWrapper as XWrapper
    from x_transformers import Decoder, TransformerWrapper
    decoder = Decoder(dim=DIM, depth=DEPTH, heads=HEADS, attn_dim_head=DIM_HEAD, rotary_pos_emb=True,
                      attn_flash=True, ff_dropout=dropout)
    net = TransformerWrapper(num_tokens=NUM_TOKENS, max_seq_len=max_seq_len, attn_layers=decoder)
    return XWrapper(net, pad_value=PAD_IDX, ignore_index=PAD_IDX)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(runs, repeats, device):
    """Fastest seconds of each named run, timing them in turn repeats times after one warm-up each.

    The minimum, because load from other processes only ever adds time."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: min(t) for name, t in times.items()}


def matmul_flops(device, dtype, size, repeats):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size ** 3 / best


def packed_tokens(batch, length, device):
    """Random tokens laid out as packed windows: a tune starts every 100 tokens, at another place in each row."""
    x = torch.randint(0, START_IDX, (batch, length), device=device)
    for row in range(batch):
        x[row, row * 37 % 100::100] = START_IDX
    return x


def train_step(model, device, amp_dtype, batch=BATCH, length=TRAIN_LEN, tune_mask=False):
    optimizer = build_optimizer(model, 1e-4, 0.01, device)
    shape = (batch, length + 1)
    x = packed_tokens(*shape, device) if tune_mask else torch.randint(0, START_IDX, shape, device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = model(x, tune_mask=True) if tune_mask else model(x)
        loss = out[0] if isinstance(out, tuple) else out  # ours returns (loss, acc), theirs the loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def model_flops_per_step(model, batch=BATCH, length=TRAIN_LEN):
    # 6 x parameters x tokens for the matmuls (embedding lookups excluded), plus causal attention scores and
    # weighted sums: forward 2 x 2 x n/2 x dim per token per layer, times 3 for forward + backward
    net = model.net
    params = sum(p.numel() for name, p in model.named_parameters() if '_emb' not in name)
    tokens = batch * length
    return 6 * params * tokens + 3 * 2 * net.depth * tokens * length * net.heads * net.dim_head


def bench_training(device, args, amp_dtype=torch.bfloat16):
    dtype_name = str(amp_dtype).removeprefix('torch.')
    print(f'\n## Training step ({device.type}): batch {BATCH} x {TRAIN_LEN}, {dtype_name}, AdamW')
    peak = matmul_flops(device, amp_dtype, 4096 if device.type == 'cuda' else 2048, 5)
    print(f'{dtype_name} matmul anchor: {peak / 1e9:,.0f} GFLOP/s')
    torch.manual_seed(0)
    models = {
        'ours, dropout 0.1 (default)': ours(TRAIN_LEN),
        'x-transformers, ff_dropout 0.1': theirs(TRAIN_LEN),
        'ours, dropout 0': ours(TRAIN_LEN, dropout=0.0),
        'x-transformers, dropout 0': theirs(TRAIN_LEN, dropout=0.0),
        'ours, original dropout (attention 0.1 too)': ours(TRAIN_LEN, attn_dropout=0.1),
    }
    if not args.quick:
        models['ours, dropout 0.1, compile_model'] = compile_model(ours(TRAIN_LEN))
    models = {name: model.to(device) for name, model in models.items()}
    flops = model_flops_per_step(models['ours, dropout 0.1 (default)'])
    runs = {name: train_step(model, device, amp_dtype) for name, model in models.items()}
    compile_start = time.perf_counter()
    seconds = alternate(runs, args.repeats, device)
    print(f'(warm-up and timing took {time.perf_counter() - compile_start:.0f} s)')
    tokens = BATCH * TRAIN_LEN
    print(f'{"model":42s} {"s/step":>8s} {"tokens/s":>9s} {"model FLOP/s":>13s} {"of matmul":>9s}')
    for name, s in seconds.items():
        print(f'{name:42s} {s:8.3f} {tokens / s:9,.0f} {flops / s / 1e9:10,.0f} G {flops / s / peak:9.0%}')
    print(f'ratio ours / x-transformers, dropout 0.1: '
          f'{seconds["x-transformers, ff_dropout 0.1"] / seconds["ours, dropout 0.1 (default)"]:.2f}x  (goal 1.3x)')
    print(f'ratio ours / x-transformers, dropout 0:   '
          f'{seconds["x-transformers, dropout 0"] / seconds["ours, dropout 0"]:.2f}x')


def bench_generation(device, args, threads=None):
    new_tokens = args.gen_tokens or (128 if args.quick else GEN_LEN)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    print(f'\n## Generation ({device.type}, {torch.get_num_threads()} threads): prompt = start token, '
          f'{new_tokens} new tokens, max_seq_len {GEN_LEN}, greedy')
    torch.manual_seed(0)
    model = ours(GEN_LEN).to(device).eval()
    reference = theirs(GEN_LEN).to(device).eval()
    runs = {
        'ours, cached, float32': (model, 1, True),
        'x-transformers, cache_kv, float32': (reference, 1, True),
        'ours, cached, int8 weights': (quantize_for_generation(model), 1, True),
        'ours, cached, float32, batch 16': (model, 16, True),
        'ours, cached, int8 weights, batch 16': (quantize_for_generation(model), 16, True),
    }
    if threads is not None:  # the single-thread pass repeats only the batch-1 comparison
        runs = {name: spec for name, spec in runs.items() if spec[1] == 1}
    if threads is None:
        runs['ours, static cache, float32'] = (model, 1, 'static')
    if device.type == 'cuda':
        bf16_model = ours(GEN_LEN).to(device).eval().to(torch.bfloat16)
        runs['ours, cached, bf16 weights'] = (bf16_model, 1, True)
        runs[GRAPHED] = (bf16_model, 1, 'static')
        runs[GRAPHED_COMPILED] = (bf16_model, 1, 'compile')

    def generate(net, batch, cached, count):
        prompt = torch.full((batch, 1), START_IDX, device=device)
        if net is reference:
            return lambda: net.generate(prompt, count, temperature=0.0, cache_kv=cached)
        return lambda: net.generate(prompt, count, temperature=0.0, use_cache=bool(cached),
                                    static_cache={'static': True, 'compile': 'compile'}.get(cached, False))
    seconds = alternate({name: generate(*spec, new_tokens) for name, spec in runs.items()}, args.gen_repeats,
                        device)
    print(f'{"run":42s} {"s":>8s} {"tokens/s":>9s}')
    for name, s in seconds.items():
        print(f'{name:42s} {s:8.2f} {runs[name][1] * new_tokens / s:9,.0f}')
    if threads is None:
        # uncached generation re-runs the whole context per token: timed on fewer tokens to keep it short
        uncached_tokens = 64 if args.quick else 128
        s = timed(generate(model, 1, False, uncached_tokens), device)
        print(f'{"ours, uncached, float32":42s} {s:8.2f} {uncached_tokens / s:9,.1f}  ({uncached_tokens} tokens)')
    base = seconds['x-transformers, cache_kv, float32']
    for name in ('ours, cached, float32', 'ours, cached, int8 weights'):
        print(f'ratio {name} / x-transformers: {base / seconds[name]:.2f}x  (goal 3x)')
    if GRAPHED in seconds:  # the same greedy tokens as the uncaptured path, token for token
        plain = generate(*runs['ours, cached, bf16 weights'], new_tokens)()
        for name in (GRAPHED, GRAPHED_COMPILED):
            same = (generate(*runs[name], new_tokens)() == plain).float().mean().item()
            print(f'{name}: {same:.1%} of {new_tokens} greedy tokens equal to the uncaptured bf16 path')
    for name in (GRAPHED, GRAPHED_COMPILED):
        if name in seconds:
            print(f'ratio {name} / cached, bf16 weights: {seconds["ours, cached, bf16 weights"] / seconds[name]:.2f}x; '
                  f'{new_tokens / seconds[name]:,.0f} tokens/s (goal 3,000 on an H200)')
    torch.set_num_threads(default_threads)


def quick_gpu_config():
    """The model of config/quick_gpu.py (read as the training script reads a config: plain assignments)."""
    config = runpy.run_path(str(ROOT / 'config' / 'quick_gpu.py'))
    return {name: config[name] for name in ('dim', 'depth', 'heads', 'dim_head', 'prev_tokens', 'dropout')}


def bench_mfu(device, args, amp_dtype):
    """Model FLOP/s of a training step at a realistic batch, eager and torch.compile'd, against the matmul anchor."""
    batch, length = args.mfu_batch, args.mfu_len
    dtype_name = str(amp_dtype).removeprefix('torch.')
    print(f'\n## MFU ({device.type}): batch {batch} x {length}, {dtype_name}, fused AdamW')
    peak = matmul_flops(device, amp_dtype, 8192 if device.type == 'cuda' else 2048, 5)
    print(f'{dtype_name} matmul anchor: {peak / 1e12:,.2f} TFLOP/s')
    configs = {'default (dim 512 x 6)': (dict(dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, prev_tokens=0,
                                                dropout=0.1), False),
               'config/quick_gpu.py': (quick_gpu_config(), True)}
    print(f'{"model":34s} {"s/step":>8s} {"tokens/s":>10s} {"TFLOP/s":>8s} {"of matmul":>9s}')
    for name, (config, tune_mask) in configs.items():
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_model(dict(config, seq_len=length)).to(device)
            model = compile_model(model) if compiled else model
            start = time.perf_counter()
            seconds = alternate({'step': train_step(model, device, amp_dtype, batch, length, tune_mask)},
                                args.repeats, device)['step']
            flops = model_flops_per_step(model, batch, length)
            label = f'{name}{", compiled" if compiled else ""}'
            print(f'{label:34s} {seconds:8.3f} {batch * length / seconds:10,.0f} {flops / seconds / 1e12:8.2f} '
                  f'{flops / seconds / peak:9.0%}  (warm-up {time.perf_counter() - start - seconds:.0f} s)',
                  flush=True)
            del model
            if device.type == 'cuda':
                torch.cuda.empty_cache()


PROFILE_GROUPS = {  # aten op name -> the part of a step it belongs to (first match; the rest is 'other')
    'matrix multiplies': ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm'),
    'attention kernels (SDPA)': ('flash_attention', 'efficient_attention', 'scaled_dot_product'),
    'softmax and log-softmax': ('softmax',),
    'copies and casts': ('aten::copy_', 'aten::_to_copy'),
    'GELU': ('gelu',),
    'layer norm': ('layer_norm',),
    'optimizer (fused AdamW)': ('adam',),
    'embeddings': ('embedding', 'index_select'),
    'elementwise (mul, add, where, ...)': ('aten::mul', 'aten::add', 'aten::where', 'aten::fill_', 'aten::cat',
                                           'aten::sum', 'aten::addcmul', 'aten::div', 'aten::sub', 'aten::neg'),
}


def profile_recipes():
    """{name: (model, batch, tune_mask)}: the default model, and the quick CPU recipe's (config/quick_cpu.py)."""
    config = runpy.run_path(str(ROOT / 'config' / 'quick_cpu.py'))
    quick = {name: config[name] for name in ('dim', 'depth', 'heads', 'dim_head', 'prev_tokens', 'dropout')}
    return {'default model, batch 8 x 256': (ours(TRAIN_LEN), BATCH, False),
            'config/quick_cpu.py, batch 16 x 256': (build_model(dict(quick, seq_len=TRAIN_LEN)),
                                                    config['batch_size'], config['tune_mask'])}


def bench_profile(device, amp_dtype):
    """Torch profiler: self time of every op in three training steps, by part, for the default model and the
    quick CPU recipe's (config/quick_cpu.py: dim 128 x 4, 9 previous tokens, batch 16 x 256, tune mask)."""
    from torch.profiler import ProfilerActivity, profile
    for name, (model, batch, tune_mask) in profile_recipes().items():
        step = train_step(model.to(device), device, amp_dtype, batch, TRAIN_LEN, tune_mask)
        step()
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        parts = dict.fromkeys(list(PROFILE_GROUPS) + ['other'], 0.0)
        for event in prof.key_averages():
            if not event.key.startswith('aten::') or event.self_cpu_time_total == 0:
                continue
            part = next((p for p, keys in PROFILE_GROUPS.items() if any(k in event.key for k in keys)), 'other')
            parts[part] += event.self_cpu_time_total
        total = sum(parts.values())
        print(f'\n## Profile ({device.type}): {name}, {str(amp_dtype).removeprefix("torch.")}, one step '
              f'{seconds:.2f} s unprofiled')
        print('| part | share of the step |\n| --- | --- |')
        for part, t in sorted(parts.items(), key=lambda item: -item[1]):
            print(f'| {part} | {t / total:.1%} |')


def bench_attention(device, repeats):
    """Forward and backward of one layer's attention at the quick CPU recipe's shape (batch 16, 2 heads of 64,
    256 tokens) under the tune mask of train_step's windows: SDPA with the mask against fast_ops.masked_attention."""
    from fast_ops import masked_attention
    batch, heads, dim_head = 16, 2, 64
    tunes = torch.cumsum(packed_tokens(batch, TRAIN_LEN, device) == START_IDX, dim=1)
    mask = attention_mask(TRAIN_LEN, TRAIN_LEN, device, tunes)
    print(f'\n## Attention ({device.type}): batch {batch}, {heads} heads of {dim_head}, {TRAIN_LEN} tokens, tune mask, '
          f'forward + backward')
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, grad = (torch.randn(batch, heads, TRAIN_LEN, dim_head, device=device, dtype=dtype,
                                     requires_grad=i < 3) for i in range(4))
        runs = {'SDPA with the mask': lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask).backward(grad),
                'masked_attention': lambda: masked_attention(q, k, v, mask).backward(grad)}
        seconds = alternate(runs, repeats, device)
        print(f'{str(dtype).removeprefix("torch.")}: ' + ', '.join(f'{name} {t * 1e3:.1f} ms' for name, t in
                                                                  seconds.items())
              + f'; SDPA / masked_attention {seconds["SDPA with the mask"] / seconds["masked_attention"]:.2f}x')


def step_times(setting, recipe):
    """Print the fastest of four CPU training steps of one model of the profile, and its page faults a step: one
    process's figures, as one training run's."""
    import resource  # Unix only
    if setting == 'kept':
        keep_freed_memory()
    device = torch.device('cpu')
    name, (model, batch, tune_mask) = list(profile_recipes().items())[recipe]
    step = train_step(model.to(device), device, choose_device('cpu').dtype, batch, TRAIN_LEN, tune_mask)
    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = min(timed(step, device) for _ in range(4))
    print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 4)


def bench_malloc(args, rounds=3):
    """The profile's CPU training steps, each model in fresh processes taking turns: glibc's malloc defaults against
    runtime.keep_freed_memory (a process-wide setting, so it cannot alternate within one process)."""
    threads = ['--threads', str(args.threads)] if args.threads else []
    print(f'\n## glibc malloc (cpu): fastest step of {4 * rounds} in {rounds} processes each, page faults a step')
    for recipe, name in enumerate(profile_recipes()):
        best, faults = {}, {}
        for _ in range(rounds):
            for setting in ('glibc', 'kept'):
                done = subprocess.run([sys.executable, __file__, '--step_times', setting, str(recipe)] + threads,
                                      capture_output=True, text=True, check=True)
                seconds, faults[setting] = (float(word) for word in done.stdout.split())
                best[setting] = min(best.get(setting, float('inf')), seconds)
        print(f'{name}: glibc defaults {best["glibc"]:.3f} s ({faults["glibc"]:,.0f} faults), keep_freed_memory '
              f'{best["kept"]:.3f} s ({faults["kept"]:,.0f}), defaults / kept {best["glibc"] / best["kept"]:.3f}x',
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='fewer repeats and tokens, no torch.compile')
    parser.add_argument('--generation_only', action='store_true', help='skip the training tables')
    parser.add_argument('--device', default='all', choices=('all', 'cpu', 'cuda'),
                        help='which tables: the CPU, the CUDA GPU, or both (default)')
    parser.add_argument('--mfu', action='store_true', help='only model FLOP/s at a realistic batch, eager and compiled')
    parser.add_argument('--mfu_batch', type=int, default=MFU_BATCH, help='rows of the --mfu batch')
    parser.add_argument('--mfu_len', type=int, default=MFU_LEN, help='tokens a row of the --mfu batch')
    parser.add_argument('--gen_tokens', type=int, default=None,
                        help='new tokens a generation table times (default 128 with --quick, else 512)')
    parser.add_argument('--profile', action='store_true', help='only where a training step\'s time goes, by op')
    parser.add_argument('--attention', action='store_true', help='only one layer\'s attention under the tune mask')
    parser.add_argument('--malloc', action='store_true',
                        help='only CPU training steps with glibc\'s malloc defaults and with keep_freed_memory')
    parser.add_argument('--step_times', nargs=2, help=argparse.SUPPRESS)  # one --malloc process: setting, recipe
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_times:
        return step_times(args.step_times[0], int(args.step_times[1]))
    keep_freed_memory()  # as training runs
    if args.malloc:
        return bench_malloc(args)
    args.repeats = 2 if args.quick else 3
    args.gen_repeats = 1 if args.quick else 2
    print(f'# bench_model.py  torch {torch.__version__}  {platform.processor() or platform.machine()}  '
          f'{os.cpu_count()} cpus, {torch.get_num_threads()} threads  load average {os.getloadavg()[0]:.1f}')
    devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ('all', d.type)]
    for device in devices:
        if args.mfu:
            bench_mfu(device, args, choose_device(device.type).dtype)
            continue
        if args.profile:
            bench_profile(device, choose_device(device.type).dtype)
            continue
        if args.attention:
            bench_attention(device, 5 * args.repeats)
            continue
        # the precision training picks here: a CPU without bf16 instructions would time emulated bf16
        if not args.generation_only:
            bench_training(device, args, choose_device(device.type).dtype)
        # GPUs without native bf16 train in fp16 (with a gradient scaler)
        if device.type == 'cuda' and not args.generation_only:
            bench_training(device, args, torch.float16)
        bench_generation(device, args)
        if device.type == 'cpu' and torch.get_num_threads() > 1:
            bench_generation(device, args, threads=1)
    print(f'\nload average at the end: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
