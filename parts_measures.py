"""Measures of music in several parts (tracks='parts'): notes in, numbers out (evaluate.py, docs/parts.md).

A piece is a list of notes [start_step, duration_steps, pitch, role], as tokens.tokens_to_notes(tokens, roles=True)
gives them: steps are the tokenization's time steps, pitch the MIDI pitch (the GM key for drums), role one of
parts.ROLES. A note sounds from its start up to, not including, start + duration. Drum keys are no pitches, so every
measure across roles (simultaneity, crossing, consonance, parallels) looks at the pitched notes alone.

Each function judges one piece; a measure a piece cannot give (a role it lacks, no two notes sounding together)
is NaN, and mean_over_pieces leaves those pieces out.
"""

import numpy as np

# interval classes (semitones modulo the octave) counted consonant: unison and octave 0, thirds 3 and 4, the fifth
# 7, sixths 8 and 9. The fourth (5) is left out, as counterpoint treats it against the bass
CONSONANT = frozenset((0, 3, 4, 7, 8, 9))
FIFTH, OCTAVE = 7, 0  # interval classes whose parallel motion counterpoint forbids


def role_notes(notes, role):
    return [note for note in notes if note[3] == role]


def pitched(notes):
    return [note for note in notes if note[3] != 'drums']


def span_steps(notes):
    """Steps from the first onset to the end of the last note to stop, every role counted."""
    return max(n[0] + n[1] for n in notes) - min(n[0] for n in notes) if notes else 0


def sounding_steps(notes):
    """Steps in which at least one of the notes sounds (the length of the union of their spans)."""
    total, reached = 0.0, -np.inf
    for start, end in sorted((n[0], n[0] + n[1]) for n in notes):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


# -----------------------------------------------------------------------------
# one role

def role_pitch_range(notes, role):
    """Highest minus lowest pitch of the role's notes, in semitones (NaN without any)."""
    pitches = [n[2] for n in role_notes(notes, role)]
    return float(max(pitches) - min(pitches)) if pitches else float('nan')


def role_notes_per_second(notes, role, step_seconds):
    """The role's notes over the whole piece's span (first onset of any role to the last end), in seconds."""
    span = span_steps(notes) * step_seconds
    return len(role_notes(notes, role)) / span if span > 0 else float('nan')


def role_sounding_share(notes, role):
    """Share of the piece's span in which at least one note of the role sounds."""
    span = span_steps(notes)
    return sounding_steps(role_notes(notes, role)) / span if span > 0 else float('nan')


# -----------------------------------------------------------------------------
# across roles

def simultaneity(notes):
    """Mean number of pitched notes sounding together over the time at least one sounds: their summed durations
    over the length of time any of them sounds (1 for a single line, 4 for four voices that always sound)."""
    notes = pitched(notes)
    sounding = sounding_steps(notes)
    return sum(n[1] for n in notes) / sounding if sounding > 0 else float('nan')


def _sounding_at_onsets(notes):
    """(onset step, [pitched notes sounding then]) for every step on which a pitched note starts, in time order:
    the notes that start there and the ones held over from before."""
    order = sorted(pitched(notes), key=lambda n: n[0])
    active, i = [], 0
    while i < len(order):
        onset = order[i][0]
        active = [n for n in active if n[0] + n[1] > onset]
        while i < len(order) and order[i][0] == onset:
            active.append(order[i])
            i += 1
        yield onset, active


def _line_extremes(notes, upper, lower):
    """Per time segment in which something changes, (top pitch of the upper role sounding or None, bottom pitch of
    the lower role sounding or None, segment length): the elementary segments between all starts and ends."""
    notes = [n for n in pitched(notes) if n[3] in (upper, lower)]
    bounds = np.unique([n[0] for n in notes] + [n[0] + n[1] for n in notes])
    top = np.full(max(len(bounds) - 1, 0), -1.0)
    bottom = np.full(len(top), np.inf)
    for start, duration, pitch, role in notes:
        first, last = np.searchsorted(bounds, [start, start + duration])
        if role == upper:
            top[first:last] = np.maximum(top[first:last], pitch)
        if role == lower:
            bottom[first:last] = np.minimum(bottom[first:last], pitch)
    return top, bottom, np.diff(bounds)


def voice_crossing(notes, upper='melody', lower='bass'):
    """Share of the time both roles sound in which the upper role's highest note is below the lower role's lowest
    (the melody sounds below the bass); NaN when they never sound together."""
    top, bottom, length = _line_extremes(notes, upper, lower)
    both = (top >= 0) & np.isfinite(bottom)
    together = length[both].sum()
    return float(length[both & (top < bottom)].sum() / together) if together > 0 else float('nan')


def onset_consonance(notes, against=None):
    """Share of consonant intervals (CONSONANT) among the pairs of pitched notes sounding at each onset, pooled over
    the piece's onsets; against='melody' counts only the pairs of a note of that role with a note of another.
    NaN when no onset has such a pair."""
    consonant = pairs = 0
    for _, active in _sounding_at_onsets(notes):
        for i, a in enumerate(active):
            for b in active[i + 1:]:
                if against is None or (a[3] == against) != (b[3] == against):
                    pairs += 1
                    consonant += abs(a[2] - b[2]) % 12 in CONSONANT
    return consonant / pairs if pairs else float('nan')


def outer_pair(active, upper='melody', lower='bass'):
    """(highest pitch of the upper role, lowest pitch of the lower role) among the notes sounding; None when either
    role is silent."""
    ups = [n[2] for n in active if n[3] == upper]
    lows = [n[2] for n in active if n[3] == lower]
    return (max(ups), min(lows)) if ups and lows else None


def parallel_motion(before, upper, lower):
    """Whether the pair before (upper pitch, lower pitch) moving to (upper, lower) is a parallel fifth or octave:
    both pairs a fifth apart (7 semitones modulo the octave, compounds included) or both an octave apart (0 modulo
    the octave, unisons included), both voices moving the same way. upper and lower may be numpy arrays of
    candidate pitches (voice_leading.py weighs a whole role's pitches at once)."""
    interval = (before[0] - before[1]) % 12
    same_way = (np.sign(np.subtract(upper, before[0])) == np.sign(np.subtract(lower, before[1]))) \
        & (np.asarray(upper) != before[0])
    return same_way & (np.subtract(upper, lower) % 12 == interval) & (interval in (FIFTH, OCTAVE))


def parallels(notes, upper='melody', lower='bass'):
    """(parallel fifths, parallel octaves) between the upper role's top note and the lower role's bottom note.

    At every pitched onset the pair (top of upper, bottom of lower) sounding then is read (outer_pair); onsets
    where neither changes are skipped, and an onset where either role is silent breaks the line. Each two pairs in
    a row that make a parallel_motion are one parallel fifth or octave.
    """
    pairs = []
    for _, active in _sounding_at_onsets(notes):
        pair = outer_pair(active, upper, lower)
        if not pairs or pair != pairs[-1]:
            pairs.append(pair)
    fifths = octaves = 0
    for before, after in zip(pairs, pairs[1:]):
        if before is not None and after is not None and parallel_motion(before, *after):
            fifths += (before[0] - before[1]) % 12 == FIFTH
            octaves += (before[0] - before[1]) % 12 == OCTAVE
    return fifths, octaves


def parallels_per_100_notes(notes, upper='melody', lower='bass'):
    """Parallel fifths and octaves (parallels) per 100 notes of the two roles; NaN when either role is missing."""
    counted = len(role_notes(notes, upper)), len(role_notes(notes, lower))
    if not all(counted):
        return float('nan')
    return 100.0 * sum(parallels(notes, upper, lower)) / sum(counted)


def mean_over_pieces(pieces, measure):
    """Mean of measure(piece) over the pieces that give a number (NaN when none does)."""
    values = [value for value in map(measure, pieces) if not np.isnan(value)]
    return float(np.mean(values)) if values else float('nan')
