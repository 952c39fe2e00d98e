"""Voice leading for a tracks='parts' model (docs/parts.md): the melody and bass pitches that would move the two in
parallel fifths or octaves, or put the melody below the bass. While sampling (--voice_leading) they are taken out of
the distribution the next pitch is drawn from; in training (Args.voice_leading_loss) the loss pushes the model's
probability away from them, so the model itself learns to leave them out.

The rules are parts_measures.py's own (outer_pair, parallel_motion), so a pitch this masks is one that measure would
count. Each row of a batch follows its own piece from the tokens generated so far, the ones a force hook placed
(accompany.py's melody) included.
"""

import numpy as np
import torch

from parts_measures import outer_pair, parallel_motion
from tokens import (
    DEFAULT_DURATION_STEPS,
    DUR_OFFSET,
    NUM_TOKENS,
    ROLE_OFFSET,
    START_IDX,
    TIME_OFFSET,
    midi_pitch,
    role_of,
    token_kind,
)

CANDIDATES = np.arange(128)  # every MIDI pitch a melody or bass id can carry


class PieceSoFar:
    """One row's piece as far as it is generated: the time reached, the pitched notes that may still sound, and the
    last outer pair (melody top, bass bottom) of the onsets before the current one, read as parts_measures.parallels
    reads them (a pair equal to the one before is no new pair). Notes are read as tokens.tokens_to_notes reads them."""

    def __init__(self):
        self.time = 0            # onset of the notes the next tokens add, in steps
        self.duration = None     # the duration token's steps waiting for its pitch
        self.sounding = []       # [start, duration, pitch, role] of pitched notes that may sound at self.time
        self.onset = False       # whether a pitched note starts at self.time
        self.last_pair = None    # outer pair of the latest pitched onset before self.time (None: a role was silent)

    def active(self):
        """The notes sounding at the current onset: those starting there and those held over (parts_measures)."""
        return [n for n in self.sounding if n[0] == self.time or n[0] + n[1] > self.time]

    def add(self, token):
        kind = token_kind(token)
        if token == START_IDX:  # a new piece
            self.__init__()
        elif kind == 'time' and token > TIME_OFFSET:
            if self.onset:
                self.last_pair = outer_pair(self.active())
            self.time += token - TIME_OFFSET
            self.sounding = [n for n in self.sounding if n[0] + n[1] > self.time]
            self.onset = False
        elif kind == 'duration':
            self.duration = token - DUR_OFFSET
        elif kind == 'pitch':
            role = role_of(token)
            steps = DEFAULT_DURATION_STEPS if self.duration is None else self.duration
            if role != 'drums':  # a drum key is no pitch
                self.sounding.append([self.time, max(steps, 0.5), int(midi_pitch(token)), role])
                self.onset = True
            self.duration = None

    def masked_pitches(self):
        """(melody pitches, bass pitches) a note starting now must not take: those making the outer pair a parallel
        fifth or octave after the last one, or putting the melody's top below the bass's bottom."""
        active = self.active()
        ups = [n[2] for n in active if n[3] == 'melody']
        lows = [n[2] for n in active if n[3] == 'bass']
        melody = bass = np.zeros(len(CANDIDATES), dtype=bool)  # nothing to move against: nothing masked
        if lows:  # a melody note moves the top when it is above the melody sounding already
            tops = np.maximum(CANDIDATES, max(ups)) if ups else CANDIDATES
            melody = self._breaks(tops, min(lows))
        if ups:
            bottoms = np.minimum(CANDIDATES, min(lows)) if lows else CANDIDATES
            bass = self._breaks(max(ups), bottoms)
        return melody, bass

    def _breaks(self, top, bottom):
        crossed = np.less(top, bottom)
        if self.last_pair is None:
            return crossed
        return crossed | parallel_motion(self.last_pair, top, bottom)


def masked_ids(piece):
    """piece.masked_pitches() as a bool row over the vocabulary: True at the melody and bass ids a note starting now
    must not take."""
    row = np.zeros(NUM_TOKENS, dtype=bool)
    melody, bass = piece.masked_pitches()
    row[ROLE_OFFSET['melody']:ROLE_OFFSET['melody'] + 128] = melody
    row[ROLE_OFFSET['bass']:ROLE_OFFSET['bass'] + 128] = bass
    return row


def avoided_targets(x):
    """For training windows x (rows, length): a bool tensor (rows, length - 1, NUM_TOKENS), True where the token
    after position t would be a melody or bass pitch the sampling mask takes out, as read from the window up to t.
    The token the window does hold next is never avoided: a parallel the music itself writes is no error to learn
    away. A window cut inside a piece starts reading at its first token, so its first onset has no pair before it."""
    avoid = np.zeros((x.shape[0], x.shape[1] - 1, NUM_TOKENS), dtype=bool)
    for r, row in enumerate(x.tolist()):
        piece = PieceSoFar()
        for t, token in enumerate(row[:-1]):
            piece.add(token)
            if piece.duration is not None:  # the next token is a pitch
                avoid[r, t] = masked_ids(piece)
                avoid[r, t, row[t + 1]] = False
    return torch.from_numpy(avoid).to(x.device)


class VoiceLeading:
    """constrain hook for AutoregressiveWrapper.generate: for each row about to draw a pitch (a duration token
    waiting for its pitch, as the token grammar has it after every duration), the melody and bass ids
    PieceSoFar.masked_pitches rules out are False, every other id True; None when no row is about to draw a pitch.
    generate keeps a row's distribution as it is where nothing would be left."""

    def __init__(self, rows):
        self.pieces = [PieceSoFar() for _ in range(rows)]
        self.read = 0  # tokens of every row read so far (the rows of a batch grow together)

    def __call__(self, out):
        new = out[:, self.read:].tolist()
        self.read = out.shape[1]
        drawing = []  # rows whose next token is a pitch
        for index, (piece, tokens) in enumerate(zip(self.pieces, new)):
            for token in tokens:
                piece.add(token)
            if piece.duration is not None:
                drawing.append(index)
        if not drawing:
            return None
        limit = np.ones((len(new), NUM_TOKENS), dtype=bool)
        for index in drawing:
            limit[index] = ~masked_ids(self.pieces[index])
        return torch.from_numpy(limit).to(out.device)
