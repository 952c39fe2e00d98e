"""Training runs side by side on one CPU machine: the tokens/s of each, against one run alone, when every run takes
all cores (torch's default, --threads 0) and when each takes cores / runs (--threads).

    python benchmarks/bench_parallel_runs.py [--runs 2] [--steps 30] [--repeats 1]

Each run is config/quick_cpu.py for --steps steps on the bundled folk songs (tokenized once beforehand, so no run
tokenizes). Configurations are interleaved within each repeat, and the load average is printed beside each, so a
machine shared with other work shows in the figures. A run's tokens/s is the mean of its metrics.csv rows after the
first (the first holds start-up).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import load_corpus  # noqa: E402
from runtime import BUNDLED_DATASET  # noqa: E402
from tokens import tokenization_settings  # noqa: E402


def run_at_once(count, threads, steps, work, cache):
    """Start `count` trainings together, wait for all; the tokens/s of each."""
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')}
    procs = []
    for i in range(count):
        folder = Path(tempfile.mkdtemp(dir=work))
        cmd = [sys.executable, str(ROOT / 'custom_training.py'), str(ROOT / 'config' / 'quick_cpu.py'),
               '--max_steps', str(steps), '--print_stats_every', '5', '--validate_every', '1000000',
               '--generate_every', '1000000', '--save_every', '1000000', '--generate_length', '16',
               '--audio', 'false', '--threads', str(threads), '--data_path', str(BUNDLED_DATASET),
               '--cache_dir', cache, '--save_dir', str(folder / 'ckpt'), '--samples_dir', str(folder / 'samples')]
        procs.append((folder, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               text=True)))
    speeds = []
    for folder, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f'a training run failed: {err[-2000:]}')
        with open(folder / 'ckpt' / 'metrics.csv') as f:
            rows = [float(row['tokens_per_sec']) for row in csv.DictReader(f)]
        speeds.append(statistics.mean(rows[1:]) if len(rows) > 1 else rows[0])
    return speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=2, help='runs side by side')
    parser.add_argument('--steps', type=int, default=30, help='training steps a run')
    parser.add_argument('--repeats', type=int, default=1, help='times the interleaved configurations are repeated')
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    share = max(1, cores // args.runs)
    configs = [('alone, all cores', 1, 0), (f'{args.runs} at once, all cores each', args.runs, 0),
               (f'{args.runs} at once, {share} thread(s) each', args.runs, share),
               (f'alone, {share} thread(s)', 1, share)]
    print(f'{cores} cores; config/quick_cpu.py, {args.steps} steps a run; load average before: '
          f'{os.getloadavg()[0]:.1f}')
    results = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory() as work:
        cache = str(Path(work) / 'cache')
        load_corpus(str(BUNDLED_DATASET), tokenization_settings(), cache, verbose=False)
        for _ in range(args.repeats):
            for name, count, threads in configs:
                start = time.time()
                speeds = run_at_once(count, threads, args.steps, work, cache)
                results[name] += speeds
                print(f'{name:34s} tokens/s of each run: {", ".join(f"{s:,.0f}" for s in speeds):24s} '
                      f'({time.time() - start:.0f} s, load average after {os.getloadavg()[0]:.1f})', flush=True)
    alone = statistics.mean(results[configs[0][0]])
    print(f'\nmean tokens/s of a run, and its ratio to one run alone with all cores ({alone:,.0f}):')
    for name, count, _ in configs:
        mean = statistics.mean(results[name])
        print(f'{name:34s} {mean:10,.0f}   x{mean / alone:.3f} a run, x{count * mean / alone:.3f} all runs together')


if __name__ == '__main__':
    main()
