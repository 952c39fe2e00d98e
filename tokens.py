"""The vocabulary, and notes <-> tokens: reading a MIDI file into notes, choosing its melody, writing tokens back.

Token system (the original's, defined here once and imported everywhere else):
    0-127    time delta since the previous note's start, in time steps
    128-255  note duration, in time steps
    256-833  pitch (256 + MIDI pitch; MIDI pitches 0-127 use 256-383, the rest of the range is never produced)
    834      start of sequence
    835      padding
Each note becomes [time delta (only when > 0), duration, pitch]; notes are sorted by start, then pitch.
TOKEN_RANGES below names every range of ids, the ones the original leaves unused included.

A time step is TIMING_FACTOR (32) milliseconds in the original's 'ms' timing, or 1/beat_division of a quarter note
in 'beats' timing (read from the file's own ticks, so notes land on the beat grid whatever the tempo).
"""

import math
import re

import numpy as np
import torch

import TMIDIX

TIMING_FACTOR = 32          # milliseconds per time/duration step (seed)
TIME_OFFSET = 0             # first time-delta token
DUR_OFFSET = 128            # first duration token
PITCH_OFFSET = 256          # first pitch token
PITCH_END = PITCH_OFFSET + 128  # one past the last pitch token a MIDI file can give (the original's range runs to 833)
MAX_STEP = 127              # largest time delta / duration step a token can hold
START_IDX = 834             # start-of-sequence token
PAD_IDX = 835               # padding token, ignored by loss and accuracy
NUM_TOKENS = 836            # vocabulary size

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

# Every range of token ids, in one place: [first, last] inclusive. The original's pitch range 256-833 holds 578 ids
# of which a MIDI pitch uses 128 (melody, the original's own ids); the rest are split between the roles of the
# 'parts' mode and the conditioning and end-of-piece tokens, so the vocabulary stays the original's 836.
TOKEN_RANGES = {
    'time': (0, 127),
    'duration': (128, 255),
    'melody': (256, 383),      # the original's pitch ids: every note of 'all' and 'melody' tracks
    'bass': (384, 511),        # 'parts' mode
    'harmony': (512, 639),     # 'parts' mode: every other pitched part
    'drums': (640, 767),       # 'parts' mode: the GM drum key (channel 10)
    'condition': (768, 833),   # key, meter, style and end-of-piece tokens
    'start': (834, 834),
    'pad': (835, 835),
}


def tokenization_settings(timing='ms', beat_division=12, include_drums=False, tracks='all'):
    """Everything that changes the token ids a file produces; saved in checkpoints and the cache key.

    tracks: 'all' (every note of every track, merged) or 'melody' (one monophonic line per file, see melody_part;
    drums are never that line, whatever include_drums says). 'all' adds no entry, so the cache key of 'all' is the
    key of settings without the option, and settings without it read as 'all': readers use
    settings.get('tracks', 'all').
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
