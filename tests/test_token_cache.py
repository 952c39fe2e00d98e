"""token_cache.py: finding MIDI files in folders and zips, the token cache, how it heals itself, damaged files."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import TMIDIX
import token_cache
from dataset import load_corpus
from tests.conftest import (
    BASS,
    BEATS,
    CHORDS,
    DRUMS,
    MS,
    ONE_LINE,
    SIXTEENTHS,
    TUNE,
    make_folder,
    melody,
    pop_song,
    write_midi,
    write_parts,
)
from token_cache import DatasetError, _settings_key, find_midi_sources, load_token_cache
from tokens import (
    NUM_TOKENS,
    PAD_IDX,
    START_IDX,
    detokenize,
    tokenization_settings,
    tokenize_midi,
)


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


# -----------------------------------------------------------------------------
# the token cache heals itself

def settings_folder(cache):
    (folder,) = Path(cache).iterdir()  # one tokenization setting: one folder
    return folder


def token_file(cache, midi_path):
    return settings_folder(cache) / f'{hashlib.sha1(Path(midi_path).read_bytes()).hexdigest()}.npy'


def consolidated_file(cache):
    (path,) = settings_folder(cache).glob('tokens-*.npy')
    return path


def stopped_while_consolidating(data, cache, monkeypatch, at=3):
    """A first tokenization stopped by Ctrl-C while it writes the consolidated file: the at-th content read into
    it raises. Returns the entries the run would have given, from a cache of their own."""
    reference = load_token_cache(data, MS, Path(cache).with_name('reference'), num_workers=1, verbose=False)
    real, reads = token_cache._CacheFolder.load, []

    def ctrl_c(self, *args):
        reads.append(args[0])
        if len(reads) == at:
            raise KeyboardInterrupt
        return real(self, *args)
    with monkeypatch.context() as patched:
        patched.setattr(token_cache._CacheFolder, 'load', ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            load_token_cache(data, MS, cache, num_workers=1, verbose=False)
    return {name: dict(e, tokens=np.array(e['tokens'])) for name, e in reference.items()}


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


@pytest.mark.parametrize('mmap', [False, True], ids=['in memory', 'memory-mapped'])
@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_token_file_is_dropped_with_one_line_and_tokenized_again(tmp_path, monkeypatch, capsys, damage, mmap):
    # a token file of its own per content: a first tokenization stopped before its end consolidated them
    if mmap:  # a cache larger than a quarter of RAM maps such files; their entries are checked the same way
        monkeypatch.setattr(token_cache, '_physical_memory', lambda: 0)
    data = make_folder(tmp_path / 'data', n=5)
    first = stopped_while_consolidating(data, tmp_path / 'cache', monkeypatch)
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
    first = stopped_while_consolidating(data, tmp_path / 'cache', monkeypatch)
    for i in range(0, 12, 2):
        token_file(tmp_path / 'cache', data / f'song_{i:02d}.mid').unlink()
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', num_workers=1))
    assert len(calls) == 6 and capsys.readouterr().out.count('token file missing; tokenizing again') == 6

    stopped_while_consolidating(data, tmp_path / 'again', monkeypatch)
    del calls[6:]  # the tokenizations of that stopped run
    for npy in settings_folder(tmp_path / 'again').glob('*.npy'):
        npy.unlink()
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'again', num_workers=1))
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
    # workers that raise KeyboardInterrupt as well as the main process print tracebacks and can leave the pool
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

    # a file leaving x leaves x's consolidated file; y's holds its own copy of what they share
    x_only = token_file(cache, x / 'song_00.mid').stem
    (x / 'song_00.mid').unlink()
    (x / 'song_03.mid').unlink()
    load_token_cache(x, MS, cache, num_workers=1, verbose=False)
    packed = [json.loads(path.read_text())['packed']['digests'] for path in settings_folder(cache).glob('index-*')]
    assert sorted(map(len, packed)) == [2, 5] and not any(x_only in digests for digests in packed)
    assert sorted(p.name[:7] for p in settings_folder(cache).glob('*.npy')) == ['tokens-', 'tokens-']
    assert same_tokens(y_first, load_token_cache(y, MS, cache, num_workers=1, verbose=False)) and len(calls) == 8


def test_cache_from_before_per_dataset_indexes_is_reused_and_replaced(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=4)
    first = load_token_cache(data, MS, tmp_path / 'cache', verbose=False)
    (index,) = settings_folder(tmp_path / 'cache').glob('index-*.json')
    # the legacy layout: a single index of the same entries without 'root', and a token file per content
    legacy = index.with_name('index.json')
    legacy.write_text(json.dumps({k: v for k, v in json.loads(index.read_text()).items() if k in ('files', 'meta')}))
    index.unlink()
    consolidated_file(tmp_path / 'cache').unlink()
    for name, entry in first.items():
        token_cache._save_npy(token_file(tmp_path / 'cache', data / name), np.array(entry['tokens']))
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



@pytest.mark.parametrize('cause', ['full disk', 'damaged entry'])
def test_a_cache_line_while_the_tokenizing_bar_is_shown_stands_on_a_line_of_its_own(tmp_path, monkeypatch, capsys,
                                                                                     cause):
    data = make_folder(tmp_path / 'data', n=5)
    if cause == 'full disk':  # the first token file written fails, after the bar is drawn
        refuse_writes(monkeypatch, OSError(errno.ENOSPC, 'No space left on device'))
        line = ('cache: cannot write to ', 'No space left on device); tokenizing in memory for this run')
    else:  # files touched since, whose tokens are found damaged as each is hashed again under the bar
        load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
        (packed,) = settings_folder(tmp_path / 'cache').glob('tokens-*.npy')
        raw = bytearray(packed.read_bytes())
        raw[-3] ^= 0xFF  # a token id far outside the vocabulary
        packed.write_bytes(bytes(raw))
        for song in data.iterdir():
            os.utime(song, (time.time() + 5, time.time() + 5))
        line = ('cache: dropping ', f'outside the vocabulary of {NUM_TOKENS}; tokenizing again')
    monkeypatch.setattr(sys, 'stderr', sys.stdout)  # the bar and the lines on one stream, as in a terminal
    load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    out = capsys.readouterr().out
    shown = [text.split('\r')[-1] for text in out.splitlines()]  # what a terminal shows of each line
    assert 'tokenizing:' in out and any(text.startswith(line[0]) and text.endswith(line[1]) for text in shown), out


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
    assert summary['files'] == 3 and summary['skipped'] == 1 and len(train) + len(val) == 2


def test_a_zip_member_with_a_bad_crc_is_one_line_and_counted_with_the_skipped_files(tmp_path, capsys):
    make_folder(tmp_path / 'data', n=3)
    tunes = {f'{name}.mid': write_midi(tmp_path / f'{name}.mid', melody(50, seed=i)).read_bytes()
             for i, name in enumerate('ab')}
    archive = tmp_path / 'data' / 'tunes.zip'
    with zipfile.ZipFile(archive, 'w', zipfile.ZIP_STORED) as zf:  # stored: the flipped byte reaches the CRC check
        for name, data in tunes.items():
            zf.writestr(name, data)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo('b.mid')
    raw = bytearray(archive.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 20] ^= 0xFF  # inside b.mid's bytes
    archive.write_bytes(bytes(raw))
    for _ in range(2):  # and again from the cache: the damaged member is read again, and counted again
        train, val, summary = load_corpus(tmp_path / 'data', MS, tmp_path / 'cache', min_notes=10)
        out = capsys.readouterr().out
        assert out.count('\n') == 1 and out == "skipping tunes.zip::b.mid: cannot read (Bad CRC-32 for file 'b.mid')\n"
        assert summary['files'] == 5 and summary['skipped'] == 1 and len(train) + len(val) == 4


def unreadable_zip(kind, tmp_path):
    """(zip bytes that cannot be opened as a zip, the reason zipfile gives) for each way a whole zip is damaged."""
    tune = write_midi(tmp_path / 'tune.mid', melody(50)).read_bytes()
    good = deflated_zip(tmp_path / 'good.zip', {'a.mid': tune, 'b.mid': tune}).read_bytes()
    if kind == 'not a zip':  # a MIDI file, or anything else, named .zip
        return tune, 'File is not a zip file'
    if kind == 'cut short':  # a download stopped halfway: the central directory at the end is missing
        return good[:len(good) // 2], 'File is not a zip file'
    central = good.rindex(b'PK\x01\x02')  # the last central directory entry's signature
    return good[:central] + b'XXXX' + good[central + 4:], 'Bad magic number for central directory'


@pytest.mark.parametrize('kind', ['not a zip', 'cut short', 'bad central directory'])
def test_a_zip_that_cannot_be_opened_is_one_line_and_counted_with_the_skipped_files(tmp_path, capsys, kind):
    make_folder(tmp_path / 'data', n=3)
    bad, reason = unreadable_zip(kind, tmp_path)
    (tmp_path / 'data' / 'tunes.zip').write_bytes(bad)
    (tmp_path / 'data' / 'outer.zip').write_bytes(deflated_zip(tmp_path / 'outer.zip', {'inner.zip': bad}).read_bytes())
    for _ in range(2):  # and again from the cache
        train, val, summary = load_corpus(tmp_path / 'data', MS, tmp_path / 'cache', min_notes=10)
        out = capsys.readouterr().out
        assert out.splitlines() == [f'skipping outer.zip::inner.zip: not a readable zip archive ({reason})',
                                    f'skipping tunes.zip: not a readable zip archive ({reason})'], out
        assert summary['files'] == 5 and summary['skipped'] == 2 and len(train) + len(val) == 3


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='FIFOs and symlinks')
def test_a_fifo_or_a_dangling_link_named_mid_is_one_line_and_counted_with_the_skipped_files(tmp_path, capsys):
    make_folder(tmp_path / 'data', n=3)
    os.mkfifo(tmp_path / 'data' / 'pipe.mid')  # opening it to read would wait for a writer for ever
    os.mkfifo(tmp_path / 'data' / 'pipe.zip')
    (tmp_path / 'data' / 'x.mid').symlink_to(tmp_path / 'gone.mid')
    train, val, summary = load_corpus(tmp_path / 'data', MS, tmp_path / 'cache', min_notes=10)
    out = capsys.readouterr().out
    assert out.splitlines() == ['skipping pipe.mid: not a regular file', 'skipping pipe.zip: not a regular file',
                                f'skipping x.mid: a link to {tmp_path / "gone.mid"}, which does not exist'], out
    assert summary['files'] == 6 and summary['skipped'] == 3 and len(train) + len(val) == 3


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='FIFOs')
def test_reading_a_fifo_put_where_a_midi_file_was_listed_does_not_wait_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / 'song.mid')
    # a reader stuck on the FIFO is let go after 10 s (a writer opens and closes it), so a failure cannot hang
    release = threading.Timer(10, lambda: os.close(os.open(tmp_path / 'song.mid', os.O_WRONLY)))
    release.start()
    try:
        with pytest.raises(token_cache.NotMidiFile, match='not a regular file'):
            token_cache._read_source(tmp_path / 'song.mid', None, {})
    finally:
        release.cancel()


def test_a_folder_named_like_a_midi_file_is_read_as_a_folder_on_disk_and_in_a_zip(tmp_path, capsys):
    (tmp_path / 'data' / 'songs.mid').mkdir(parents=True)
    tune = write_midi(tmp_path / 'data' / 'songs.mid' / 'tune.mid', melody(50)).read_bytes()
    with zipfile.ZipFile(tmp_path / 'data' / 'set.zip', 'w') as zf:
        zf.mkdir('more.mid')  # a folder entry 'more.mid/' of its own
        zf.writestr('more.mid/tune.mid', tune)
    names = [source[0] for source in find_midi_sources(tmp_path / 'data')]
    assert names == ['set.zip::more.mid/tune.mid', 'songs.mid/tune.mid'] and capsys.readouterr().out == ''


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


def test_cache_key_of_all_tracks_is_the_key_from_before_and_melody_has_its_own(tmp_path):
    before = {'version': 1, 'timing': 'ms', 'timing_factor': 32, 'beat_division': 12, 'include_drums': False}
    assert tokenization_settings() == tokenization_settings(tracks='all') == before
    assert _settings_key(before) == 'fe84d281fb72'  # settings without 'tracks': caches written so stay valid
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


# -----------------------------------------------------------------------------
# careless or hostile input: links, zip bombs, odd names, odd paths, signals

def test_a_linked_folder_is_read_and_a_link_loop_is_read_once_with_one_line(tmp_path, capsys):
    outside = make_folder(tmp_path / 'outside', n=2)
    data = make_folder(tmp_path / 'data', n=1)
    (data / 'linked').symlink_to(outside, target_is_directory=True)
    (data / 'loop').symlink_to(data, target_is_directory=True)  # would list the folder within itself for ever
    names = [s[0] for s in find_midi_sources(data)]
    assert names == ['linked/song_00.mid', 'linked/song_01.mid', 'song_00.mid']
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('skipping loop: a link to a folder that is read already')
    assert len(load_token_cache(data, MS, tmp_path / 'cache', verbose=False)) == 3


def test_a_zip_member_declaring_a_huge_size_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(token_cache, 'MAX_MIDI_BYTES', 1 << 20, raising=False)  # so the test's bomb may be small
    (tmp_path / 'data').mkdir()
    tune = write_midi(tmp_path / 'tune.mid', melody(50)).read_bytes()
    bomb = b'MThd' + bytes(3 << 20)  # 3 MB that deflate to a few KB
    archive = deflated_zip(tmp_path / 'data' / 'tunes.zip', {'tune.mid': tune, 'bomb.mid': bomb})
    assert archive.stat().st_size < 20_000
    read = []
    monkeypatch.setattr(zipfile.ZipFile, 'read', lambda self, name, *a: read.append(name) or b'')
    names = [s[0] for s in find_midi_sources(tmp_path / 'data')]
    assert names == ['tunes.zip::tune.mid'] and read == []  # the bomb is never unpacked
    assert capsys.readouterr().out == ('skipping tunes.zip::bomb.mid: 3,145,732 bytes, far more than a MIDI file '
                                       'holds (at most 1,048,576 bytes are read)\n')


def test_a_plain_file_far_too_large_to_be_midi_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(token_cache, 'MAX_MIDI_BYTES', 1000, raising=False)
    data = make_folder(tmp_path / 'data', n=1)
    (data / 'huge.mid').write_bytes(bytes(1001))
    assert [s[0] for s in find_midi_sources(data)] == ['song_00.mid']
    assert 'skipping huge.mid: 1,001 bytes, far more than a MIDI file holds' in capsys.readouterr().out


def test_file_contents_held_at_once_are_bounded_by_the_batch(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=10, notes=20)
    monkeypatch.setattr(token_cache, 'TOKENIZE_BATCH_FILES', 3, raising=False)
    real_read, real_job = token_cache._read_source, token_cache._tokenize_job
    held, most = set(), []

    def read(*args):  # every content read stays held until its file is tokenized
        data = real_read(*args)
        held.add(hashlib.sha1(data).hexdigest())
        most.append(len(held))
        return data

    def job(job):
        held.discard(job[0])
        return real_job(job)
    monkeypatch.setattr(token_cache, '_read_source', read)
    monkeypatch.setattr(token_cache, '_tokenize_job', job)
    entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert len(entries) == 10 and all(e['n_notes'] == 20 for e in entries.values())
    assert max(most) == 3


def test_a_name_with_a_newline_or_a_terminal_escape_is_printed_escaped(tmp_path, capsys):
    data = make_folder(tmp_path / 'data', n=2)
    (data / 'fake\nskipping x.mid: \x1b[2Jbad.mid').write_bytes(b'not a MIDI file')
    load_corpus(data, MS, tmp_path / 'cache', min_notes=10)
    out = capsys.readouterr().out
    assert '\x1b' not in out and out.count('\n') == 1
    assert 'skipping fake\\nskipping x.mid: \\x1b[2Jbad.mid: ' in out


def test_a_cache_dir_that_is_a_file_is_one_clear_error(tmp_path):
    data = make_folder(tmp_path / 'data', n=2)
    (tmp_path / 'cache').write_text('a file')
    for cache_dir in (tmp_path / 'cache', tmp_path / 'cache' / 'sub'):
        with pytest.raises(DatasetError, match=f'^cache_dir {cache_dir}: {tmp_path / "cache"} is a file, not a '):
            load_corpus(data, MS, cache_dir, min_notes=10)


def test_a_single_midi_file_or_zip_is_a_dataset(tmp_path):
    data = make_folder(tmp_path / 'data', n=3)
    train, val, summary = load_corpus(data / 'song_01.mid', MS, tmp_path / 'cache', min_notes=10, verbose=False)
    assert summary['files'] == 1 and len(train) == 1
    assert list(train[0]) == list(tokenize_midi((data / 'song_01.mid').read_bytes(), MS)[0])
    archive = deflated_zip(tmp_path / 'tunes.zip', {p.name: p.read_bytes() for p in data.iterdir()})
    train, val, summary = load_corpus(archive, MS, tmp_path / 'cache', min_notes=10, verbose=False)
    assert summary['files'] == 3 and len(train) + len(val) == 3


SIGTERM_CHILD = '''
import os, sys, time
import token_cache, tokens
real = token_cache._tokenize_job
def slow(job):
    if len(os.listdir(sys.argv[3])) == 0:
        open(os.path.join(sys.argv[3], 'started'), 'w').close()
    time.sleep(0.2)
    return real(job)
token_cache._tokenize_job = slow
token_cache.load_token_cache(sys.argv[1], tokens.tokenization_settings(), sys.argv[2], num_workers=1, verbose=False)
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGTERM')
def test_sigterm_while_tokenizing_says_what_is_kept_and_exits_143(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=30, notes=20)
    (tmp_path / 'flag').mkdir()
    child = subprocess.Popen([sys.executable, '-c', SIGTERM_CHILD, str(data), str(tmp_path / 'cache'),
                              str(tmp_path / 'flag')], env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / 'flag' / 'started').exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few files tokenized
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    kept = int(err.split('stopped by SIGTERM while tokenizing: ')[1].split()[0]) if 'SIGTERM' in err else -1
    assert child.returncode == 143 and err.splitlines() == [err.strip()], err
    assert 1 <= kept < 30 and 'new files are kept in the cache' in err
    calls = count_tokenizations(monkeypatch)
    assert len(load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)) == 30
    assert len(calls) == 30 - kept


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
    # a mapped token file holds a file descriptor: 170,000 mapped files ran out of them and crashed the run. Files
    # of their own are read when a run cannot write its consolidated file (stopped, then a read-only cache)
    monkeypatch.setattr(token_cache, '_physical_memory', lambda: 0)  # a cache larger than a quarter of RAM
    data = make_folder(tmp_path / 'data', n=5)
    stopped_while_consolidating(data, tmp_path / 'cache', monkeypatch)
    refuse_writes(monkeypatch, OSError(errno.EROFS, 'Read-only file system'))
    for limit, mapped in ((4 * 5 + 4, True), (4 * 5, False)):
        monkeypatch.setattr(token_cache, '_open_file_limit', lambda: limit)
        entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
        assert all(isinstance(e['tokens'], np.memmap) == mapped for e in entries.values())


# -----------------------------------------------------------------------------
# the consolidated token file

def test_consolidated_cache_holds_the_tokens_of_every_file_as_views_of_one_mapped_file(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, '_open_file_limit', lambda: 4)  # one descriptor, whatever the number of files
    data = make_folder(tmp_path / 'data', n=6)
    (data / 'copy.mid').write_bytes((data / 'song_01.mid').read_bytes())  # one content, stored once
    (data / 'bad.mid').write_bytes(b'not a MIDI file')
    entries = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    assert entries.pop('bad.mid')['tokens'] is None
    for name, entry in entries.items():
        assert np.array_equal(entry['tokens'], tokenize_midi((data / name).read_bytes(), MS)[0])
        assert entry['tokens'].dtype == np.uint16
    views = [e['tokens'] for e in entries.values() if e['tokens'] is not None]
    assert len({id(v.base) for v in views}) == 1 and isinstance(views[0].base, np.memmap)
    assert [p.name[:7] for p in settings_folder(tmp_path / 'cache').glob('*.npy')] == ['tokens-']
    assert sum(map(len, views)) - len(views[0]) == len(views[0].base)  # the copy's tokens are there once


def test_ctrl_c_while_consolidating_loses_no_tokenized_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=6)
    first = stopped_while_consolidating(data, tmp_path / 'cache', monkeypatch, at=4)
    names = sorted(p.name for p in settings_folder(tmp_path / 'cache').iterdir())
    assert len([n for n in names if n.endswith('.npy')]) == 6 and not any('tokens-' in n or '.tmp' in n for n in names)
    calls = count_tokenizations(monkeypatch)
    assert same_tokens(first, load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False))
    assert calls == [] and consolidated_file(tmp_path / 'cache').exists()


def damage_entry(change):
    def damage(path, index, digest):
        packed = index['packed']
        at = packed['digests'].index(digest)
        start = sum(packed['lengths'][:at])
        tokens = np.load(path, mmap_mode='r+')
        tokens[start:start + packed['lengths'][at]] = change(np.array(tokens[start:start + packed['lengths'][at]]))
        tokens.flush()
    return damage


def whole_file(damage):
    return lambda path, index, digest: damage(path)


PACKED_DAMAGE = {
    'cut short': whole_file(cut_in_half),
    'missing': whole_file(Path.unlink),
    'not uint16': whole_file(resave(lambda tokens: tokens.astype(np.int64))),
    'one token more': whole_file(resave(lambda tokens: np.append(tokens, tokens[:1]))),
    'an id out of range in one entry': damage_entry(set_item(5, NUM_TOKENS + 64)),
    'no start token in one entry': damage_entry(set_item(0, PAD_IDX)),
}


@pytest.mark.parametrize('damage', PACKED_DAMAGE)
def test_damaged_consolidated_file_is_rebuilt_with_one_line(tmp_path, monkeypatch, capsys, damage):
    data = make_folder(tmp_path / 'data', n=5)
    first = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1, verbose=False)
    first = {name: dict(e, tokens=np.array(e['tokens'])) for name, e in first.items()}  # a memmap sees the damage
    (index_file,) = settings_folder(tmp_path / 'cache').glob('index-*.json')
    path, digest = consolidated_file(tmp_path / 'cache'), token_file(tmp_path / 'cache', data / 'song_02.mid').stem
    PACKED_DAMAGE[damage](path, json.loads(index_file.read_text()), digest)
    calls = count_tokenizations(monkeypatch)
    capsys.readouterr()

    second = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    out = capsys.readouterr().out
    one_entry = 'one entry' in damage  # the other entries are sound: only this one is tokenized again
    assert out.count('\n') == 1 and out.startswith(f'cache: dropping {digest if one_entry else path.name}: ')
    assert sorted(calls) == ([digest] if one_entry else sorted(f['hash'] for f in json.loads(
        index_file.read_text())['files'].values())) and same_tokens(first, second)
    third = load_token_cache(data, MS, tmp_path / 'cache', num_workers=1)
    assert len(calls) == (1 if one_entry else 5) and capsys.readouterr().out == '' and same_tokens(first, third)


def test_a_write_that_fails_names_the_file_asked_for_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / 'sample.mid'
    target.mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(IsADirectoryError) as failed:
        token_cache.write_atomically(target, lambda tmp: open(tmp, 'wb').close(), suffix='.mid')
    assert failed.value.filename == str(target) and failed.value.filename2 is None
    with pytest.raises(FileNotFoundError) as failed:  # the writer's own error, on a folder that is not there
        token_cache.write_atomically(tmp_path / 'gone' / 'x.json', lambda tmp: open(tmp, 'w').close())
    assert failed.value.filename == str(tmp_path / 'gone' / 'x.json')
    assert [p.name for p in tmp_path.iterdir()] == ['sample.mid'] and not any(target.iterdir())
