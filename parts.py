"""Which part of a MIDI file plays what: the part that carries the tune, and the roles of tracks='parts'.

A part is one (track, channel) pair of a file's notes, as TMIDIX.midi2notes(with_track=True) gives them: notes
['note', start, duration, channel, pitch, velocity, track] in ms or quarter notes (every measure here is a share
or a ratio, so the unit does not matter). Channel 10 (9 counting from 0) is drums, never a pitched part.

The tune (melody_part): a part whose track is named like one (MELODY_NAME) wins, then one named like an
ensemble's top voice (TOP_VOICE_NAME: 'Soprano', 'Violin I'). Otherwise each part is scored
on what makes a tune (TUNE_WEIGHTS): one note at a time, motion by steps and small leaps, a singing register,
presence across the song, its share of the notes, a lead-like name ('Lead', 'Solo') and a program that is not a
pad, ensemble or bass sound; a slightly higher part wins a near tie, as a tune lies above its accompaniment.

Roles (part_roles): drums = channel 10; melody = the tune's part; bass = parts named bass or playing a GM bass
program (33-40, 32-39 counting from 0), else the lowest part when there are at least three pitched parts;
harmony = every other pitched part.
"""

import re

DRUM_CHANNEL = 9            # General MIDI percussion channel (10 in 1-based numbering)
MIN_PART_NOTES = 8          # a part needs this many notes to be the tune (any part may be, when none has)
ROLES = ('melody', 'bass', 'harmony', 'drums')  # token id order too: notes that start together follow it
SINGING_RANGE = (52, 84)    # MIDI pitches a tune's mean pitch sits in (E3-C6); the score falls off an octave out
STEP_SEMITONES = 5          # an interval up to a fourth is a step or a small leap
OVERLAP_SHARE = 0.3         # a note overlaps another when they share more than this share of the shorter one
PRESENCE_SEGMENTS = 16      # the song is cut into this many equal spans to measure where a part sounds
TUNE_WEIGHTS = {'single': 3.0, 'motion': 1.0, 'register': 1.0, 'presence': 1.0, 'amount': 1.0,
                'lead_name': 0.5, 'program': 0.5, 'height': 0.01}  # height: per semitone of mean pitch above 60

# track names that say a part is the tune, as whole words in any case, also cut off by a short name field
# ('Lead Voca', 'Melod'): 'MELODY' (POP909), 'Melody 1', 'Lead Vocal', 'Voice', 'vocals', 'Mélodie', 'Melodía',
# 'Chant', 'Tune', 'Canto', 'Gesang', 'Singer'. Only letters around the word break a match ('Melody1' matches,
# 'melodic' does not). A bare 'lead' or 'solo' is a weaker sign (LEAD_NAME): 'Lead Guitar' plays riffs as often
# as the tune. GM program names used as track names ('Voice Oohs', 'Choir Aahs') are pads (ACCOMPANIMENT_NAME).
_WORD = r'(?<![^\W\d_])({})(?![^\W\d_])'
MELODY_NAME = re.compile(_WORD.format(r'melo|melod|melody|m[eé]lodie|melod[ií]a|voc|voca|vocals?|vocalist|vox|'
                                      r'voices?|voz|voix|sing|singer|singing|chant|tune|canto|gesang'), re.IGNORECASE)
LEAD_NAME = re.compile(_WORD.format(r'lead|solo'), re.IGNORECASE)
ACCOMPANIMENT_NAME = re.compile(_WORD.format(r'oohs?|aahs?|choir|pad|backing|back|bgv|harmony|chords?|strings?|'
                                             r'accomp'), re.IGNORECASE)
# the top voice of an ensemble, which carries the tune by convention (a chorale's soprano, a quartet's first
# violin): 'Soprano', 'Sopran', 'Cantus', 'Superius', 'Discantus', 'Treble', 'Violin I', 'Violino 1', 'Vln. I',
# '1st Violin', 'First Violin'. It counts after MELODY_NAME, so a pop song's 'Vocal' still beats its 'Violin I'.
TOP_VOICE_NAME = re.compile(_WORD.format(r'soprano|sopran|cantus|superius|discantus|treble|'
                                         r'(?:violin[oe]?|vln?\.?)(?:\s*1|\s+i|\s*primo)|(?:1st|first)\s+violin'),
                            re.IGNORECASE)
# a bass part: 'Bass', 'Synth Bass 1', 'E.Bass', 'Basso continuo', 'Contrabass', 'Bajo' ('Bassoon' is not one)
BASS_NAME = re.compile(_WORD.format(r'bass|basses|bassline|basso|contrabass|kontrabass|bajo|ba[sß]'), re.IGNORECASE)
BASS_PROGRAMS = range(32, 40)  # GM acoustic, electric, fretless, slap and synth basses
# GM programs that accompany far more often than they carry the tune: string and voice ensembles, pads
ACCOMPANIMENT_PROGRAMS = set(range(48, 56)) | set(range(88, 96)) | set(BASS_PROGRAMS)


def _track_name(raw):
    """Track names are bytes in no declared encoding: UTF-8 where they decode as such, else Latin-1 (never fails)."""
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return raw.decode('latin-1')


def pitched_parts(notes):
    """{(track, channel): its notes in order} of every part that is not drums."""
    parts = {}
    for note in notes:
        if note[3] != DRUM_CHANNEL:
            parts.setdefault((note[6], note[3]), []).append(note)
    return parts


def part_label(key, parts, names):
    """How a user finds a part: 'track 2 'Lead Voca'' where notes sit on several tracks (with ' channel 3' when its
    track holds more than one part), 'channel 3' in a one-track file. Channels count from 1, as in a DAW."""
    track, channel = key
    if len({t for t, _ in parts}) == 1:
        return f'channel {channel + 1}'
    name = _track_name(names[track]).strip() if track < len(names) else ''
    label = f"track {track} '{name}'" if name else f'track {track}'
    if sum(t == track for t, _ in parts) > 1:
        label += f' channel {channel + 1}'
    return label


def _single_share(part):
    """Share of a part's notes that sound alone: no other note of the part shares more than OVERLAP_SHARE of the
    shorter of the two (a legato singer's slight overlap is still one note at a time; a chord or a pad is not)."""
    alone = [True] * len(part)
    reach, reach_index = None, None  # the note sounding furthest of those before
    for i, note in enumerate(part):
        start, end = note[1], note[1] + note[2]
        if reach is not None:
            earlier = part[reach_index]
            shared = min(reach, end) - start
            if shared > OVERLAP_SHARE * max(min(earlier[2], note[2]), 0) or (start == earlier[1] and shared >= 0):
                alone[i] = alone[reach_index] = False
        if reach is None or end > reach:
            reach, reach_index = end, i
    return sum(alone) / len(part)


def _top_line(part):
    """Pitches of the highest note of each onset, in order: the line a listener follows."""
    top = {}
    for note in part:
        top[note[1]] = max(top.get(note[1], -1), note[4])
    return [top[start] for start in sorted(top)]


def _motion_share(line):
    """Share of the line's intervals that are steps or small leaps; a repeated note counts half."""
    if len(line) < 2:
        return 1.0
    moves = [abs(b - a) for a, b in zip(line, line[1:])]
    return sum(1.0 if 0 < move <= STEP_SEMITONES else 0.5 if move == 0 else 0.0 for move in moves) / len(moves)


def _register_fit(mean_pitch):
    low, high = SINGING_RANGE
    outside = max(low - mean_pitch, mean_pitch - high, 0)
    return max(0.0, 1.0 - outside / 12)


def _presence(part, song_start, song_end):
    """Share of the song's PRESENCE_SEGMENTS spans in which the part sounds."""
    span = (song_end - song_start) or 1
    segments = set()
    for note in part:
        first = int((note[1] - song_start) / span * PRESENCE_SEGMENTS)
        last = int((note[1] + max(note[2], 0) - song_start) / span * PRESENCE_SEGMENTS - 1e-9)
        segments.update(range(min(first, PRESENCE_SEGMENTS - 1), min(max(last, first), PRESENCE_SEGMENTS - 1) + 1))
    return len(segments) / PRESENCE_SEGMENTS


def tune_features(parts, names, programs):
    """{key: {measure: value}} for melody_part's score; the raw figures the reason line quotes come along."""
    every = [note for part in parts.values() for note in part]
    song_start = min(note[1] for note in every)
    song_end = max(note[1] + note[2] for note in every)
    lines = {key: _top_line(part) for key, part in parts.items()}
    most_onsets = max(len(line) for line in lines.values())
    features = {}
    for key, part in parts.items():
        name = _track_name(names[key[0]]) if key[0] < len(names) else ''
        mean_pitch = sum(note[4] for note in part) / len(part)
        program = programs.get(key)
        features[key] = {
            'single': _single_share(part),
            'motion': _motion_share(lines[key]),
            'register': _register_fit(mean_pitch),
            'presence': _presence(part, song_start, song_end),
            'amount': len(lines[key]) / most_onsets,
            'lead_name': 1.0 if LEAD_NAME.search(name) and not ACCOMPANIMENT_NAME.search(name) else 0.0,
            'program': 0.0 if program in ACCOMPANIMENT_PROGRAMS else 1.0,
            'height': mean_pitch - 60,
            'mean_pitch': mean_pitch, 'notes': len(part), 'onsets': len(lines[key]), 'program_number': program,
        }
    return features


def tune_score(feature):
    return sum(weight * feature[name] for name, weight in TUNE_WEIGHTS.items())


def _named_like_melody(name):
    return bool(MELODY_NAME.search(name)) and not ACCOMPANIMENT_NAME.search(name)


def _why(winner, runner_up, label, other):
    """The measure that puts the winner furthest ahead of the runner-up, in words."""
    gains = {name: weight * (winner[name] - runner_up[name]) for name, weight in TUNE_WEIGHTS.items()}
    decider = max(gains, key=gains.get)
    if gains[decider] <= 0:
        return f'{label}: as good a tune as {other} by every measure; the first part in the file wins'
    percent = lambda value: f'{100 * value:.0f}%'
    said = {
        'single': f"most one note at a time ({percent(winner['single'])} of its notes alone vs "
                  f"{percent(runner_up['single'])})",
        'motion': f"moves most by steps and small leaps ({percent(winner['motion'])} vs "
                  f"{percent(runner_up['motion'])})",
        'register': f"in a singing register (mean pitch {winner['mean_pitch']:.0f} vs {runner_up['mean_pitch']:.0f})",
        'presence': f"present through more of the song ({percent(winner['presence'])} vs "
                    f"{percent(runner_up['presence'])})",
        'amount': f"more of the notes ({winner['onsets']} onsets vs {runner_up['onsets']})",
        'lead_name': 'named like a lead part',
        'program': f"{other} plays program {runner_up['program_number']}, a pad, ensemble or bass sound",
        'height': f"higher (mean pitch {winner['mean_pitch']:.0f} vs {runner_up['mean_pitch']:.0f})",
    }[decider]
    return (f"{label}: {said}; {percent(winner['single'])} one note at a time, mean pitch "
            f"{winner['mean_pitch']:.0f}; next best {other}")


def choose_melody(notes, track_names, programs=None):
    """(key of the part that carries the tune, the parts, a one-line reason); key None when no part is pitched.

    A part whose track is named like a melody and has MIN_PART_NOTES notes wins (the best scored of several), else
    one named like an ensemble's top voice (TOP_VOICE_NAME: a chorale's soprano, a quartet's first violin, whose
    inner voices often have more notes and move as smoothly); names count only when notes sit on more than one
    track, since the one track of a format-0 file is named after the song. Otherwise the parts with MIN_PART_NOTES
    notes (every part, when none has) are scored (tune_score) and the best wins; a tie goes to the first
    (track, channel).
    """
    parts = pitched_parts(notes)
    if not parts:
        return None, parts, 'no pitched notes (drums only, or an empty file)'
    programs = programs or {}
    features = tune_features(parts, track_names, programs)
    ranked = sorted(sorted(parts), key=lambda key: -tune_score(features[key]))  # stable: ties keep file order
    label = lambda key: part_label(key, parts, track_names)
    if len({track for track, _ in parts}) > 1:
        for named_like, said in ((_named_like_melody, 'named like a melody'),
                                 (TOP_VOICE_NAME.search, 'named like the top voice of an ensemble')):
            named = [key for key in ranked if len(parts[key]) >= MIN_PART_NOTES
                     and named_like(_track_name(track_names[key[0]]) if key[0] < len(track_names) else '')]
            if named:
                return named[0], parts, f'{label(named[0])}: {said}'
    contenders = [key for key in ranked if len(parts[key]) >= MIN_PART_NOTES] or ranked
    best = contenders[0]
    if len(contenders) == 1:
        alone = 'the only pitched part' if len(parts) == 1 else f'the only part with {MIN_PART_NOTES} or more notes'
        return best, parts, f'{label(best)}: {alone}'
    return best, parts, _why(features[best], features[contenders[1]], label(best), label(contenders[1]))


def melody_part(notes, track_names, programs=None):
    """(the notes of the one part that carries the tune, in their order ([] if none), why it was chosen): see
    choose_melody. programs: {(track, channel): GM program} (TMIDIX.midi2notes(with_programs=True))."""
    key, parts, reason = choose_melody(notes, track_names, programs)
    return (parts[key] if key is not None else []), reason


def part_roles(notes, track_names, programs=None):
    """(the role of each note, in the order of notes; {role: [part keys]}; the melody choice's reason).

    drums = channel 10; melody = choose_melody's part; bass = parts named bass (BASS_NAME, names read only when
    notes sit on several tracks) or whose program is a GM bass, else the lowest part (by mean pitch) when there
    are at least three pitched parts; harmony = the rest. A file of one pitched part is all melody.
    """
    programs = programs or {}
    melody, parts, reason = choose_melody(notes, track_names, programs)
    several_tracks = len({track for track, _ in parts}) > 1
    others = [key for key in sorted(parts) if key != melody]

    def named_bass(key):
        return several_tracks and key[0] < len(track_names) and BASS_NAME.search(_track_name(track_names[key[0]]))
    bass = [key for key in others if named_bass(key) or programs.get(key) in BASS_PROGRAMS]
    if not bass and len(parts) >= 3:
        bass = [min(others, key=lambda key: (sum(note[4] for note in parts[key]) / len(parts[key]), key))]
    role_of_part = {key: 'harmony' for key in others}
    role_of_part.update({key: 'bass' for key in bass})
    if melody is not None:
        role_of_part[melody] = 'melody'
    roles = ['drums' if note[3] == DRUM_CHANNEL else role_of_part[note[6], note[3]] for note in notes]
    members = {role: [key for key in sorted(role_of_part) if role_of_part[key] == role] for role in ROLES[:3]}
    members['drums'] = sorted({(note[6], note[3]) for note in notes if note[3] == DRUM_CHANNEL})
    return roles, members, reason


def _most_common(pairs):
    """{key: its most frequent value} over (key, value) pairs; a tie goes to the lower value."""
    tally = {}
    for key, value in pairs:
        tally.setdefault(key, {}).setdefault(value, 0)
        tally[key][value] += 1
    return {key: max(sorted(counts), key=counts.get) for key, counts in tally.items()}


def role_programs(notes, roles, programs):
    """{role: the GM program most of its notes play} for the pitched roles whose parts have a program change;
    drums have a kit, not a program, and are left out."""
    return _most_common((role, programs[note[6], note[3]]) for note, role in zip(notes, roles)
                        if role != 'drums' and (note[6], note[3]) in programs)


def parse_programs(text):
    """'melody=73,bass=33' -> {'melody': 73, 'bass': 33} (GM programs counted from 0; '' -> {}). Raises
    ValueError saying what is wrong."""
    programs = {}
    for item in filter(None, (piece.strip() for piece in text.split(','))):
        role, _, number = item.partition('=')
        role = role.strip()
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in {text!r}: roles are {', '.join(ROLES)}")
        if not number.strip().isdigit() or int(number) > 127:
            raise ValueError(f'{item!r} in {text!r}: a program is a number 0-127 (GM, counted from 0)')
        if role in programs:
            raise ValueError(f'{role} is given twice in {text!r}: one program a role')
        programs[role] = int(number)
    return programs


def format_programs(programs):
    """{role: program} -> 'melody=73,bass=33', roles in ROLES order: the text parse_programs reads."""
    return ','.join(f'{role}={programs[role]}' for role in ROLES if role in programs)


def common_programs(per_file):
    """{role: the program most files give that role} over an iterable of role_programs results."""
    return _most_common((role, program) for programs in per_file for role, program in programs.items())
