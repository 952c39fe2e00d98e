"""Minutes to a good model: train a config for a wall-clock budget and print (seconds, validation NLL) pairs.

    python benchmarks/bench_time_to_quality.py config/quick_cpu.py --minutes 7 [--field value ...]
    python benchmarks/bench_time_to_quality.py --preset quick_unpacked --minutes 7

The training runs as a user runs it (`python custom_training.py CONFIG ...`) into a temporary folder and is
stopped by SIGTERM when the budget is spent (it saves and exits, as on a cluster). The seconds are the user's
clock, from launching the command; each validation point is what the run's metrics.csv logged. Prints the time
at which each threshold (--thresholds) was first reached, or that it was not.
"""

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a quick recipe with one tune a window (40% padding at seq_len 256), beside which config/quick_cpu.py's packed
# windows are measured
PRESETS = {'quick_unpacked': ['--dim', '256', '--depth', '4', '--heads', '4', '--seq_len', '256', '--batch_size', '16',
                         '--grad_accum', '1', '--lr', '1e-3', '--lr_schedule', 'cosine', '--warmup_steps', '100',
                         '--min_lr', '1e-4', '--max_steps', '2000', '--validate_every', '250', '--generate_every',
                         '500', '--save_every', '500', '--generate_length', '512', '--pack', 'false']}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), help='a recipe kept here for comparison')
    parser.add_argument('--minutes', type=float, default=7.0, help='wall-clock budget')
    parser.add_argument('--thresholds', default='0.914,0.87', help='validation NLLs to time, comma-separated')
    parser.add_argument('--keep', default=None, help='keep the run in this folder (default: a temporary one)')
    # everything else (a config file, --field value) goes to the training command as it is
    args, extra = parser.parse_known_args()
    command = [sys.executable, str(ROOT / 'custom_training.py')]
    command += PRESETS[args.preset] if args.preset else []
    folder = Path(args.keep or tempfile.mkdtemp(prefix='time_to_quality_'))
    folder.mkdir(parents=True, exist_ok=True)
    command += extra + ['--save_dir', str(folder / 'ckpt'), '--samples_dir', str(folder / 'samples'),
                        '--audio', 'false']
    print(f'# {" ".join(command[1:])}\n# budget {args.minutes} min, {os.cpu_count()} CPUs, load average '
          f'{os.getloadavg()[0]:.1f}', flush=True)
    start = time.time()
    with open(folder / 'training.log', 'w') as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the run finishes its step, saves and exits
            proc.wait(timeout=600)
    wall = time.time() - start
    if not (folder / 'ckpt' / 'metrics.csv').exists():
        sys.exit(f'the run logged nothing; see {folder / "training.log"}')
    with open(folder / 'ckpt' / 'metrics.csv') as f:
        rows = [r for r in csv.DictReader(f) if r.get('val_loss')]
    # metrics.csv counts from the script's start; the launch (python, imports) came a little before
    print(f'{"seconds":>8s} {"step":>6s} {"val NLL":>8s} {"val acc":>8s}')
    for r in rows:
        print(f'{float(r["elapsed_sec"]):8.0f} {int(r["step"]):6d} {float(r["val_loss"]):8.4f} {float(r["val_acc"]):8.4f}')
    for threshold in (float(t) for t in args.thresholds.split(',')):
        reached = next((r for r in rows if float(r['val_loss']) <= threshold), None)
        print(f'NLL <= {threshold}: ' + (f'reached at {float(reached["elapsed_sec"]):.0f} s (step {reached["step"]})'
                                         if reached else 'not reached'))
    print(f'run ended after {wall:.0f} s with exit code {proc.returncode}; files in {folder}')


if __name__ == '__main__':
    main()
