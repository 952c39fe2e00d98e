"""Is a trained model any good? Validation NLL against n-gram baselines, and generated music against held-out music.

    python evaluate.py --checkpoint content/checkpoints/best.pt [--data_path DIR] [--num_samples 32]

Writes <output_dir>/evaluation.json and evaluation.png (output_dir defaults to the checkpoint's folder) and prints
a table. Three parts:

1. Model: NLL per token (nats), perplexity and accuracy over the validation split, pad excluded, computed by
   runtime.evaluate_split on the same corpus, split and windows as training, so the numbers are the ones
   training reported.
2. Baselines counted on the training split's tokens and scored on the same validation windows and targets: an
   add-one unigram and an interpolated Witten-Bell n-gram (default 5-gram) that backs off down to that unigram.
   A target's context never reaches before its window's first token, just as the model's does.
3. Music: statistics of num_samples pieces generated from the start token against the validation pieces, each
   the relative difference generated vs held-out (goal: within 10%), the duration histograms compared by their
   total variation distance (goal: at most 0.10).

Beat grid rule: an onset is on the grid when it falls on a 16th-note or an 8th-note-triplet line, counted from
the piece's first note. 'beats' timing: step s (1/beat_division of a quarter) is on the grid when 4*s or 3*s is a
multiple of beat_division. 'ms' timing: the onset in ms is converted to beats at the checkpoint's output_tempo
(the training set's median tempo) and counts when it lies within 10 ms of a grid line.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dataset import (
    DUR_OFFSET,
    NUM_TOKENS,
    PAD_IDX,
    START_IDX,
    TIME_OFFSET,
    DatasetError,
    MIDI_Dataset,
    load_corpus,
    seconds_per_step,
    token_kind,
    tokens_to_notes,
)
from options import RULES, exit_on_bad_args, optional
from runtime import CheckpointError, DeviceError, evaluate_split, load_model, resolve_data_path, start_machine

KEY_BITS = 10               # a token id fits in 10 bits (NUM_TOKENS < 1024), so an n-gram of 6 fits in an int64
GOAL_MARGIN = 0.20          # model NLL at least 20% below the n-gram baseline's
GOAL_RELATIVE = 0.10        # generated statistics within 10% of held-out music
GOAL_DURATION_TV = 0.10     # duration histograms at most this far apart (total variation distance)
GRID_TOLERANCE_MS = 10.0    # 'ms' timing: an onset this close to a grid line counts as on the grid
MAJOR_STEPS = (0, 2, 4, 5, 7, 9, 11)
# a natural minor scale holds the same pitch classes as its relative major (A minor = C major), so the 12
# rotations of the major scale are all 24 major and natural-minor keys
DIATONIC_SETS = np.array([[(p - root) % 12 in MAJOR_STEPS for p in range(12)] for root in range(12)])
STATISTICS = ('pitch_range', 'pitch_class_entropy', 'scale_consistency', 'notes_per_second', 'onsets_on_grid',
              'grammar_validity')


# -----------------------------------------------------------------------------
# baselines

def _context_keys(tokens, positions, k):
    """Integer key of the k tokens before each position (oldest in the highest bits)."""
    key = np.zeros(len(positions), dtype=np.int64)
    for j in range(k, 0, -1):
        key = (key << KEY_BITS) | tokens[positions - j]
    return key


class NGramModel:
    """Interpolated Witten-Bell n-gram over the token vocabulary, down to an add-one unigram.

    P(w|h) = (c(h,w) + T(h) * P(w|h')) / (c(h) + T(h)), where h' drops h's oldest token, c counts training
    occurrences and T(h) is the number of distinct tokens seen after h; an unseen h passes P(w|h') on unchanged.
    Every level is a normalised distribution over all NUM_TOKENS ids because the add-one unigram is, so the
    NLL is a real one (stupid backoff would not be). order=1 is the unigram alone.
    """

    def __init__(self, sequences, order=5):
        if order < 1 or order > 64 // KEY_BITS:
            raise ValueError(f'n-gram order must be 1..{64 // KEY_BITS}, got {order}')
        self.order = order
        tokens, targets, context_lengths = flatten(sequences)
        counts = np.bincount(tokens[targets], minlength=NUM_TOKENS)
        self.unigram = (counts + 1.0) / (counts.sum() + NUM_TOKENS)
        self.tables = []  # per context length k: sorted (h,w) keys and counts, sorted h keys, c(h), T(h)
        for k in range(1, order):
            pos = targets[context_lengths >= k]
            hw = (_context_keys(tokens, pos, k) << KEY_BITS) | tokens[pos]
            hw_keys, hw_counts = np.unique(hw, return_counts=True)
            h_keys, first = np.unique(hw_keys >> KEY_BITS, return_index=True)
            h_counts = np.add.reduceat(hw_counts, first) if len(first) else np.zeros(0, np.int64)
            h_types = np.diff(np.append(first, len(hw_keys)))
            self.tables.append((hw_keys, hw_counts, h_keys, h_counts, h_types))

    def probabilities(self, tokens, positions, context_lengths):
        """P(tokens[p] | up to context_lengths[p] tokens before p), for every p in positions."""
        tokens = tokens.astype(np.int64)
        p = self.unigram[tokens[positions]]
        for k, (hw_keys, hw_counts, h_keys, h_counts, h_types) in enumerate(self.tables, start=1):
            use = context_lengths >= k
            if not use.any():
                break
            pos = positions[use]
            h = _context_keys(tokens, pos, k)
            c_hw = _lookup(hw_keys, hw_counts, (h << KEY_BITS) | tokens[pos])
            c_h = _lookup(h_keys, h_counts, h)
            t_h = _lookup(h_keys, h_types, h)
            seen = c_h > 0
            lower = p[use]
            p[use] = np.where(seen, (c_hw + t_h * lower) / np.maximum(c_h + t_h, 1), lower)
        return p


def flatten(sequences):
    """Sequences end to end: (tokens, positions of the predicted tokens (all but each sequence's first), how many
    tokens of its own sequence precede each of them). Contexts are cut there, never crossing into the previous
    sequence."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if not len(sequences):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    before = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    targets = np.flatnonzero(before > 0)
    return tokens, targets, before[targets]


def _lookup(keys, values, query):
    """values[keys == query] per query, 0 where the key is absent (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(len(query))
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0).astype(np.float64)


def window_targets(dataset):
    """The windows of a dataset end to end: (tokens, target positions, context length available to each target).

    A target's context is capped at its position inside its window, the tokens the model sees. Pad targets are
    dropped, as the model's loss drops them."""
    tokens, targets, context_lengths = flatten([dataset[i].numpy() for i in range(len(dataset))])
    keep = tokens[targets] != PAD_IDX
    return tokens, targets[keep], context_lengths[keep]


def nll_of(probabilities):
    return float(-np.log(probabilities).mean()) if len(probabilities) else float('nan')


# -----------------------------------------------------------------------------
# musical statistics of one piece: notes are [start_step, duration_steps, pitch] as tokens_to_notes gives them

def pitch_range(notes):
    pitches = [n[2] for n in notes]
    return float(max(pitches) - min(pitches))


def pitch_class_entropy(notes):
    """Shannon entropy in bits of the piece's pitch-class distribution (log2(7) for a once-through major scale)."""
    counts = np.bincount([n[2] % 12 for n in notes], minlength=12)
    share = counts[counts > 0] / counts.sum()
    return float(-(share * np.log2(share)).sum())


def scale_consistency(notes):
    """Share of the piece's notes inside its best-fitting major / natural-minor scale."""
    counts = np.bincount([n[2] % 12 for n in notes], minlength=12)
    return float((DIATONIC_SETS @ counts).max() / counts.sum())


def notes_per_second(notes, step_seconds):
    """Notes over the time from the first onset to the last note's end."""
    span = max(n[0] + n[1] for n in notes) - notes[0][0]
    return len(notes) / (span * step_seconds)


def onsets_on_grid(notes, settings, tempo_bpm):
    """Share of onsets on a 16th or 8th-triplet line (the rule in the module docstring)."""
    starts = np.array([n[0] for n in notes], dtype=np.int64) - notes[0][0]
    if settings['timing'] == 'beats':
        division = settings['beat_division']
        return float(((starts * 4 % division == 0) | (starts * 3 % division == 0)).mean())
    beat_ms = 60_000.0 / tempo_bpm
    onset_ms = starts * settings['timing_factor']
    on_grid = np.zeros(len(starts), dtype=bool)
    for lines_per_beat in (4, 3):
        spacing = beat_ms / lines_per_beat
        off = np.abs(onset_ms - np.round(onset_ms / spacing) * spacing)
        on_grid |= off <= GRID_TOLERANCE_MS
    return float(on_grid.mean())


def duration_histogram(pieces):
    """Normalised histogram of duration steps (0-127) over the notes of all pieces."""
    steps = [int(n[1]) for notes in pieces for n in notes]  # tokens_to_notes's 0.5 for a zero step -> 0
    counts = np.bincount(steps, minlength=DUR_OFFSET - TIME_OFFSET).astype(np.float64)
    return counts / max(counts.sum(), 1)


def total_variation(p, q):
    return float(0.5 * np.abs(p - q).sum())


def grammar_validity(tokens):
    """Share of tokens that may follow the token before them in the pattern time? duration pitch.

    A time token must come after a pitch, a duration after a time or a pitch (or the start token), a pitch after
    a duration; after a broken token a time or duration may begin the next note. The start and pad tokens and ids
    outside the produced ranges (pitches above 127) are violations."""
    allowed = {'start': {'duration'}, 'time': {'duration'}, 'duration': {'pitch'},
               'pitch': {'time', 'duration'}, 'invalid': {'time', 'duration'}, 'pad': {'time', 'duration'}}
    tokens = [int(t) for t in tokens]
    previous = 'start' if tokens and tokens[0] != START_IDX else None
    valid = judged = 0
    for tok in tokens:
        current = token_kind(tok)
        if previous is not None:  # a leading start token begins the sequence and is not judged
            judged += 1
            valid += current in allowed[previous]
        previous = current
    return valid / judged if judged else float('nan')


def music_statistics(token_sequences, settings, tempo_bpm):
    """Per-piece statistics averaged over pieces with at least two notes, grammar validity over all tokens."""
    pieces = [tokens_to_notes(t) for t in token_sequences]
    pieces = [p for p in pieces if len(p) >= 2]
    step_seconds = seconds_per_step(settings, tempo_bpm)
    per_piece = {'pitch_range': pitch_range, 'pitch_class_entropy': pitch_class_entropy,
                 'scale_consistency': scale_consistency,
                 'notes_per_second': lambda n: notes_per_second(n, step_seconds),
                 'onsets_on_grid': lambda n: onsets_on_grid(n, settings, tempo_bpm)}
    stats = {name: float(np.mean([fn(p) for p in pieces])) if pieces else float('nan')
             for name, fn in per_piece.items()}
    judged = [(grammar_validity(t), len(t)) for t in token_sequences if len(t)]
    stats['grammar_validity'] = float(np.average([g for g, _ in judged], weights=[n for _, n in judged])) \
        if judged else float('nan')
    stats['pieces'] = len(pieces)
    stats['notes'] = sum(len(p) for p in pieces)
    return stats, duration_histogram(pieces)


# -----------------------------------------------------------------------------
# the report

def evaluate(checkpoint, data_path=None, cache_dir=None, num_samples=32, sample_length=None, ngram=5,
             temperature=1.0, top_p=0.95, top_k=None, device='auto', dtype=None, seed=0, log=print):
    """Everything in the report as a dict (see the module docstring)."""
    timings = {}
    clock = time.time()
    model, ckpt = load_model(checkpoint, 'cpu')
    args = SimpleNamespace(**ckpt['args'])
    # training's precision by default (the NLL it reported), where this machine has it
    try:
        machine = start_machine(device, dtype or ckpt['args'].get('dtype', 'auto'))
    except DeviceError:
        if dtype:
            raise
        machine = start_machine(device, 'auto')
    model = model.to(machine.device)
    settings = ckpt['tokenization']
    path = resolve_data_path(data_path or args.data_path, log)
    train_seqs, val_seqs, summary = load_corpus(path, settings, cache_dir or args.cache_dir, args.min_notes,
                                                args.val_fraction)
    if not val_seqs:
        raise DatasetError(f'{path} gives no validation files (val_fraction={args.val_fraction})')
    tempo = args.output_tempo or summary['median_tempo_bpm']
    timings['load_s'] = time.time() - clock

    clock = time.time()
    val_ds = MIDI_Dataset(val_seqs, args.seq_len, rand_start=False)
    val_nll, val_acc = evaluate_split(model, val_ds, max(8, 4 * args.batch_size), machine)
    timings['model_nll_s'] = time.time() - clock

    clock = time.time()
    tokens, positions, context = window_targets(val_ds)
    baselines = {}
    for name, order in (('unigram', 1), (f'{ngram}-gram', ngram)):
        nll = nll_of(NGramModel(train_seqs, order).probabilities(tokens, positions, context))
        margin = (nll - val_nll) / nll
        baselines[name] = {'order': order, 'nll': nll, 'perplexity': math.exp(nll), 'model_margin': margin,
                           'model_within_goal': bool(margin >= GOAL_MARGIN)}
    timings['baselines_s'] = time.time() - clock

    clock = time.time()
    if sample_length is None:  # range and pitch-class entropy grow with length: compare pieces of the same size
        sample_length = max(1, int(np.median([len(s) for s in val_seqs])) - 1)
    torch.manual_seed(seed)
    prompt = torch.full((num_samples, 1), START_IDX, dtype=torch.long, device=machine.device)
    with machine.autocast():
        generated = model.generate(prompt, sample_length, temperature=temperature, top_p=top_p, top_k=top_k)
    generated = generated.cpu().numpy()
    timings['generate_s'] = time.time() - clock

    gen_stats, gen_hist = music_statistics(list(generated), settings, tempo)
    held_stats, held_hist = music_statistics(val_seqs, settings, tempo)
    comparison = {}
    for name in STATISTICS:
        g, h = gen_stats[name], held_stats[name]
        rel = (g - h) / h if h else float('nan')
        comparison[name] = {'generated': g, 'held_out': h, 'relative_difference': rel,
                            'within_goal': bool(abs(rel) <= GOAL_RELATIVE)}
    tv = total_variation(gen_hist, held_hist)
    comparison['duration_histogram_tv'] = {'generated': None, 'held_out': None, 'distance': tv,
                                           'within_goal': bool(tv <= GOAL_DURATION_TV)}
    return {
        'checkpoint': str(checkpoint), 'step': ckpt.get('step'), 'data_path': str(path),
        'tokenization': settings, 'output_tempo_bpm': tempo, 'device': str(machine.device),
        'dtype': machine.dtype_name,
        'corpus': summary, 'validation_targets': int(len(positions)),
        'model': {'nll': val_nll, 'perplexity': math.exp(val_nll), 'accuracy': val_acc},
        'baselines': baselines,
        'samples': {'count': num_samples, 'length': sample_length, 'temperature': temperature, 'top_p': top_p,
                    'top_k': top_k, 'seed': seed, 'generated_pieces': gen_stats['pieces'],
                    'generated_notes': gen_stats['notes'], 'held_out_pieces': held_stats['pieces'],
                    'held_out_notes': held_stats['notes']},
        'music': comparison,
        'duration_histograms': {'generated': gen_hist.tolist(), 'held_out': held_hist.tolist()},
        'goals': {'relative': GOAL_RELATIVE, 'duration_tv': GOAL_DURATION_TV, 'model_margin': GOAL_MARGIN},
        'seconds': timings,
    }


def json_safe(value):
    """NaN (a statistic of no usable piece) as null, so strict JSON readers accept the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(report):
    lines = [f"{'':24s}{'NLL (nats)':>12s}{'perplexity':>12s}{'model margin':>14s}"]
    m = report['model']
    lines.append(f"{'model':24s}{m['nll']:12.4f}{m['perplexity']:12.2f}{'':>14s}   accuracy {m['accuracy']:.4f}")
    for name, b in report['baselines'].items():
        verdict = 'ok' if b['model_within_goal'] else 'MISSED'
        goal = f'  {verdict} (at least {GOAL_MARGIN:.0%})' if b['order'] > 1 else ''
        lines.append(f"{name + ' baseline':24s}{b['nll']:12.4f}{b['perplexity']:12.2f}{b['model_margin']:13.1%}{goal}")
    lines.append('')
    lines.append(f"{'statistic':24s}{'generated':>12s}{'held-out':>12s}{'difference':>14s}  goal")
    for name in STATISTICS:
        s = report['music'][name]
        lines.append(f"{name:24s}{s['generated']:12.4f}{s['held_out']:12.4f}{s['relative_difference']:13.1%}"
                     f"  {'ok' if s['within_goal'] else 'MISSED'} (within {GOAL_RELATIVE:.0%})")
    tv = report['music']['duration_histogram_tv']
    lines.append(f"{'duration histogram TV':24s}{'':>24s}{tv['distance']:14.4f}"
                 f"  {'ok' if tv['within_goal'] else 'MISSED'} (at most {GOAL_DURATION_TV})")
    return '\n'.join(lines)


def plot_report(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_nll, ax_music) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={'width_ratios': [1, 2]})
    names = ['model'] + list(report['baselines'])
    values = [report['model']['nll']] + [b['nll'] for b in report['baselines'].values()]
    bars = ax_nll.bar(names, values, color=['tab:orange'] + ['tab:gray'] * len(report['baselines']))
    ax_nll.bar_label(bars, fmt='%.3f')
    ax_nll.set_ylabel('validation NLL (nats/token)')
    ax_nll.set_title('model vs baselines (lower is better)')
    ratios = [report['music'][n]['generated'] / report['music'][n]['held_out'] if report['music'][n]['held_out']
              else float('nan') for n in STATISTICS]
    ax_music.axhspan(1 - GOAL_RELATIVE, 1 + GOAL_RELATIVE, color='tab:green', alpha=0.15, label='goal: within 10%')
    ax_music.axhline(1.0, color='tab:green', linewidth=1)
    colors = ['tab:blue' if report['music'][n]['within_goal'] else 'tab:red' for n in STATISTICS]
    ax_music.bar([n.replace('_', '\n') for n in STATISTICS], ratios, color=colors)
    tv = report['music']['duration_histogram_tv']['distance']
    ax_music.set_title(f'generated / held-out music (duration histogram TV distance {tv:.3f})')
    ax_music.set_ylabel('ratio')
    ax_music.tick_params(axis='x', labelsize=8)
    ax_music.legend(loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default='./content/checkpoints/best.pt', help='checkpoint to evaluate')
    parser.add_argument('--data_path', default=None, help="dataset folder (default: the checkpoint's training data)")
    parser.add_argument('--cache_dir', default=None, help="token cache (default: the checkpoint's)")
    parser.add_argument('--num_samples', type=int, default=32, help='generated pieces for the music statistics')
    parser.add_argument('--sample_length', type=int, default=None,
                        help='tokens per generated piece (default: the median held-out piece length)')
    parser.add_argument('--ngram', type=int, default=5, help='order of the n-gram baseline')
    parser.add_argument('--temperature', type=float, default=1.0, help='sampling temperature (0 = greedy)')
    parser.add_argument('--top_p', type=lambda t: None if t.lower() in ('none', 'off') else float(t), default=0.95,
                        help='nucleus sampling threshold (none = off)')
    parser.add_argument('--top_k', type=int, default=None, help='sample among the k most likely tokens')
    parser.add_argument('--output_dir', default=None,
                        help="where evaluation.json and .png are written (default: the checkpoint's folder)")
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'mps'")
    parser.add_argument('--dtype', default=None, help="autocast dtype (default: the one training used)")
    parser.add_argument('--seed', type=int, default=0, help='random seed for sampling')
    args = parser.parse_args(argv)
    # None means "the checkpoint's" for these, so None passes
    exit_on_bad_args(args, rules={**RULES, **{name: optional(RULES[name])
                                              for name in ('dtype', 'output_dir', 'data_path', 'cache_dir')}})
    try:
        report = evaluate(args.checkpoint, args.data_path, args.cache_dir, args.num_samples, args.sample_length,
                          args.ngram, args.temperature, args.top_p, args.top_k, args.device, args.dtype,
                          args.seed)
    except (CheckpointError, DeviceError, DatasetError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    output_dir = Path(args.output_dir or Path(args.checkpoint).parent)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / 'evaluation.json').write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    plot_report(report, output_dir / 'evaluation.png')
    print(format_table(report))
    print(f"report: {output_dir / 'evaluation.json'}, {output_dir / 'evaluation.png'} "
          f"({sum(report['seconds'].values()):.0f} s)")


if __name__ == '__main__':
    main()
