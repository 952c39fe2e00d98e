"""dataset.py: tokenization, token cache, split, windows, augmentation, bad input, detokenize."""

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
import TMIDIX
import token_cache
import tokens
from dataset import (
    MIDI_Dataset,
    PackedDataset,
    collate_fn,
    is_validation_file,
    load_corpus,
    transpose,
    validation_sample,
)
from tests.conftest import make_folder, melody, write_midi
from token_cache import DatasetError, find_midi_sources, load_token_cache
from tokens import (
    DUR_OFFSET,
    MAX_STEP,
    NUM_TOKENS,
    PAD_IDX,
    PITCH_OFFSET,
    START_IDX,
    TIMING_FACTOR,
    detokenize,
    is_pitch,
    tokenization_settings,
    tokenize_midi,
    tokenize_notes,
    tokens_to_notes,
)

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


# -----------------------------------------------------------------------------
# the token cache heals itself

def settings_folder(cache):
    (folder,) = Path(cache).iterdir()  # one tokenization setting: one folder
    return folder


def token_file(cache, midi_path):
    return settings_folder(cache) / f'{hashlib.sha1(Path(midi_path).read_bytes()).hexdigest()}.npy'


def count_tokenizations(monkeypatch):
    """Content hashes tokenized from now on (in this process: pass num_workers=1 or fewer than 9 new files)."""
    calls = []
    real = token_cache._tokenize_job

    def counting(job):
        calls.append(job[0])
        return real(job)
    monkeypatch.setattr(token_cache, '_tokenize_job', counting)
    return calls


def same_tokens(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k]['tokens'], b[k]['tokens']) for k in a)


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def resave(change):
    def damage(path):
        tokens = np.load(path)
        np.save(path, change(tokens.copy()))
    return damage


def set_item(index, value):
    def change(tokens):
        tokens[index] = value
        return tokens
    return change


DAMAGE = {
    'cut short': cut_in_half,
    'missing': Path.unlink,
    'id out of range': resave(set_item(5, NUM_TOKENS + 64)),
    'not uint16': resave(lambda tokens: tokens.astype(np.int64)),
    'wrong length': resave(lambda tokens: tokens[:-3]),
    'no start token': resave(set_item(0, PAD_IDX)),
}


def test_a_token_file_read_by_its_header_bytes_is_what_np_load_reads_and_any_other_file_is_left_to_np_load(tmp_path):
    tokens = np.array([START_IDX, 3, 700, 5], dtype=np.uint16)
    path = str(tmp_path / 'a.npy')
    token_cache._save_npy(path, tokens)
    read = token_cache._read_saved_tokens(path, len(tokens))
    assert read.dtype == np.uint16 and read.tolist() == np.load(path).tolist()
    assert token_cache._read_saved_tokens(path, len(tokens) + 1) is None  # the index says another length
    token_cache._save_npy(path, tokens.astype(np.int64))
    assert token_cache._read_saved_tokens(path, len(tokens)) is None
    token_cache._save_npy(path, tokens)
    Path(path).write_bytes(Path(path).read_bytes()[:-1])  # cut short
    assert token_cache._read_saved_tokens(path, len(tokens)) is None


def test_a_large_cache_of_more_files_than_a_quarter_of_the_open_file_limit_is_read_into_memory(tmp_path, monkeypatch):
    # a mapped token file holds a file descriptor: 170,000 mapped files ran out of them and crashed the run
    monkeypatch.setattr(token_cache, '_physical_memory', lambda: 0)  # a cache larger than a quarter of RAM
    data = make_folder(tmp_path / 'data', n=5)
    for limit, mapped in ((4 * 5 + 4, True), (4 * 5, False)):
        monkeypatch.setattr(token_cache, '_open_file_limit', lambda: limit)
        entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
        assert all(isinstance(e['tokens'], np.memmap) == mapped for e in entries.values())


@pytest.mark.parametrize('mmap', [False, True], ids=['in memory', 'memory-mapped'])
@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_token_file_is_dropped_with_one_line_and_tokenized_again(tmp_path, monkeypatch, capsys, damage, mmap):
    if mmap:  # a cache larger than a quarter of RAM is memory-mapped; its entries are checked the same way
        monkeypatch.setattr(token_cache, '_physical_memory', lambda: 0)
    data = make_folder(tmp_path / 'data', n=5)
    first = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert isinstance(first['song_00.mid']['tokens'], np.memmap) == mmap
    first = {name: dict(e, tokens=np.array(e['tokens'])) for name, e in first.items()}  # a memmap sees the damage
    npy = token_file(tmp_path / 'cache', data / 'song_02.mid')
    DAMAGE[damage](npy)
    calls = count_tokenizations(monkeypatch)
    capsys.readouterr()

    second = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    out = capsys.readouterr().out
    assert out.count('cache: dropping') == 1 and f'cache: dropping {npy.stem}: ' in out and 'tokenizing again' in out
    assert calls == [npy.stem] and same_tokens(first, second)
    third = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    assert calls == [npy.stem] and capsys.readouterr().out == '' and same_tokens(first, third)


def test_deleted_token_files_are_tokenized_again_listing_at_most_ten(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / 'data', n=12, notes=20)
    first = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    for i in range(0, 12, 2):
        token_file(tmp_path / 'cache', data / f'song_{i:02d}.mid').unlink()
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', num_workers=1))
    assert len(calls) == 6 and capsys.readouterr().out.count('token file missing; tokenizing again') == 6

    for npy in settings_folder(tmp_path / 'cache').glob('*.npy'):
        npy.unlink()
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', num_workers=1))
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith('cache: dropping') for line in lines) == 11  # ten listed, then one line for the rest
    assert len(calls) == 6 + 12


@pytest.mark.parametrize('text', [b'', b'{"files": {"song_00.mid": {"st', b'{}', b'[]', b'{"files": [], "meta": {}}',
                                  b'\xff\xfe\x00garbage'], ids=['empty', 'cut short', 'no keys', 'list', 'wrong types',
                                                                'not text'])
def test_damaged_index_is_dropped_with_one_line_and_rebuilt(tmp_path, monkeypatch, capsys, text):
    data = make_folder(tmp_path / 'data', n=4)
    first = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    (index,) = settings_folder(tmp_path / 'cache').glob('index*.json')
    index.write_bytes(text)
    second = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    out = capsys.readouterr().out
    assert out.count('cache: dropping') == 1 and f'cache: dropping {index.name}: ' in out
    calls = count_tokenizations(monkeypatch)
    third = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    assert same_tokens(first, second) and same_tokens(first, third) and calls == []


def test_malformed_index_entries_are_dropped_and_the_rest_kept(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / 'data', n=4)
    first = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    (index_file,) = settings_folder(tmp_path / 'cache').glob('index*.json')
    index = json.loads(index_file.read_text())
    digest = index['files']['song_01.mid']['hash']
    index['files']['song_00.mid'] = 'not an entry'
    index['meta'][digest] = {'n_notes': 'sixty'}
    index_file.write_text(json.dumps(index))
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', num_workers=1))
    out = capsys.readouterr().out
    assert out.count('cache: dropping') == 2 and 'song_00.mid: malformed index entry' in out
    assert calls == [digest]  # song_00 was only hashed again: its tokens were sound


def test_interrupted_tokenization_keeps_the_files_done(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=10, notes=20)
    real = token_cache._tokenize_job
    calls = []

    def ctrl_c_at_the_fourth_file(job):
        calls.append(job[0])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(token_cache, '_tokenize_job', ctrl_c_at_the_fourth_file)
    with pytest.raises(KeyboardInterrupt):
        load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    monkeypatch.undo()
    calls = count_tokenizations(monkeypatch)
    entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert len(calls) == 7 and len(entries) == 10 and all(e['n_notes'] == 20 for e in entries.values())


KILLED_CHILD = '''
import os, signal, sys
import token_cache, tokens
token_cache.INDEX_SAVE_SECONDS = 0  # save the index after every file
real, calls = token_cache._tokenize_job, []
def killed_at_the_fourth_file(job):
    calls.append(job)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no Python cleanup runs: only what was saved survives
    return real(job)
token_cache._tokenize_job = killed_at_the_fourth_file
token_cache.load_token_cache(sys.argv[1], tokens.tokenization_settings(), sys.argv[2], num_workers=1, verbose=False)
'''


def child_env():
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS='1')


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
def test_killed_tokenization_keeps_the_files_saved_before(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=10, notes=20)
    child = subprocess.run([sys.executable, '-c', KILLED_CHILD, str(data), str(tmp_path / 'cache')], env=child_env(),
                           capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()
    calls = count_tokenizations(monkeypatch)
    entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert len(calls) == 7 and len(entries) == 10


CTRL_C_CHILD = '''
import os, signal, sys
import token_cache, tokens
token_cache.INDEX_SAVE_SECONDS = 0  # save the index after every file
real, calls = token_cache._tokenize_job, []
def ctrl_c_from_a_worker(job):  # the forked workers inherit it
    calls.append(job)
    if len(calls) == 20 and not os.path.exists(sys.argv[3]):
        open(sys.argv[3], 'w').close()
        os.killpg(0, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group, this worker first
    return real(job)
token_cache._tokenize_job = ctrl_c_from_a_worker
try:
    token_cache.load_token_cache(sys.argv[1], tokens.tokenization_settings(), sys.argv[2], num_workers=2, verbose=False)
except KeyboardInterrupt:
    print('stopped')
    sys.exit(130)
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='process groups')
def test_ctrl_c_during_tokenizing_with_a_worker_pool_stops_at_once_without_a_traceback(tmp_path):
    # workers that raised KeyboardInterrupt as well as the main process printed tracebacks and once left the pool
    # hung for good: only the main process may act on Ctrl-C
    data = make_folder(tmp_path / 'data', n=60, notes=20)
    child = subprocess.Popen([sys.executable, '-c', CTRL_C_CHILD, str(data), str(tmp_path / 'cache'),
                              str(tmp_path / 'sent')], env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130 and out == 'stopped\n', err
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
    entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert len(entries) == 60 and all(e['n_notes'] == 20 for e in entries.values())  # and the cache still works


def test_old_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    data = make_folder(tmp_path / 'data', n=2)
    load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    old, recent = (settings_folder(tmp_path / 'cache') / f'{"0" * 40}.npy.{pid}.tmp' for pid in (11, 12))
    old.write_bytes(b'half')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent.write_bytes(b'half')  # could belong to a writer still at work
    write_midi(data / 'new.mid', melody(50, seed=5))
    load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    assert not old.exists() and recent.exists()


def test_two_datasets_sharing_a_cache_keep_each_others_entries(tmp_path, monkeypatch):
    x = make_folder(tmp_path / 'x', n=4)
    y = tmp_path / 'y'
    y.mkdir()
    for i in range(4):
        write_midi(y / f'song_{i:02d}.mid', melody(60, seed=10 + i))  # same names as in x, other music
    (y / 'shared.mid').write_bytes((x / 'song_03.mid').read_bytes())
    cache = tmp_path / 'cache'
    calls = count_tokenizations(monkeypatch)
    load_token_cache(x, MS, cache, num_workers=1, verbose=False)
    y_first = load_token_cache(y, MS, cache, num_workers=1, verbose=False)
    assert len(calls) == 8  # shared.mid has song_03.mid's content: tokenized once, for x
    load_token_cache(x, MS, cache, num_workers=1, verbose=False)
    assert same_tokens(y_first, load_token_cache(y, MS, cache, num_workers=1, verbose=False))
    assert len(calls) == 8

    # a file leaving x deletes its tokens only when no other dataset has them
    x_only = token_file(cache, x / 'song_00.mid')
    (x / 'song_00.mid').unlink()
    (x / 'song_03.mid').unlink()
    load_token_cache(x, MS, cache, num_workers=1, verbose=False)
    assert not x_only.exists() and token_file(cache, y / 'shared.mid').exists()
    assert same_tokens(y_first, load_token_cache(y, MS, cache, num_workers=1, verbose=False)) and len(calls) == 8


def test_cache_from_before_per_dataset_indexes_is_reused_and_replaced(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=4)
    first = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    (index,) = settings_folder(tmp_path / 'cache').glob('index-*.json')
    legacy = index.with_name('index.json')  # the single index of older versions: the same entries, no 'root'
    legacy.write_text(json.dumps({k: v for k, v in json.loads(index.read_text()).items() if k != 'root'}))
    index.unlink()
    # another dataset going first leaves it alone: its entries are not that dataset's to delete
    load_token_cache(make_folder(tmp_path / 'other', n=2, notes=30), MS, tmp_path / 'cache', verbose=False)
    assert legacy.exists() and token_file(tmp_path / 'cache', data / 'song_00.mid').exists()
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', verbose=False)) and calls == []
    assert index.exists() and not legacy.exists()


RACE_CHILD = '''
import contextlib, io, json, os, sys, time
from pathlib import Path
import numpy as np
import dataset, tokens
data, runs, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
real_save = np.save
def slow_save(file, array, *args, **kwargs):  # a slow (network) disk: each file stays half written for a while
    buffer = io.BytesIO()
    real_save(buffer, array, *args, **kwargs)
    data = buffer.getvalue()
    with open(file, 'wb') if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
        f.write(data[:64])
        f.flush()
        time.sleep(0.01)
        f.write(data[64:])
if me == 'a':  # one process writes slowly while the other reads what it writes
    np.save = slow_save
for attempt in range(3):
    gate = runs / f'gate{attempt}'
    gate.mkdir(exist_ok=True)
    (gate / me).touch()
    while len(list(gate.iterdir())) < 2:  # both processes start building the same moment
        time.sleep(0.001)
    _, _, summary = dataset.load_corpus(data, tokens.tokenization_settings(), runs / f'cache{attempt}', min_notes=10,
                                        verbose=False)
    print(json.dumps([summary['train_tokens'], summary['val_tokens']]))
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='no lock without fcntl')
def test_two_processes_building_one_cache_at_once_both_succeed(tmp_path):
    data = make_folder(tmp_path / 'data', n=40, notes=30)
    children = [subprocess.Popen([sys.executable, '-c', RACE_CHILD, str(data), str(tmp_path), name], env=child_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in 'ab']
    deadline = time.monotonic() + 120
    # until both are done, one fails (the other would wait for it forever) or time is up
    while time.monotonic() < deadline and not all(c.poll() == 0 for c in children):
        if any(c.poll() not in (None, 0) for c in children):
            break
        time.sleep(0.05)
    for child in children:
        child.kill()
    outputs = [child.communicate() for child in children]
    assert [child.returncode for child in children] == [0, 0], '\n'.join(err[-2000:] for _, err in outputs)
    results = [out.splitlines() for out, _ in outputs]
    assert len(results[0]) == 3 and results[0] == results[1]
    assert len(set(results[0])) == 1  # the same corpus every time


def refuse_writes(monkeypatch, error):
    """Every cache write goes through write_atomically or np.save: record the attempts and fail them."""
    attempts = []

    def refused(*args, **kwargs):
        attempts.append(args[0])
        raise error
    monkeypatch.setattr(token_cache, 'write_atomically', refused)
    monkeypatch.setattr(np, 'save', refused)
    return attempts


def test_unchanged_cache_is_read_without_writing_anything(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=5)
    first = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    # tests run as root, which ignores permission bits: a read-only mount is simulated by refusing writes
    attempts = refuse_writes(monkeypatch, PermissionError(errno.EACCES, 'Permission denied'))
    second = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    assert attempts == [] and same_tokens(first, second)


def test_read_only_cache_tokenizes_what_changed_in_memory(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / 'data', n=5)
    first = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    write_midi(data / 'new.mid', melody(50, seed=50))
    write_midi(data / 'song_01.mid', melody(70, seed=51))
    attempts = refuse_writes(monkeypatch, OSError(errno.EROFS, 'Read-only file system'))
    second = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    out = capsys.readouterr().out
    assert out.count('cache: cannot write') == 1 and 'Read-only file system' in out and len(attempts) == 1
    assert second['new.mid']['n_notes'] == 50 and second['song_01.mid']['n_notes'] == 70
    assert np.array_equal(second['song_02.mid']['tokens'], first['song_02.mid']['tokens']) and len(second) == 6


# -----------------------------------------------------------------------------
# one damaged file costs one file

def deflated_zip(path, members):
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_corrupt_zip_member_is_skipped_and_the_others_kept(tmp_path, capsys):
    midi = {f'{name}.mid': write_midi(tmp_path / f'{name}.mid', melody(50, seed=i)).read_bytes()
            for i, name in enumerate('abc')}
    (tmp_path / 'data').mkdir()
    archive = deflated_zip(tmp_path / 'data' / 'tunes.zip', midi)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo('b.mid')
    raw = bytearray(archive.read_bytes())
    data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # after the local file header
    raw[data_start] = 0xFF  # deflate block type 3 does not exist: zlib.error on reading
    archive.write_bytes(bytes(raw))
    train, val, summary = load_corpus(tmp_path / 'data', MS, tmp_path / 'cache', min_notes=10)
    out = capsys.readouterr().out
    assert out.count('skipping tunes.zip::b.mid: cannot read (') == 1 and 'invalid block type' in out
    assert summary['files'] == 2 and len(train) + len(val) == 2


def test_zip_inside_a_zip_is_read_one_level_deep(tmp_path, monkeypatch, capsys):
    tune = {f't{i}.mid': write_midi(tmp_path / f't{i}.mid', melody(50, seed=i)).read_bytes() for i in range(4)}
    inner = deflated_zip(tmp_path / 'inner.zip', {'t1.mid': tune['t1.mid'], 'folder/t2.mid': tune['t2.mid']})
    deepest = deflated_zip(tmp_path / 'deepest.zip', {'t3.mid': tune['t3.mid']})
    middle = deflated_zip(tmp_path / 'middle.zip', {'deepest.zip': deepest.read_bytes()})
    (tmp_path / 'data').mkdir()
    deflated_zip(tmp_path / 'data' / 'outer.zip', {'t0.mid': tune['t0.mid'], 'inner.zip': inner.read_bytes(),
                                                   'middle.zip': middle.read_bytes()})
    names = [s[0] for s in find_midi_sources(tmp_path / 'data')]
    assert names == ['outer.zip::inner.zip::folder/t2.mid', 'outer.zip::inner.zip::t1.mid', 'outer.zip::t0.mid']
    assert 'skipping outer.zip::middle.zip::deepest.zip: ' in capsys.readouterr().out
    entries = load_token_cache(tmp_path / 'data', MS, tmp_path / 'cache', verbose=False)
    assert sorted(entries) == sorted(names) and all(e['n_notes'] == 50 for e in entries.values())
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(entries, load_token_cache(tmp_path / 'data', MS, tmp_path / 'cache', verbose=False))
    assert calls == []


def write_bytes_name(folder, name, data):
    """A file whose name is bytes that are not UTF-8 (Linux allows any bytes but '/' and NUL)."""
    fd = os.open(os.fsencode(folder) + b'/' + name, os.O_WRONLY | os.O_CREAT)
    os.write(fd, data)
    os.close(fd)


@pytest.mark.skipif(sys.platform in ('win32', 'darwin'), reason='file names must be valid Unicode there')
def test_file_names_that_are_not_utf8_are_split_cached_and_printed(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / 'data', n=3)
    write_bytes_name(data, b'caf\xe9.mid', (data / 'song_00.mid').read_bytes())
    write_bytes_name(data, b'bad\xff.mid', b'not a MIDI file')
    for run in range(2):
        if run == 1:  # the second run reads the names back from the cache's index
            calls = count_tokenizations(monkeypatch)
        train, val, summary = load_corpus(data, MS, tmp_path / 'cache', min_notes=10)
        assert summary['files'] == 5 and summary['skipped'] == 1 and len(train) + len(val) == 4
        assert 'skipping bad\\xff.mid: ' in capsys.readouterr().out
    assert calls == []


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
# the validation sample

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


def test_packed_windows_change_their_cuts_per_epoch_and_repeat_for_the_same_epoch():
    ds = PackedDataset(tunes(), 16, seed=3)
    first = [ds[i].tolist() for i in range(3)]
    assert first == [ds[i].tolist() for i in range(3)]
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        offsets.add(tuple(ds[0].tolist()))
    assert len(offsets) > 1


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


# -----------------------------------------------------------------------------
# tracks='melody': one melodic line per file (the part that carries the tune, made monophonic)

import mido  # noqa: E402  (this section's files have several tracks, which conftest's write_midi does not make)

from token_cache import _settings_key  # noqa: E402
from tokens import MELODY_NAME, _track_name, melody_part, skyline  # noqa: E402

SIXTEENTHS = tokenization_settings('beats', 4)  # a step is a 16th note: 120 ticks at 480 ticks per quarter
ONE_LINE = tokenization_settings('beats', 4, tracks='melody')

# a pop song's parts, (start_tick, duration_tick, pitch): 16 quarter notes of tune, 8 half notes of bass, 4 bars of
# whole-note triads, 32 eighth notes of kick and hi-hat
TUNE = [(i * 480, 480, p) for i, p in enumerate([72, 74, 76, 77, 79, 77, 76, 74] * 2)]  # mean pitch 75.6
BASS = [(i * 960, 960, p) for i, p in enumerate([36, 43, 41, 43] * 2)]
CHORDS = [(bar * 1920, 1920, p) for bar, chord in enumerate([(60, 64, 67), (65, 69, 72), (67, 71, 74), (60, 64, 67)])
          for p in chord]  # mean pitch 66.7
DRUMS = [(i * 240, 120, 42 if i % 2 else 36) for i in range(32)]


def write_parts(path, parts, file_format=1):
    """parts: (track name or None, channel, [(start_tick, duration_tick, pitch), ...]), 480 ticks per quarter.
    Format 1: a tempo track, then a track per part; format 0: every part on one track, named after the first part."""
    def track(events):  # (tick, rank, message): at one tick names, then note_offs, then note_ons
        out, previous = mido.MidiTrack(), 0
        for tick, _, message in sorted(events, key=lambda e: e[:2]):
            out.append(message.copy(time=tick - previous))
            previous = tick
        return out

    tempo = [(0, 0, mido.MetaMessage('set_tempo', tempo=500000))]
    bodies = []
    for name, channel, notes in parts:
        events = [(0, 0, mido.MetaMessage('track_name', name=name))] if name else []
        for start, duration, pitch in notes:
            events.append((start, 2, mido.Message('note_on', channel=channel, note=pitch, velocity=80)))
            events.append((start + duration, 1, mido.Message('note_off', channel=channel, note=pitch, velocity=0)))
        bodies.append(events)
    mid = mido.MidiFile(type=file_format, ticks_per_beat=480)
    if file_format == 0:
        mid.tracks.append(track(tempo + [event for body in bodies for event in body]))
    else:
        mid.tracks += [track(tempo)] + [track(body) for body in bodies]
    mid.save(str(path))
    return path


def notes_kept(path, settings=ONE_LINE):
    """[start_step, duration_steps, pitch] of the tokens a file gives."""
    return tokens_to_notes(tokenize_midi(path.read_bytes(), settings)[0])


def in_steps(*parts):
    """The notes of parts on the 16th-note grid of SIXTEENTHS, in token order (start, then pitch), from the first
    onset."""
    notes = sorted(([start // 120, duration // 120, pitch] for part in parts for start, duration, pitch in part),
                   key=lambda note: (note[0], note[2]))
    return [[start - notes[0][0], duration, pitch] for start, duration, pitch in notes]


def pop_song(tmp_path):
    return write_parts(tmp_path / 'pop.mid', [(None, 0, TUNE), (None, 1, BASS), (None, 2, CHORDS), (None, 9, DRUMS)])


def test_melody_of_unnamed_parts_is_the_part_with_the_highest_mean_pitch(tmp_path):
    path = pop_song(tmp_path)
    assert notes_kept(path) == in_steps(TUNE)  # bass, chords and drums gone; the tune exactly as written
    assert [n[2] for n in notes_kept(path, tokenization_settings('ms', tracks='melody'))] == [p for _, _, p in TUNE]
    # drums are never the tune, even when kept in 'all' tracks
    assert notes_kept(path, tokenization_settings('beats', 4, include_drums=True, tracks='melody')) == in_steps(TUNE)


def test_track_named_melody_wins_over_a_higher_piano_track_as_in_pop909(tmp_path):
    tune = [(start, duration, pitch - 12) for start, duration, pitch in TUNE]  # below the piano, mean 63.6
    bridge = [(i * 960, 480, 70) for i in range(8)]
    piano = [(bar * 1920, 1920, p) for bar in range(4) for p in (76, 79, 84)]  # mean 79.7, all on channel 0 too
    parts = [('MELODY', 0, tune), ('BRIDGE', 0, bridge), ('PIANO', 0, piano)]
    assert notes_kept(write_parts(tmp_path / 'named.mid', parts)) == in_steps(tune)
    # without the names the highest part, the piano, is the tune: its top line (84 of each chord)
    unnamed = [(None, channel, notes) for _, channel, notes in parts]
    assert notes_kept(write_parts(tmp_path / 'unnamed.mid', unnamed)) == [[bar * 16, 16, 84] for bar in range(4)]


def test_track_named_melody_with_fewer_than_eight_notes_is_not_the_tune(tmp_path):
    parts = [('Lead Vocal', 0, TUNE[:7]), (None, 1, TUNE[7:]), (None, 2, BASS)]
    assert notes_kept(write_parts(tmp_path / 'short.mid', parts)) == in_steps(TUNE[7:])


def test_format_0_file_keeps_the_channel_of_the_tune_and_ignores_its_title(tmp_path):
    tune = [(i * 480, 480, p) for i, p in enumerate([72, 74, 76, 77, 79, 77, 76, 74] * 5)]  # 40 notes
    bells = [(i * 240, 240, 96) for i in range(8)]  # high, but fewer than a quarter of the tune's notes
    # the one track is named after the song: were its name read, every part would be 'named' and the bells win
    parts = [('Melody of the Night', 0, BASS), (None, 1, CHORDS), (None, 2, tune), (None, 3, bells), (None, 9, DRUMS)]
    path = write_parts(tmp_path / 'format0.mid', parts, file_format=0)
    assert mido.MidiFile(str(path)).type == 0 and len(mido.MidiFile(str(path)).tracks) == 1
    assert notes_kept(path) == in_steps(tune)


def test_piano_chords_become_one_line_where_the_highest_onset_wins_and_a_new_onset_ends_the_old_note(tmp_path):
    piano = [(0, 960, 60), (0, 960, 64), (0, 960, 67),     # C chord, 8 steps
             (480, 240, 72),                               # a melody note at step 4, inside the chord
             (960, 480, 65), (960, 480, 69), (960, 480, 72),  # F chord at step 8
             (1080, 480, 53),                              # a lower note at step 9, while the F chord sounds
             (1440, 480, 60), (1450, 480, 64),             # a rolled chord: both start on step 12
             (1920, 240, 70)]                              # alone, after a rest
    path = write_midi(tmp_path / 'piano.mid', piano)
    assert notes_kept(path) == [[0, 4, 67],   # top of the chord, cut where the melody note starts
                                [4, 2, 72],   # ends before the chord does: the chord's lower notes do not come back
                                [8, 1, 72],   # top of the F chord, ended by the onset of 53
                                [9, 3, 53],   # a new onset wins even when lower; cut by the next onset
                                [12, 4, 64],  # the higher of the rolled chord
                                [16, 2, 70]]
    assert tokenize_midi(path.read_bytes(), ONE_LINE)[1] == 6


def test_skyline_on_the_step_grid():
    assert skyline([]) == []
    assert skyline([[0, 4, 60], [0, 4, 67], [2, 1, 50], [8, 2, 62], [8, 2, 62]]) == [[0, 2, 67], [2, 1, 50], [8, 2, 62]]


def test_melody_names_match_whole_words_in_any_case_and_encoding():
    for name in ('MELODY', 'Melody 1', 'melody2', 'Lead Vocal', 'Voice 1', 'vocals', 'VOX', 'Singer', 'Mélodie',
                 'MELODÍA'):
        assert MELODY_NAME.search(name), name
    for name in ('melodic', 'Lead Guitar', 'Lead', 'PIANO', 'BRIDGE', 'voiceover', ''):
        assert not MELODY_NAME.search(name), name
    assert _track_name('Melodía'.encode()) == _track_name('Melodía'.encode('latin-1')) == 'Melodía'


def test_melody_part_of_nothing_or_drums_only_is_empty_and_tiny_parts_still_give_a_line():
    assert melody_part([], []) == []
    assert melody_part([['note', 0, 1, 9, 36, 80, 0]], [b'']) == []
    tiny = [['note', 0, 1, 0, 60, 80, 0], ['note', 1, 1, 1, 72, 80, 0]]
    assert melody_part(tiny, [b'']) == [tiny[1]]  # no part has 8 notes: every part competes


def test_all_tracks_keep_every_non_drum_note_merged_as_before(tmp_path):
    pop = pop_song(tmp_path)
    assert notes_kept(pop, SIXTEENTHS) == in_steps(TUNE, BASS, CHORDS)  # stacked parts, drums left out
    assert tokenize_midi(pop.read_bytes(), SIXTEENTHS)[1] == len(TUNE + BASS + CHORDS)
    # tracks='all' and a settings dict from before tracks existed give the same tokens
    for path in (pop, write_midi(tmp_path / 'tune.mid', melody(40))):
        tokens = tokenize_midi(path.read_bytes(), SIXTEENTHS)[0]
        assert tokens.tolist() == tokenize_midi(path.read_bytes(), dict(SIXTEENTHS, tracks='all'))[0].tolist()
        assert 'tracks' not in SIXTEENTHS


def test_cache_key_of_all_tracks_is_the_key_from_before_and_melody_has_its_own(tmp_path):
    before = {'version': 1, 'timing': 'ms', 'timing_factor': 32, 'beat_division': 12, 'include_drums': False}
    assert tokenization_settings() == tokenization_settings(tracks='all') == before
    assert _settings_key(before) == 'fe84d281fb72'  # the key of every cache written before tracks existed
    assert _settings_key(tokenization_settings(tracks='melody')) != _settings_key(before)
    with pytest.raises(ValueError, match='tracks'):
        tokenization_settings(tracks='bass')
    # a checkpoint's settings without 'tracks' still tokenize (as 'all') and decode
    path = pop_song(tmp_path)
    tokens = tokenize_midi(path.read_bytes(), before)[0]
    assert len(detokenize(tokens, tmp_path / 'old.mid', before)) == len(TUNE + BASS + CHORDS)
    # one cache folder holds both, side by side
    folder = tmp_path / 'data'
    folder.mkdir()
    write_parts(folder / 'pop.mid', [(None, 0, TUNE), (None, 1, BASS), (None, 2, CHORDS), (None, 9, DRUMS)])
    cache = tmp_path / 'cache'
    every = load_token_cache(folder, SIXTEENTHS, cache, verbose=False)['pop.mid']
    tune = load_token_cache(folder, ONE_LINE, cache, verbose=False)['pop.mid']
    assert (every['n_notes'], tune['n_notes']) == (len(TUNE + BASS + CHORDS), len(TUNE))
    assert sorted(p.name for p in cache.iterdir()) == sorted([_settings_key(SIXTEENTHS), _settings_key(ONE_LINE)])


def test_drums_only_file_in_melody_tracks_is_skipped_as_too_short(tmp_path, capsys):
    folder = tmp_path / 'data'
    folder.mkdir()
    write_parts(folder / 'drums.mid', [(None, 9, DRUMS)])
    write_parts(folder / 'pop.mid', [(None, 0, TUNE), (None, 1, BASS), (None, 9, DRUMS)])
    train, val, summary = load_corpus(folder, ONE_LINE, tmp_path / 'cache', min_notes=8, val_fraction=0)
    assert summary['skipped_short'] == 1 and [len(t) for t in train] == [1 + 2 * 16 + 15]


def test_grammar_table_allows_every_pair_the_tokenizer_writes_and_nothing_else_of_the_pattern():
    table = tokens.grammar_table()
    # a chord (notes 0 steps apart: no time token between them), a long gap (clipped) and a short note, both timings
    notes = [['note', 0, 400, 0, 60, 90], ['note', 0, 400, 0, 64, 90], ['note', 5000, 10, 0, 67, 90],
             ['note', 5100, 300, 0, 127, 90], ['note', 5200, 300, 0, 0, 90]]
    for timing in ('ms', 'beats'):
        ids = torch.tensor(tokens.tokenize_notes(notes, tokens.tokenization_settings(timing)))
        assert bool(table[ids[:-1], ids[1:]].all())
    time, duration, pitch = 3, DUR_OFFSET + 5, PITCH_OFFSET + 60
    for before, after in [(time, time), (START_IDX, time), (START_IDX, pitch), (duration, duration),
                          (duration, PITCH_OFFSET + 128), (pitch, pitch), (pitch, START_IDX), (time, PAD_IDX)]:
        assert not table[before, after], (before, after)
    for before, after in [(pitch, time), (pitch, duration), (PAD_IDX, duration), (PITCH_OFFSET + 500, time)]:
        assert table[before, after], (before, after)
    assert table.shape == (NUM_TOKENS, NUM_TOKENS)
