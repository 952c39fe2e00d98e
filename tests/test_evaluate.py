"""evaluate.py: n-gram baselines with hand-computed answers, musical statistics of hand-made pieces, and the
report of a tiny trained model (its NLL must be the one training reported)."""

import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import runtime
from custom_basic_transformer import AutoregressiveWrapper
from dataset import MIDI_Dataset
from tests.conftest import in_process, make_folder
from tokens import NUM_TOKENS, PAD_IDX, START_IDX, is_pitch, tokenization_settings, tokenize_notes

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
              800]       # an id no note carries (conditioning): broken
    assert evaluate.grammar_validity(tokens) == pytest.approx(11 / 15)
    assert evaluate.grammar_validity([START_IDX, 3, 130, 316]) == pytest.approx(2 / 3)  # no time before note 1
    assert evaluate.grammar_validity([130, 316, 4, 131, 317]) == 1.0
    # ids outside the vocabulary are violations, and a note may begin after them
    assert evaluate.grammar_validity([START_IDX, 900, 130, 316, -1, 3, 130, 316]) == pytest.approx(5 / 7)
    # tracks='parts': a pitch of every role follows a duration (bass 420, harmony 572, drums 676)
    assert evaluate.grammar_validity([START_IDX, 130, 316, 130, 420, 2, 130, 572, 130, 676]) == 1.0


def test_grammar_validity_leaves_out_the_header_after_a_start_token_but_not_header_ids_elsewhere():
    import condition
    asked = condition.header({'key': 'D major', 'meter': '6/8', 'style': 'reels'}, ['reels'])
    assert len(asked) == 3
    assert evaluate.grammar_validity([START_IDX, *asked, 130, 316, 3, 130, 316]) == 1.0  # a held-out tune
    assert evaluate.grammar_validity([START_IDX, *asked, 3, 130, 316]) == 1.0  # sampled: a note may begin after it
    # after a note the same ids are broken tokens: 316 -> key, key -> meter, meter -> style
    assert evaluate.grammar_validity([START_IDX, 130, 316, *asked, 130, 316]) == pytest.approx(4 / 7)


def test_ngram_and_bits_per_note_count_every_role_of_parts_tokens_as_notes():
    # melody, bass, harmony and drum notes of tracks='parts' ([duration, pitch] each, a time step between onsets)
    bar = [130, 256 + 72, 130, 384 + 36, 130, 640 + 36, 2, 130, 256 + 74, 130, 512 + 64, 2]
    train = [[START_IDX] + bar * 20]
    tokens = np.array([START_IDX] + bar * 4)
    positions = np.arange(1, len(tokens))
    context = positions.copy()
    probabilities = evaluate.NGramModel(train, order=5).probabilities(tokens, positions, context)
    nll = -np.log(probabilities)
    bits = evaluate.bits_per_note(tokens, positions, nll)
    notes = 5 * 4
    assert bits['total'] == pytest.approx(nll.sum() / notes / math.log(2))
    assert bits['pitch'] + bits['timing'] == pytest.approx(bits['total'])
    assert bits['pitch'] < 0.1  # a 5-gram that saw this bar twenty times knows every pitch of every role


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
                         '--repeat_memory', '0.2', '--output_dir', out], tmp_path)
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
    assert report['samples']['grammar_constrained'] and report['music']['grammar_validity']['generated'] == 1.0
    assert report['samples']['count'] == 4 and report['samples']['length'] == 40
    assert report['validation_targets'] > 0
    assert 'perplexity' in proc.stdout and 'pitch_class_entropy' in proc.stdout
    # sampled with the repeat memory asked for, and the distribution it samples from is scored too
    memory = report['repeat_memory']
    assert report['samples']['repeat_memory'] == memory['strength'] == 0.2
    assert memory['nll'] > 0 and 0 <= memory['accuracy'] <= 1 and '+ repeat memory' in proc.stdout
    assert memory['nll'] * report['validation_targets'] == pytest.approx(
        memory['bits_per_note']['total'] * math.log(2) * report['validation_notes'], rel=1e-4)


def test_missing_checkpoint_or_data_stops_with_a_clear_message(checkpoint, tmp_path):
    proc = run_evaluate(['--checkpoint', tmp_path / 'nope.pt'], tmp_path, check=False)
    assert proc.returncode != 0 and 'not found' in proc.stderr and 'Traceback' not in proc.stderr
    (tmp_path / 'empty').mkdir()
    proc = run_evaluate(['--checkpoint', checkpoint, '--data_path', tmp_path / 'empty', '--cache_dir',
                         tmp_path / 'cache'], tmp_path, check=False)
    assert proc.returncode != 0 and 'no MIDI files' in proc.stderr and 'Traceback' not in proc.stderr


# =============================================================================
# bits per note and the classifier two-sample test (C2ST)
# -----------------------------------------------------------------------------
# per-target NLL and bits per note

def music_model(seq_len=16):
    """A small untrained model over the real vocabulary, dropout off."""
    from runtime import build_model
    torch.manual_seed(0)
    return build_model({'seq_len': seq_len, 'dim': 32, 'depth': 2, 'heads': 2, 'dim_head': 16, 'dropout': 0.0})


def random_pieces(count, seed=0):
    """Token sequences of different lengths (so windows get padded in a batch), a start token first."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[START_IDX], rng.integers(0, 384, rng.integers(3, 60))]) for _ in range(count)]


def test_held_out_ends_read_the_start_token_after_each_tune_a_window_holds_and_after_its_other_notes():
    model = music_model(seq_len=40)
    pieces = random_pieces(12)
    machine = evaluate.start_machine('cpu', 'float32')
    model.train()
    ends = evaluate.held_out_ends(model, pieces, machine)
    assert model.training
    assert [i for i, _, _ in ends] == [i for i, p in enumerate(pieces) if len(p) <= 40]  # the longer ones left out
    assert 0 < len(ends) < len(pieces)
    model.eval()
    for i, last, others in ends:
        tune = torch.tensor(pieces[i], dtype=torch.long)[None]
        with torch.no_grad():
            p = model.net(tune).float().softmax(-1)[0, :, START_IDX]
        n = len(pieces[i]) - 1  # the tune's last token: the start token after it is the end
        assert last == pytest.approx(float(p[n]), abs=1e-5)
        assert others == pytest.approx(float(p[:n][is_pitch(tune[0, :n])].sum()), abs=1e-5)
    assert evaluate.held_out_ends(model, [pieces[i] for i in range(12) if len(pieces[i]) > 40], machine) == []
    # a tune_length model is told nothing of each tune's length (its end is not in view: the start token after it is
    # the target, not an input)
    from runtime import build_model
    torch.manual_seed(0)
    model = build_model({'seq_len': 40, 'dim': 32, 'depth': 2, 'heads': 2, 'dim_head': 16, 'dropout': 0.0,
                         'tune_clock': True, 'tune_length': True})
    torch.nn.init.normal_(model.net.length_emb.weight)  # a table that starts at zero would read every row alike
    model.eval()
    i, last, _ = evaluate.held_out_ends(model, pieces, machine)[0]
    tune = torch.tensor(pieces[i], dtype=torch.long)[None]
    with torch.no_grad():
        read = lambda length: float(model.net(tune, length=length).float().softmax(-1)[0, -1, START_IDX])
    assert last == pytest.approx(read(torch.tensor([-1])), abs=1e-5)
    assert last != pytest.approx(read(None), abs=1e-5)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_target_nll_lines_up_with_window_targets_and_averages_to_evaluate_splits_nll(dtype):
    model = music_model()
    ds = MIDI_Dataset(random_pieces(9), max_seq_len=16, rand_start=False)
    machine = evaluate.start_machine('cpu', dtype)
    model.train()
    nll, _ = evaluate.target_nll(model, ds, 3, machine)
    assert model.training  # the mode it came in with, as evaluate_split leaves it
    tokens, positions, _ = evaluate.window_targets(ds)
    assert nll.dtype == np.float64 and nll.shape == positions.shape
    mean_nll, _ = runtime.evaluate_split(model, ds, 3, machine)
    assert nll.mean() == pytest.approx(mean_nll, abs=1e-4)
    # each window alone, float32: the same numbers in the same order, whatever the batch's padding
    model.eval()
    alone = []
    with torch.no_grad():
        for i in range(len(ds)):
            window = ds[i]
            logits = model.net(window[None, :-1]).float()[0]
            alone.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction='none').numpy())
    alone = np.concatenate(alone)
    assert alone.shape == nll.shape
    assert np.allclose(nll, alone, atol=1e-5 if dtype == 'float32' else 0.1)


def test_bits_per_note_sums_a_notes_tokens_and_divides_by_the_notes_scored():
    # [dur pitch] [time dur pitch] [time dur]: the last note's pitch is not in the window, so 2 notes are scored
    tokens = np.array([START_IDX, 130, 316, 3, 130, 318, 4, 131])
    positions = np.arange(1, 8)
    nll = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) * math.log(2)  # in nats: 1..7 bits
    bits = evaluate.bits_per_note(tokens, positions, nll)
    assert bits['pitch'] == pytest.approx((2 + 5) / 2)
    assert bits['timing'] == pytest.approx((1 + 3 + 4 + 6 + 7) / 2)
    assert bits['total'] == pytest.approx(28 / 2) == bits['pitch'] + bits['timing']
    assert math.isnan(evaluate.bits_per_note(tokens[:2], np.array([1]), nll[:1])['total'])  # no note scored


# -----------------------------------------------------------------------------
# C2ST: features and classifiers on toy melodies with known answers

def varied_melody(rng, count=32):
    """A random walk of pitches with rests, chords and three note lengths: what 'held-out' pieces are here."""
    notes, start, pitch = [], 0, int(rng.integers(50, 70))
    for _ in range(count):
        length = int(rng.choice([2, 4, 8]))
        notes.append([start, length - int(rng.integers(0, 2)), pitch])
        start += 0 if rng.random() < 0.05 else length + int(rng.choice([0, 0, 0, 2]))
        pitch += int(rng.choice([-4, -2, -1, 0, 1, 2, 3, 5]))
    return notes


def constant_melody(pitch, length, count=32):
    return [[i * length, length, pitch] for i in range(count)]


def test_features_are_the_same_after_a_transposition_or_a_tempo_change():
    rng = np.random.default_rng(3)
    for _ in range(20):
        notes = varied_melody(rng)
        features = evaluate.piece_features(notes)
        assert features.shape == (sum(size for _, size in evaluate.FEATURE_GROUPS),)
        assert np.array_equal(features, evaluate.piece_features([[s, d, p + 5] for s, d, p in notes]))
        assert np.array_equal(features, evaluate.piece_features([[2 * s, 2 * d, p] for s, d, p in notes]))


def test_features_of_a_hand_made_melody():
    # C D E C, an onset every 4 steps; durations 2 2 4 4 (two rests of 2 steps in a 16-step span)
    notes = [[0, 2, 60], [4, 2, 62], [8, 4, 64], [12, 4, 60]]
    f = {name: evaluate.piece_features(notes)[columns] for name, columns in evaluate.feature_columns().items()}
    up_two, down_four = evaluate.MAX_INTERVAL + 1 + 2, evaluate.MAX_INTERVAL + 1 - 4
    assert f['intervals'][up_two] == pytest.approx(2 / 3) and f['intervals'][down_four] == pytest.approx(1 / 3)
    assert f['intervals'].sum() == pytest.approx(1)
    equal, double = 4, 6  # the bins of log2 ratio 0 and 1
    assert f['ioi_ratios'][equal] == 1
    assert f['duration_ratios'][equal] == pytest.approx(2 / 3) and f['duration_ratios'][double] == pytest.approx(1 / 3)
    assert f['articulation'] == pytest.approx([1 / 3, (0.5 + 0.5 + 1) / 3, 4 / 16])
    assert f['scale_fit'] == 1 and f['pitch_range'] == 4
    assert f['key_profile'][[0, 2, 4]] == pytest.approx([0.5, 0.25, 0.25])  # C is the tonic of the best key
    assert f['contour'] == pytest.approx([2 / 3, 1 / 3, 0, 1 / 4])
    assert f['interval_entropy'] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    # the motif four times: its steps +2 +2 -4 0 repeat every 4 notes, so of 13 windows of 4 notes the first 4 are new
    motif = [[4 * i, 4, [60, 62, 64, 60][i % 4]] for i in range(16)]
    assert evaluate.piece_features(motif)[evaluate.feature_columns()['repetition']] == pytest.approx(9 / 13)


def test_repetition_does_not_depend_on_how_onsets_were_rounded():
    # C D E over and over, a note every 62.5 steps: floored onsets read 62 63 62 63 ..., so the motif's repeat
    # 3 notes on starts on the other phase. It repeats as often as on an exact grid of 62 steps: 10 of 13.
    column = evaluate.feature_columns()['repetition']
    exact = [[62 * i, 40, [60, 62, 64][i % 3]] for i in range(16)]
    floored = [[math.floor(62.5 * i), 40, [60, 62, 64][i % 3]] for i in range(16)]
    assert evaluate.piece_features(exact)[column] == pytest.approx(10 / 13)
    assert evaluate.piece_features(floored)[column] == pytest.approx(10 / 13)
    # a rhythm that really differs is no repeat: the same pitches with IOIs 62 and 31 alternating
    uneven = [[sum((62, 31)[k % 2] for k in range(i)), 20, [60, 62, 64][i % 3]] for i in range(16)]
    assert evaluate.piece_features(uneven)[column] == pytest.approx(7 / 13)


def test_first_notes_cuts_pieces_and_drops_the_short_ones():
    tokens = [START_IDX] + [130, 316, 4] * 5
    assert evaluate.first_notes(tokens, 3) == [[0, 2, 60], [4, 2, 60], [8, 2, 60]]
    assert evaluate.first_notes(tokens, 6) is None


def test_c2st_cannot_tell_pieces_of_one_generator_apart():
    rng = np.random.default_rng(0)
    generated = [varied_melody(rng) for _ in range(100)]
    held_out = [varied_melody(rng) for _ in range(100)]
    result = evaluate.classifier_two_sample_test(generated, held_out, seed=0)
    assert result['generated_vs_held_out']['pieces_per_class'] == 100 and result['control']['pieces_per_class'] == 50
    for side in ('generated_vs_held_out', 'control'):
        for model in ('linear', 'boosted'):
            assert abs(result[side][model] - 0.5) <= 0.15, (side, model, result[side][model])
    drops = [drop for _, drop in result['giveaways']]
    assert drops == sorted(drops, reverse=True)
    assert {name for name, _ in result['giveaways']} == {name for name, _ in evaluate.FEATURE_GROUPS}


def test_c2st_is_judged_by_the_goal_it_is_given_else_by_its_kinds(monkeypatch):
    # the generated side's run is the one with importance: 4 points above the control's runs
    monkeypatch.setattr(evaluate, 'c2st_accuracy', lambda a, b, seed, importance=False, groups=None: {
        'linear': 0.5, 'boosted': 0.54 if importance else 0.50, 'pieces_per_class': len(a),
        **({'giveaways': [[name, 0.0] for name, _ in groups]} if importance else {})})
    rng = np.random.default_rng(0)
    pieces = [varied_melody(rng) for _ in range(20)]
    default = evaluate.classifier_two_sample_test(pieces, pieces, seed=0)
    assert default['goal_points'] == 5 and default['within_goal']  # 4 points above the control
    asked = evaluate.classifier_two_sample_test(pieces, pieces, seed=0, goal=evaluate.first_notes_goal(True))
    assert asked['goal_points'] == 3 and not asked['within_goal']


def test_c2st_tells_a_constant_melody_from_varied_ones():
    rng = np.random.default_rng(1)
    constant = np.array([evaluate.piece_features(constant_melody(int(rng.integers(50, 70)), int(rng.choice([2, 4]))))
                         for _ in range(100)])
    varied = np.array([evaluate.piece_features(varied_melody(rng)) for _ in range(100)])
    result = evaluate.c2st_accuracy(constant, varied, seed=0, importance=True)
    assert result['linear'] >= 0.95 and result['boosted'] >= 0.95
    assert result['giveaways'][0][1] > 0.2  # shuffling the group the trees use takes them back towards chance


def test_c2st_without_scikit_learn_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.')] + ['sklearn']:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes an import fail
    with pytest.raises(evaluate.MissingDependencyError, match='pip install -r requirements-eval.txt'):
        evaluate.c2st_accuracy(np.zeros((10, 3)), np.ones((10, 3)))
    # before any work: a missing checkpoint would be the next complaint
    with pytest.raises(evaluate.MissingDependencyError):
        evaluate.evaluate('no-such-checkpoint.pt')


# -----------------------------------------------------------------------------
# the report's new parts, end to end

def test_report_has_bits_per_note_and_says_why_the_c2st_was_skipped(checkpoint, tmp_path):
    out = tmp_path / 'report'
    proc = run_evaluate(['--checkpoint', checkpoint, '--num_samples', '2', '--sample_length', '20',
                         '--c2st_pieces', '8', '--output_dir', out], tmp_path)
    report = json.loads((out / 'evaluation.json').read_text())
    bits = report['bits_per_note']
    assert set(bits) == {'model', 'unigram', '5-gram'} and report['validation_notes'] > 0
    for name, b in bits.items():
        assert b['total'] == pytest.approx(b['pitch'] + b['timing'])  # real data holds only note tokens
        assert 0 < b['pitch'] < b['total']
    assert bits['unigram']['pitch'] > bits['5-gram']['pitch']
    # the NLL per token and the bits per note are the same sum: nats * targets = bits * ln 2 * notes
    for name, nll in [('model', report['model']['nll'])] + [(n, b['nll']) for n, b in report['baselines'].items()]:
        assert nll * report['validation_targets'] == pytest.approx(
            bits[name]['total'] * math.log(2) * report['validation_notes'], rel=1e-4)
    five = bits['5-gram']
    assert five['model_pitch_margin'] == pytest.approx((five['pitch'] - bits['model']['pitch']) / five['pitch'])
    assert five['model_pitch_within_goal'] == (five['model_pitch_margin'] >= 0.25)
    # the tiny folder has too few validation pieces for a C2ST: the report says so instead of failing
    assert 'needs' in report['c2st']['skipped'] and 'two-sample test skipped' in proc.stdout
    assert 'bits per note' in proc.stdout
    proc = run_evaluate(['--checkpoint', checkpoint, '--c2st_notes', '1'], tmp_path, check=False)
    assert proc.returncode == 2 and '--c2st_notes 1' in proc.stderr and 'Traceback' not in proc.stderr


def test_c2st_report_of_a_constant_melody_generator(checkpoint, tmp_path, monkeypatch):
    """The whole C2ST path in one process on a folder with enough validation pieces; the model's samples are
    replaced by a constant melody, which any classifier tells from the held-out music."""
    data = make_folder(tmp_path / 'midi', n=60, notes=24)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt['args']['val_fraction'] = 0.5
    torch.save(ckpt, tmp_path / 'half.pt')
    note = [4, 128 + 4, 256 + 60]  # time delta 4, duration 4, pitch 60

    def constant_pieces(model, machine, count, length, **sampling):
        return np.array([(note * length)[:length]] * count)

    monkeypatch.setattr(evaluate, 'generate_pieces', constant_pieces)
    report = evaluate.evaluate(tmp_path / 'half.pt', data, tmp_path / 'cache', num_samples=4, sample_length=30,
                               c2st_pieces=40, c2st_notes=16, log=lambda *a: None)
    c2st = report['c2st']
    assert 'skipped' not in c2st, c2st
    assert c2st['generated_used'] == 40 and c2st['held_out_used'] >= evaluate.C2ST_MIN_PIECES
    assert c2st['generated_vs_held_out']['boosted'] >= 0.95 and c2st['generated_vs_held_out']['linear'] >= 0.95
    assert abs(c2st['control']['boosted'] - 0.5) <= 0.3 and not c2st['within_goal']
    assert c2st['control']['splits'] == evaluate.C2ST_CONTROL_SPLITS
    assert report['copy_test']['pieces'] > 0 and report['copy_test']['repeat_nll'] > 0
    # the constant melody repeats its one pattern from the second window on
    assert c2st['repetition']['generated'] == pytest.approx(12 / 13) and c2st['repetition']['held_out'] < 0.9
    table = evaluate.format_table(report)
    assert 'MISSED (at most control + 5 points)' in table and 'gives the generated pieces away most' in table
    assert 'mean over many (tools/c2st_seeds.py)' in table
    evaluate.plot_report(report, tmp_path / 'evaluation.png')
    assert (tmp_path / 'evaluation.png').stat().st_size > 0

# -----------------------------------------------------------------------------
# the whole-tune C2ST's features

PHRASE = [[4 * i, 4, p] for i, p in enumerate([60, 62, 64, 65, 67, 65, 64, 62, 60, 64, 67, 72, 71, 67, 62, 60])]


def whole(notes, group):
    return evaluate.whole_tune_features(notes)[evaluate.feature_columns(evaluate.WHOLE_TUNE_GROUPS)[group]]


def test_a_tune_played_twice_repeats_its_phrases_and_the_tune_alone_does_not():
    twice = PHRASE + [[s + 64, d, p] for s, d, p in PHRASE]
    once, again = whole(PHRASE, 'phrase_repetition'), whole(twice, 'phrase_repetition')
    assert once[:3].tolist() == [0, 0, 0] and once[3] == 0  # no 4-, 8- or 16-note pattern comes back
    # every pattern inside the second playing repeats one of the first, and those across the join (C to C, an
    # interval the tune lacks) are new: 13 of 29 4-note, 9 of 25 8-note and 1 of 17 16-note patterns; the second
    # playing's 16 notes lie inside repeated 8-note patterns
    assert again[:3] == pytest.approx([13 / 29, 9 / 25, 1 / 17]) and again[3] == pytest.approx(16 / 32)
    assert again[4] == pytest.approx(16 / 32)  # each repeat reaches 16 notes back, half the tune
    halves = whole(twice, 'halves')
    assert halves == pytest.approx([0, 0])  # the halves are the same notes


def test_whole_tune_features_read_the_ending_against_the_tunes_scale_whatever_its_key_or_tempo():
    ending, opening = whole(PHRASE, 'ending'), whole(PHRASE, 'opening')
    assert ending[:12].argmax() == 0 and ending[12:24].argmax() == 2  # ends D C in C major: degrees 2, then 0
    assert ending[24] == pytest.approx(-2 / 12) and ending[25] == 0 and ending[26] == 1  # a step down, even notes
    assert opening.argmax() == 0
    on_the_fifth = PHRASE[:-1] + [[60, 16, 67]]  # ends on G, held four times as long
    ending = whole(on_the_fifth, 'ending')
    assert ending[:12].argmax() == 7 and ending[25] == pytest.approx(2) and ending[26] == 1
    assert whole(PHRASE, 'length') == pytest.approx([4, 4])  # 16 notes; 64 steps in IOIs of 4
    features = evaluate.whole_tune_features(on_the_fifth)
    assert features.shape == (sum(size for _, size in evaluate.WHOLE_TUNE_GROUPS),)
    assert np.array_equal(features, evaluate.whole_tune_features([[s, d, p + 5] for s, d, p in on_the_fifth]))
    assert np.array_equal(features, evaluate.whole_tune_features([[3 * s, 3 * d, p] for s, d, p in on_the_fifth]))


def test_whole_tune_c2st_tells_tunes_cut_mid_phrase_from_tunes_that_end_on_their_tonic():
    rng = np.random.default_rng(5)

    def tune(ends_home):
        notes = varied_melody(rng, count=int(rng.integers(24, 40)))
        if ends_home:  # a long last note on the tonic of a C major melody
            notes = [[s, d, 60 + [0, 2, 4, 5, 7, 9, 11][(p - 60) % 7]] for s, d, p in notes]
            notes.append([notes[-1][0] + 8, 16, 60])
        return notes
    result = evaluate.classifier_two_sample_test([tune(False) for _ in range(60)], [tune(True) for _ in range(60)],
                                                 kind='whole_tune')
    assert result['generated_vs_held_out']['boosted'] >= 0.9 and not result['within_goal']
    assert {name for name, _ in result['giveaways']} == {name for name, _ in evaluate.WHOLE_TUNE_GROUPS}


# -----------------------------------------------------------------------------
# adherence and the whole-tune C2ST, end to end

REPORT_KEYS = {'checkpoint', 'step', 'data_path', 'tokenization', 'output_tempo_bpm', 'device', 'dtype', 'corpus',
               'validation_targets', 'validation_notes', 'model', 'repeat_memory', 'baselines', 'bits_per_note',
               'copy_test', 'samples', 'music', 'duration_histograms', 'c2st', 'goals', 'seconds'}


def labelled_folder(root, per_style=60):
    """Two style folders: 'lieder' in C major and 3/4 (a half and a quarter note a bar), 'reels' in F# minor and
    2/4 (two quarters a bar); each file carries its key and time signature."""
    import mido
    rng = np.random.default_rng(0)
    for style, key, meter, scale, bar in (('lieder', 'C', (3, 4), [0, 2, 4, 5, 7, 9, 11], [960, 480]),
                                          ('reels', 'F#m', (2, 4), [6, 8, 9, 11, 13, 14, 16], [480, 480])):
        (root / style).mkdir(parents=True)
        for i in range(per_style):
            track = mido.MidiTrack([mido.MetaMessage('key_signature', key=key),
                                    mido.MetaMessage('time_signature', numerator=meter[0], denominator=meter[1])])
            degrees = np.clip(np.cumsum(rng.integers(-2, 3, 24)), 0, 6)
            degrees[-1] = 0
            for n, degree in enumerate(degrees):
                track.append(mido.Message('note_on', note=60 + scale[degree], velocity=80))
                track.append(mido.Message('note_off', note=60 + scale[degree], velocity=0, time=bar[n % len(bar)]))
            mid = mido.MidiFile(type=0, ticks_per_beat=480)
            mid.tracks.append(track)
            mid.save(str(root / style / f'{i:03d}.mid'))
    return root


def test_adherence_ceilings_and_whole_tune_c2st_of_a_tiny_model_on_a_labelled_folder(checkpoint, tmp_path,
                                                                                       monkeypatch):
    data = labelled_folder(tmp_path / 'midi')
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt['args']['val_fraction'] = 0.4
    torch.save(ckpt, tmp_path / 'labelled.pt')
    # a checkpoint with conditioning, as the tiny model has none: a header of one unused id per label, which the
    # model never learned; its asked tunes are read back all the same
    headers = []
    monkeypatch.setattr(evaluate, 'header_tokens', lambda ckpt: lambda labels: headers.append(labels) or
                        [790] * len(labels))
    report = evaluate.evaluate(tmp_path / 'labelled.pt', data, tmp_path / 'cache', num_samples=2, sample_length=20,
                               c2st_pieces=24, c2st_notes=8, tunes=30, log=lambda *a: None)
    assert REPORT_KEYS | {'whole_tunes', 'c2st_whole_tune', 'adherence'} == set(report)  # and three new ones
    classifiers = report['adherence']['classifiers']
    assert classifiers['key']['classes'] == ['C major', 'F# minor'] and classifiers['key']['ceiling'] >= 0.9
    assert classifiers['meter']['classes'] == ['2/4', '3/4'] and classifiers['style']['classes'] == ['lieder', 'reels']
    assert classifiers['key']['held_out_accuracy'] >= 0.9 and classifiers['key']['held_out_tunes'] >= 20
    asked = report['adherence']['asked']
    assert set(asked) == {'key', 'meter', 'style'} and report['adherence']['pieces'] == 30
    for rate in asked.values():
        assert rate['asked'] == 30 and 0 <= rate['read_as_asked'] <= 1
        assert rate['gap_points'] == pytest.approx(100 * (rate['ceiling'] - rate['read_as_asked']))
    assert {'key': 'C major', 'meter': '3/4', 'style': 'lieder'} in headers  # the labels of a held-out tune
    assert report['c2st_whole_tune']['generated_pieces'] == 30  # the same tunes: one generation for both parts
    whole = report['c2st_whole_tune']
    assert 'skipped' not in whole, whole
    assert whole['generated_used'] <= whole['generated_pieces'] == 30 and whole['held_out_used'] >= 40
    assert sum(whole['ends'].values()) == 30 and 'next start token the model draws' in whole['ending']
    assert set(whole['control']) >= {'linear', 'boosted'} and report['goals']['c2st_whole_tune_points'] == 0.08
    ends = asked['key']['tonic_endings']
    assert ends['read_as_asked']['tunes'] + ends['read_otherwise']['tunes'] == 30
    table = evaluate.format_table(report)
    assert 'whole tunes' in table and 'ceiling' in table and 'read as asked' in table
    assert 'tunes read as the key asked' in table


def test_tonic_endings_are_split_by_whether_the_key_classifier_reads_the_tune_as_the_key_asked():
    class Reader:  # reads a tune as D major when its first note is a D, else as G major
        classes = ['D major', 'G major']

        def predict(self, tunes):
            return ['D major' if tune[0][2] % 12 == 2 else 'G major' for tune in tunes]
    tune = lambda first, last: [[0, 4, first], [4, 4, 66], [8, 8, last], [8, 8, last + 12]]  # noqa: E731
    tunes = [tune(62, 50), tune(62, 57), tune(62, 38), tune(67, 50), tune(67, 43), [[0, 4, 62]], tune(62, 50)]
    asked = [{'key': 'D major'}] * 5 + [{'key': 'D major'}, {'key': 'A minor'}]  # the last two: too short, unknown
    split = evaluate.tonic_endings_by_reading(Reader(), asked, tunes)
    # read as D major: ends on D, on A, on D (the lowest of the last onset); read as G major: ends on D, on G
    assert split == {'read_as_asked': {'tunes': 3, 'share': pytest.approx(2 / 3)},
                     'read_otherwise': {'tunes': 2, 'share': 0.5}}
    assert evaluate.tonic_endings_by_reading(Reader(), [{}] * 2, tunes[:2])['read_as_asked'] == {'tunes': 0,
                                                                                                  'share': None}


def test_without_conditioning_the_report_gives_the_ceilings_and_says_adherence_needs_a_conditioned_model(
        checkpoint, tmp_path):
    data = labelled_folder(tmp_path / 'midi', per_style=40)
    out = tmp_path / 'report'
    run_evaluate(['--checkpoint', checkpoint, '--data_path', data, '--cache_dir', tmp_path / 'cache',
                  '--num_samples', '2', '--sample_length', '20', '--tunes', '0', '--output_dir', out], tmp_path)
    report = json.loads((out / 'evaluation.json').read_text())
    adherence = report['adherence']
    assert adherence['classifiers']['key']['ceiling'] >= 0.9 and 'no conditioning' in adherence['skipped']
    assert report['c2st_whole_tune'] == {'skipped': 'off (--tunes 0)'}
    assert report['goals']['c2st_points'] == 0.05  # an unconditioned model's first notes: control + 5 points


# end of the bits-per-note and C2ST block
# =============================================================================


# -----------------------------------------------------------------------------
# bad input: one line on stderr naming what is wrong, exit 2, no traceback, nothing written

def evaluate_in_process(argv, capsys):
    return in_process(evaluate.main, argv, capsys)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text', 'midi', 'state_dict', 'folder', 'missing',
                                  'weights_of_another_size', 'args_without_dim'])
def test_a_bad_checkpoint_file_is_one_line_naming_it(checkpoint, tmp_path, capsys, kind):
    from tests.test_generate import BAD_CHECKPOINTS, make_bad_checkpoint
    path = make_bad_checkpoint(kind, checkpoint, tmp_path)
    code, out, err = evaluate_in_process(['--checkpoint', path, '--output_dir', tmp_path / 'out'], capsys)
    assert code == 2 and err.splitlines() == [err.strip()], err
    assert err.startswith('error: ') and str(path) in err and 'Traceback' not in err
    assert BAD_CHECKPOINTS[kind] is None or BAD_CHECKPOINTS[kind] in err
    assert not (tmp_path / 'out').exists()


def test_a_bare_state_dict_stops_the_real_command_with_one_line(checkpoint, tmp_path):
    from tests.test_generate import make_bad_checkpoint
    path = make_bad_checkpoint('state_dict', checkpoint, tmp_path)
    proc = run_evaluate(['--checkpoint', path, '--output_dir', tmp_path / 'out'], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert str(path) in proc.stderr and 'a bare state_dict is not enough' in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_ctrl_c_is_one_line_and_writes_no_report(checkpoint, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, 'generate_pieces', interrupt)
    code, out, err = evaluate_in_process(['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out'], capsys)
    assert code == 130 and err == 'stopped by Ctrl-C: no report written\n'
    assert not (tmp_path / 'out').exists()


def test_the_checkpoint_is_read_once(checkpoint, tmp_path, capsys, monkeypatch):
    # its run's sampling settings and the model come from one read: a large checkpoint costs its load once
    import runtime
    reads = []
    real_load = runtime.torch.load
    monkeypatch.setattr(runtime.torch, 'load',
                        lambda *args, **kwargs: reads.append(args[0]) or real_load(*args, **kwargs))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, 'generate_pieces', interrupt)
    code, out, err = evaluate_in_process(['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out'], capsys)
    assert code == 130 and len(reads) == 1


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGTERM')
def test_sigterm_while_evaluating_is_one_line_exit_143_and_no_report(checkpoint, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    # pieces of 100,000 tokens take minutes; the signal comes once the progress bar counts tokens, not as the bar
    # is first drawn (a signal between that first write and the end of tqdm's constructor leaves no bar to close)
    cmd = [sys.executable, str(ROOT / 'evaluate.py'), '--checkpoint', str(checkpoint), '--output_dir',
           str(tmp_path / 'out'), '--num_samples', '1', '--sample_length', '100000', '--no_c2st', '--tunes', '0']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen, deadline = b'', time.time() + 120
        while re.search(rb'generating: .*\dtoken/s', seen) is None and time.time() < deadline:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        proc.send_signal(signal.SIGTERM)  # as `kill PID`, `timeout` or a scheduler does
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = (seen + err).decode()
    stops = [line.split('\r')[-1] for line in err.splitlines() if 'stopped by' in line]
    assert 'generating' in seen.decode() and proc.returncode == 143 and 'Traceback' not in err, err
    assert stops == ['stopped by SIGTERM: no report written'], err
    assert not (tmp_path / 'out').exists()


def test_sigterm_while_the_report_is_written_leaves_no_part_of_it(checkpoint, tmp_path, capsys, monkeypatch):
    def stopped_halfway(report, path):
        Path(path).write_bytes(b'\x89PNG\r\n')  # the start of a picture
        raise KeyboardInterrupt(signal.SIGTERM)  # what runtime.sigterm_as_ctrl_c raises
    monkeypatch.setattr(evaluate, 'plot_report', stopped_halfway)
    code, out, err = evaluate_in_process(['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out',
                                          '--num_samples', '4', '--sample_length', '16', '--no_c2st', '--tunes',
                                          '0'], capsys)
    assert code == 143 and 'NLL (nats)' in out and err == 'stopped by SIGTERM: no report written\n', err
    assert list((tmp_path / 'out').iterdir()) == []


@pytest.mark.parametrize('field, value', [('num_samples', '0'), ('ngram', '9'), ('repeat_memory', '-0.5'),
                                          ('repeat_memory', '0.7'), ('tunes', '-1')])
def test_a_bad_evaluation_value_exits_2_naming_the_field(checkpoint, tmp_path, capsys, field, value):
    code, out, err = evaluate_in_process(['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out',
                                          f'--{field}', value], capsys)
    assert code == 2 and err.splitlines() == [err.strip()] and err.startswith(f'error: --{field} {value}: '), err
    assert not (tmp_path / 'out').exists()


class _Bigram(torch.nn.Module):
    """A 'model' whose logits depend on the current token only: it cannot copy."""
    def __init__(self, max_seq_len=64):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.table = torch.nn.Embedding(NUM_TOKENS, NUM_TOKENS)

    def forward(self, x, head=None):  # head: as MusicTransformer's, a tune_labels model's (none here)
        return self.table(x)


class _Copier(_Bigram):
    """Logits that put nearly all mass on the token `lag` positions back: a perfect copier of the repeat."""
    def __init__(self, lag):
        super().__init__()
        self.lag = lag

    def forward(self, x, head=None):
        logits = torch.zeros(*x.shape, NUM_TOKENS)
        logits[:, self.lag - 1:].scatter_(-1, x[:, :x.shape[1] - self.lag + 1, None], 30.0)
        return logits


def test_repeat_memory_scores_what_sampling_draws_from_and_helps_a_model_that_cannot_copy():
    model = music_model(seq_len=64).eval()
    rng = np.random.default_rng(1)
    phrases = [rng.integers(0, 384, 24) for _ in range(4)]
    tunes = [np.concatenate([[START_IDX], p, p]) for p in phrases]  # each phrase played twice
    ds = MIDI_Dataset(tunes, max_seq_len=64, rand_start=False)
    machine = evaluate.start_machine('cpu', 'float32')
    plain, _ = evaluate.target_nll(model, ds, 3, machine)
    assert np.array_equal(evaluate.target_nll(model, ds, 3, machine, repeat_memory=0.0)[0], plain)
    memory, hits = evaluate.target_nll(model, ds, 3, machine, repeat_memory=0.3)
    nll = lambda n: n.reshape(4, 48)
    # the first playing has nothing to repeat; the second is followed from its third note on
    assert np.allclose(nll(memory)[:, :24], nll(plain)[:, :24], atol=1e-5)
    assert (nll(memory)[:, 31:] < nll(plain)[:, 31:] - 1).all() and hits.reshape(4, 48)[:, 31:].all()
    # scoring mixes exactly as generation does: greedy generation picks each position's most likely token
    window = ds[0][None, :-1]
    with torch.no_grad():
        logits = model.net(window).float()
        scored = evaluate.with_repeat_memory(logits, window, 0.3)
    for t in (2, 20, 27, 30, 40):
        picked = model.generate(window[:, :t + 1], 1, temperature=0, repeat_memory=0.3, eos_token=START_IDX)
        assert picked.item() == scored[0, t].argmax().item()
    # a tune's end keeps the model's own probability inside a repeat, where every other token's moves
    plain_log = logits.log_softmax(dim=-1)
    assert torch.allclose(scored[0, :, START_IDX], plain_log[0, :, START_IDX], atol=1e-5)
    assert not torch.allclose(scored[0, 31:, :START_IDX], plain_log[0, 31:, :START_IDX], atol=1e-2)


def test_copy_test_is_near_0_for_a_copier_and_unchanged_for_a_model_that_cannot_copy():
    torch.manual_seed(0)
    machine = runtime.start_machine('cpu', 'float32')
    rng = np.random.default_rng(0)
    tunes = [[START_IDX] + rng.integers(0, 256, 40).tolist() for _ in range(6)] + [[START_IDX, 5, 6]]  # one short
    bigram = AutoregressiveWrapper(_Bigram())
    result = evaluate.copy_test(bigram, tunes, 4, machine, length=20)
    assert result['pieces'] == 6 and result['tokens'] == 20
    assert result['first_nll'] > 3 and abs(result['repeat_nll'] - result['first_nll']) < 0.5
    copier = AutoregressiveWrapper(_Copier(lag=20))
    result = evaluate.copy_test(copier, tunes, 4, machine, length=20)
    assert result['repeat_nll'] < 1e-6 and result['first_nll'] > 3
    # the window bounds the passage: half of max_seq_len minus the start token
    assert evaluate.copy_test(AutoregressiveWrapper(_Bigram(max_seq_len=21)), tunes, 4, machine)['tokens'] == 10


def test_unconstrained_sampling_shows_the_models_own_grammar_and_constrained_never_breaks_it(checkpoint):
    model, _ = runtime.load_model(checkpoint, 'cpu')
    machine = runtime.start_machine('cpu')
    torch.manual_seed(0)
    free = evaluate.generate_pieces(model, machine, 16, 60, 1.0, None, None, constrained=False)
    torch.manual_seed(0)
    constrained = evaluate.generate_pieces(model, machine, 16, 60, 1.0, None, None)
    assert min(evaluate.grammar_validity(p) for p in constrained) == 1.0
    assert min(evaluate.grammar_validity(p) for p in free) < 1.0  # the barely trained model breaks notes


# -----------------------------------------------------------------------------
# tools/c2st_seeds.py: the C2ST's mean over sampling seeds

C2ST_SEEDS = ROOT / 'tools' / 'c2st_seeds.py'


def seed_report(seed, boosted, control, step=6, nll=0.9, skipped=None, guidance=None):
    """The parts of an evaluate.py report the seed summary reads."""
    c2st = {'skipped': skipped} if skipped else {
        'generated_vs_held_out': {'boosted': boosted, 'linear': boosted - 0.01},
        'control': {'boosted': control, 'linear': control + 0.01}}
    return {'checkpoint': 'x.pt', 'step': step, 'model': {'nll': nll}, 'c2st': c2st, 'goals': {'c2st_points': 0.05},
            'repeat_memory': {'strength': 0.0},
            'samples': {'seed': seed, 'temperature': 1.0, 'top_p': None, 'top_k': None, 'grammar_constrained': True,
                        **({'guidance': guidance} if guidance else {})}}


def test_c2st_seed_summary_takes_the_means_and_the_paired_standard_error():
    summarize = runpy.run_path(str(C2ST_SEEDS))['summarize']
    summary = summarize([seed_report(2, 0.56, 0.50), seed_report(0, 0.54, 0.50), seed_report(1, 0.55, 0.49)])
    assert summary['seeds'] == [0, 1, 2] and [row['seed'] for row in summary['per_seed']] == [0, 1, 2]
    assert summary['mean']['boosted'] == pytest.approx(0.55)
    assert summary['mean']['control_boosted'] == pytest.approx(1.49 / 3)
    assert summary['gap_points'] == pytest.approx(100 * (0.55 - 1.49 / 3))  # 5.33: over the goal
    assert summary['gap_standard_error_points'] == pytest.approx(100 * np.std([0.06, 0.04, 0.06], ddof=1) / 3 ** 0.5)
    assert not summary['within_goal'] and summary['goal_points'] == pytest.approx(5)
    assert summarize([seed_report(0, 0.54, 0.50), seed_report(1, 0.55, 0.50)])['within_goal']  # 4.5 points
    assert summarize([seed_report(0, 0.5, 0.5), seed_report(1, 0.5, 0.5, guidance=1.0)])  # a report before the option
    for bad in ([seed_report(0, 0.5, 0.5), seed_report(0, 0.5, 0.5)],  # a seed twice
                [seed_report(0, 0.5, 0.5), seed_report(1, 0.5, 0.5, step=7)],  # another checkpoint
                [seed_report(0, 0.5, 0.5), seed_report(1, 0.5, 0.5, guidance=1.5)],  # sampled otherwise
                [seed_report(0, 0.5, 0.5, skipped='needs 20 held-out pieces')]):
        with pytest.raises(ValueError):
            summarize(bad)


def test_c2st_seeds_reads_seed_ranges_and_takes_a_malformed_report_for_a_missing_one(tmp_path):
    tool = runpy.run_path(str(C2ST_SEEDS))
    assert tool['seed_range']('0-29') == list(range(30)) and tool['seed_range']('3') == [3]
    for bad in ('', '-1', '3-', '1-0', 'a-b', '0-999999999999'):
        with pytest.raises(ValueError):
            tool['seed_range'](bad)
    path = tmp_path / 'evaluation.json'
    path.write_text(json.dumps(seed_report(3, 0.55, 0.5)))
    assert tool['read_report'](path)['samples']['seed'] == 3
    for damaged in ('{"c2st": {}, "samples": {}}', '{"c2st": [], "samples": 1}', 'null', '{"c2st": {'):
        path.write_text(damaged)
        assert tool['read_report'](path) is None  # so that seed is evaluated again
    assert tool['read_report'](tmp_path / 'missing.json') is None


def test_c2st_seeds_averages_the_whole_tune_test_with_its_own_goal_and_reruns_reports_without_it(tmp_path):
    tool = runpy.run_path(str(C2ST_SEEDS))
    reports = []
    for seed, boosted in ((0, 0.60), (1, 0.56)):
        report = seed_report(seed, 0.55, 0.50)
        report['c2st_whole_tune'] = {'generated_vs_held_out': {'boosted': boosted, 'linear': 0.5},
                                     'control': {'boosted': 0.5, 'linear': 0.5}}
        report['goals']['c2st_whole_tune_points'] = 0.08
        reports.append(report)
    summary = tool['summarize'](reports, 'whole_tune')
    assert summary['test'] == 'whole_tune' and summary['mean']['boosted'] == pytest.approx(0.58)
    assert summary['gap_points'] == pytest.approx(8) and summary['goal_points'] == pytest.approx(8)
    assert tool['summarize'](reports)['mean']['boosted'] == pytest.approx(0.55)  # the first-notes test by default
    path = tmp_path / 'evaluation.json'
    path.write_text(json.dumps(reports[0]))
    assert tool['read_report'](path, 'whole_tune') is not None
    reports[0]['c2st_whole_tune'] = {'skipped': 'off (--tunes 0)'}  # a first-notes sweep's report
    path.write_text(json.dumps(reports[0]))
    assert tool['read_report'](path, 'whole_tune') is None and tool['read_report'](path) is not None
    del reports[0]['c2st_whole_tune']  # a report of an evaluate.py without the test
    path.write_text(json.dumps(reports[0]))
    assert tool['read_report'](path, 'whole_tune') is None


def run_c2st_seeds(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(C2ST_SEEDS)] + [str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_c2st_seeds_runs_evaluate_per_seed_once_and_writes_json_and_png(checkpoint, tmp_path):
    data = make_folder(tmp_path / 'midi', n=60, notes=24)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt['args']['val_fraction'] = 0.5  # enough held-out pieces for a C2ST
    torch.save(ckpt, tmp_path / 'half.pt')
    args = ['--checkpoint', tmp_path / 'half.pt', '--seeds', '0-1', '--work_dir', tmp_path / 'work', '--output',
            tmp_path / 'out' / 'c2st', '--', '--data_path', data, '--cache_dir', tmp_path / 'cache',
            '--num_samples', '2', '--sample_length', '30', '--c2st_pieces', '30', '--c2st_notes', '8']
    proc = run_c2st_seeds(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'seed 0: evaluate.py' in proc.stdout and 'seed 1: evaluate.py' in proc.stdout
    summary = json.loads((tmp_path / 'out' / 'c2st.json').read_text())
    reports = [json.loads((tmp_path / 'work' / f's{s}' / 'evaluation.json').read_text()) for s in (0, 1)]
    assert [r['samples']['seed'] for r in reports] == [0, 1] == summary['seeds']
    boosted = [r['c2st']['generated_vs_held_out']['boosted'] for r in reports]
    assert summary['mean']['boosted'] == pytest.approx(np.mean(boosted))
    assert (tmp_path / 'out' / 'c2st.png').stat().st_size > 0
    again = run_c2st_seeds(args, tmp_path)  # every seed has its report: nothing is evaluated twice
    assert again.returncode == 0 and 'evaluate.py' not in again.stdout
    assert json.loads((tmp_path / 'out' / 'c2st.json').read_text()) == summary
    (tmp_path / 'work' / 's1' / 'evaluation.json').write_text('{"c2st": {')  # cut short, as by a kill
    healed = run_c2st_seeds(args, tmp_path)
    assert healed.returncode == 0 and 'seed 1: evaluate.py' in healed.stdout and 'seed 0' not in healed.stdout
    assert json.loads((tmp_path / 'out' / 'c2st.json').read_text()) == summary  # a seed's C2ST is reproducible


def test_c2st_seeds_stops_with_one_line_on_bad_seeds_or_a_failed_run(tmp_path):
    proc = run_c2st_seeds(['--checkpoint', 'x.pt', '--seeds', '5-2', '--work_dir', tmp_path, '--output',
                           tmp_path / 'o'], tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --seeds '5-2': expected a seed or a range")
    for flag in ('--seed=3', '--see'):  # evaluate.py would take a prefix of --seed as --seed
        proc = run_c2st_seeds(['--checkpoint', 'x.pt', '--work_dir', tmp_path, '--output', tmp_path / 'o', '--',
                               flag], tmp_path)
        assert proc.returncode == 1 and proc.stderr.startswith(f'error: {flag} after --: this script sets it')
    for output in ('', '.', tmp_path / 'w' / 's4' / 'evaluation'):  # no name; a seed's own report
        proc = run_c2st_seeds(['--checkpoint', 'x.pt', '--seeds', '4', '--work_dir', tmp_path / 'w', '--output',
                               output], tmp_path)
        assert proc.returncode == 1 and proc.stderr.startswith(f'error: --output {str(output)!r}')
    proc = run_c2st_seeds(['--checkpoint', tmp_path / 'missing.pt', '--seeds', '3', '--work_dir', tmp_path / 'w',
                           '--output', tmp_path / 'o'], tmp_path)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith('error: evaluate.py stopped with exit code 2 at seed 3')


def test_c2st_seeds_stopped_while_writing_its_summary_says_so_in_one_line_and_leaves_each_file_whole(
        tmp_path, monkeypatch, capsys):
    tool = runpy.run_path(str(C2ST_SEEDS))
    names = tool['main'].__globals__  # the functions main calls, as the script sees them
    for seed in (0, 1):  # every seed has its report: nothing is evaluated
        (tmp_path / 'work' / f's{seed}').mkdir(parents=True)
        (tmp_path / 'work' / f's{seed}' / 'evaluation.json').write_text(json.dumps(seed_report(seed, 0.55, 0.5)))
    args = ['--checkpoint', 'x.pt', '--seeds', '0-1', '--work_dir', tmp_path / 'work', '--output', tmp_path / 'c2st']
    monkeypatch.setitem(names, 'plot', lambda summary, path: Path(path).write_bytes(b'\x89PNG whole'))
    assert in_process(tool['main'], args, capsys)[0] == 0
    first = (tmp_path / 'c2st.json').read_text()
    assert json.loads(first)['seeds'] == [0, 1]

    def stopped_halfway(signum):
        def write(path, *_):
            Path.write_bytes(Path(path), b'{"seeds": [0,')  # half a file, then the stop
            raise KeyboardInterrupt(signum) if signum else KeyboardInterrupt
        return write
    for signum, code, how in ((None, 130, 'Ctrl-C'), (signal.SIGTERM, 143, 'SIGTERM')):
        with monkeypatch.context() as patch:  # while the picture is drawn
            patch.setitem(names, 'plot', lambda summary, path, write=stopped_halfway(signum): write(path))
            stopped = in_process(tool['main'], args, capsys)
        with monkeypatch.context() as patch:  # while the summary's text is written
            patch.setitem(names, 'plot', lambda summary, path: Path(path).write_bytes(b'\x89PNG new'))
            patch.setattr(Path, 'write_text', stopped_halfway(signum))
            stopped_in_json = in_process(tool['main'], args, capsys)
        for result in (stopped, stopped_in_json):
            assert (result[0], result[2]) == (code, f'stopped by {how}: the seeds done so far are kept in '
                                                    f"{tmp_path / 'work'}, no summary written to {tmp_path / 'c2st'}\n")
        assert (tmp_path / 'c2st.json').read_text() == first  # the earlier sweep's, whole
        assert (tmp_path / 'c2st.png').read_bytes() == b'\x89PNG whole'
        assert sorted(p.name for p in tmp_path.iterdir()) == ['c2st.json', 'c2st.png', 'work']


def test_music_statistics_of_parts_tokens_leave_drum_keys_out_of_the_pitches():
    # melody 72 and 74, bass 36, a drum key 81 (open triangle): the pitch range is 74 - 36, not 81 - 36
    piece = [START_IDX, 130, 256 + 72, 130, 384 + 36, 130, 640 + 81, 4, 130, 256 + 74]
    stats, _ = evaluate.music_statistics([piece], tokenization_settings(tracks='parts'), 120.0)
    assert stats['pitch_range'] == 74 - 36


def test_a_read_only_folder_beside_the_checkpoint_is_refused_before_evaluating(checkpoint, tmp_path, capsys,
                                                                               monkeypatch):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'best.pt').write_bytes(checkpoint.read_bytes())
    # immutable: refused even to root, who may write into any folder whatever its mode bits say
    if subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode != 0:
        pytest.skip('chattr +i is not available here')
    calls = []
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: calls.append(a))
    try:
        assert not os.access(folder, os.W_OK)
        code, out, err = evaluate_in_process(['--checkpoint', folder / 'best.pt'], capsys)
    finally:
        subprocess.run(['chattr', '-i', str(folder)], check=True)
    assert code == 2 and calls == [] and err == (f'error: the report goes beside the checkpoint, in {folder}, which '
                                                 f'must be a folder we can write to, but {folder} is not writable; '
                                                 f'choose another folder with --output_dir\n'), err


def test_a_report_that_cannot_be_written_is_one_line_after_the_table(checkpoint, tmp_path, capsys):
    (tmp_path / 'out' / 'evaluation.json').mkdir(parents=True)  # in the way of the report file
    code, out, err = evaluate_in_process(['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out',
                                          '--num_samples', '4', '--sample_length', '16', '--no_c2st'], capsys)
    assert code == 1 and 'NLL (nats)' in out and 'Traceback' not in err
    assert err == f'error: cannot write the report into {tmp_path / "out"}: Is a directory (the table above is ' \
                  'all of it that is kept)\n', err


def test_on_off_options_take_true_or_false_as_the_training_script_does(monkeypatch):
    def stop(args, rules):
        raise SystemExit(vars(args))
    monkeypatch.setattr(evaluate, 'exit_on_bad_args', stop)
    with pytest.raises(SystemExit) as e:
        evaluate.main(['--voice_leading', 'false', '--no_c2st', 'true', '--no_adherence', 'false', '--no_accompany',
                       '--unconstrained', 'no'])
    assert {name: e.value.code.get(name) for name in (
        'voice_leading', 'no_c2st', 'no_adherence', 'no_accompany', 'unconstrained')} == {
        'voice_leading': False, 'no_c2st': True, 'no_adherence': False, 'no_accompany': True, 'unconstrained': False}
