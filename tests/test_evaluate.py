"""evaluate.py: n-gram baselines with hand-computed answers, musical statistics of hand-made pieces, and the
report of a tiny trained model (its NLL must be the one training reported)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from dataset import NUM_TOKENS, PAD_IDX, START_IDX, MIDI_Dataset, tokenization_settings, tokenize_notes

ROOT = Path(__file__).resolve().parents[1]
V = NUM_TOKENS


def score(model, history, target, context=None):
    """P(target | history) from the model, with the whole history as context unless told otherwise."""
    tokens = np.array(list(history) + [target])
    n = len(history)
    return model.probabilities(tokens, np.array([n]), np.array([n if context is None else context]))[0]


# -----------------------------------------------------------------------------
# baselines

def test_unigram_is_add_one_smoothed_over_the_whole_vocabulary():
    # targets are every token but a sequence's first (the start token is never predicted): 1, 2, 1, 3
    model = evaluate.NGramModel([[START_IDX, 1, 2, 1, 3]], order=1)
    assert model.unigram[1] == pytest.approx(3 / (4 + V))
    assert model.unigram[2] == pytest.approx(2 / (4 + V))
    assert model.unigram[START_IDX] == pytest.approx(1 / (4 + V))
    assert model.unigram.sum() == pytest.approx(1.0)


def test_witten_bell_interpolation_matches_the_formula_by_hand():
    model = evaluate.NGramModel([[START_IDX, 1, 2, 1, 3]], order=3)
    uni = lambda w: {1: 3, 2: 2, 3: 2}.get(w, 1) / (4 + V)
    # after 1: seen twice, followed by 2 and 3 -> c(h)=2, T(h)=2
    p2_after_1 = (1 + 2 * uni(2)) / (2 + 2)
    assert score(model, [1], 2) == pytest.approx(p2_after_1)
    assert score(model, [1], 7) == pytest.approx(2 * uni(7) / 4)
    # after (2, 1): seen once, followed by 3 -> c=1, T=1, interpolated with P(3 | 1)
    p3_after_1 = (1 + 2 * uni(3)) / 4
    assert score(model, [2, 1], 3) == pytest.approx((1 + p3_after_1) / 2)
    # an unseen context passes the lower order on unchanged: (3, 1) never occurred, so P(2 | 3, 1) = P(2 | 1)
    assert score(model, [3, 1], 2) == pytest.approx(p2_after_1)
    # a context of length 0 is the unigram, whatever tokens come before
    assert score(model, [2, 1], 3, context=0) == pytest.approx(uni(3))


def test_every_context_gives_a_distribution_that_sums_to_one():
    rng = np.random.default_rng(0)
    model = evaluate.NGramModel([rng.integers(0, 12, 400), rng.integers(0, 12, 300)], order=5)
    for history in ([3], [3, 4], [1, 2, 3, 4], [9, 9, 9, 9], [500, 501]):
        tokens = np.array([t for w in range(V) for t in history + [w]])
        positions = np.arange(V) * (len(history) + 1) + len(history)
        p = model.probabilities(tokens, positions, np.full(V, len(history)))
        assert p.min() > 0 and p.sum() == pytest.approx(1.0, abs=1e-9), history


def test_repeating_pattern_is_near_certain_for_the_5_gram_but_not_for_the_bigram():
    pattern = [10, 11, 10, 12, 10, 13]  # after 10 alone, 11/12/13 are equally likely; two tokens decide it
    train = [[START_IDX] + pattern * 100]
    five, two = evaluate.NGramModel(train, 5), evaluate.NGramModel(train, 2)
    tokens = np.array([START_IDX] + pattern * 3)
    positions = np.arange(5, len(tokens))
    p5 = five.probabilities(tokens, positions, np.full(len(positions), 4))
    assert p5.min() > 0.99
    after_10 = positions[tokens[positions - 1] == 10]
    p2 = two.probabilities(tokens, after_10, np.full(len(after_10), 1))
    assert np.allclose(p2, 1 / 3, atol=0.01)
    assert evaluate.nll_of(p5) < 0.01 < evaluate.nll_of(p2)


def test_baseline_contexts_stop_at_the_window_start_like_the_model():
    ds = MIDI_Dataset([np.array([START_IDX, 1, 2, 1, 3, 4])], max_seq_len=2, rand_start=False)
    tokens, positions, context = evaluate.window_targets(ds)
    # windows [S 1 2] [2 1 3] [3 4]: the first target of each window sees only that window's first token
    assert tokens.tolist() == [START_IDX, 1, 2, 2, 1, 3, 3, 4]
    assert tokens[positions].tolist() == [1, 2, 1, 3, 4]
    assert context.tolist() == [1, 2, 1, 2, 1]


def test_pad_targets_are_not_scored():
    ds = MIDI_Dataset([np.array([START_IDX, 1, PAD_IDX, 2])], max_seq_len=8, rand_start=False)
    tokens, positions, _ = evaluate.window_targets(ds)
    assert tokens[positions].tolist() == [1, 2]


# -----------------------------------------------------------------------------
# musical statistics

C_MAJOR = [[4 * i, 4, p] for i, p in enumerate([60, 62, 64, 65, 67, 69, 71])]


def test_c_major_scale_fits_a_scale_fully_with_log2_7_bits_of_pitch_classes():
    assert evaluate.scale_consistency(C_MAJOR) == 1.0
    assert evaluate.pitch_class_entropy(C_MAJOR) == pytest.approx(math.log2(7))
    assert evaluate.pitch_range(C_MAJOR) == 11


def test_a_minor_melody_fits_its_scale_and_chromatic_notes_do_not():
    a_minor = [[i, 1, p] for i, p in enumerate([57, 59, 60, 62, 64, 65, 67, 69])]
    assert evaluate.scale_consistency(a_minor) == 1.0
    chromatic = [[i, 1, 60 + i] for i in range(12)]
    assert evaluate.scale_consistency(chromatic) == pytest.approx(7 / 12)
    assert evaluate.pitch_class_entropy(chromatic) == pytest.approx(math.log2(12))


def test_notes_per_second_uses_the_step_length_of_the_timing():
    ms = tokenization_settings('ms')
    # 7 notes from step 0 to the end of the last one at step 28, 32 ms a step
    assert evaluate.notes_per_second(C_MAJOR, evaluate.seconds_per_step(ms, 120)) == pytest.approx(7 / (28 * 0.032))
    beats = tokenization_settings('beats', beat_division=12)
    # at 120 bpm a quarter note is 0.5 s, a step 1/24 s
    assert evaluate.notes_per_second(C_MAJOR, evaluate.seconds_per_step(beats, 120)) == pytest.approx(7 / (28 / 24))


def test_beat_grid_counts_16ths_and_triplets():
    beats = tokenization_settings('beats', beat_division=12)
    notes = [[s, 1, 60] for s in (0, 3, 4, 5, 6, 8)]  # 5 is neither a 16th (multiple of 3) nor a triplet (of 4)
    assert evaluate.onsets_on_grid(notes, beats, 120) == pytest.approx(5 / 6)
    ms = tokenization_settings('ms')
    # 120 bpm: 16ths every 125 ms, triplets every 166.7 ms; steps 0, 3, 4, 5 start at 0, 96, 128, 160 ms
    notes = [[s, 1, 60] for s in (0, 3, 4, 5)]
    assert evaluate.onsets_on_grid(notes, ms, 120) == pytest.approx(3 / 4)


def test_grammar_validity_of_a_hand_made_token_list():
    tokens = [START_IDX, 130, 316, 3, 130, 316, 130, 318, 5,
              316,       # pitch straight after a time token: broken
              PAD_IDX,   # pad: broken
              2, 130, 316,
              316,       # pitch after pitch: broken
              500]       # pitch id above MIDI 127: broken
    assert evaluate.grammar_validity(tokens) == pytest.approx(11 / 15)
    assert evaluate.grammar_validity([START_IDX, 3, 130, 316]) == pytest.approx(2 / 3)  # no time before note 1
    assert evaluate.grammar_validity([130, 316, 4, 131, 317]) == 1.0


def test_duration_histogram_distance():
    short = [[0, 2, 60], [2, 2, 62]]
    long = [[0, 4, 60], [4, 4, 62]]
    same = evaluate.duration_histogram([short])
    assert evaluate.total_variation(same, evaluate.duration_histogram([short, short])) == 0
    assert evaluate.total_variation(same, evaluate.duration_histogram([long])) == 1
    assert evaluate.total_variation(same, evaluate.duration_histogram([short, long])) == pytest.approx(0.5)


def test_music_statistics_average_per_piece_and_survive_pieces_without_notes():
    ms = tokenization_settings('ms')
    scale = tokenize_notes([['note', 96 * i, 64, 0, n[2], 90] for i, n in enumerate(C_MAJOR)], ms)
    fifth = tokenize_notes([['note', 96 * i, 64, 0, p, 90] for i, p in enumerate([60, 67, 60, 67])], ms)
    stats, hist = evaluate.music_statistics([scale, fifth, [START_IDX, 130]], ms, 120)
    assert stats['pieces'] == 2 and stats['notes'] == 11  # the one-duration piece holds no note
    assert stats['pitch_range'] == pytest.approx((11 + 7) / 2)
    assert stats['pitch_class_entropy'] == pytest.approx((math.log2(7) + 1) / 2)
    assert stats['grammar_validity'] == 1.0 and hist[2] == 1.0
    empty, _ = evaluate.music_statistics([[PAD_IDX, PAD_IDX]], ms, 120)
    assert math.isnan(empty['pitch_range']) and empty['grammar_validity'] == 0.0
    assert evaluate.json_safe({'a': [empty['pitch_range'], 1.5]}) == {'a': [None, 1.5]}


# -----------------------------------------------------------------------------
# end to end

@pytest.fixture(scope='module')
def checkpoint(trained):
    """best.pt of the shared tiny training run (tests/conftest.py), float32 on CPU, validated at steps 3 and 6."""
    return trained[0] / 'ckpt' / 'best.pt'


def run_evaluate(args, cwd, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(ROOT / 'evaluate.py')] + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def test_report_of_a_tiny_model_has_trainings_validation_loss_and_writes_json_and_png(checkpoint, tmp_path):
    out = tmp_path / 'report'
    proc = run_evaluate(['--checkpoint', checkpoint, '--num_samples', '4', '--sample_length', '40',
                         '--output_dir', out], tmp_path)
    report = json.loads((out / 'evaluation.json').read_text())
    assert (out / 'evaluation.png').stat().st_size > 0
    ckpt = torch.load(checkpoint, weights_only=True)
    # best.pt is written right after the validation that set best_val_loss, with the weights it measured
    assert report['model']['nll'] == pytest.approx(ckpt['best_val_loss'], rel=1e-6)
    assert report['model']['perplexity'] == pytest.approx(math.exp(ckpt['best_val_loss']), rel=1e-6)
    assert set(report['baselines']) == {'unigram', '5-gram'}
    for b in report['baselines'].values():
        assert b['nll'] > 0 and b['model_margin'] == pytest.approx((b['nll'] - report['model']['nll']) / b['nll'])
        assert b['model_within_goal'] == (b['model_margin'] >= 0.20)
    assert set(evaluate.STATISTICS) | {'duration_histogram_tv'} == set(report['music'])
    assert report['music']['grammar_validity']['held_out'] == 1.0  # real data follows the pattern exactly
    assert report['samples']['count'] == 4 and report['samples']['length'] == 40
    assert report['validation_targets'] > 0
    assert 'perplexity' in proc.stdout and 'pitch_class_entropy' in proc.stdout


def test_missing_checkpoint_or_data_stops_with_a_clear_message(checkpoint, tmp_path):
    proc = run_evaluate(['--checkpoint', tmp_path / 'nope.pt'], tmp_path, check=False)
    assert proc.returncode != 0 and 'not found' in proc.stderr and 'Traceback' not in proc.stderr
    (tmp_path / 'empty').mkdir()
    proc = run_evaluate(['--checkpoint', checkpoint, '--data_path', tmp_path / 'empty', '--cache_dir',
                         tmp_path / 'cache'], tmp_path, check=False)
    assert proc.returncode != 0 and 'no MIDI files' in proc.stderr and 'Traceback' not in proc.stderr
