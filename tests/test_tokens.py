"""tokens.py: notes<->tokens in both timings, detokenize, the melody line of tracks='melody', the grammar table."""

import mido
import torch

import TMIDIX
import tokens
from parts import MELODY_NAME, _track_name, melody_part
from tests.conftest import (
    BASS,
    BEATS,
    CHORDS,
    DRUMS,
    MS,
    ONE_LINE,
    SIXTEENTHS,
    TUNE,
    melody,
    pop_song,
    write_midi,
    write_parts,
)
from tokens import (
    DUR_OFFSET,
    MAX_STEP,
    NUM_TOKENS,
    PAD_IDX,
    PITCH_OFFSET,
    START_IDX,
    TIMING_FACTOR,
    detokenize,
    skyline,
    tokenization_settings,
    tokenize_midi,
    tokenize_notes,
    tokens_to_notes,
)


def test_each_note_becomes_time_duration_pitch_like_the_seed():
    notes = [['note', 0, 64, 0, 60, 90], ['note', 96, 24, 0, 62, 90], ['note', 96, 40, 0, 65, 90]]
    # first note: no time token; second: delta 96 ms -> 3 steps; chord note at the same time: no time token
    assert tokenize_notes(notes, MS) == [START_IDX, 128 + 2, 256 + 60, 3, 128 + 0, 256 + 62, 128 + 1, 256 + 65]


def test_quantized_start_times_do_not_drift_over_a_long_melody():
    # 50 ms apart: flooring each delta (the seed) gives 1 step = 32 ms per note and drifts 18 ms a note
    notes = [['note', 50 * i, 40, 0, 60, 90] for i in range(200)]
    tokens = tokenize_notes(notes, MS)
    decoded = tokens_to_notes(tokens)
    for (start, _, _), note in zip(decoded, notes):
        assert 0 <= note[1] - start * TIMING_FACTOR < TIMING_FACTOR


def test_gaps_longer_than_127_steps_are_clipped_but_later_deltas_stay_exact():
    notes = [['note', 0, 32, 0, 60, 90], ['note', 10_000, 32, 0, 61, 90], ['note', 10_064, 32, 0, 62, 90]]
    tokens = tokenize_notes(notes, MS)
    assert tokens[3] == MAX_STEP and tokens[6] == 2


def test_midi_file_round_trip_keeps_pitches_and_times_within_one_step(tmp_path):
    notes = melody(80, seed=1, step=200)
    path = write_midi(tmp_path / 'a.mid', notes, tempos=((0, 500000), (4000, 400000), (4100, 650000)))
    original = TMIDIX.midi2notes(str(path), unit='ms')
    tokens, n_notes, _ = tokenize_midi(path.read_bytes(), MS)
    assert n_notes == len(notes)
    detokenize(tokens, tmp_path / 'out.mid', MS)
    back = TMIDIX.midi2notes(str(tmp_path / 'out.mid'), unit='ms')
    assert [n[4] for n in back] == [n[4] for n in original]
    for a, b in zip(original, back):
        assert abs(a[1] - b[1]) < TIMING_FACTOR
        assert abs(a[2] - b[2]) < TIMING_FACTOR


def test_beats_timing_puts_onsets_exactly_on_the_grid_through_tempo_changes(tmp_path):
    # sixteenths and eighth-note triplets at 480 ticks per quarter, with tempo changes between notes
    ticks = [0, 120, 240, 360, 480, 640, 800, 960, 1440, 1560]
    notes = [(t, 100, 60 + i) for i, t in enumerate(ticks)]
    path = write_midi(tmp_path / 'b.mid', notes, tempos=((0, 500000), (130, 300000), (700, 900000), (1000, 450000)))
    tokens, _, _ = tokenize_midi(path.read_bytes(), BEATS)
    song = detokenize(tokens, tmp_path / 'out.mid', BEATS, tempo_bpm=100)
    back = TMIDIX.midi2notes(str(tmp_path / 'out.mid'), unit='ticks')
    step_ticks = 480 // BEATS['beat_division']
    assert [n[1] for n in back] == ticks  # written at 480 ticks per quarter: exactly the original ticks
    assert all(n[1] % step_ticks == 0 for n in back)
    assert len(song) == len(ticks)


def test_detokenize_reads_any_token_sequence(tmp_path):
    tokens = [START_IDX, PAD_IDX, 300, 5, 130, 301, 900, -3, 383, 800, 129, PAD_IDX]
    song = detokenize(tokens, tmp_path / 'any.mid')
    # 300: default duration; 301 after 5 steps with duration 2; 383 = pitch 127 with default duration; 800 (a
    # conditioning id) ignored
    assert [(n[1], n[2], n[4]) for n in song] == [(0, 256, 44), (160, 64, 45), (160, 256, 127)]
    assert (tmp_path / 'any.mid').exists()
    assert tokens_to_notes([]) == [] and detokenize([], tmp_path / 'empty.mid') == []


def test_drum_channel_is_left_out_by_default(tmp_path):
    path = write_midi(tmp_path / 'drums.mid', melody(10), channel=9)
    _, n_notes, _ = tokenize_midi(path.read_bytes(), MS)
    assert n_notes == 0
    _, n_notes, _ = tokenize_midi(path.read_bytes(), tokenization_settings('ms', include_drums=True))
    assert n_notes == 10


# -----------------------------------------------------------------------------
# tracks='melody': one melodic line per file (the part that carries the tune, made monophonic)

def notes_kept(path, settings=ONE_LINE):
    """[start_step, duration_steps, pitch] of the tokens a file gives."""
    return tokens_to_notes(tokenize_midi(path.read_bytes(), settings)[0])


def in_steps(*parts):
    """The notes of parts on the 16th-note grid of SIXTEENTHS, in token order (start, then pitch), from the first
    onset."""
    notes = sorted(([start // 120, duration // 120, pitch] for part in parts for start, duration, pitch in part),
                   key=lambda note: (note[0], note[2]))
    return [[start - notes[0][0], duration, pitch] for start, duration, pitch in notes]


def test_melody_of_unnamed_parts_is_the_part_with_the_highest_mean_pitch(tmp_path):
    path = pop_song(tmp_path)
    assert notes_kept(path) == in_steps(TUNE)  # bass, chords and drums gone; the tune exactly as written
    assert [n[2] for n in notes_kept(path, tokenization_settings('ms', tracks='melody'))] == [p for _, _, p in TUNE]
    # drums are never the tune, even when kept in 'all' tracks
    assert notes_kept(path, tokenization_settings('beats', 4, include_drums=True, tracks='melody')) == in_steps(TUNE)


def test_track_named_melody_wins_over_a_higher_piano_track_as_in_pop909(tmp_path):
    tune = [(start, duration, pitch - 12) for start, duration, pitch in TUNE]  # below the piano, mean 63.6
    bridge = [(i * 960, 480, 70) for i in range(8)]
    piano = [(bar * 1920, 1920, p) for bar in range(4) for p in (76, 79, 84)]  # mean 79.7, all on channel 0 too
    parts = [('MELODY', 0, tune), ('BRIDGE', 0, bridge), ('PIANO', 0, piano)]
    assert notes_kept(write_parts(tmp_path / 'named.mid', parts)) == in_steps(tune)
    # without the names the piano is higher, but its block chords lose to a single line: the tune again, now by its
    # shape (the name rule is what makes a lower, chordal or sparse part win: see tests/test_parts.py)
    unnamed = [(None, channel, notes) for _, channel, notes in parts]
    assert notes_kept(write_parts(tmp_path / 'unnamed.mid', unnamed)) == in_steps(tune)


def test_track_named_melody_with_fewer_than_eight_notes_is_not_the_tune(tmp_path):
    parts = [('Lead Vocal', 0, TUNE[:7]), (None, 1, TUNE[7:]), (None, 2, BASS)]
    assert notes_kept(write_parts(tmp_path / 'short.mid', parts)) == in_steps(TUNE[7:])


def test_format_0_file_keeps_the_channel_of_the_tune_and_ignores_its_title(tmp_path):
    tune = [(i * 480, 480, p) for i, p in enumerate([72, 74, 76, 77, 79, 77, 76, 74] * 5)]  # 40 notes
    bells = [(i * 240, 240, 96) for i in range(8)]  # high, but fewer than a quarter of the tune's notes
    # the one track is named after the song: were its name read, every part would be 'named' and the bells win
    parts = [('Melody of the Night', 0, BASS), (None, 1, CHORDS), (None, 2, tune), (None, 3, bells), (None, 9, DRUMS)]
    path = write_parts(tmp_path / 'format0.mid', parts, file_format=0)
    assert mido.MidiFile(str(path)).type == 0 and len(mido.MidiFile(str(path)).tracks) == 1
    assert notes_kept(path) == in_steps(tune)


def test_piano_chords_become_one_line_where_the_highest_onset_wins_and_a_new_onset_ends_the_old_note(tmp_path):
    piano = [(0, 960, 60), (0, 960, 64), (0, 960, 67),     # C chord, 8 steps
             (480, 240, 72),                               # a melody note at step 4, inside the chord
             (960, 480, 65), (960, 480, 69), (960, 480, 72),  # F chord at step 8
             (1080, 480, 53),                              # a lower note at step 9, while the F chord sounds
             (1440, 480, 60), (1450, 480, 64),             # a rolled chord: both start on step 12
             (1920, 240, 70)]                              # alone, after a rest
    path = write_midi(tmp_path / 'piano.mid', piano)
    assert notes_kept(path) == [[0, 4, 67],   # top of the chord, cut where the melody note starts
                                [4, 2, 72],   # ends before the chord does: the chord's lower notes do not come back
                                [8, 1, 72],   # top of the F chord, ended by the onset of 53
                                [9, 3, 53],   # a new onset wins even when lower; cut by the next onset
                                [12, 4, 64],  # the higher of the rolled chord
                                [16, 2, 70]]
    assert tokenize_midi(path.read_bytes(), ONE_LINE)[1] == 6


def test_skyline_on_the_step_grid():
    assert skyline([]) == []
    assert skyline([[0, 4, 60], [0, 4, 67], [2, 1, 50], [8, 2, 62], [8, 2, 62]]) == [[0, 2, 67], [2, 1, 50], [8, 2, 62]]


def test_melody_names_match_whole_words_in_any_case_and_encoding():
    for name in ('MELODY', 'Melody 1', 'melody2', 'Lead Vocal', 'Voice 1', 'vocals', 'VOX', 'Singer', 'Mélodie',
                 'MELODÍA'):
        assert MELODY_NAME.search(name), name
    for name in ('melodic', 'Lead Guitar', 'Lead', 'PIANO', 'BRIDGE', 'voiceover', ''):
        assert not MELODY_NAME.search(name), name
    assert _track_name('Melodía'.encode()) == _track_name('Melodía'.encode('latin-1')) == 'Melodía'


def test_melody_part_of_nothing_or_drums_only_is_empty_and_tiny_parts_still_give_a_line():
    assert melody_part([], [])[0] == []
    assert melody_part([['note', 0, 1, 9, 36, 80, 0]], [b''])[0] == []
    tiny = [['note', 0, 1, 0, 60, 80, 0], ['note', 1, 1, 1, 72, 80, 0]]
    assert melody_part(tiny, [b''])[0] == [tiny[1]]  # no part has 8 notes: every part competes


def test_all_tracks_keep_every_non_drum_note_merged_as_before(tmp_path):
    pop = pop_song(tmp_path)
    assert notes_kept(pop, SIXTEENTHS) == in_steps(TUNE, BASS, CHORDS)  # stacked parts, drums left out
    assert tokenize_midi(pop.read_bytes(), SIXTEENTHS)[1] == len(TUNE + BASS + CHORDS)
    # tracks='all' and a settings dict without 'tracks' give the same tokens
    for path in (pop, write_midi(tmp_path / 'tune.mid', melody(40))):
        tokens = tokenize_midi(path.read_bytes(), SIXTEENTHS)[0]
        assert tokens.tolist() == tokenize_midi(path.read_bytes(), dict(SIXTEENTHS, tracks='all'))[0].tolist()
        assert 'tracks' not in SIXTEENTHS


def test_grammar_table_allows_every_pair_the_tokenizer_writes_and_nothing_else_of_the_pattern():
    table = tokens.grammar_table()
    # a chord (notes 0 steps apart: no time token between them), a long gap (clipped) and a short note, both timings
    notes = [['note', 0, 400, 0, 60, 90], ['note', 0, 400, 0, 64, 90], ['note', 5000, 10, 0, 67, 90],
             ['note', 5100, 300, 0, 127, 90], ['note', 5200, 300, 0, 0, 90]]
    for timing in ('ms', 'beats'):
        ids = torch.tensor(tokens.tokenize_notes(notes, tokens.tokenization_settings(timing)))
        assert bool(table[ids[:-1], ids[1:]].all())
    time, duration, pitch = 3, DUR_OFFSET + 5, PITCH_OFFSET + 60
    CONDITION = tokens.TOKEN_RANGES['key'][0]  # never produced: no note follows a duration with it
    for before, after in [(time, time), (START_IDX, time), (START_IDX, pitch), (duration, duration),
                          (duration, CONDITION), (pitch, pitch), (pitch, START_IDX), (time, PAD_IDX)]:
        assert not table[before, after], (before, after)
    # a pitch of every role of tracks='parts' (bass 384, drums up to 767) follows a duration
    for before, after in [(pitch, time), (pitch, duration), (PAD_IDX, duration), (CONDITION + 10, time),
                          (duration, PITCH_OFFSET + 128), (duration, tokens.TOKEN_RANGES['drums'][1]),
                          (tokens.TOKEN_RANGES['harmony'][0], duration)]:
        assert table[before, after], (before, after)
    assert table.shape == (NUM_TOKENS, NUM_TOKENS)


def test_tokens_or_error_returns_the_tokens_or_the_midi_error_instead_of_raising_it(tmp_path):
    path = write_midi(tmp_path / 'a.mid', melody(10))
    settings = tokenization_settings()
    assert (tokens.tokens_or_error(path.read_bytes(), settings) == tokens.tokenize_midi(path.read_bytes(),
                                                                                      settings)[0]).all()
    assert isinstance(tokens.tokens_or_error(b'not MIDI', settings), TMIDIX.MIDIError)
