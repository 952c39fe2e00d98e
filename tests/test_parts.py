"""parts.py: which part carries the tune (tracks='melody'), and the roles of tracks='parts'. Files built here."""

import random

import TMIDIX
from parts import LEAD_NAME, MELODY_NAME, _named_like_melody, choose_melody, melody_part
from tests.conftest import write_parts

Q = 480  # ticks per quarter note in write_parts


def tune(n, seed=0, low=62, high=76, step=Q, length=Q - 20, start=0):
    """A singable line: n notes one after another, moving by steps and small leaps inside low..high."""
    rng = random.Random(seed)
    pitch, notes = (low + high) // 2, []
    for i in range(n):
        notes.append((start + i * step, length, pitch))
        pitch = min(high, max(low, pitch + rng.choice([-2, -1, 1, 2, 3, -3, 0])))
    return notes


def block_chords(bars, top, chord_share=1.0, seed=1, length=4 * Q):
    """A chord part: a chord (top, top-4, top-7) on each bar, or its top note alone for 1 - chord_share of bars."""
    rng = random.Random(seed)
    notes = []
    for bar in range(bars):
        pitch = top + rng.choice([0, 2, -2, 5])
        chord = (pitch, pitch - 4, pitch - 7) if rng.random() < chord_share else (pitch,)
        notes += [(bar * 4 * Q, length, p) for p in chord]
    return notes


def choice(path):
    """(notes of the chosen part as (start, pitch), reason) of a file, as tokenize_midi's melody mode reads it."""
    notes, names, programs = TMIDIX.midi2notes(path.read_bytes(), unit='ticks', with_track=True, with_programs=True)
    part, reason = melody_part(notes, names, programs)
    return [(n[1], n[4]) for n in part], reason


def as_chosen(part):
    return sorted((start, pitch) for start, _, pitch in part)


BASS = [(bar * 4 * Q + beat * 2 * Q, 2 * Q - 20, p) for bar in range(16) for beat, p in enumerate((36, 43))]
DRUMS = [(i * Q // 2, 60, 36 if i % 4 == 0 else 42) for i in range(128)]


def test_cut_off_lead_voca_track_wins_over_a_higher_pad_by_its_name(tmp_path):
    lead = tune(64, seed=3, low=55, high=67)  # program 65 (alto sax sound), one note at a time, mean about 61
    pad = block_chords(16, 79, chord_share=0.5, length=2 * Q)  # program 94 (Halo Pad), higher
    pad += [(bar * 4 * Q + 2 * Q, 2 * Q, 81) for bar in range(16)]  # a single note each half bar: a third in chords
    parts = [('Halo Pad', 1, pad, 94), ('Lead Voca', 0, lead, 65), ('Bass', 2, BASS, 33), ('Drums', 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'lead.mid', parts))
    assert chosen == as_chosen(lead)
    assert reason == "track 2 'Lead Voca': named like a melody"
    # unnamed, the single line still beats the pad: by its shape
    unnamed = [(None, channel, notes, *program) for _, channel, notes, *program in parts]
    chosen, reason = choice(write_parts(tmp_path / 'unnamed.mid', unnamed))
    assert chosen == as_chosen(lead) and reason.startswith('track 2: ') and 'one note at a time' in reason


def test_unnamed_choir_block_chords_above_a_single_line_sax_lose_to_the_sax(tmp_path):
    sax = tune(64, seed=5, low=58, high=70)
    choir = block_chords(16, 81, chord_share=1.0)  # program 52 (choir aahs): every note in a chord, higher
    parts = [(None, 0, choir, 52), (None, 1, sax, 65), (None, 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'choir.mid', parts))
    assert chosen == as_chosen(sax)
    assert reason.startswith('track 2: most one note at a time (100% of its notes alone vs 0%)'), reason


def test_dense_strummed_guitar_loses_to_a_sparse_higher_single_line(tmp_path):
    # 255 strums of 5 notes (1,275 notes), each string 10 ticks after the one below, ringing into the next strum
    rng = random.Random(7)
    guitar = []
    for strum in range(255):
        root = rng.choice([48, 50, 52, 53, 55])
        ring = 600 if strum % 7 else 200  # mostly overlapping the next strum, 240 ticks later
        guitar += [(strum * 240 + 10 * string, ring, root + offset)
                   for string, offset in enumerate((0, 7, 12, 16, 19))]
    line = tune(185, seed=9, low=67, high=81, step=330, length=300)  # over the same 61,200 ticks
    parts = [(None, 0, guitar, 24), (None, 1, line, 73)]
    path = write_parts(tmp_path / 'strum.mid', parts)
    chosen, reason = choice(path)
    assert len(guitar) == 1275 and chosen == as_chosen(line)
    assert 'one note at a time' in reason, reason


def test_octave_doubled_melody_gives_the_higher_track_and_a_unison_double_the_first(tmp_path):
    low = tune(48, seed=11, low=60, high=72)
    high = [(start, length, pitch + 12) for start, length, pitch in low]
    chosen, reason = choice(write_parts(tmp_path / 'octaves.mid', [(None, 0, low), (None, 1, high)]))
    assert chosen == as_chosen(high) and 'higher (mean pitch' in reason, reason
    # the same notes on two tracks: nothing tells them apart, the first track in the file wins
    chosen, reason = choice(write_parts(tmp_path / 'unison.mid', [(None, 3, low), (None, 1, list(low))]))
    assert reason.startswith('track 1: as good a tune as track 2'), reason


def test_melody_moving_between_two_tracks_gives_the_track_with_most_of_it(tmp_path):
    verse1 = tune(32, seed=21, start=0)
    verse2 = tune(32, seed=22, start=32 * Q)
    chorus = tune(32, seed=23, start=64 * Q, low=65, high=79)
    chords = block_chords(24, 67)
    bass = [(bar * 4 * Q, 4 * Q - 20, 36 + bar % 5) for bar in range(24)]
    parts = [(None, 0, verse2), (None, 1, verse1 + chorus), (None, 2, chords), (None, 3, bass)]
    chosen, reason = choice(write_parts(tmp_path / 'verses.mid', parts))
    assert chosen == as_chosen(verse1 + chorus)
    assert reason.startswith('track 2: ') and 'next best track 1' in reason, reason


def test_named_vocal_wins_over_a_higher_busier_unnamed_line(tmp_path):
    # the name overrides the shape: this is how a user picks the tune where the score picks another part
    vocal = tune(20, seed=31, low=55, high=62, step=3 * Q)
    flute = tune(90, seed=32, low=72, high=84, step=Q // 2, length=Q // 2 - 10)
    parts = [(None, 0, flute, 73), ('Vocal', 1, vocal, 52)]
    chosen, reason = choice(write_parts(tmp_path / 'vocal.mid', parts))
    assert chosen == as_chosen(vocal) and reason == "track 2 'Vocal': named like a melody"
    chosen, _ = choice(write_parts(tmp_path / 'novocal.mid', [(None, 0, flute, 73), (None, 1, vocal, 52)]))
    assert chosen == as_chosen(flute)


def test_format_0_reason_names_the_channel_counted_from_one(tmp_path):
    melody_line = tune(40, seed=41)
    parts = [('Song title', 0, block_chords(10, 60)), (None, 2, melody_line), (None, 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'f0.mid', parts, file_format=0))
    assert chosen == as_chosen(melody_line) and reason.startswith('channel 3: '), reason


def test_melody_names_include_cut_off_words_and_other_languages_but_not_pads_or_backing_voices():
    for name in ('Lead Voca', 'Melod', 'VOC', 'Chant', 'Tune 2', 'Canto', 'GESANG', 'Singing', 'voz', 'Voix'):
        assert _named_like_melody(name), name
    for name in ('Voice Oohs', 'Choir Aahs', 'Backing Vocals', 'Harmony Vocal', 'Tuned Perc', 'Melodica', 'Vocoder'):
        assert not _named_like_melody(name), name
    assert LEAD_NAME.search('Lead Guitar') and LEAD_NAME.search('SOLO') and not MELODY_NAME.search('Lead Guitar')


def test_choose_melody_of_drums_only_has_no_part_and_says_why():
    key, parts, reason = choose_melody([['note', 0, 1, 9, 36, 80, 0]], [b''])
    assert key is None and parts == {} and reason.startswith('no pitched notes')
