"""dataset.py: the train/validation split, the files it skips, training windows (plain, augmented, packed)."""

import hashlib
import random

import numpy as np
import pytest
import torch

import dataset
from dataset import (
    MIDI_Dataset,
    PackedDataset,
    collate_fn,
    is_validation_file,
    load_corpus,
    transpose,
    validation_sample,
)
from tests.conftest import BASS, DRUMS, MS, ONE_LINE, TUNE, make_folder, melody, write_midi, write_parts
from token_cache import DatasetError
from tokens import DUR_OFFSET, PAD_IDX, PITCH_OFFSET, START_IDX, is_pitch, tokenization_settings, tokenize_notes


def test_split_is_by_file_stable_and_disjoint_when_files_are_added():
    names = [f'folder/tune_{i}.mid' for i in range(2000)]
    val = {n for n in names if is_validation_file(n, 0.1)}
    assert 150 < len(val) < 250
    more = names + [f'new/tune_{i}.mid' for i in range(500)]
    assert {n for n in more[:2000] if is_validation_file(n, 0.1)} == val


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
    with pytest.raises(DatasetError, match='missing does not exist'):
        load_corpus(tmp_path / 'missing', MS, tmp_path / 'cache')
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x.mid').write_bytes(b'MThd garbage')
    with pytest.raises(DatasetError, match='nothing usable.*1 MIDI files found'):
        load_corpus(tmp_path / 'bad', MS, tmp_path / 'cache', verbose=False)


def test_short_files_are_skipped_below_min_notes(tmp_path):
    data = make_folder(tmp_path / 'data', n=3, notes=30)
    write_midi(data / 'long.mid', melody(60))
    train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=40, verbose=False)
    assert summary['skipped_short'] == 3 and len(train) + len(val) == 1


def test_split_of_valid_names_is_the_one_it_always_was():
    names = ['song_00.mid', 'folk/Dvořák - Humoreska.mid', 'archive.zip::inner/z0.MIDI', '日本/さくら.mid']
    names += [f'tune_{i}.mid' for i in range(200)]
    for name in names:
        old = int(hashlib.sha1(name.encode('utf-8')).hexdigest()[:8], 16) / 2**32 < 0.1
        assert is_validation_file(name, 0.1) == old


def test_drums_only_file_is_skipped_saying_that_drums_are_left_out(tmp_path, capsys):
    data = make_folder(tmp_path / 'data', n=3)
    write_midi(data / 'drums.mid', melody(50), channel=9)
    train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=10)
    line = next(line for line in capsys.readouterr().out.splitlines() if 'drums.mid' in line)
    assert line.startswith('skipping drums.mid: only drum notes (50 on channel 10)') and 'include_drums' in line
    assert summary['skipped'] == 1 and len(train) + len(val) == 3
    drums = tokenization_settings('ms', include_drums=True)
    assert load_corpus(data, drums, tmp_path / 'cache', min_notes=10, verbose=False)[2]['skipped'] == 0


@pytest.mark.parametrize('n_files, val_fraction, reason', [(1, 0.05, 'only 1 usable file'),
                                                            (4, 0, 'val_fraction=0')])
def test_no_validation_files_is_said_once(tmp_path, capsys, n_files, val_fraction, reason):
    data = make_folder(tmp_path / 'data', n=n_files)
    train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=10, val_fraction=val_fraction)
    out = capsys.readouterr().out
    assert out.count('no validation files') == 1
    assert f'no validation files ({reason}): training without validation' in out
    assert summary['val_files'] == 0 and val == [] and len(train) == n_files


# -----------------------------------------------------------------------------
# windows

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


# -----------------------------------------------------------------------------
# packed training windows

def tunes(count=6, seed=0):
    """Token sequences of tunes of different lengths, each with its start token."""
    rng = np.random.default_rng(seed)
    return [np.array(tokenize_notes([['note', i * 96, 64, 0, int(p), 90] for i, p in
                                     enumerate(rng.integers(50, 80, size=int(rng.integers(5, 40))))], MS),
                     dtype=np.uint16) for _ in range(count)]


def test_packed_windows_are_full_length_with_no_padding_and_cover_the_stream():
    sequences = tunes()
    total = sum(len(s) for s in sequences)
    ds = PackedDataset(sequences, 16, seed=3)
    assert len(ds) == (total - 1) // 16
    windows = [ds[i] for i in range(len(ds))]
    assert all(len(w) == 17 for w in windows) and not any((w == PAD_IDX).any() for w in windows)
    stream = np.concatenate(sequences)
    # consecutive windows continue the stream: window i+1 starts where window i's inputs end
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]
    assert int((np.concatenate([w[:-1].numpy() for w in windows]) == START_IDX).sum()) >= len(sequences) - 1
    assert set(np.concatenate([w.numpy() for w in windows]).tolist()) <= set(stream.tolist())


def test_aligned_windows_begin_at_start_tokens_hold_every_short_tune_whole_and_cover_the_stream():
    sequences = tunes(count=12, seed=5)
    sequences.append(np.concatenate([sequences[-1]] + [s[1:] for s in sequences[:3]]))  # longer than a window
    seq_len = 120
    assert min(map(len, sequences)) < seq_len and max(map(len, sequences[:-1])) <= seq_len
    ds = PackedDataset(sequences, seq_len, seed=3, aligned=True)
    stream = np.concatenate(sequences)
    starts = dataset.aligned_window_starts(np.cumsum([len(s) for s in sequences]) - [len(s) for s in sequences],
                                           len(stream), seq_len)
    assert len(ds) == len(starts) and starts[0] == 0
    windows = [ds[i].numpy() for i in range(len(ds))]
    assert all(len(w) == seq_len + 1 for w in windows)
    for start, window in zip(starts, windows):
        assert np.array_equal(window, stream[min(start, len(stream) - seq_len - 1):][:seq_len + 1])
    long_tune = len(stream) - len(sequences[-1])
    # every window but the long tune's continuation (and the last, moved back to fit) begins at a start token
    assert all(w[0] == START_IDX for s, w in zip(starts[:-1], windows) if not long_tune < s)
    assert any(long_tune < s < long_tune + len(sequences[-1]) for s in starts)
    covered = np.zeros(len(stream), dtype=bool)
    for start in starts:
        covered[start:start + seq_len + 1] = True
    assert covered.all()
    assert all(held_whole(tune, windows) for tune in sequences[:-1])


def held_whole(tune, windows):
    return any(np.array_equal(w[i:i + len(tune)], tune) for w in windows for i in range(len(w) - len(tune) + 1))


def test_unaligned_windows_hold_some_tunes_only_in_part():  # what aligned windows are for
    sequences = tunes(count=12, seed=5)
    ds = PackedDataset(sequences, 120, seed=3)
    assert not all(held_whole(tune, [ds[i].numpy() for i in range(len(ds))]) for tune in sequences)


def test_aligned_windows_follow_the_stream_each_epochs_header_dropout_leaves():
    from condition import header
    sequences = [np.concatenate([[START_IDX], header({'key': 'D major', 'meter': '6/8'}), s[1:]]).astype(np.uint16)
                 for s in tunes(count=12, seed=5)]
    ds = PackedDataset(sequences, 120, seed=3, aligned=True, header_dropout=0.5)
    lengths = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        lengths.add(ds.length)
        assert all(ds[i][0] == START_IDX for i in range(len(ds) - 1))
    assert len(lengths) > 1


def test_packed_windows_change_their_cuts_per_epoch_and_repeat_for_the_same_epoch():
    ds = PackedDataset(tunes(), 16, seed=3)
    first = [ds[i].tolist() for i in range(3)]
    assert first == [ds[i].tolist() for i in range(3)]
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        offsets.add(tuple(ds[0].tolist()))
    assert len(offsets) > 1


def test_packed_transposition_moves_each_tune_by_its_own_shift_and_keeps_pitches_in_range():
    sequences = tunes(count=8, seed=1)
    plain = PackedDataset(sequences, 24, seed=5)
    moved = PackedDataset(sequences, 24, aug=True, aug_range=3, seed=5)
    stream_tune = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    shifts = {}
    for i in range(len(plain)):
        a, b = plain[i], moved[i]
        assert torch.equal(a[~is_pitch(a)], b[~is_pitch(b)])  # only pitches move
        assert bool(is_pitch(b).all() == is_pitch(a).all())
        start = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(np.concatenate(sequences), len(a))
                                   .__eq__(a.numpy()).all(axis=1))[0])
        for j in np.flatnonzero(is_pitch(a).numpy()):
            tune = int(stream_tune[start + j])
            shifts.setdefault(tune, set()).add(int(b[j] - a[j]))
    assert all(len(s) == 1 for s in shifts.values())  # one shift per tune, in every window it appears in
    assert len({next(iter(s)) for s in shifts.values()}) > 1  # tunes of one window may move differently
    assert all(abs(next(iter(s))) <= 3 for s in shifts.values())


def test_drums_only_file_in_melody_tracks_is_skipped_as_too_short(tmp_path, capsys):
    folder = tmp_path / 'data'
    folder.mkdir()
    write_parts(folder / 'drums.mid', [(None, 9, DRUMS)])
    write_parts(folder / 'pop.mid', [(None, 0, TUNE), (None, 1, BASS), (None, 9, DRUMS)])
    train, val, summary = load_corpus(folder, ONE_LINE, tmp_path / 'cache', min_notes=8, val_fraction=0)
    assert summary['skipped_short'] == 1 and [len(t) for t in train] == [1 + 2 * 16 + 15]


# -----------------------------------------------------------------------------
# the validation sample and batched windows

def held_out(count=40, seed=0):
    """Validation windows of seq_len 16 over files of 5 to 200 tokens."""
    rng = np.random.default_rng(seed)
    return MIDI_Dataset([np.arange(int(n), dtype=np.uint16) for n in rng.integers(5, 200, size=count)], 16,
                        rand_start=False)


def targets_of(ds, indices):
    return sum(len(ds[i]) - 1 for i in indices)


def test_window_lengths_are_the_lengths_of_the_windows_cut():
    ds = held_out()
    assert ds.window_lengths().tolist() == [len(ds[i]) for i in range(len(ds))]
    crops = MIDI_Dataset([np.arange(n, dtype=np.uint16) for n in (5, 17, 40)], 16)
    assert crops.window_lengths().tolist() == [len(crops[i]) for i in range(len(crops))]


def test_validation_sample_is_the_same_windows_every_time_whatever_the_run_seed():
    ds = held_out()
    first = validation_sample(ds, 500)
    torch.manual_seed(1)
    np.random.seed(2)
    assert validation_sample(ds, 500) == first
    assert validation_sample(held_out(), 500) == first  # the same split in another run
    assert first == sorted(set(first)) and 0 < len(first) < len(ds)


def test_held_out_split_within_val_tokens_is_scored_whole():
    ds = held_out()
    total = targets_of(ds, range(len(ds)))
    assert validation_sample(ds, total) == list(range(len(ds)))
    assert validation_sample(ds, None) == list(range(len(ds)))
    assert len(validation_sample(ds, total - 1)) < len(ds)


def test_validation_sample_of_a_large_split_keeps_to_val_tokens_and_spreads_over_its_files():
    ds = held_out(count=400, seed=3)
    sample = validation_sample(ds, 2_000)
    assert 2_000 - 16 < targets_of(ds, sample) <= 2_000  # full up to the last window that fits
    assert len(set(ds.window_file[sample].tolist())) > 80  # windows from all over, not a few whole files
    assert len(validation_sample(ds, 3)) == 1  # a budget below one window still scores one


def test_packed_pitch_ranges_per_tune_do_not_depend_on_the_block_they_are_read_in(monkeypatch):
    sequences = tunes(count=8, seed=2) + [np.array([START_IDX], dtype=np.uint16)]  # the last one has no pitch
    whole = PackedDataset(sequences, 24)
    monkeypatch.setattr(dataset, 'PITCH_RANGE_BLOCK', 5)  # blocks that end inside tunes
    blocks = PackedDataset(sequences, 24)
    assert whole.lowest.tolist() == blocks.lowest.tolist() and whole.highest.tolist() == blocks.highest.tolist()
    pitches = [s[is_pitch(s)].astype(int) - PITCH_OFFSET for s in sequences[:-1]]
    assert whole.lowest.tolist() == [p.min() for p in pitches] + [127]
    assert whole.highest.tolist() == [p.max() for p in pitches] + [0]


def one_window_at_a_time(ds, idx):
    """PackedDataset's windows as they were cut one by one before batches were cut together: the reference."""
    n = ds.max_seq_len + 1
    offset = random.Random(f'{ds.seed}/{ds.epoch}/offset').randrange(ds.max_seq_len)
    start = min(offset + int(idx) * ds.max_seq_len, max(0, len(ds.stream) - n))
    window = torch.from_numpy(ds.stream[start:start + n].astype(np.int64))
    if ds.aug and ds.aug_range:
        first = np.searchsorted(ds.tune_starts, start, side='right') - 1
        last = np.searchsorted(ds.tune_starts, start + len(window) - 1, side='right') - 1
        tunes = np.searchsorted(ds.tune_starts, np.arange(start, start + len(window)), side='right') - 1
        shifts = torch.tensor([ds.tune_shift(t) for t in range(first, last + 1)])
        pitch = is_pitch(window)
        window[pitch] += shifts[torch.from_numpy(tunes - first)][pitch]
    return window


@pytest.mark.parametrize('seq_len, aug_range', [(24, 3), (7, 2), (200, 5), (24, 0), (5000, 2)])
def test_packed_windows_cut_as_a_batch_are_the_windows_cut_one_at_a_time(seq_len, aug_range):
    ds = PackedDataset(tunes(count=12, seed=4), seq_len, aug=True, aug_range=aug_range, seed=9)
    for epoch in (0, 1, 5):
        ds.set_epoch(epoch)
        indices = list(range(len(ds)))[::-1]
        batch = ds.__getitems__(indices)
        assert [w.tolist() for w in batch] == [one_window_at_a_time(ds, i).tolist() for i in indices]
        assert ds[indices[0]].tolist() == batch[0].tolist()


@pytest.mark.parametrize('seq_len, aug_range', [(24, 3), (7, 0), (5000, 2)])
def test_packed_windows_read_in_place_from_one_array_are_the_windows_of_the_copied_stream(monkeypatch, seq_len,
                                                                                           aug_range):
    # the token cache's mapped file: tunes end to end, some held out between them, one file twice
    sequences = tunes(count=12, seed=6)
    base = np.concatenate(sequences)
    starts = np.cumsum([len(s) for s in sequences]) - [len(s) for s in sequences]
    train = [base[a:a + len(s)] for i, (a, s) in enumerate(zip(starts, sequences)) if i % 4 != 1]
    train.insert(3, train[5])
    monkeypatch.setattr(dataset, 'PITCH_RANGE_BLOCK', 50)  # blocks that end inside tunes
    in_place = PackedDataset(train, seq_len, aug=True, aug_range=aug_range, seed=2)
    copied = PackedDataset([s.copy() for s in train], seq_len, aug=True, aug_range=aug_range, seed=2)
    assert in_place.stream is base and copied.stream.base is None and len(in_place) == len(copied)
    assert in_place.lowest.tolist() == copied.lowest.tolist() and in_place.highest.tolist() == copied.highest.tolist()
    for epoch in (0, 3):
        in_place.set_epoch(epoch)
        copied.set_epoch(epoch)
        indices = list(range(len(copied)))[::-1]
        assert [w.tolist() for w in in_place.__getitems__(indices)] == [
            w.tolist() for w in copied.__getitems__(indices)]


def test_packed_windows_of_a_cached_corpus_read_the_cache_file_in_place(tmp_path):
    data = make_folder(tmp_path / 'data', n=12)
    train, val, _ = load_corpus(data, MS, tmp_path / 'cache', min_notes=10, verbose=False)
    ds = PackedDataset(train, 16, aug=True, seed=1)
    assert isinstance(ds.stream, np.memmap) and ds.moved is not None  # held-out files lie between the training ones
    copied = PackedDataset([np.array(s) for s in train], 16, aug=True, seed=1)
    indices = list(range(len(ds)))
    assert [w.tolist() for w in ds.__getitems__(indices)] == [w.tolist() for w in copied.__getitems__(indices)]


def test_a_file_whose_tempo_is_0_counts_at_midis_default_120_bpm_in_the_median_tempo(tmp_path):
    # set_tempo 0 (no microseconds a quarter) is in the bytes a file can hold; every note then starts at 0 ms
    tune = write_midi(tmp_path / 'tempo0.mid', melody(n=50), tempos=((0, 0),))
    for timing in ('ms', 'beats'):
        summary = load_corpus(tune, tokenization_settings(timing), tmp_path / 'cache', min_notes=1, verbose=False)[2]
        assert summary['median_tempo_bpm'] == 120
