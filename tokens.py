"""The vocabulary, and notes <-> tokens: reading a MIDI file into notes (which part plays what: parts.py), writing
tokens back.

Token system (the original's, defined here once and imported everywhere else):
    0-127    time delta since the previous note's start, in time steps
    128-255  note duration, in time steps
    256-833  pitch (256 + MIDI pitch; MIDI pitches 0-127 use 256-383, the original's only produced ids)
    834      start of sequence
    835      padding
Each note becomes [time delta (only when > 0), duration, pitch]; notes are sorted by start, then pitch.
TOKEN_RANGES below names every range of ids, the ones the original leaves unused included: tracks='parts' folds
each note's role (melody, bass, harmony, drums; see parts.py) into its pitch id, a block of 128 ids per role, and
sorts notes that start together by role, then pitch. 'all' and 'melody' use the melody block alone.

A time step is TIMING_FACTOR (32) milliseconds in the original's 'ms' timing, or 1/beat_division of a quarter note
in 'beats' timing (read from the file's own ticks, so notes land on the beat grid whatever the tempo).
"""


from operator import itemgetter

import numpy as np
import torch

import TMIDIX
from parts import DRUM_CHANNEL, ROLES, melody_part, part_roles, role_programs

TIMING_FACTOR = 32          # milliseconds per time/duration step (seed)
TIME_OFFSET = 0             # first time-delta token
DUR_OFFSET = 128            # first duration token
PITCH_OFFSET = 256          # first pitch token
PITCH_END = PITCH_OFFSET + 4 * 128  # one past the last pitch id a note gets (drums', in tracks='parts')
MAX_STEP = 127              # largest time delta / duration step a token can hold
START_IDX = 834             # start-of-sequence token
PAD_IDX = 835               # padding token, ignored by loss and accuracy
NUM_TOKENS = 836            # vocabulary size

DEFAULT_DURATION_STEPS = 8  # duration given to a pitch token that has no duration token before it
BEATS_TICKS_PER_QUARTER = 480   # resolution of files written in 'beats' timing (divisible by 12, 16, 24)
MELODY_CHOICE_VERSION = 3   # bump when parts.choose_melody picks differently, so 'melody' caches are remade
CACHE_VERSION = 1           # bump when tokenization code changes meaning, so old caches are not reused

# Every range of token ids, in one place: [first, last] inclusive. The original's pitch range 256-833 holds 578 ids
# of which a MIDI pitch uses 128 (melody, the original's own ids); the rest are split between the roles of the
# 'parts' mode and the conditioning header (key, meter, style), so the vocabulary stays the original's 836. A tune's
# end is the next tune's start token, so it needs no id of its own.
TOKEN_RANGES = {
    'time': (0, 127),
    'duration': (128, 255),
    'melody': (256, 383),      # the original's pitch ids: every note of 'all' and 'melody' tracks
    'bass': (384, 511),        # 'parts' mode
    'harmony': (512, 639),     # 'parts' mode: every other pitched part
    'drums': (640, 767),       # 'parts' mode: the GM drum key (channel 10)
    'key': (768, 791),         # conditioning (condition.py): tonic C..B major, then C..B minor
    'meter': (792, 801),       # conditioning: the common meters of condition.METERS
    'style': (802, 833),       # conditioning: the dataset's top folders, sorted
    'start': (834, 834),
    'pad': (835, 835),
}
LABEL_KINDS = ('key', 'meter', 'style')  # a header's kinds of id, in its order: a tune_labels model's label slots
LABEL_RANGES = tuple(TOKEN_RANGES[kind] for kind in LABEL_KINDS)
# a training window's head (dataset.split_head), for a tune_labels model: the label slots of the tune it is cut
# from, then the time steps of that tune before the window (its clock reads on from there)
HEAD_SLOTS = len(LABEL_KINDS) + 1
ROLE_OFFSET = {role: TOKEN_RANGES[role][0] for role in ROLES}  # pitch id = ROLE_OFFSET[role] + MIDI pitch
TONAL_END = TOKEN_RANGES['harmony'][1] + 1  # melody, bass and harmony ids transpose; drum ids name instruments
ROLE_CHANNEL = {'melody': 0, 'bass': 1, 'harmony': 2, 'drums': DRUM_CHANNEL}  # where detokenize writes each role
DEFAULT_PROGRAMS = {'melody': 0, 'bass': 33, 'harmony': 0, 'drums': 0}  # GM, from 0: piano, fingered bass, piano


def tokenization_settings(timing='ms', beat_division=12, include_drums=False, tracks='all', condition=False):
    """Everything that changes the token ids a file produces; saved in checkpoints and the cache key.

    tracks: 'all' (every note of every track, merged), 'melody' (one monophonic line per file, see melody_part;
    drums are never that line, whatever include_drums says) or 'parts' (every note, its role in its pitch id; drums
    are always kept, so include_drums is stored as True). 'all' adds no entry, so the cache key of 'all' is the
    key of settings without the option, and settings without it read as 'all': readers use
    settings.get('tracks', 'all').
    condition=True (a model with a key, meter and style header, condition.py) adds 'condition': True, so the
    cache of such a run keeps each file's key and meter labels; without it the settings, and the cache key, are
    those of the function without the option.
    """
    if timing not in ('ms', 'beats'):
        raise ValueError(f"timing must be 'ms' or 'beats', got {timing!r}")
    if tracks not in ('all', 'melody', 'parts'):
        raise ValueError(f"tracks must be 'all', 'melody' or 'parts', got {tracks!r}")
    include_drums = include_drums or tracks == 'parts'
    if int(beat_division) < 1:
        raise ValueError(f'beat_division must be a positive number of steps per quarter note, got {beat_division!r}')
    settings = {'version': CACHE_VERSION, 'timing': timing, 'timing_factor': TIMING_FACTOR,
                'beat_division': int(beat_division), 'include_drums': bool(include_drums)}
    if tracks != 'all':
        settings['tracks'] = tracks
        # the melody choice decides these modes' tokens: a cache made by another version of it is not reused
        settings['melody_choice'] = MELODY_CHOICE_VERSION
    if condition:
        settings['condition'] = True
    return settings


def step_size(settings):
    """Length of one time step in the unit TMIDIX.midi2notes returns for this timing (ms or quarter notes)."""
    if settings['timing'] == 'ms':
        return float(settings['timing_factor'])
    return 1.0 / settings['beat_division']


def bpm_of_tempo(usec_per_quarter):
    """Quarter notes a minute of a MIDI tempo (microseconds a quarter note). A set_tempo of 0, which a file can hold
    but no player can play, counts as MIDI's default tempo, 120."""
    return 60_000_000 / (usec_per_quarter or TMIDIX.DEFAULT_TEMPO)


def seconds_per_step(settings, tempo_bpm):
    """Length of one time step in seconds; 'beats' steps last as long as the tempo the music is played at."""
    if settings['timing'] == 'ms':
        return step_size(settings) / 1000.0
    return step_size(settings) * 60.0 / tempo_bpm


def time_steps(tokens):
    """Elementwise, for a numpy array or torch tensor: the time steps each id moves a tune on (a time delta's own
    value, 0 for any other id)."""
    return tokens * (tokens <= TOKEN_RANGES['time'][1])


def is_pitch(tokens):
    """Elementwise: which ids of a numpy array or torch tensor are pitch tokens a note can carry (any role)."""
    return (tokens >= PITCH_OFFSET) & (tokens < PITCH_END)


def is_tonal(tokens):
    """Elementwise: which ids are pitches that transposition moves (melody, bass, harmony; not drums)."""
    return (tokens >= PITCH_OFFSET) & (tokens < TONAL_END)


def midi_pitch(tokens):
    """MIDI pitch (or GM drum key) of pitch ids of any role: the place in the role's block of 128."""
    return (tokens - PITCH_OFFSET) % 128


def role_of(token):
    """The role whose block holds pitch id token."""
    return ROLES[(token - PITCH_OFFSET) // 128]


def token_kind(token):
    """'time', 'duration', 'pitch', 'start', 'pad' or 'invalid' (ids outside the produced ranges) for one id."""
    if TIME_OFFSET <= token < DUR_OFFSET:
        return 'time'
    if DUR_OFFSET <= token < PITCH_OFFSET:
        return 'duration'
    if PITCH_OFFSET <= token < PITCH_END:
        return 'pitch'
    return {START_IDX: 'start', PAD_IDX: 'pad'}.get(token, 'invalid')


def grammar_table(ends=False):
    """(NUM_TOKENS, NUM_TOKENS) bool tensor, [a, b] when token b may follow token a in the pattern the tokenizer
    writes, [time] duration pitch: a duration after the start token or a time shift, a pitch (of any role) after a
    duration, a time shift or a duration after a pitch; after any other id (a pad, a conditioning id) a note may
    begin. ends=True also lets the start token follow a pitch: the next tune's start is where a tune ends, so
    sampling that stops there writes whole tunes. Sampling draws only such tokens; evaluate.py's grammar
    validity is the share of pairs it allows (ends=False)."""
    ids = torch.arange(NUM_TOKENS)
    time = (ids >= TIME_OFFSET) & (ids < DUR_OFFSET)
    duration = (ids >= DUR_OFFSET) & (ids < PITCH_OFFSET)
    table = (time | duration).repeat(NUM_TOKENS, 1)
    table[time] = duration
    table[duration] = is_pitch(ids)
    table[START_IDX] = duration
    if ends:
        table[is_pitch(ids), START_IDX] = True
    return table


def parts_table(roles, ends=False, without=()):
    """grammar_table() whose pitch columns of every role outside roles, or in without, are False: sampling with it
    draws notes of those roles only (generate.py --parts; --accompany leaves the melody out); ends as
    grammar_table's. Raises ValueError naming the roles for an unknown one, none left, or one given twice (a slip
    in typing the list, which would otherwise pass unseen)."""
    unknown = [role for role in roles if role not in ROLES]
    twice = [role for i, role in enumerate(roles) if role in roles[:i]]
    roles = [role for role in roles if role not in without]
    if unknown or twice or not roles:
        problem = (f'unknown role {unknown[0]!r}' if unknown else f'{twice[0]} is given twice' if twice
                   else 'no role given')
        raise ValueError(f"{problem}: the roles are {', '.join(ROLES)}{', each at most once' if twice else ''}")
    table = grammar_table(ends)
    for role in set(ROLES) - set(roles):
        first, last = TOKEN_RANGES[role]
        table[:, first:last + 1] = False
    return table


# -----------------------------------------------------------------------------
# notes <-> tokens

def tokenize_notes(notes, settings, monophonic=False, roles=None):
    """['note', start, dur, channel, pitch, velocity] events (start-sorted) -> list of token ids.

    Start times are quantized on the absolute grid first and deltas taken between grid points, so rounding never
    accumulates along a melody; only gaps longer than MAX_STEP steps are clipped. 'ms' floors like the original
    (delta_ms // 32); 'beats' snaps to the nearest grid line, since a performed note a hair early is on the beat.
    monophonic=True keeps one note at a time (skyline), decided on the grid: notes on one step sound together.
    roles: each note's role (tracks='parts'): its pitch id is in that role's block, and notes on one step are
    ordered by role, then pitch (id order).
    """
    step = step_size(settings)
    eps = 1e-6  # float tempo arithmetic can give 95.99999 ms for a note exactly on a step boundary
    # whole arrays at once: the same float64 operations as math.floor / round (half to even) of each note, so the
    # same steps, at a fraction of a Python loop's cost (a Lakh file holds thousands of notes)
    snap = np.floor if settings['timing'] == 'ms' else np.rint
    start, duration, channel, pitch = (np.fromiter(map(itemgetter(field), notes), np.float64, len(notes))
                                       for field in (1, 2, 3, 4))
    kept = slice(None) if settings['include_drums'] else channel != DRUM_CHANNEL
    starts = snap(start[kept] / step + eps).astype(np.int64)
    durations = snap(duration[kept] / step + eps).astype(np.int64)
    pitch_ids = pitch[kept].astype(np.int64)
    pitch_ids += np.array([ROLE_OFFSET[role] for role in roles], dtype=np.int64)[kept] if roles else PITCH_OFFSET
    if monophonic:
        line = skyline([[a, d, p] for a, d, p in zip(starts.tolist(), durations.tolist(), pitch_ids.tolist())])
        starts, durations, pitch_ids = np.array(line, dtype=np.int64).reshape(-1, 3).T
    if roles is not None:
        order = np.lexsort((pitch_ids, starts))  # stable, as sorting by (start, pitch id) is
        starts, durations, pitch_ids = starts[order], durations[order], pitch_ids[order]
    # a time token before each note that starts later than the note before it, then duration and pitch
    gaps = np.diff(starts, prepend=starts[:1])
    timed = gaps > 0
    ends = 1 + np.cumsum(2 + timed)  # one past each note's pitch token
    tokens = np.empty(int(ends[-1]) if len(ends) else 1, dtype=np.int64)
    tokens[0] = START_IDX
    tokens[ends[timed] - 3] = TIME_OFFSET + np.minimum(gaps[timed], MAX_STEP)
    tokens[ends - 2] = DUR_OFFSET + np.clip(durations, 0, MAX_STEP)
    tokens[ends - 1] = pitch_ids
    return tokens.tolist()


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


def tokens_to_notes(tokens, roles=False):
    """Token ids -> [start_step, duration_steps, pitch] (steps may be fractional: 0.5 for a zero duration), pitch
    the MIDI pitch (or drum key) whatever the role; roles=True appends each note's role.

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
            notes.append([time, max(steps, 0.5), midi_pitch(tok)] + ([role_of(tok)] if roles else []))
            duration = None
    return notes


def detokenize(tokens, output_file, settings=None, tempo_bpm=120.0, velocity=90, patch=0,
               title='Basic MIDI Transformer', programs=None):
    """Write any token sequence to a MIDI file; returns the ms song (['note', start_ms, dur_ms, ch, pitch, vel])
    for plotting. 'ms' timing: a step is TIMING_FACTOR ms. 'beats' timing: a step is 1/beat_division quarter note,
    written at tempo_bpm so notes sit exactly on the beat grid in any DAW.

    Tokens of tracks='parts' (or any sequence holding a pitch id outside the melody block) become one track per
    role, on ROLE_CHANNEL with the program programs[role] (DEFAULT_PROGRAMS for the roles it leaves out, patch for
    the melody); others become one track on channel 1 playing patch.
    """
    settings = settings or tokenization_settings()
    output_file = str(output_file)
    stem = output_file[:-4] if output_file.lower().endswith('.mid') else output_file
    with_roles = tokens_to_notes(tokens, roles=True)
    if settings.get('tracks', 'all') == 'parts' or any(note[3] != 'melody' for note in with_roles):
        programs = {**DEFAULT_PROGRAMS, 'melody': patch, **(programs or {})}
        return _write_parts(with_roles, stem + '.mid', settings, tempo_bpm, velocity, programs, title)
    notes = [note[:3] for note in with_roles]
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


def _write_parts(notes, path, settings, tempo_bpm, velocity, programs, title):
    """[start_step, duration_steps, pitch, role] notes -> a format-1 file, a track per role that has notes (named
    after the role, on its ROLE_CHANNEL, playing programs[role]); returns the ms song in the notes' order."""
    if settings['timing'] == 'ms':  # a tick is a millisecond: 1000 ticks per quarter at 60 bpm
        division, usec_per_quarter = 1000, 1_000_000
        ticks_per_step = float(settings['timing_factor'])
    else:
        division, usec_per_quarter = BEATS_TICKS_PER_QUARTER, int(round(60_000_000 / tempo_bpm))
        ticks_per_step = BEATS_TICKS_PER_QUARTER / settings['beat_division']
    events = [['note', int(round(t * ticks_per_step)), int(round(d * ticks_per_step)), ROLE_CHANNEL[role], p,
               velocity] for t, d, p, role in notes]
    score = [division, [['track_name', 0, title.encode('latin-1', 'replace')], ['set_tempo', 0, usec_per_quarter]]]
    for role in ROLES:
        channel = ROLE_CHANNEL[role]
        mine = [event for event in events if event[3] == channel]
        if mine:
            score.append([['track_name', 0, role.encode()], ['patch_change', 0, channel, programs[role]]] + mine)
    with open(path, 'wb') as f:
        f.write(TMIDIX.score2midi(score))
    ms_per_tick = usec_per_quarter / 1000 / division
    return [['note', e[1] * ms_per_tick, e[2] * ms_per_tick, e[3], e[4], velocity] for e in events]


def drum_notes_left_out(midi_bytes, settings):
    """How many channel-10 drum notes settings leave out of a file (0 when they keep drums or pick one melody), so
    that a file without usable notes can be told from a drum track."""
    if settings['include_drums'] or settings.get('tracks', 'all') != 'all':
        return 0
    return tokenize_midi(midi_bytes, dict(settings, include_drums=True))[1]


def tokens_or_error(midi_bytes, settings):
    """tokenize_midi's token array, or the TMIDIX.MIDIError that refused the file, returned rather than raised: the
    tools that go through a whole collection note such a file and go on."""
    try:
        return tokenize_midi(midi_bytes, settings)[0]
    except TMIDIX.MIDIError as error:
        return error


def tokenize_midi(midi_bytes, settings, with_programs=False):
    """MIDI bytes -> (uint16 token array, number of notes used, tempo in usec per quarter). Raises TMIDIX.MIDIError.
    with_programs=True adds {role: GM program most of its notes play} last (tracks='parts'; {} otherwise)."""
    unit = 'ms' if settings['timing'] == 'ms' else 'beats'
    tracks = settings.get('tracks', 'all')
    if tracks != 'all':
        notes, tempo, names, programs = TMIDIX.midi2notes(midi_bytes, unit=unit, with_tempo=True, with_track=True,
                                                          with_programs=True)
    if tracks == 'melody':
        tokens = tokenize_notes(melody_part(notes, names, programs)[0], settings, monophonic=True)
    elif tracks == 'parts':
        roles = part_roles(notes, names, programs)[0]
        tokens = tokenize_notes(notes, settings, roles=roles)
    else:
        notes, tempo = TMIDIX.midi2notes(midi_bytes, unit=unit, with_tempo=True)
        tokens = tokenize_notes(notes, settings)
    tokens = np.asarray(tokens, dtype=np.uint16)
    n_notes = int(is_pitch(tokens).sum())
    if with_programs:
        return tokens, n_notes, tempo, role_programs(notes, roles, programs) if tracks == 'parts' else {}
    return tokens, n_notes, tempo
