"""Accompanying a given melody: the model writes bass, harmony and drums while each melody note of a file is placed
in the sequence when it is due (generate.py --accompany, docs/parts.md).

The model sees the melody only up to the note being placed, never what follows: AutoregressiveWrapper.generate
draws every token, and Accompanist, its force hook, swaps in the melody's tokens where a melody note begins.
"""

import torch

from parts import ROLES
from tokens import DUR_OFFSET, MAX_STEP, PAD_IDX, PITCH_OFFSET, START_IDX, TIME_OFFSET, parts_table, role_of, token_kind
from voice_leading import VoiceLeading

# a time shift landing this many steps short of the next melody onset lands on it: the tokenizer rounds times to
# whole steps, so a beat lasts 15 steps here and 16 there, and a shift one short of the given melody's onset is the
# model's guess at that same beat (the held-out chorales have no lower note starting 1-3 steps before a melody note;
# accompaniments without this start 8% of their lower notes one step early, against the melody note before)
ONSET_TOLERANCE_STEPS = 1
LOWER_PARTS = parts_table([role for role in ROLES if role != 'melody'])  # what the model draws


def melody_notes(tokens):
    """[(onset step, duration steps, MIDI pitch)] of the melody-role notes of a token sequence, in sequence order."""
    notes, time, duration = [], 0, 0
    for token in map(int, tokens):
        kind = token_kind(token)
        if kind == 'time':
            time += token - TIME_OFFSET
        elif kind == 'duration':
            duration = token - DUR_OFFSET
        elif kind == 'pitch' and role_of(token) == 'melody':
            notes.append((time, duration, token - PITCH_OFFSET))
    return notes


def accompaniable(tokens):
    """Whether a piece has a melody to accompany and a bass or harmony part of its own to compare with."""
    return bool(melody_notes(tokens)) and any(token_kind(t) == 'pitch' and role_of(t) in ('bass', 'harmony')
                                              for t in map(int, tokens))


def accompany_piece(net, tokens, rows, sampling, device, voice_leading=False, on_token=None):
    """rows accompaniments of the melody of a piece's tokens, as evaluate.py and tools/own_tunes.py sample them:
    every role but the melody drawn by net (a generation model), with room for twice the piece's own tokens (an
    accompaniment twice as dense), each row ending (PAD_IDX) after the melody's last note. sampling: temperature,
    top_p, top_k and repeat_memory; voice_leading: the bass drawn with voice_leading.VoiceLeading. Returns the rows
    as generated (without the start token) and the Accompanist, which counts the melody notes not placed."""
    force = Accompanist(melody_notes(tokens), rows)
    prompt = torch.full((rows, 1), START_IDX, dtype=torch.long, device=device)
    out = net.generate(prompt, 2 * len(tokens), temperature=sampling['temperature'], top_p=sampling['top_p'],
                       top_k=sampling['top_k'], allowed_next=LOWER_PARTS, repeat_memory=sampling['repeat_memory'],
                       force=force, eos_token=PAD_IDX, on_token=on_token,
                       constrain=VoiceLeading(rows) if voice_leading else None)
    return out, force


class Accompanist:
    """force hook for AutoregressiveWrapper.generate (one per batch of rows, each row its own accompaniment):
    places the melody notes at their onsets and stops each row after the last one.

    Each row keeps the time its sequence has reached (the sum of its time deltas). A drawn time delta that would
    pass the next melody onset, or fall ONSET_TOLERANCE_STEPS or fewer short of it, lands on it instead, and the
    melody note's [duration, pitch] follow; a note drawn at the onset itself (a duration token) becomes the melody
    note, so the melody comes first of the notes that start together, as the tokenizer orders them. After the last
    melody note a row ends (PAD_IDX, the eos of the generation) at the first time delta that reaches that note's
    end, or falls ONSET_TOLERANCE_STEPS or fewer short of it. The model must not draw melody pitches
    itself: sample with a table that leaves them out (tokens.parts_table).
    """

    def __init__(self, melody, rows):
        self.melody = list(melody)
        self.end = max(onset + duration for onset, duration, _ in self.melody)
        self.time = [0] * rows
        self.placed = [0] * rows     # melody notes placed (or being placed) per row
        self.pending = [[] for _ in range(rows)]  # forced tokens still to come per row

    def __call__(self, out, drawn):
        return drawn.new_tensor([self.next_token(row, token) for row, token in enumerate(drawn.tolist())])

    def unplaced(self):
        """Melody notes some row has not placed (the generation's length ran out first), for a warning."""
        return max(len(self.melody) - placed + bool(pending) for placed, pending in zip(self.placed, self.pending))

    def next_token(self, row, token):
        if self.pending[row]:
            return self.pending[row].pop(0)
        kind = token_kind(token)
        due = self.melody[self.placed[row]] if self.placed[row] < len(self.melody) else None
        if kind in ('time', 'duration') and due and due[0] == self.time[row]:  # a note begins where one is due
            first, *self.pending[row] = self.melody_tokens(row)
            return first
        if kind == 'time':
            target = due[0] if due else self.end
            reached = self.time[row] + token - TIME_OFFSET
            if reached < target - ONSET_TOLERANCE_STEPS or target - self.time[row] > MAX_STEP:
                self.time[row] = reached
                return token
            if due is None:
                return PAD_IDX
            token = TIME_OFFSET + target - self.time[row]
            self.time[row] = target
            self.pending[row] = self.melody_tokens(row)
            return token
        return token

    def melody_tokens(self, row):
        _, duration, pitch = self.melody[self.placed[row]]
        self.placed[row] += 1
        return [DUR_OFFSET + duration, PITCH_OFFSET + pitch]
