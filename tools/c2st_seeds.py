"""The classifier two-sample test over many sampling seeds: one evaluate.py run per seed, then the mean.

One seed's C2ST accuracy moves by a couple of points with the pieces it happened to sample, more than the gap
between two good models; the mean over seeds, next to the mean of each run's own control, is the figure to
compare. This script runs `evaluate.py --seed S --output_dir WORK/sS` for every seed whose report is missing
(so a stopped sweep goes on where it was), then writes c2st_seeds.json and .png:

    python tools/c2st_seeds.py --checkpoint models/long_cpu.pt --seeds 0-29 --work_dir /tmp/c2st \\
        --output training_loss/c2st_seeds_ms [--test whole_tune] [-- any other evaluate.py option]

--test first_notes (the default) averages the test over each piece's first notes, --test whole_tune the one over
whole tunes. Each run leaves out the parts the sweep does not read (the other test, the key/meter/style
classifiers, whose figures do not depend on the seed); a report without the test asked for is evaluated again.
"""

import json
import statistics
import subprocess
import sys
from argparse import ArgumentParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import sigterm_as_ctrl_c, stopped_by  # noqa: E402
from token_cache import write_atomically  # noqa: E402

MAX_SEEDS = 1000  # each seed is a whole evaluate.py run: a longer range is taken for a typo
# each test: (its entry in the report, its goal in the report's goals, evaluate.py options that leave the rest out)
TESTS = {'first_notes': ('c2st', 'c2st_points', ['--tunes', '0', '--no_adherence']),
         'whole_tune': ('c2st_whole_tune', 'c2st_whole_tune_points', ['--no_adherence'])}


def seed_range(text):
    """'0-29' or '3' -> a list of seeds."""
    first, dash, last = text.partition('-')
    try:
        first, last = int(first), int(last if dash else first)
    except ValueError:
        first, last = -1, -1
    if first < 0 or not first <= last < first + MAX_SEEDS:
        raise ValueError(f'--seeds {text!r}: expected a seed or a range such as 0-29, at most {MAX_SEEDS} seeds')
    return list(range(first, last + 1))


def seed_row(report, test='first_notes'):
    """The accuracies one report gives for a test of TESTS, or KeyError/TypeError where it lacks them."""
    c2st = report[TESTS[test][0]]
    if 'skipped' in c2st:
        return {'skipped': c2st['skipped']}
    return {'seed': int(report['samples']['seed']),
            'boosted': float(c2st['generated_vs_held_out']['boosted']),
            'linear': float(c2st['generated_vs_held_out']['linear']),
            'control_boosted': float(c2st['control']['boosted']),
            'control_linear': float(c2st['control']['linear'])}


def model_key(report):
    """What must be the same in every report of a sweep: the weights (step and validation NLL; the file may have
    moved between runs) and the sampling settings."""
    samples = report['samples']
    return (report['step'], report['model']['nll'], samples['temperature'], samples['top_p'], samples['top_k'],
            samples['grammar_constrained'], report['repeat_memory']['strength'], samples.get('guidance', 1.0),
            samples.get('end_guidance'), samples.get('voice_leading', False))


def read_report(path, test='first_notes'):
    """An evaluate.py report, or None where there is none yet, it was cut short or damaged (evaluate.py stopped
    while writing it) or it left the test out (a sweep of the other test made it): that seed is then evaluated
    again. Every field the summary reads is looked up here once."""
    key, goal, _ = TESTS[test]
    try:
        report = json.loads(Path(path).read_text())
        row = seed_row(report, test)
        model_key(report), str(report['checkpoint']), float(report['goals'][goal])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if row.get('skipped', '').startswith('off ('):
        return None
    return report


def summarize(reports, test='first_notes'):
    """evaluate.py reports of one checkpoint, one per seed -> each seed's accuracies of the test (TESTS), their
    means and the gap."""
    rows = [seed_row(report, test) for report in reports]
    for report, row in zip(reports, rows):
        if 'skipped' in row:
            raise ValueError(f"seed {report['samples']['seed']}: the C2ST was skipped ({row['skipped']})")
    if len({model_key(report) for report in reports}) != 1:
        raise ValueError('the reports are not all of one checkpoint with the same sampling settings')
    seeds = [row['seed'] for row in rows]
    if len(set(seeds)) != len(seeds):
        raise ValueError('a seed appears twice among the reports')
    goal = reports[0]['goals'][TESTS[test][1]]
    mean = {key: statistics.fmean(row[key] for row in rows) for key in rows[0] if key != 'seed'}
    gaps = [row['boosted'] - row['control_boosted'] for row in rows]
    # each run's gap is its own paired difference, so the spread of the gaps gives the mean gap's standard error
    error = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None
    return {'test': test, 'checkpoints': sorted({r['checkpoint'] for r in reports}), 'step': reports[0]['step'],
            'nll': reports[0]['model']['nll'], 'sampling': reports[0]['samples'] | {'seed': None},
            'seeds': sorted(seeds),
            'per_seed': sorted(rows, key=lambda row: row['seed']), 'mean': mean,
            'gap_points': 100 * (mean['boosted'] - mean['control_boosted']),
            'gap_standard_error_points': None if error is None else 100 * error,
            'goal_points': 100 * goal, 'within_goal': mean['boosted'] - mean['control_boosted'] <= goal}


def plot(summary, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = summary['per_seed']
    seeds = [row['seed'] for row in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, color, label in (('boosted', 'tab:orange', 'generated vs held-out'),
                              ('control_boosted', 'tab:gray', 'control: held-out halves')):
        ax.plot(seeds, [row[key] for row in rows], 'o', color=color, label=f"{label} (mean {summary['mean'][key]:.3f})")
        ax.axhline(summary['mean'][key], color=color, linewidth=1)
    goal = summary['mean']['control_boosted'] + summary['goal_points'] / 100
    ax.axhline(goal, color='tab:green', linewidth=2, linestyle='--',
               label=f"goal: mean at most control + {summary['goal_points']:.0f} points")
    error = summary['gap_standard_error_points']
    what = 'whole tunes' if summary['test'] == 'whole_tune' else 'first notes'
    ax.set_title(f"boosted-tree C2ST ({what}) by seed: {summary['gap_points']:.2f} points above the control"
                 + (f' (standard error {error:.2f})' if error is not None else ''))
    ax.set_xlabel('sampling seed (evaluate.py --seed)')
    ax.set_ylabel('cross-validated accuracy')
    ax.set_ylim(0.4, max(0.7, max(row['boosted'] for row in rows) + 0.05))
    ax.legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')  # path may be a temporary name without the .png suffix
    plt.close(fig)


def write_summary(summary, json_path, png_path):
    """Both files, each under a temporary name renamed into place, the picture drawn first and renamed last: a stop
    leaves each whole or as it was, never part of one."""
    def write_both(png):
        plot(summary, png)
        text = json.dumps(summary, indent=1)
        write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))
    write_atomically(png_path, write_both)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='checkpoint to evaluate')
    parser.add_argument('--seeds', default='0-29', help="sampling seeds, e.g. '0-29'")
    parser.add_argument('--work_dir', required=True, help='one evaluate.py report per seed goes in WORK_DIR/sSEED')
    parser.add_argument('--output', required=True, help='writes OUTPUT.json and OUTPUT.png')
    parser.add_argument('--test', default='first_notes', choices=sorted(TESTS),
                        help="the two-sample test averaged: over each piece's first notes, or over whole tunes")
    parser.add_argument('evaluate_args', nargs='*', help='after --: passed on to evaluate.py')
    args = parser.parse_args(argv)
    try:
        seeds = seed_range(args.seeds)
    except ValueError as e:
        sys.exit(f'error: {e}')
    # evaluate.py's argparse takes any unambiguous prefix (--see for --seed), so a prefix is refused too
    ours = [a for a in args.evaluate_args if len(a.split('=')[0]) > 2 and
            any(name.startswith(a.split('=')[0]) for name in ('--seed', '--output_dir', '--checkpoint'))]
    if ours:
        sys.exit(f'error: {ours[0]} after --: this script sets it for each run (use --seeds, --work_dir, --checkpoint)')
    # OUTPUT.json and OUTPUT.png: the suffixes are added, never swapped for a dotted ending (run.1, run.2)
    output = Path(args.output)
    summary_json, summary_png = (output.parent / f'{output.name}{suffix}' for suffix in ('.json', '.png'))
    if not output.name or output.name in ('.', '..'):
        sys.exit(f'error: --output {args.output!r}: expected a file name without its suffix, e.g. results/c2st')
    folder = summary_json.resolve().parent
    if folder.parent == Path(args.work_dir).resolve() and folder.name[:1] == 's' and folder.name[1:].isdigit():
        sys.exit(f'error: --output {args.output!r} is inside a seed folder of --work_dir, where it could replace '
                 f'a report: write the summary elsewhere')
    reports, summary = [], None
    try:
        with sigterm_as_ctrl_c():  # a scheduler's stop ends the running evaluate.py too
            for seed in seeds:
                out = Path(args.work_dir) / f's{seed}'
                report = read_report(out / 'evaluation.json', args.test)
                if report is None:
                    print(f'seed {seed}: evaluate.py -> {out}', flush=True)
                    command = [sys.executable, str(ROOT / 'evaluate.py'), '--checkpoint', args.checkpoint, '--seed',
                               str(seed), '--output_dir', str(out)] + TESTS[args.test][2] + args.evaluate_args
                    done = subprocess.run(command, stdout=subprocess.DEVNULL)
                    report = read_report(out / 'evaluation.json', args.test)
                    if done.returncode or report is None:
                        sys.exit(f'error: evaluate.py stopped with exit code {done.returncode} at seed {seed} (its '
                                 f'message is above); the seeds done so far are kept in {args.work_dir}')
                reports.append(report)
            try:
                summary = summarize(reports, args.test)
            except ValueError as e:
                sys.exit(f'error: {e}')
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                write_summary(summary, summary_json, summary_png)
            except OSError as e:
                sys.exit(f'error: cannot write {e.filename or output}: {e.strerror or e}')
    except KeyboardInterrupt as e:  # subprocess.run has killed the evaluate.py it was waiting for
        how, code = stopped_by(e)
        print(f'stopped by {how}: the seeds done so far are kept in {args.work_dir}'
              + ('' if summary is None else f', no summary written to {output}'), file=sys.stderr)
        sys.exit(code)
    mean = summary['mean']
    print(f"{len(seeds)} seeds: boosted {mean['boosted']:.4f}, control {mean['control_boosted']:.4f}, "
          f"gap {summary['gap_points']:.2f} points (goal at most {summary['goal_points']:.0f}; standard error "
          f"{summary['gap_standard_error_points'] or float('nan'):.2f}); linear {mean['linear']:.4f}; "
          f"{'within' if summary['within_goal'] else 'NOT within'} the goal -> {summary_json}")


if __name__ == '__main__':
    main()
