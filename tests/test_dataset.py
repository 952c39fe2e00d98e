"""dataset.py: tokenization, token cache, split, windows, augmentation, bad input, detokenize."""

import zipfile

import mido
import numpy as np
import pytest
import torch

import TMIDIX
from dataset import (DUR_OFFSET, MAX_STEP, PAD_IDX, PITCH_OFFSET, START_IDX, TIMING_FACTOR, DatasetError,
                     MIDI_Dataset, collate_fn, detokenize, find_midi_sources, is_validation_file, load_corpus,
                     load_token_cache, tokenization_settings, tokenize_midi, tokenize_notes, tokens_to_notes,
                     transpose)


def write_midi(path, notes, ticks_per_beat=480, tempos=((0, 500000),), channel=0, program=0):
    """notes: (start_tick, duration_tick, pitch) on one track; tempos: (tick, usec) on a separate tempo track."""
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    tempo_track = mido.MidiTrack()
    last = 0
    for tick, usec in tempos:
        tempo_track.append(mido.MetaMessage('set_tempo', tempo=usec, time=tick - last))
        last = tick
    events = []
    for start, dur, pitch in notes:
        events.append((start, 1, pitch))
        events.append((start + dur, 0, pitch))
    track = mido.MidiTrack([mido.Message('program_change', program=program, channel=channel, time=0)])
    last = 0
    for tick, on, pitch in sorted(events):
        kind = 'note_on' if on else 'note_off'
        track.append(mido.Message(kind, note=pitch, velocity=80 if on else 0, channel=channel, time=tick - last))
        last = tick
    mid.tracks += [tempo_track, track]
    mid.save(str(path))
    return path


def melody(n=60, seed=0, step=240):
    rng = np.random.default_rng(seed)
    return [(i * step, int(rng.integers(60, 480)), int(rng.integers(48, 84))) for i in range(n)]


MS = tokenization_settings('ms')
BEATS = tokenization_settings('beats')


def test_each_note_becomes_time_duration_pitch_like_the_seed():
    notes = [['note', 0, 64, 0, 60, 90], ['note', 96, 24, 0, 62, 90], ['note', 96, 40, 0, 65, 90]]
    # first note: no time token; second: delta 96 ms -> 3 steps; chord note at the same time: no time token
    assert tokenize_notes(notes, MS) == [START_IDX, 128 + 2, 256 + 60, 3, 128 + 0, 256 + 62, 128 + 1, 256 + 65]


def test_quantized_start_times_do_not_drift_over_a_long_melody():
    # 50 ms apart: flooring each delta (the seed) gives 1 step = 32 ms per note and drifts 18 ms a note
    notes = [['note', 50 * i, 40, 0, 60, 90] for i in range(200)]
    tokens = tokenize_notes(notes, MS)
    decoded = tokens_to_notes(tokens)
    for (start, _, _), note in zip(decoded, notes):
        assert 0 <= note[1] - start * TIMING_FACTOR < TIMING_FACTOR


def test_gaps_longer_than_127_steps_are_clipped_but_later_deltas_stay_exact():
    notes = [['note', 0, 32, 0, 60, 90], ['note', 10_000, 32, 0, 61, 90], ['note', 10_064, 32, 0, 62, 90]]
    tokens = tokenize_notes(notes, MS)
    assert tokens[3] == MAX_STEP and tokens[6] == 2


def test_midi_file_round_trip_keeps_pitches_and_times_within_one_step(tmp_path):
    notes = melody(80, seed=1, step=200)
    path = write_midi(tmp_path / 'a.mid', notes, tempos=((0, 500000), (4000, 400000), (4100, 650000)))
    original = TMIDIX.midi2notes(str(path), unit='ms')
    tokens, n_notes, _ = tokenize_midi(path.read_bytes(), MS)
    assert n_notes == len(notes)
    detokenize(tokens, tmp_path / 'out.mid', MS)
    back = TMIDIX.midi2notes(str(tmp_path / 'out.mid'), unit='ms')
    assert [n[4] for n in back] == [n[4] for n in original]
    for a, b in zip(original, back):
        assert abs(a[1] - b[1]) < TIMING_FACTOR
        assert abs(a[2] - b[2]) < TIMING_FACTOR


def test_beats_timing_puts_onsets_exactly_on_the_grid_through_tempo_changes(tmp_path):
    # sixteenths and eighth-note triplets at 480 ticks per quarter, with tempo changes between notes
    ticks = [0, 120, 240, 360, 480, 640, 800, 960, 1440, 1560]
    notes = [(t, 100, 60 + i) for i, t in enumerate(ticks)]
    path = write_midi(tmp_path / 'b.mid', notes, tempos=((0, 500000), (130, 300000), (700, 900000), (1000, 450000)))
    tokens, _, _ = tokenize_midi(path.read_bytes(), BEATS)
    song = detokenize(tokens, tmp_path / 'out.mid', BEATS, tempo_bpm=100)
    back = TMIDIX.midi2notes(str(tmp_path / 'out.mid'), unit='ticks')
    step_ticks = 480 // BEATS['beat_division']
    assert [n[1] for n in back] == ticks  # written at 480 ticks per quarter: exactly the original ticks
    assert all(n[1] % step_ticks == 0 for n in back)
    assert len(song) == len(ticks)


def test_detokenize_reads_any_token_sequence(tmp_path):
    tokens = [START_IDX, PAD_IDX, 300, 5, 130, 301, 900, -3, 383, 600, 129, PAD_IDX]
    song = detokenize(tokens, tmp_path / 'any.mid')
    # 300: default duration; 301 after 5 steps with duration 2; 383 = pitch 127 with default duration; 600 ignored
    assert [(n[1], n[2], n[4]) for n in song] == [(0, 256, 44), (160, 64, 45), (160, 256, 127)]
    assert (tmp_path / 'any.mid').exists()
    assert tokens_to_notes([]) == [] and detokenize([], tmp_path / 'empty.mid') == []


def test_drum_channel_is_left_out_by_default(tmp_path):
    path = write_midi(tmp_path / 'drums.mid', melody(10), channel=9)
    _, n_notes, _ = tokenize_midi(path.read_bytes(), MS)
    assert n_notes == 0
    _, n_notes, _ = tokenize_midi(path.read_bytes(), tokenization_settings('ms', include_drums=True))
    assert n_notes == 10


def make_folder(root, n=12, notes=60):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_midi(root / f'song_{i:02d}.mid', melody(notes, seed=i))
    return root


def test_corpus_finds_files_recursively_and_inside_zip_archives(tmp_path):
    data = make_folder(tmp_path / 'data' / 'sub', n=3)
    with zipfile.ZipFile(tmp_path / 'data' / 'archive.zip', 'w') as zf:
        for i in range(4):
            zf.write(write_midi(tmp_path / f'z{i}.MIDI', melody(50, seed=10 + i)), f'inner/z{i}.MIDI')
        zf.writestr('readme.txt', 'not midi')
    names = [s[0] for s in find_midi_sources(tmp_path / 'data')]
    assert names == ['archive.zip::inner/z0.MIDI', 'archive.zip::inner/z1.MIDI', 'archive.zip::inner/z2.MIDI',
                     'archive.zip::inner/z3.MIDI', 'sub/song_00.mid', 'sub/song_01.mid', 'sub/song_02.mid']
    train, val, summary = load_corpus(tmp_path / 'data', MS, tmp_path / 'cache', min_notes=10, verbose=False)
    assert summary['files'] == 7 and summary['skipped'] == 0 and len(train) + len(val) == 7
    assert data.exists()


def test_split_is_by_file_stable_and_disjoint_when_files_are_added():
    names = [f'folder/tune_{i}.mid' for i in range(2000)]
    val = {n for n in names if is_validation_file(n, 0.1)}
    assert 150 < len(val) < 250
    more = names + [f'new/tune_{i}.mid' for i in range(500)]
    assert {n for n in more[:2000] if is_validation_file(n, 0.1)} == val


def test_token_cache_reads_no_midi_on_a_second_run_and_follows_changes(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=5)
    first = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    assert len(first) == 5

    def fail(*args, **kwargs):
        raise AssertionError('MIDI parsed although the cache holds it')
    monkeypatch.setattr(TMIDIX, 'midi2notes', fail)
    second = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    assert all(np.array_equal(first[k]['tokens'], second[k]['tokens']) for k in first)
    assert second['song_00.mid']['tokens'].dtype == np.uint16
    monkeypatch.undo()

    (data / 'song_00.mid').unlink()
    write_midi(data / 'song_01.mid', melody(70, seed=99))  # changed content
    third = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    assert 'song_00.mid' not in third and third['song_01.mid']['n_notes'] == 70
    # a different tokenization setting is a different cache
    beats = load_token_cache(data, BEATS, tmp_path / 'cache', verbose=False)
    assert not np.array_equal(beats['song_02.mid']['tokens'], third['song_02.mid']['tokens'])


def test_bad_files_are_reported_once_skipped_and_counted(tmp_path, capsys):
    data = make_folder(tmp_path / 'data', n=4)
    (data / 'garbage.mid').write_bytes(b'this is not a MIDI file at all')
    (data / 'empty.mid').write_bytes(b'')
    good = (data / 'song_00.mid').read_bytes()
    (data / 'truncated.mid').write_bytes(good[:len(good) // 2])
    train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=10)
    out = capsys.readouterr().out
    assert summary['skipped'] == 3 and len(train) + len(val) == 4
    for name in ('garbage.mid', 'empty.mid', 'truncated.mid'):
        assert out.count(f'skipping {name}:') == 1


def test_empty_or_all_bad_folder_stops_with_a_clear_message(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no MIDI files'):
        load_corpus(tmp_path / 'empty', MS, tmp_path / 'cache')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x.mid').write_bytes(b'MThd garbage')
    with pytest.raises(DatasetError, match='nothing usable.*1 MIDI files found'):
        load_corpus(tmp_path / 'bad', MS, tmp_path / 'cache', verbose=False)


def test_short_files_are_skipped_below_min_notes(tmp_path):
    data = make_folder(tmp_path / 'data', n=3, notes=30)
    write_midi(data / 'long.mid', melody(60))
    train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=40, verbose=False)
    assert summary['skipped_short'] == 3 and len(train) + len(val) == 1


def test_epoch_has_one_window_per_seq_len_tokens_of_each_file():
    short = [np.arange(50, dtype=np.uint16)] * 10
    long = [np.arange(10_001, dtype=np.uint16)]
    assert len(MIDI_Dataset(short, 100)) == 10
    assert len(MIDI_Dataset(long, 100)) == 100
    windows = [MIDI_Dataset(long, 100, rand_start=False)[i] for i in range(100)]
    assert torch.equal(torch.cat([w[:-1] for w in windows]), torch.arange(10_000))


def test_windows_are_deterministic_per_epoch_and_padded_by_collate():
    seqs = [np.arange(300, dtype=np.uint16), np.arange(20, dtype=np.uint16)]
    ds = MIDI_Dataset(seqs, 64, seed=3)
    assert torch.equal(ds[0], MIDI_Dataset(seqs, 64, seed=3)[0])
    starts = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        starts.add(int(ds[0][0]))
    assert len(starts) > 3  # random starts differ between epochs
    batch = collate_fn([ds[0], ds[len(ds) - 1]])
    assert batch.shape == (2, 65) and (batch[1, 20:] == PAD_IDX).all()


def test_transposition_never_moves_a_pitch_out_of_range():
    window = torch.tensor([START_IDX, 130, PITCH_OFFSET + 0, 3, 130, PITCH_OFFSET + 126, PAD_IDX])
    for shift in range(-5, 6):
        out = transpose(window, shift)
        pitches = out[(out >= PITCH_OFFSET) & (out < PITCH_OFFSET + 128)] - PITCH_OFFSET
        assert pitches.min() >= 0 and pitches.max() <= 127
        assert torch.equal(out[[0, 1, 3, 4, 6]], window[[0, 1, 3, 4, 6]])  # only pitches move
    assert torch.equal(transpose(window, 1), window + torch.tensor([0, 0, 1, 0, 0, 1, 0]))
    assert torch.equal(transpose(window, -3), window)


def test_augmented_training_windows_stay_in_range_and_vary():
    seq = np.array([START_IDX] + [DUR_OFFSET + 4, PITCH_OFFSET + 64, 5] * 100, dtype=np.uint16)
    ds = MIDI_Dataset([seq], 32, aug=True, aug_range=2, seed=1)
    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        w = ds[0]
        pitches = w[(w >= PITCH_OFFSET) & (w < PITCH_OFFSET + 128)] - PITCH_OFFSET
        seen.update(pitches.tolist())
    assert seen <= set(range(62, 67)) and len(seen) > 1
