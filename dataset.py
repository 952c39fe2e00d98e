"""MIDI files -> token sequences -> training batches, and tokens -> MIDI.

Token system (the original's, defined here once and imported everywhere else):
    0-127    time delta since the previous note's start, in time steps
    128-255  note duration, in time steps
    256-833  pitch (256 + MIDI pitch; MIDI pitches 0-127 use 256-383, the rest of the range is never produced)
    834      start of sequence
    835      padding
Each note becomes [time delta (only when > 0), duration, pitch]; notes are sorted by start, then pitch.

A time step is TIMING_FACTOR (32) milliseconds in the original's 'ms' timing, or 1/beat_division of a quarter note
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
import re
import signal
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import TMIDIX

try:
    import fcntl  # POSIX: one process updates the token cache while the others wait
except ImportError:  # Windows
    fcntl = None

TIMING_FACTOR = 32          # milliseconds per time/duration step (seed)
TIME_OFFSET = 0             # first time-delta token
DUR_OFFSET = 128            # first duration token
PITCH_OFFSET = 256          # first pitch token
PITCH_END = PITCH_OFFSET + 128  # one past the last pitch token a MIDI file can give (the original's range runs to 833)
MAX_STEP = 127              # largest time delta / duration step a token can hold
START_IDX = 834             # start-of-sequence token
PAD_IDX = 835               # padding token, ignored by loss and accuracy
NUM_TOKENS = 836            # vocabulary size

MIDI_SUFFIXES = ('.mid', '.midi', '.kar', '.rmi')
DRUM_CHANNEL = 9            # General MIDI percussion channel (10 in 1-based numbering)
DEFAULT_DURATION_STEPS = 8  # duration given to a pitch token that has no duration token before it
BEATS_TICKS_PER_QUARTER = 480   # resolution of files written in 'beats' timing (divisible by 12, 16, 24)
CACHE_VERSION = 1           # bump when tokenization code changes meaning, so old caches are not reused
MIN_PART_NOTES = 8          # 'melody' tracks: a part (track, channel) needs this many notes to be the tune ...
MIN_PART_SHARE = 0.25       # ... and, unless its track is named like one, this share of the largest part's notes

# track names that say a part is the tune: 'MELODY' (POP909), 'Melody 1', 'Lead Vocal', 'Voice', 'vocals', 'Mélodie',
# 'Melodía'. Only letters around the word break a match ('Melody1' matches, 'melodic' does not). A bare 'lead' is not
# enough: 'Lead Guitar' plays riffs and solos as often as the tune, so such parts are left to the pitch rule.
MELODY_NAME = re.compile(r'(?<![^\W\d_])(melody|m[eé]lodie|melod[ií]a|vocals?|voices?|vox|singer)(?![^\W\d_])',
                         re.IGNORECASE)


class DatasetError(RuntimeError):
    """The dataset folder cannot be used (empty, nothing readable, ...)."""


def tokenization_settings(timing='ms', beat_division=12, include_drums=False, tracks='all'):
    """Everything that changes the token ids a file produces; saved in checkpoints and the cache key.

    tracks: 'all' (every note of every track, merged) or 'melody' (one monophonic line per file, see melody_part;
    drums are never that line, whatever include_drums says). 'all' adds no entry, so caches and checkpoints from
    before the option keep their key and read as 'all'; readers use settings.get('tracks', 'all').
    """
    if timing not in ('ms', 'beats'):
        raise ValueError(f"timing must be 'ms' or 'beats', got {timing!r}")
    if tracks not in ('all', 'melody'):
        raise ValueError(f"tracks must be 'all' or 'melody', got {tracks!r}")
    if int(beat_division) < 1:
        raise ValueError(f'beat_division must be a positive number of steps per quarter note, got {beat_division!r}')
    settings = {'version': CACHE_VERSION, 'timing': timing, 'timing_factor': TIMING_FACTOR,
                'beat_division': int(beat_division), 'include_drums': bool(include_drums)}
    if tracks != 'all':
        settings['tracks'] = tracks
    return settings


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


def grammar_table():
    """(NUM_TOKENS, NUM_TOKENS) bool tensor, [a, b] when token b may follow token a in the pattern the tokenizer
    writes, [time] duration pitch: a duration after the start token or a time shift, a pitch (MIDI 0-127) after a
    duration, a time shift or a duration after a pitch; after any other id (a pad, a pitch above 127) a note may
    begin. Sampling draws only such tokens; evaluate.py's grammar validity is the share of pairs it allows."""
    ids = torch.arange(NUM_TOKENS)
    time = (ids >= TIME_OFFSET) & (ids < DUR_OFFSET)
    duration = (ids >= DUR_OFFSET) & (ids < PITCH_OFFSET)
    table = (time | duration).repeat(NUM_TOKENS, 1)
    table[time] = duration
    table[duration] = is_pitch(ids)
    table[START_IDX] = duration
    return table


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

def tokenize_notes(notes, settings, monophonic=False):
    """['note', start, dur, channel, pitch, velocity] events (start-sorted) -> list of token ids.

    Start times are quantized on the absolute grid first and deltas taken between grid points, so rounding never
    accumulates along a melody; only gaps longer than MAX_STEP steps are clipped. 'ms' floors like the original
    (delta_ms // 32); 'beats' snaps to the nearest grid line, since a performed note a hair early is on the beat.
    monophonic=True keeps one note at a time (skyline), decided on the grid: notes on one step sound together.
    """
    step = step_size(settings)
    snap = math.floor if settings['timing'] == 'ms' else round
    eps = 1e-6  # float tempo arithmetic can give 95.99999 ms for a note exactly on a step boundary
    grid = [[snap(note[1] / step + eps), snap(note[2] / step + eps), note[4]] for note in notes
            if settings['include_drums'] or note[3] != DRUM_CHANNEL]
    if monophonic:
        grid = skyline(grid)
    tokens = [START_IDX]
    prev = None
    for start, duration, pitch in grid:
        if prev is not None and start > prev:
            tokens.append(TIME_OFFSET + min(start - prev, MAX_STEP))
        prev = start
        tokens.append(DUR_OFFSET + min(max(duration, 0), MAX_STEP))
        tokens.append(PITCH_OFFSET + pitch)
    return tokens


def skyline(notes):
    """[start, duration, pitch] notes -> one note at a time, the usual skyline rule: of the notes that start
    together the highest is kept, and a new onset ends the note before it (cut to end where the new one starts)."""
    line = []
    for note in sorted(notes, key=lambda note: (note[0], -note[2])):
        if line:
            last = line[-1]
            if note[0] == last[0]:  # a lower note of the same onset
                continue
            last[1] = min(last[1], note[0] - last[0])
        line.append(note)
    return line


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


def detokenize(tokens, output_file, settings=None, tempo_bpm=120.0, velocity=90, patch=0,
               title='Basic MIDI Transformer'):
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


def _track_name(raw):
    """Track names are bytes in no declared encoding: UTF-8 where they decode as such, else Latin-1 (never fails)."""
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return raw.decode('latin-1')


def melody_part(notes, track_names):
    """The notes of the one part, a (track, channel) pair, that carries the tune, in their order ([] if none).

    notes carry their track number as a 7th field (TMIDIX.midi2notes(with_track=True)). A part whose track is named
    like a melody (MELODY_NAME) and has MIN_PART_NOTES notes wins; names count only when notes sit on more than one
    track, since the one track of a format-0 file is named after the song. Otherwise the parts with MIN_PART_NOTES
    notes and MIN_PART_SHARE of the largest part's notes compete (every part, when none has). Of the contenders the
    highest mean pitch wins, as a tune lies above its accompaniment; a tie goes to the first (track, channel).
    Drums (channel 10) are never the tune.
    """
    parts = {}
    for note in notes:
        if note[3] != DRUM_CHANNEL:
            parts.setdefault((note[6], note[3]), []).append(note)
    if not parts:
        return []
    named = []
    if len({track for track, _ in parts}) > 1:
        named = [key for key, part in parts.items()
                 if len(part) >= MIN_PART_NOTES and MELODY_NAME.search(_track_name(track_names[key[0]]))]
    largest = max(map(len, parts.values()))
    big = [key for key, part in parts.items() if len(part) >= max(MIN_PART_NOTES, MIN_PART_SHARE * largest)]
    contenders = named or big or list(parts)
    best = max(sorted(contenders), key=lambda key: sum(note[4] for note in parts[key]) / len(parts[key]))
    return parts[best]


def tokenize_midi(midi_bytes, settings):
    """MIDI bytes -> (uint16 token array, number of notes used, tempo in usec per quarter). Raises TMIDIX.MIDIError."""
    unit = 'ms' if settings['timing'] == 'ms' else 'beats'
    if settings.get('tracks', 'all') == 'melody':
        notes, tempo, names = TMIDIX.midi2notes(midi_bytes, unit=unit, with_tempo=True, with_track=True)
        tokens = tokenize_notes(melody_part(notes, names), settings, monophonic=True)
    else:
        notes, tempo = TMIDIX.midi2notes(midi_bytes, unit=unit, with_tempo=True)
        tokens = tokenize_notes(notes, settings)
    tokens = np.asarray(tokens, dtype=np.uint16)
    n_notes = int(is_pitch(tokens).sum())
    return tokens, n_notes, tempo


# -----------------------------------------------------------------------------
# finding files

# what reading a file or a zip member can raise: I/O errors, a damaged archive (BadZipFile; zlib.error for a corrupt
# deflate stream, EOFError for a cut one), a member gone since it was listed (KeyError), an encrypted member or an
# unsupported compression method (RuntimeError, NotImplementedError)
UNREADABLE = (OSError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error)


def _name_bytes(name):
    """The bytes of a file name. Linux names need not be UTF-8: Python keeps such bytes as lone surrogates, which
    'surrogateescape' turns back into the original bytes; a valid UTF-8 name gives the same bytes as .encode()."""
    return name.encode('utf-8', 'surrogateescape')


def _printable(name):
    """A file name that any terminal can print: bytes that are not UTF-8 are shown as \\xe9 (printing a lone
    surrogate to a UTF-8 stream raises)."""
    return _name_bytes(name).decode('utf-8', 'backslashreplace')


def find_midi_sources(path):
    """All MIDI files under path (recursive, any case), including members of .zip archives and of zips inside them.
    Returns a sorted list of (name relative to path, file path, member): member is None for a plain file, the member
    name for a file in a zip, (inner zip, member) for a file in a zip inside a zip."""
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
            sources += _zip_sources(rel, file)
    return sources


def _zip_sources(rel, file):
    try:
        with zipfile.ZipFile(file) as zf:
            sources = [(f'{rel}::{m}', file, m) for m in _members(zf, MIDI_SUFFIXES)]
            # collections are often shipped as a zip of zips: read the inner ones too, one level deep
            for inner in _members(zf, ('.zip',)):
                sources += _inner_zip_sources(f'{rel}::{inner}', file, inner, zf)
    except UNREADABLE as e:
        print(f'skipping {_printable(rel)}: not a readable zip archive ({e})')
        return []
    return sorted(sources, key=lambda source: source[0])


def _inner_zip_sources(name, file, inner, outer_zf):
    try:
        with zipfile.ZipFile(io.BytesIO(outer_zf.read(inner))) as zf:
            for deeper in _members(zf, ('.zip',)):
                print(f'skipping {_printable(name)}::{deeper}: zips inside a zip inside a zip are not read')
            return [(f'{name}::{m}', file, (inner, m)) for m in _members(zf, MIDI_SUFFIXES)]
    except UNREADABLE as e:
        print(f'skipping {_printable(name)}: not a readable zip archive ({e})')
        return []


def _members(zf, suffixes):
    return sorted(m for m in zf.namelist() if Path(m).suffix.lower() in suffixes)


def _read_source(file, member, open_zips):
    """The bytes of one source of find_midi_sources; open_zips keeps archives open between calls."""
    if member is None:
        return Path(file).read_bytes()
    if isinstance(member, tuple):  # a file in a zip inside a zip
        inner, member = member
        if (file, inner) not in open_zips:
            open_zips[file, inner] = zipfile.ZipFile(io.BytesIO(_read_source(file, inner, open_zips)))
        return open_zips[file, inner].read(member)
    if file not in open_zips:
        open_zips[file] = zipfile.ZipFile(file)
    return open_zips[file].read(member)


def _stamp(file):
    st = os.stat(file)
    return [st.st_size, st.st_mtime_ns]


def _stamp_or_none(file):
    try:
        return _stamp(file)
    except OSError:  # gone since it was listed
        return None


# -----------------------------------------------------------------------------
# the token cache
#
# cache_dir/<settings key>/ holds one <sha1 of the file's bytes>.npy of uint16 tokens per distinct file content,
# shared by every dataset tokenized with these settings, and one index-<key of the dataset folder>.json per dataset:
# {'root': folder, 'files': {name: {'stamp': [size, mtime_ns], 'hash': sha1}},
#  'meta': {sha1: {'n_notes', 'tempo', 'n_tokens'} or {'error'}}}.
# A token file is deleted only when no index refers to it. Every file is written under a temporary name and renamed,
# so a reader never sees half a file; a lock file lets one process change the folder while the others wait.

INDEX_SAVE_SECONDS = 5      # while tokenizing, the index is saved this often, so a killed run keeps its work
MAX_DROP_LINES = 10         # damaged cache entries are listed one per line up to this many, then only counted


def _tokenize_job(job):
    """Worker process body: (content hash, bytes, settings) -> (hash, tokens or None, meta)."""
    digest, data, settings = job
    try:
        tokens, n_notes, tempo = tokenize_midi(data, settings)
        info = {'n_notes': n_notes, 'tempo': tempo, 'n_tokens': len(tokens)}
        if n_notes == 0 and not settings['include_drums'] and settings.get('tracks', 'all') == 'all':
            # so that the skip message can tell a drum track from an empty file and point at include_drums
            info['drum_notes'] = tokenize_midi(data, dict(settings, include_drums=True))[1]
        return digest, tokens, info
    except TMIDIX.MIDIError as e:
        return digest, None, {'error': str(e)}
    except Exception as e:  # a reader bug must cost one file, not the whole dataset; say what it was
        return digest, None, {'error': f'{type(e).__name__}: {e}'}


def _settings_key(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _valid_file_entry(entry):
    return (isinstance(entry, dict) and isinstance(entry.get('stamp'), list) and isinstance(entry.get('hash'), str)
            and re.fullmatch('[0-9a-f]{40}', entry['hash']) is not None)


def _valid_meta(info):
    if not isinstance(info, dict):
        return False
    if 'error' in info:
        return isinstance(info['error'], str)
    return (isinstance(info.get('n_notes'), int) and isinstance(info.get('n_tokens'), int) and info['n_tokens'] >= 1
            and isinstance(info.get('tempo'), (int, float)))


def _parse_index(text):
    """(index, files, meta, names of malformed entries) of an index file's text, keeping the well-formed entries.
    Raises ValueError (not JSON: cut short, empty) or TypeError (JSON but not an index)."""
    index = json.loads(text)
    if not (isinstance(index, dict) and isinstance(index.get('files'), dict) and isinstance(index.get('meta'), dict)):
        raise TypeError('not a cache index')
    files = {name: f for name, f in index['files'].items() if _valid_file_entry(f)}
    meta = {digest: m for digest, m in index['meta'].items() if _valid_meta(m)}
    malformed = [n for n in index['files'] if n not in files] + [d for d in index['meta'] if d not in meta]
    return index, files, meta, malformed


def _save_npy(tmp, tokens):
    with open(tmp, 'wb') as f:  # a file object: given a name, np.save would append '.npy' to the temporary one
        np.save(f, tokens)


def _mmap_mode(infos):
    # a cache larger than a quarter of RAM is memory-mapped: the OS pages tokens in and out as training samples them
    total_bytes = 2 * sum(info.get('n_tokens', 0) for info in infos)
    return 'r' if total_bytes > _physical_memory() // 4 else None


def _physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class _DamagedEntry(Exception):
    """A cache entry that cannot be used (missing, cut short, bit rot, a foreign file); the message says why."""


class _CacheFolder:
    """One settings folder of the token cache as one dataset sees it: its index, the shared token files, the lock.

    Damaged entries are dropped with one line each and tokenized again. When the folder cannot be written (a
    read-only mount, a full disk), new tokens are kept in memory for this run instead.
    """

    def __init__(self, folder, root, verbose):
        self.folder = Path(folder)
        self.root = str(Path(root).resolve())
        self.index_file = self.folder / f'index-{hashlib.sha1(_name_bytes(self.root)).hexdigest()[:12]}.json'
        self.legacy_index = self.folder / 'index.json'  # the one index of caches written before per-dataset indexes
        self.from_legacy = False    # whether read_index fell back to it
        self.legacy_adopted = False  # whether it is this dataset's: then our own index replaces it
        self.verbose = verbose
        self.writable = True
        self.saved_index = None     # the index as last read or written: an unchanged index is not written again
        self.index_written = False
        self.arrays = {}            # digest -> checked token array
        self.damaged = set()        # digests found damaged in this pass
        self.in_memory = {}         # digest -> tokens that could not be written
        self.other_meta = None      # meta of the other datasets' indexes, read when first needed
        self.dropped = 0

    def say(self, message):
        if self.verbose:
            print(message)

    def drop(self, what, reason):
        self.dropped += 1
        if self.dropped <= MAX_DROP_LINES:
            self.say(f'cache: dropping {_printable(what)}: {reason}; tokenizing again')
        elif self.dropped == MAX_DROP_LINES + 1:
            self.say('cache: dropping more damaged entries; not listing them')

    def read_index(self, quiet=False):
        """(files, meta) of this dataset's index, well-formed entries only; empty when it is missing or damaged.
        A cache from before per-dataset indexes starts from its single index.json."""
        path = self.index_file if self.index_file.exists() else self.legacy_index
        try:
            index, files, meta, malformed = _parse_index(path.read_bytes())
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, TypeError) as e:
            if not quiet:
                self.drop(path.name, f'unreadable index ({e})')
            return {}, {}
        for name in malformed if not quiet else ():
            self.drop(name, 'malformed index entry')
        self.from_legacy = path == self.legacy_index
        self.saved_index = None if self.from_legacy else index
        return files, meta

    def usable(self, digest, meta, mmap, quiet=False):
        """Whether digest has a sound entry (in meta, or in another dataset's index, then copied into meta).
        Loads and checks its tokens; a damaged entry is dropped from meta."""
        if digest in self.arrays:
            return True
        if digest in self.damaged:
            return False
        info = meta.get(digest) or self.meta_of_other_datasets().get(digest)
        if info is None:
            return False
        if 'error' not in info:  # a file that failed to tokenize has no tokens to check
            try:
                self.arrays[digest] = self.load(digest, info, mmap)
            except _DamagedEntry as e:
                self.damaged.add(digest)
                meta.pop(digest, None)
                if not quiet:
                    self.drop(digest, str(e))
                return False
        meta[digest] = info
        return True

    def load(self, digest, info, mmap):
        """The tokens of one entry, checked cheaply: dtype, length, first token and largest id. Bit rot that slips
        through here would crash the model's embedding many steps into training."""
        if digest in self.in_memory:
            tokens = self.in_memory[digest]
        else:
            try:
                # a str path: building 10,000 Path objects would cost a tenth of a cached load
                tokens = np.load(os.path.join(self.folder, f'{digest}.npy'), mmap_mode=mmap, allow_pickle=False)
            except FileNotFoundError:
                raise _DamagedEntry('token file missing') from None
            except (OSError, ValueError, EOFError) as e:
                raise _DamagedEntry(f'unreadable token file ({e})') from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise _DamagedEntry(f'{tokens.dtype} array of shape {tokens.shape}, not uint16 tokens')
        if len(tokens) != info['n_tokens']:
            raise _DamagedEntry(f"{len(tokens)} tokens where the index says {info['n_tokens']}")
        if tokens[0] != START_IDX:
            raise _DamagedEntry(f'first token {tokens[0]}, not the start token {START_IDX}')
        if tokens.max() >= NUM_TOKENS:
            raise _DamagedEntry(f'token id {tokens.max()} outside the vocabulary of {NUM_TOKENS}')
        return tokens

    def meta_of_other_datasets(self):
        """Entries other datasets already tokenized: a file two datasets share is tokenized once."""
        if self.other_meta is None:
            self.other_meta = {}
            for path in self.index_paths():
                if path != self.index_file:
                    self.other_meta.update(self.read_meta(path))
        return self.other_meta

    def index_paths(self):
        return sorted(self.folder.glob('index-*.json')) + [p for p in [self.legacy_index] if p.exists()]

    @staticmethod
    def read_meta(path):
        try:
            return _parse_index(path.read_bytes())[2]
        except (OSError, ValueError, TypeError):
            return {}

    def store(self, digest, tokens):
        self.damaged.discard(digest)  # written anew
        if self.writable:
            try:
                write_atomically(self.folder / f'{digest}.npy', lambda tmp: _save_npy(tmp, tokens))
                return
            except OSError as e:
                self.cannot_write(e)
        self.in_memory[digest] = tokens

    def write_index(self, files, meta):
        """Save the index of the files whose tokens are done, unless it is unchanged or the folder is read-only."""
        if not self.writable:
            return
        done = {name: f for name, f in files.items() if f['hash'] in meta}
        index = {'root': self.root, 'files': done, 'meta': {f['hash']: meta[f['hash']] for f in done.values()}}
        if index == self.saved_index:
            return
        text = json.dumps(index)  # ASCII: a name that is not UTF-8 is kept as a \udcxx escape and read back the same
        try:
            write_atomically(self.index_file, lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            self.cannot_write(e)
            return
        self.saved_index = index
        self.index_written = True
        if self.legacy_adopted:
            with contextlib.suppress(OSError):
                self.legacy_index.unlink(missing_ok=True)

    def cannot_write(self, error):
        self.writable = False
        self.say(f'cache: cannot write to {self.folder} ({error}); tokenizing in memory for this run')

    def prune(self):
        """Delete the token files that no dataset's index refers to (their files changed or were removed), and
        temporary files that a process killed while writing left behind an hour or more ago."""
        used = set()
        for path in self.index_paths():
            used.update(self.read_meta(path))
        for path in self.folder.glob('*.npy'):
            if path.stem not in used:
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in self.folder.glob('*.tmp'):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 3600:  # old enough that no live writer still owns it
                    path.unlink()

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's lock file: processes (or nodes sharing cache_dir) update it one at a time. There is no
        lock without fcntl (Windows), on a read-only folder or a file system without locks; atomic writes still
        keep every reader safe there."""
        fd = self.open_lock_file()
        try:
            if fd is not None:
                self.acquire(fd)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def open_lock_file(self):
        if fcntl is None:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.folder / 'lock', os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None

    def acquire(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.say(f'cache: another process is updating {self.folder}; waiting for it')
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a network mount without lock support
            pass

    def entries(self, files, meta):
        """load_token_cache's result: name -> dict(meta, tokens=array or None)."""
        out = {}
        for name, entry in files.items():
            info = meta.get(entry['hash'], {'error': 'its token cache entry is damaged (see above)'})
            out[name] = dict(info, tokens=self.arrays.get(entry['hash']))
        return out


def load_token_cache(path, settings, cache_dir, num_workers=None, verbose=True):
    """Tokenize every MIDI file under path once and keep the tokens in cache_dir.

    The cache is keyed by each file's content hash and the tokenization settings: unchanged files (same size and
    mtime as last time) are not even read, renamed files and files another dataset in cache_dir holds are found by
    hash, new or changed ones are tokenized in parallel worker processes, removed ones are dropped from the index.
    Damaged cache entries are tokenized again. Returns a dict name -> {'tokens': uint16 array (memory-mapped when
    the cache is larger than a quarter of RAM) or None, 'n_notes', 'tempo', 'error'}.
    """
    sources = find_midi_sources(path)
    cache = _CacheFolder(Path(cache_dir) / _settings_key(settings), path, verbose)
    # most runs change nothing: that is checked without the lock and without writing, so that readers run side by
    # side and a read-only cache works
    entries = _unchanged_entries(sources, cache)
    if entries is None:
        with cache.lock():
            entries = _update_cache(sources, settings, num_workers, cache)
    return entries


def _unchanged_entries(sources, cache):
    """The entries when every source is in the index with its old size and mtime and sound tokens, else None."""
    files, meta = cache.read_index(quiet=True)
    if len(files) != len(sources) or cache.from_legacy:  # an old cache's index.json is replaced by our own
        return None
    mmap = _mmap_mode(meta.values())
    for name, file, _ in sources:
        entry = files.get(name)
        if entry is None or entry['hash'] not in meta or entry['stamp'] != _stamp_or_none(file):
            return None
        if not cache.usable(entry['hash'], meta, mmap, quiet=True):
            return None
    return cache.entries(files, meta)


def _update_cache(sources, settings, num_workers, cache):
    """Read and tokenize what is new, changed or damaged, save the index, then load_token_cache's result."""
    index_files, meta = cache.read_index()  # read again: the process we waited for may have done the work
    cache.damaged.clear()  # ... and healed what looked damaged before
    mmap = _mmap_mode(meta.values())
    files, todo, open_zips = {}, {}, {}
    try:
        for name, file, member in sources:
            try:
                stamp = _stamp(file)
                old = index_files.get(name)
                if old and old['stamp'] == stamp and cache.usable(old['hash'], meta, mmap):
                    files[name] = old
                    continue
                data = _read_source(file, member, open_zips)
            except UNREADABLE as e:
                cache.say(f'skipping {_printable(name)}: cannot read ({e})')
                continue
            digest = hashlib.sha1(data).hexdigest()
            files[name] = {'stamp': stamp, 'hash': digest}
            if digest not in todo and not cache.usable(digest, meta, mmap):
                todo[digest] = data
    finally:
        for zf in open_zips.values():
            zf.close()
    # an old cache's single index is ours when some of our files are in it unchanged; any other dataset's entries
    # in it stay protected until that dataset runs
    cache.legacy_adopted = cache.from_legacy and any(index_files.get(name) == f for name, f in files.items())

    if todo:
        _tokenize_all(todo, settings, num_workers, cache, files, meta)
        mmap = _mmap_mode(meta[f['hash']] for f in files.values())
        for digest in todo:
            cache.usable(digest, meta, mmap)
    cache.write_index(files, meta)
    if cache.index_written:
        cache.prune()
    return cache.entries(files, meta)


def _tokenize_all(todo, settings, num_workers, cache, files, meta):
    """Tokenize new contents (digest -> bytes) in worker processes, storing each result as it arrives. The index is
    saved every INDEX_SAVE_SECONDS and when the run stops early (Ctrl-C), so the next run tokenizes only the rest."""
    jobs = [(digest, data, settings) for digest, data in todo.items()]
    workers = num_workers or min(len(jobs), os.cpu_count() or 1)
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc='tokenizing', unit='file', disable=not cache.verbose)
    next_save = time.monotonic() + INDEX_SAVE_SECONDS
    try:
        with contextlib.closing(_run_jobs(jobs, workers)) as results:  # closing stops the worker pool at once
            for digest, tokens, info in results:
                if tokens is not None:
                    cache.store(digest, tokens)
                meta[digest] = info
                bar.update()
                if time.monotonic() >= next_save:
                    cache.write_index(files, meta)
                    next_save = time.monotonic() + INDEX_SAVE_SECONDS
    finally:
        bar.close()
        cache.write_index(files, meta)


def _ignore_ctrl_c():
    """In each tokenizing worker: Ctrl-C reaches every process of the terminal's group, and only the main process
    should act on it (it stops the pool, then saves the index). A worker that raised KeyboardInterrupt too printed a
    traceback and could die holding the pool's result lock, and the run hung instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_jobs(jobs, workers):
    if workers > 1 and len(jobs) > 8:
        # fork where it exists: a spawned worker would re-import torch (seconds) before its first file
        context = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
        with multiprocessing.get_context(context).Pool(workers, initializer=_ignore_ctrl_c) as pool:
            yield from pool.imap_unordered(_tokenize_job, jobs, chunksize=16)
    else:
        for job in jobs:
            yield _tokenize_job(job)


# -----------------------------------------------------------------------------
# the corpus: usable files, split into train and validation

def is_validation_file(name, val_fraction):
    """Stable split by file: a hash of the name relative to the dataset root, so no file is ever on both sides
    and adding files never moves old ones."""
    h = int(hashlib.sha1(_name_bytes(name)).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def _skip_reason(entry, min_notes):
    """Why a file is left out of the corpus, or None to use it."""
    if entry['tokens'] is None:
        return entry['error']
    if entry['n_notes'] == 0 and entry.get('drum_notes'):
        return f"only drum notes ({entry['drum_notes']} on channel 10), which are left out by default (include_drums)"
    if entry['n_notes'] < min_notes:
        return f"only {entry['n_notes']} notes (min_notes={min_notes})"
    return None


def load_corpus(path, settings, cache_dir, min_notes=40, val_fraction=0.05, num_workers=None, verbose=True):
    """Token sequences of a folder, split into train and validation by file, plus a summary dict."""
    entries = load_token_cache(path, settings, cache_dir, num_workers=num_workers, verbose=verbose)
    if not entries:
        raise DatasetError(f'no MIDI files ({", ".join(MIDI_SUFFIXES)} or .zip archives of them) found in '
                           f'{Path(path).resolve()}')
    train, val, skipped = {}, {}, {}
    for name, e in sorted(entries.items()):
        reason = _skip_reason(e, min_notes)
        if reason:
            skipped[name] = reason
        else:
            (val if is_validation_file(name, val_fraction) else train)[name] = e
    if verbose:
        for name, reason in skipped.items():
            if 'min_notes' not in reason:
                print(f'skipping {_printable(name)}: {reason}')
    if not train and not val:
        raise DatasetError(f'nothing usable in {Path(path).resolve()}: {len(entries)} MIDI files found, all '
                           f'skipped ({len(skipped)}); e.g. {next(iter(skipped.items()))}')
    # a tiny folder may hash every file to one side: move the first file over so both splits exist
    if val_fraction > 0 and not val and len(train) > 1:
        name = min(train, key=lambda n: hashlib.sha1(_name_bytes(n)).hexdigest())
        val[name] = train.pop(name)
    if not train:
        name = next(iter(val))
        train[name] = val.pop(name)
    if not val and verbose:
        reason = f'val_fraction={val_fraction}' if val_fraction <= 0 else 'only 1 usable file'
        print(f'no validation files ({reason}): training without validation')
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
    are random crops (the original's rule: a random start in 85% of draws, the beginning otherwise) with optional
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


class PackedDataset(Dataset):
    """Training windows of max_seq_len + 1 tokens cut from the tunes laid end to end: no padding.

    Every tune keeps its start token (834), so a window may hold the end of one tune and the beginning of the
    next, and the model sees where a tune begins. An epoch is (training tokens - 1) // max_seq_len windows that
    tile the stream from a random offset (a new one each epoch, so cuts fall elsewhere). Transposition is per
    tune, not per window: a tune split over two windows moves by the same shift in both, and two tunes in one
    window keep their own keys, as they would if each were its own window. Randomness comes from
    (seed, epoch, index) and (seed, epoch, tune), so a resumed or multi-process run draws the same windows.
    """

    def __init__(self, sequences, max_seq_len, aug=False, aug_range=2, seed=0):
        self.max_seq_len = max_seq_len
        self.aug = aug
        self.aug_range = aug_range
        self.seed = seed
        self.epoch = 0
        self.stream = np.concatenate([np.asarray(s, dtype=np.uint16) for s in sequences])
        lengths = np.array([len(s) for s in sequences])
        self.tune_starts = np.cumsum(lengths) - lengths
        # each tune's pitch range, so its shift can be cut to keep every pitch inside 0-127
        pitch = is_pitch(self.stream)
        tune_of = np.repeat(np.arange(len(sequences)), lengths)
        self.lowest = np.full(len(sequences), 127)
        self.highest = np.zeros(len(sequences), dtype=np.int64)
        np.minimum.at(self.lowest, tune_of[pitch], self.stream[pitch].astype(np.int64) - PITCH_OFFSET)
        np.maximum.at(self.highest, tune_of[pitch], self.stream[pitch].astype(np.int64) - PITCH_OFFSET)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return max(1, (len(self.stream) - 1) // self.max_seq_len)

    def tune_shift(self, tune):
        """The semitones tune `tune` moves by this epoch, reduced so none of its pitches leaves 0-127."""
        # a string seed is hashed with SHA-512, the same in every process (hash() of a str is not)
        shift = random.Random(f'{self.seed}/{self.epoch}/tune {tune}').randint(-self.aug_range, self.aug_range)
        return max(min(shift, 127 - int(self.highest[tune])), -int(self.lowest[tune]))

    def __getitem__(self, idx):
        n = self.max_seq_len + 1
        offset = random.Random(f'{self.seed}/{self.epoch}/offset').randrange(self.max_seq_len)
        start = min(offset + int(idx) * self.max_seq_len, max(0, len(self.stream) - n))
        window = torch.from_numpy(self.stream[start:start + n].astype(np.int64))
        if self.aug and self.aug_range:
            first = np.searchsorted(self.tune_starts, start, side='right') - 1
            last = np.searchsorted(self.tune_starts, start + len(window) - 1, side='right') - 1
            tunes = np.searchsorted(self.tune_starts, np.arange(start, start + len(window)), side='right') - 1
            shifts = torch.tensor([self.tune_shift(t) for t in range(first, last + 1)])
            pitch = is_pitch(window)
            window[pitch] += shifts[torch.from_numpy(tunes - first)][pitch]
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
