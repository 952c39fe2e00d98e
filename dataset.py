"""MIDI files -> token sequences -> training batches, and tokens -> MIDI.

Token system (the seed's, defined here once and imported everywhere else):
    0-127    time delta since the previous note's start, in time steps
    128-255  note duration, in time steps
    256-833  pitch (256 + MIDI pitch; MIDI pitches 0-127 use 256-383, the rest of the range is never produced)
    834      start of sequence
    835      padding
Each note becomes [time delta (only when > 0), duration, pitch]; notes are sorted by start, then pitch.

A time step is TIMING_FACTOR (32) milliseconds in the seed's 'ms' timing, or 1/beat_division of a quarter note
in 'beats' timing (read from the file's own ticks, so notes land on the beat grid whatever the tempo).
"""

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import TMIDIX

TIMING_FACTOR = 32          # milliseconds per time/duration step (seed)
TIME_OFFSET = 0             # first time-delta token
DUR_OFFSET = 128            # first duration token
PITCH_OFFSET = 256          # first pitch token
PITCH_END = PITCH_OFFSET + 128  # one past the last pitch token a MIDI file can give (the seed's range runs to 833)
MAX_STEP = 127              # largest time delta / duration step a token can hold
START_IDX = 834             # start-of-sequence token
PAD_IDX = 835               # padding token, ignored by loss and accuracy
NUM_TOKENS = 836            # vocabulary size

MIDI_SUFFIXES = ('.mid', '.midi', '.kar', '.rmi')
DRUM_CHANNEL = 9            # General MIDI percussion channel (10 in 1-based numbering)
DEFAULT_DURATION_STEPS = 8  # duration given to a pitch token that has no duration token before it
BEATS_TICKS_PER_QUARTER = 480   # resolution of files written in 'beats' timing (divisible by 12, 16, 24)
CACHE_VERSION = 1           # bump when tokenization code changes meaning, so old caches are not reused


class DatasetError(RuntimeError):
    """The dataset folder cannot be used (empty, nothing readable, ...)."""


def tokenization_settings(timing='ms', beat_division=12, include_drums=False):
    """Everything that changes the token ids a file produces; saved in checkpoints and the cache key."""
    if timing not in ('ms', 'beats'):
        raise ValueError(f"timing must be 'ms' or 'beats', got {timing!r}")
    return {'version': CACHE_VERSION, 'timing': timing, 'timing_factor': TIMING_FACTOR,
            'beat_division': int(beat_division), 'include_drums': bool(include_drums)}


def step_size(settings):
    """Length of one time step in the unit TMIDIX.midi2notes returns for this timing (ms or quarter notes)."""
    if settings['timing'] == 'ms':
        return float(settings['timing_factor'])
    return 1.0 / settings['beat_division']


def seconds_per_step(settings, tempo_bpm):
    """Length of one time step in seconds; 'beats' steps last as long as the tempo the music is played at."""
    if settings['timing'] == 'ms':
        return step_size(settings) / 1000.0
    return step_size(settings) * 60.0 / tempo_bpm


def is_pitch(tokens):
    """Elementwise: which ids of a numpy array or torch tensor are pitch tokens a note can carry (MIDI 0-127)."""
    return (tokens >= PITCH_OFFSET) & (tokens < PITCH_END)


def token_kind(token):
    """'time', 'duration', 'pitch', 'start', 'pad' or 'invalid' (ids outside the produced ranges) for one id."""
    if TIME_OFFSET <= token < DUR_OFFSET:
        return 'time'
    if DUR_OFFSET <= token < PITCH_OFFSET:
        return 'duration'
    if PITCH_OFFSET <= token < PITCH_END:
        return 'pitch'
    return {START_IDX: 'start', PAD_IDX: 'pad'}.get(token, 'invalid')


def write_atomically(path, write):
    """write(tmp_path), then rename over path: a reader sees the old file or the new one, never a part.

    The temporary name carries the process id, so processes writing the same file at once do not share one;
    it is removed when writing fails (a full disk, Ctrl-C), so no partial file is left behind.
    """
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# notes <-> tokens

def tokenize_notes(notes, settings):
    """['note', start, dur, channel, pitch, velocity] events (start-sorted) -> list of token ids.

    Start times are quantized on the absolute grid first and deltas taken between grid points, so rounding never
    accumulates along a melody; only gaps longer than MAX_STEP steps are clipped. 'ms' floors like the seed
    (delta_ms // 32); 'beats' snaps to the nearest grid line, since a performed note a hair early is on the beat.
    """
    step = step_size(settings)
    snap = math.floor if settings['timing'] == 'ms' else round
    eps = 1e-6  # float tempo arithmetic can give 95.99999 ms for a note exactly on a step boundary
    tokens = [START_IDX]
    prev = None
    for note in notes:
        if not settings['include_drums'] and note[3] == DRUM_CHANNEL:
            continue
        start = snap(note[1] / step + eps)
        duration = snap(note[2] / step + eps)
        if prev is not None and start > prev:
            tokens.append(TIME_OFFSET + min(start - prev, MAX_STEP))
        prev = start
        tokens.append(DUR_OFFSET + min(max(duration, 0), MAX_STEP))
        tokens.append(PITCH_OFFSET + note[4])
    return tokens


def tokens_to_notes(tokens):
    """Token ids -> [start_step, duration_steps, pitch] (steps may be fractional: 0.5 for a zero duration).

    Reads any sequence: a pitch without a duration token directly before it gets DEFAULT_DURATION_STEPS,
    out-of-range ids and the start/pad tokens are ignored.
    """
    notes = []
    time, duration = 0, None
    for tok in tokens:
        tok = int(tok)
        kind = token_kind(tok)
        if kind == 'time':
            time += tok - TIME_OFFSET
        elif kind == 'duration':
            duration = tok - DUR_OFFSET
        elif kind == 'pitch':
            steps = DEFAULT_DURATION_STEPS if duration is None else duration
            # a floored duration of 0 steps was a real note shorter than one step: give it half a step
            notes.append([time, max(steps, 0.5), tok - PITCH_OFFSET])
            duration = None
    return notes


def detokenize(tokens, output_file, settings=None, tempo_bpm=120.0, velocity=90, patch=0, title='Basic MIDI Transformer'):
    """Write any token sequence to a MIDI file; returns the ms song (['note', start_ms, dur_ms, ch, pitch, vel])
    for plotting. 'ms' timing: a step is TIMING_FACTOR ms. 'beats' timing: a step is 1/beat_division quarter note,
    written at tempo_bpm so notes sit exactly on the beat grid in any DAW."""
    settings = settings or tokenization_settings()
    notes = tokens_to_notes(tokens)
    output_file = str(output_file)
    stem = output_file[:-4] if output_file.lower().endswith('.mid') else output_file
    if settings['timing'] == 'ms':
        step_ms = settings['timing_factor']
        song = [['note', int(round(t * step_ms)), int(round(d * step_ms)), 0, p, velocity] for t, d, p in notes]
        TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter(song, output_signature=title, track_name=title,
                                                 list_of_MIDI_patches=[patch] * 16, output_file_name=stem,
                                                 verbose=False)
        return song
    ticks_per_step = BEATS_TICKS_PER_QUARTER / settings['beat_division']
    usec_per_quarter = int(round(60_000_000 / tempo_bpm))
    events = [['track_name', 0, title.encode('latin-1', 'replace')], ['set_tempo', 0, usec_per_quarter],
              ['patch_change', 0, 0, patch]]
    events += [['note', int(round(t * ticks_per_step)), int(round(d * ticks_per_step)), 0, p, velocity]
               for t, d, p in notes]
    with open(stem + '.mid', 'wb') as f:
        f.write(TMIDIX.score2midi([BEATS_TICKS_PER_QUARTER, events]))
    ms_per_tick = usec_per_quarter / 1000 / BEATS_TICKS_PER_QUARTER
    return [['note', e[1] * ms_per_tick, e[2] * ms_per_tick, 0, e[4], velocity] for e in events[3:]]


def tokenize_midi(midi_bytes, settings):
    """MIDI bytes -> (uint16 token array, number of notes used, tempo in usec per quarter). Raises TMIDIX.MIDIError."""
    unit = 'ms' if settings['timing'] == 'ms' else 'beats'
    notes, tempo = TMIDIX.midi2notes(midi_bytes, unit=unit, with_tempo=True)
    tokens = np.asarray(tokenize_notes(notes, settings), dtype=np.uint16)
    n_notes = int(is_pitch(tokens).sum())
    return tokens, n_notes, tempo


# -----------------------------------------------------------------------------
# finding files and the token cache

def find_midi_sources(path):
    """All MIDI files under path (recursive, any case), including members of .zip archives.
    Returns a sorted list of (name relative to path, file path, zip member or None)."""
    root = Path(path)
    sources = []
    if not root.is_dir():
        return sources
    for file in sorted(root.rglob('*')):
        if not file.is_file():
            continue
        rel = file.relative_to(root).as_posix()
        suffix = file.suffix.lower()
        if suffix in MIDI_SUFFIXES:
            sources.append((rel, file, None))
        elif suffix == '.zip':
            try:
                with zipfile.ZipFile(file) as zf:
                    members = [m for m in zf.namelist() if Path(m).suffix.lower() in MIDI_SUFFIXES]
            except (zipfile.BadZipFile, OSError) as e:
                print(f'skipping {rel}: not a readable zip archive ({e})')
                continue
            sources += [(f'{rel}::{m}', file, m) for m in sorted(members)]
    return sources


def _read_source(file, member, open_zips):
    if member is None:
        return Path(file).read_bytes()
    if file not in open_zips:
        open_zips[file] = zipfile.ZipFile(file)
    return open_zips[file].read(member)


def _tokenize_job(job):
    """Worker process body: (content hash, bytes, settings) -> (hash, tokens or None, meta)."""
    digest, data, settings = job
    try:
        tokens, n_notes, tempo = tokenize_midi(data, settings)
        return digest, tokens, {'n_notes': n_notes, 'tempo': tempo, 'n_tokens': int(len(tokens))}
    except TMIDIX.MIDIError as e:
        return digest, None, {'error': str(e)}
    except Exception as e:  # a reader bug must cost one file, not the whole dataset; say what it was
        return digest, None, {'error': f'{type(e).__name__}: {e}'}


def _settings_key(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _stamp(file):
    st = os.stat(file)
    return [st.st_size, st.st_mtime_ns]


def load_token_cache(path, settings, cache_dir, num_workers=None, verbose=True):
    """Tokenize every MIDI file under path once and keep the tokens in cache_dir.

    The cache is keyed by each file's content hash and the tokenization settings: unchanged files (same size and
    mtime as last time) are not even read, renamed files are found by hash, new or changed ones are tokenized in
    parallel worker processes, removed ones are dropped from the index. Returns a dict
    name -> {'tokens': uint16 array (memory-mapped when the cache is larger than a quarter of RAM) or None,
    'n_notes', 'tempo', 'error'}.
    """
    sources = find_midi_sources(path)
    folder = Path(cache_dir) / _settings_key(settings)
    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / 'index.json'
    index = json.loads(index_file.read_text()) if index_file.exists() else {'files': {}, 'meta': {}}
    files, meta = {}, index['meta']

    # which sources need reading (stamp changed) and which hashes need tokenizing
    todo, open_zips = {}, {}
    try:
        for name, file, member in sources:
            stamp = _stamp(file)
            old = index['files'].get(name)
            if old and old['stamp'] == stamp and old['hash'] in meta:
                files[name] = old
                continue
            try:
                data = _read_source(file, member, open_zips)
            except (OSError, zipfile.BadZipFile, KeyError) as e:
                if verbose:
                    print(f'skipping {name}: cannot read ({e})')
                continue
            digest = hashlib.sha1(data).hexdigest()
            files[name] = {'stamp': stamp, 'hash': digest}
            if digest not in meta and digest not in todo:
                todo[digest] = data
    finally:
        for zf in open_zips.values():
            zf.close()

    if todo:
        jobs = [(digest, data, settings) for digest, data in todo.items()]
        workers = num_workers or min(len(jobs), os.cpu_count() or 1)
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc='tokenizing', unit='file', disable=not verbose)
        if workers > 1 and len(jobs) > 8:
            # fork where it exists: a spawned worker would re-import torch (seconds) before its first file
            context = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
            with multiprocessing.get_context(context).Pool(workers) as pool:
                for digest, tokens, info in pool.imap_unordered(_tokenize_job, jobs, chunksize=16):
                    _store(folder, meta, digest, tokens, info)
                    bar.update()
        else:
            for job in jobs:
                _store(folder, meta, *_tokenize_job(job))
                bar.update()
        bar.close()

    # drop cache entries no current file refers to, then write the index atomically
    used = {f['hash'] for f in files.values()}
    for digest in list(meta):
        if digest not in used:
            (folder / f'{digest}.npy').unlink(missing_ok=True)
            del meta[digest]
    text = json.dumps({'files': files, 'meta': meta})
    write_atomically(index_file, lambda tmp: Path(tmp).write_text(text))

    total_bytes = 2 * sum(m.get('n_tokens', 0) for m in meta.values())
    mmap = 'r' if total_bytes > _physical_memory() // 4 else None
    out = {}
    for name, entry in files.items():
        info = meta[entry['hash']]
        tokens = None if 'error' in info else np.load(folder / f"{entry['hash']}.npy", mmap_mode=mmap)
        out[name] = dict(info, tokens=tokens)
    return out


def _store(folder, meta, digest, tokens, info):
    if tokens is not None:
        np.save(folder / f'{digest}.npy', tokens)
    meta[digest] = info


def _physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def is_validation_file(name, val_fraction):
    """Stable split by file: a hash of the name relative to the dataset root, so no file is ever on both sides
    and adding files never moves old ones."""
    h = int(hashlib.sha1(name.encode('utf-8')).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def load_corpus(path, settings, cache_dir, min_notes=40, val_fraction=0.05, num_workers=None, verbose=True):
    """Token sequences of a folder, split into train and validation by file, plus a summary dict."""
    entries = load_token_cache(path, settings, cache_dir, num_workers=num_workers, verbose=verbose)
    if not entries:
        raise DatasetError(f'no MIDI files ({", ".join(MIDI_SUFFIXES)} or .zip archives of them) found in '
                           f'{Path(path).resolve()}')
    train, val, skipped = {}, {}, {}
    for name, e in sorted(entries.items()):
        if e['tokens'] is None:
            skipped[name] = e['error']
        elif e['n_notes'] < min_notes:
            skipped[name] = f"only {e['n_notes']} notes (min_notes={min_notes})"
        else:
            (val if is_validation_file(name, val_fraction) else train)[name] = e
    if verbose:
        for name, reason in skipped.items():
            if 'min_notes' not in reason:
                print(f'skipping {name}: {reason}')
    if not train and not val:
        raise DatasetError(f'nothing usable in {Path(path).resolve()}: {len(entries)} MIDI files found, all '
                           f'skipped ({len(skipped)}); e.g. {next(iter(skipped.items()))}')
    # a tiny folder may hash every file to one side: move the first file over so both splits exist
    if val_fraction > 0 and not val and len(train) > 1:
        name = min(train, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        val[name] = train.pop(name)
    if not train:
        name = next(iter(val))
        train[name] = val.pop(name)
    tempos = sorted(e['tempo'] for e in train.values())
    summary = {
        'files': len(entries), 'skipped': len(skipped),
        'skipped_short': sum('min_notes' in r for r in skipped.values()),
        'train_files': len(train), 'val_files': len(val),
        'train_tokens': int(sum(len(e['tokens']) for e in train.values())),
        'val_tokens': int(sum(len(e['tokens']) for e in val.values())),
        'median_tempo_bpm': round(60_000_000 / tempos[len(tempos) // 2], 2),
    }
    return ([e['tokens'] for e in train.values()], [e['tokens'] for e in val.values()], summary)


# -----------------------------------------------------------------------------
# windows for training

class MIDI_Dataset(Dataset):
    """Windows of max_seq_len + 1 tokens over a list of token sequences.

    An epoch holds about one window per max_seq_len tokens of each file (at least one per file), so a folder of
    short melodies and a folder of long piano pieces both see their data about once per epoch. Training windows
    are random crops (the seed's rule: a random start in 85% of draws, the beginning otherwise) with optional
    transposition; validation windows (rand_start=False) tile each file in order, covering every token once.
    Randomness comes from (seed, epoch, index) alone, so a resumed or multi-process run draws the same windows.
    """

    def __init__(self, sequences, max_seq_len, pad_idx=PAD_IDX, rand_start=True, aug=False, aug_range=2, seed=0):
        self.sequences = sequences
        self.max_seq_len = max_seq_len
        self.pad_idx = pad_idx
        self.rand_start = rand_start
        self.aug = aug
        self.aug_range = aug_range
        self.seed = seed
        self.epoch = 0
        counts = [max(1, math.ceil((len(s) - 1) / max_seq_len)) for s in sequences]
        self.window_file = np.repeat(np.arange(len(sequences)), counts)
        self.window_part = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.window_file)

    def __getitem__(self, idx):
        seq = self.sequences[self.window_file[idx]]
        n = self.max_seq_len + 1
        rng = random.Random(hash((self.seed, self.epoch, int(idx))))
        if self.rand_start:
            start = rng.randint(0, max(0, len(seq) - n)) if rng.random() < 0.85 else 0
        else:
            start = int(self.window_part[idx]) * self.max_seq_len
        window = torch.from_numpy(np.asarray(seq[start:start + n], dtype=np.int64))
        if self.aug:
            window = transpose(window, rng.randint(-self.aug_range, self.aug_range))
        return window


def transpose(window, shift):
    """Shift pitch tokens by up to `shift` semitones, reduced so that no pitch leaves 0-127."""
    pitch = is_pitch(window)
    if shift == 0 or not pitch.any():
        return window
    pitches = window[pitch] - PITCH_OFFSET
    shift = max(min(shift, 127 - int(pitches.max())), -int(pitches.min()))
    window = window.clone()
    window[pitch] += shift
    return window


def collate_fn(batch, pad_idx=PAD_IDX):
    """Pad windows of a batch to the same length with pad_idx."""
    return torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad_idx)
