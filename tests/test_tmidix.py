"""Tests for TMIDIX.py. Every file is built here: raw bytes where byte layout matters (running
status, damage), mido for the rest. symusic and pretty_midi serve as reference readers."""

import io
import random
import time
import warnings

import mido
import pretty_midi
import pytest
import symusic

import TMIDIX
from TMIDIX import MIDIError

# ---------------------------------------------------------------------------------------------
# fixture builders
# ---------------------------------------------------------------------------------------------

def smf(*bodies, file_format=1, division=96):
    """Raw Standard MIDI File bytes from track chunk bodies."""
    header = b'MThd' + (6).to_bytes(4, 'big') + bytes([0, file_format]) + len(bodies).to_bytes(2, 'big')
    header += division.to_bytes(2, 'big')
    return header + b''.join(b'MTrk' + len(b).to_bytes(4, 'big') + b for b in bodies)


def mido_bytes(mid):
    buffer = io.BytesIO()
    mid.save(file=buffer)
    return buffer.getvalue()


def absolute_track(events):
    """(tick, mido message) pairs in any order -> a mido track with delta times."""
    track = mido.MidiTrack()
    previous = 0
    for tick, message in sorted(events, key=lambda e: e[0]):
        track.append(message.copy(time=tick - previous))
        previous = tick
    return track


def piano_performance_bytes(seed, n_notes=1500, n_tempos=300, ticks_per_beat=384):
    """Type 1: tempo map (hundreds of changes) on track 0; notes, sustain pedal and varied
    velocities on track 1, like a transcribed piano performance. Same-pitch notes may overlap."""
    rng = random.Random(seed)
    conductor = [(0, mido.MetaMessage('set_tempo', tempo=500000))]
    for _ in range(n_tempos):
        at = rng.randrange(1, 200000)
        conductor.append((at, mido.MetaMessage('set_tempo', tempo=rng.randrange(250000, 1200000))))
    conductor.append((0, mido.MetaMessage('time_signature', numerator=3, denominator=4)))
    events = []
    next_start = {}
    for _ in range(n_notes):
        pitch = rng.randrange(21, 109)
        start = next_start.get(pitch, rng.randrange(0, 2000)) + rng.randrange(5, 400)
        next_start[pitch] = start
        end = start + rng.randrange(1, 3000)
        events.append((start, mido.Message('note_on', note=pitch, velocity=rng.randrange(1, 128))))
        events.append((end, mido.Message('note_off', note=pitch, velocity=rng.randrange(0, 128))))
    for _ in range(n_notes // 5):
        at = rng.randrange(0, 200000)
        events.append((at, mido.Message('control_change', control=64, value=rng.choice([0, 127]))))
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    mid.tracks += [absolute_track(conductor), absolute_track(events)]
    return mido_bytes(mid)


def pop_multitrack_bytes(seed, n_notes=300):
    """Type 1: conductor track with a few tempo changes, four instruments incl. drums."""
    rng = random.Random(seed)
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    mid.tracks.append(absolute_track([(0, mido.MetaMessage('set_tempo', tempo=600000)),
                                      (7680, mido.MetaMessage('set_tempo', tempo=450000)),
                                      (15360, mido.MetaMessage('set_tempo', tempo=520000))]))
    for channel, program in ((0, 33), (1, 0), (2, 48), (9, 0)):
        events = [(0, mido.Message('program_change', channel=channel, program=program)),
                  (0, mido.MetaMessage('track_name', name=f'inst {channel}'))]
        for i in range(n_notes):
            start = i * 120 + rng.randrange(0, 60)
            pitch = 36 + channel * 5 + i % 12
            velocity = rng.randrange(40, 128)
            events.append((start, mido.Message('note_on', channel=channel, note=pitch, velocity=velocity)))
            end = start + rng.randrange(30, 100)
            events.append((end, mido.Message('note_on', channel=channel, note=pitch, velocity=0)))
        mid.tracks.append(absolute_track(events))
    return mido_bytes(mid)


def symusic_notes_ms(data):
    score = symusic.Score.from_midi(data, ttype='second')
    return [(n.start * 1000, n.duration * 1000, n.pitch, n.velocity) for t in score.tracks for n in t.notes]


def assert_same_notes(ours, reference, tolerance_ms=1.0):
    """ours: TMIDIX note events; reference: (start_ms, dur_ms, pitch, velocity). Same multiset
    of notes, each start and duration within tolerance."""
    assert len(ours) == len(reference)
    mine = sorted((n[4], n[1], n[2], n[5]) for n in ours)
    theirs = sorted((p, s, d, v) for s, d, p, v in reference)
    for (p1, s1, d1, v1), (p2, s2, d2, v2) in zip(mine, theirs):
        assert (p1, v1) == (p2, v2)
        assert abs(s1 - s2) <= tolerance_ms, (p1, s1, s2)
        assert abs(d1 - d2) <= tolerance_ms, (p1, s1, d1, d2)


def notes_of(score_track):
    return [ev for ev in score_track if ev[0] == 'note']


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def test_tempo_change_between_notes_applies_at_its_tick():
    # Tempo map on track 0, notes on track 1; three tempo changes between two notes.
    conductor = bytes([0, 0xFF, 0x51, 3, 0x07, 0xA1, 0x20,      # tick 0: 500000
                       48, 0xFF, 0x51, 3, 0x0F, 0x42, 0x40,     # tick 48: 1000000
                       24, 0xFF, 0x51, 3, 0x03, 0xD0, 0x90,     # tick 72: 250000
                       24, 0xFF, 0x51, 3, 0x07, 0xA1, 0x20,     # tick 96: 500000
                       0, 0xFF, 0x2F, 0])
    notes = bytes([0, 0x90, 60, 100, 96, 0x80, 60, 0,           # 0..96
                   0, 0x90, 62, 90, 96, 0x80, 62, 0, 0, 0xFF, 0x2F, 0])  # 96..192
    data = smf(conductor, notes)
    got = TMIDIX.midi2notes(data)
    # 48 ticks at 500 ms/96 ticks = 250 ms, 24 at 1000 ms/96 = 250 ms, 24 at 250 ms/96 = 62.5 ms
    assert [(n[1], n[2], n[4]) for n in got] == [(0.0, 562.5, 60), (562.5, 500.0, 62)]
    assert_same_notes(got, symusic_notes_ms(data), tolerance_ms=1e-6)


def test_default_tempo_is_500000_until_first_set_tempo():
    notes = bytes([96, 0x90, 60, 100, 96, 0x80, 60, 0, 0, 0xFF, 0x51, 3, 0x0F, 0x42, 0x40,
                   0, 0x90, 61, 100, 96, 0x80, 61, 0, 0, 0xFF, 0x2F, 0])
    got = TMIDIX.midi2notes(smf(notes, file_format=0))
    assert [(n[1], n[2]) for n in got] == [(500.0, 500.0), (1000.0, 1000.0)]


def test_piano_performance_with_hundreds_of_tempo_changes_matches_symusic_within_1ms():
    data = piano_performance_bytes(seed=7)
    reference = symusic_notes_ms(data)
    assert_same_notes(TMIDIX.midi2notes(data), reference)
    assert_same_notes(notes_of(TMIDIX.midi2single_track_ms_score(data)[1]), reference)
    ms_score = TMIDIX.midi2ms_score(data)
    assert_same_notes([n for track in ms_score[1:] for n in notes_of(track)], reference)


def test_pop_multitrack_matches_symusic_and_pretty_midi():
    data = pop_multitrack_bytes(seed=3)
    ours = TMIDIX.midi2notes(data)
    assert_same_notes(ours, symusic_notes_ms(data))
    pm = pretty_midi.PrettyMIDI(io.BytesIO(data))
    assert_same_notes(ours, [(n.start * 1000, (n.end - n.start) * 1000, n.pitch, n.velocity)
                             for inst in pm.instruments for n in inst.notes])


def test_smpte_division_uses_frame_rate_and_ignores_tempo():
    division = (0x100 - 25) << 8 | 40  # 25 fps, 40 ticks per frame: 1000 ticks per second
    body = bytes([0, 0xFF, 0x51, 3, 0x0F, 0x42, 0x40, 0, 0x90, 60, 100, 0x87, 0x68, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
    data = smf(body, file_format=0, division=division)
    assert [(n[1], n[2]) for n in TMIDIX.midi2notes(data)] == [(0.0, 1000.0)]
    assert [(n[1], n[2]) for n in TMIDIX.midi2notes(data, unit='beats')] == [(0.0, 2.0)]  # ms / 500
    assert TMIDIX.midi2opus(data)[0] == division
    assert TMIDIX.opus2midi(TMIDIX.midi2opus(data)) == data


# ---------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------

def test_overlapping_same_pitch_notes_pair_first_in_first_out():
    body = bytes([0, 0x90, 60, 100, 10, 0x90, 60, 90, 10, 0x80, 60, 0, 10, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
    data = smf(body, file_format=0)
    got = TMIDIX.midi2notes(data, unit='ticks')
    assert [(n[1], n[2], n[5]) for n in got] == [(0, 20, 100), (10, 20, 90)]
    assert_same_notes(TMIDIX.midi2notes(data), symusic_notes_ms(data))
    assert notes_of(TMIDIX.midi2score(data)[1]) == got


def test_note_on_velocity_zero_is_note_off():
    body = bytes([0, 0x90, 64, 80, 30, 64, 0, 0, 0xFF, 0x2F, 0])  # running status, velocity 0
    assert TMIDIX.midi2notes(smf(body), unit='ticks') == [['note', 0, 30, 0, 64, 80]]


def test_unterminated_note_ends_at_its_tracks_last_event():
    body = bytes([0, 0x90, 64, 80, 20, 0xB0, 64, 127, 25, 0xFF, 0x2F, 0])
    other = bytes([0, 0x90, 50, 70, 100, 0x80, 50, 0, 0, 0xFF, 0x2F, 0])
    got = TMIDIX.midi2notes(smf(body, other), unit='ticks')
    assert got == [['note', 0, 100, 0, 50, 70], ['note', 0, 45, 0, 64, 80]]
    assert notes_of(TMIDIX.midi2score(smf(body))[1]) == [['note', 0, 45, 0, 64, 80]]


def test_note_off_without_note_on_is_ignored():
    body = bytes([0, 0x80, 64, 0, 10, 0x90, 64, 80, 10, 0x80, 64, 0, 0, 0xFF, 0x2F, 0])
    assert TMIDIX.midi2notes(smf(body), unit='ticks') == [['note', 10, 10, 0, 64, 80]]


# ---------------------------------------------------------------------------------------------
# file structure
# ---------------------------------------------------------------------------------------------

def test_running_status_continues_across_meta_and_sysex_events():
    body = bytes([0, 0x90, 60, 100,
                  10, 0xFF, 0x01, 2, ord('h'), ord('i'),   # text meta between channel events
                  0, 62, 90,                               # running status 0x90 continues
                  0, 0xF0, 2, 0x7E, 0xF7,                  # sysex
                  10, 60, 0, 0, 62, 0, 0, 0xFF, 0x2F, 0])
    data = smf(body, file_format=0)
    assert TMIDIX.midi2notes(data, unit='ticks') == [['note', 0, 20, 0, 60, 100], ['note', 10, 10, 0, 62, 90]]
    opus = TMIDIX.midi2opus(data)
    assert ['text_event', 10, b'hi'] in opus[1] and ['sysex_f0', 0, b'\x7e\xf7'] in opus[1]


def test_sysex_f0_and_f7_events_are_kept_and_written_back():
    body = bytes([0, 0xF0, 3, 0x43, 0x12, 0x00, 5, 0xF7, 2, 0x34, 0xF7, 0, 0x90, 60, 1, 4, 0x80, 60, 0,
                  0, 0xFF, 0x2F, 0])
    data = smf(body, file_format=0)
    opus = TMIDIX.midi2opus(data)
    assert opus[1][:2] == [['sysex_f0', 0, b'\x43\x12\x00'], ['sysex_f7', 5, b'\x34\xf7']]
    assert TMIDIX.midi2opus(TMIDIX.opus2midi(opus)) == opus


def test_rmid_wrapped_file_reads_like_the_plain_file():
    data = pop_multitrack_bytes(seed=1, n_notes=20)
    riff_body = b'RMID' + b'data' + len(data).to_bytes(4, 'little') + data
    rmid = b'RIFF' + len(riff_body).to_bytes(4, 'little') + riff_body
    assert TMIDIX.midi2opus(rmid) == TMIDIX.midi2opus(data)
    assert TMIDIX.midi2notes(rmid) == TMIDIX.midi2notes(data)


@pytest.mark.parametrize('file_format', [0, 2])
def test_type_0_and_type_2_files_read(file_format):
    mid = mido.MidiFile(type=file_format, ticks_per_beat=240)
    for channel in range(2 if file_format == 2 else 1):
        mid.tracks.append(absolute_track([(0, mido.MetaMessage('set_tempo', tempo=400000)),
                                          (0, mido.Message('note_on', channel=channel, note=60 + channel, velocity=64)),
                                          (240, mido.Message('note_off', channel=channel, note=60 + channel))]))
    data = mido_bytes(mid)
    got = TMIDIX.midi2notes(data)
    assert [(n[1], n[2], n[3], n[4]) for n in got] == [(0.0, 400.0, c, 60 + c) for c in range(len(mid.tracks))]
    assert_same_notes(got, symusic_notes_ms(data))


def test_alien_chunks_are_skipped():
    body = bytes([0, 0x90, 60, 100, 10, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
    data = smf(body, file_format=0)
    with_alien = data[:14] + b'XFIH' + (3).to_bytes(4, 'big') + b'abc' + data[14:]
    assert TMIDIX.midi2opus(with_alien) == TMIDIX.midi2opus(data)


def test_every_opus_event_kind_round_trips_through_bytes():
    track = [['track_name', 0, b'Piano'], ['copyright_text_event', 0, b'(c)'], ['set_tempo', 0, 612345],
             ['time_signature', 0, 6, 3, 24, 8], ['key_signature', 0, -3, 1], ['smpte_offset', 0, 1, 2, 3, 4, 5],
             ['sequence_number', 0, 7], ['channel_prefix', 0, 3], ['sequencer_specific', 0, b'\x00\x01'],
             ['raw_meta_event', 0, 0x21, b'\x01'], ['patch_change', 0, 3, 41], ['control_change', 5, 3, 64, 127],
             ['pitch_wheel_change', 1, 3, -8192], ['pitch_wheel_change', 1, 3, 8191],
             ['channel_after_touch', 1, 3, 50], ['key_after_touch', 1, 3, 60, 70], ['note_on', 0, 3, 60, 99],
             ['note_off', 200000, 3, 60, 10], ['lyric', 0, b'la'], ['marker', 0, b'A'], ['cue_point', 0, b'x'],
             ['instrument_name', 0, b'gtr'], ['text_event', 0, b't'], ['end_track', 3]]
    opus = [480, track]
    data = TMIDIX.opus2midi(opus)
    assert TMIDIX.midi2opus(data) == opus
    assert len(mido.MidiFile(file=io.BytesIO(data)).tracks[0]) == len(track)


def test_midi_score_midi_score_round_trip_keeps_every_note():
    data = piano_performance_bytes(seed=11, n_notes=600, n_tempos=50)
    score = TMIDIX.midi2score(data)
    again = TMIDIX.midi2score(TMIDIX.score2midi(score))
    assert again == score
    assert_same_notes(TMIDIX.midi2notes(TMIDIX.score2midi(score)), symusic_notes_ms(data))


def test_score2midi_writes_a_beats_grid_at_a_chosen_tempo():
    score = [480, [['set_tempo', 0, 400000], ['note', 0, 480, 0, 60, 90], ['note', 960, 240, 0, 62, 90]]]
    data = TMIDIX.score2midi(score)
    assert TMIDIX.midi2notes(data, unit='beats') == [['note', 0.0, 1.0, 0, 60, 90], ['note', 2.0, 0.5, 0, 62, 90]]
    assert_same_notes(TMIDIX.midi2notes(data), [(0, 400, 60, 90), (800, 200, 62, 90)])
    assert TMIDIX.midi2notes(data, with_tempo=True)[1] == 400000


def test_midi2notes_units_tempo_and_path_input(tmp_path):
    conductor = bytes([0, 0xFF, 0x51, 3, 0x0F, 0x42, 0x40, 0x83, 0x00, 0xFF, 0x51, 3, 0x07, 0xA1, 0x20,
                       0, 0xFF, 0x2F, 0])  # 1,000,000 for 384 ticks, then 500,000
    notes = bytes([0, 0x90, 60, 100, 0x83, 0x00, 0x80, 60, 0, 0, 0x90, 67, 50, 0x60, 0x80, 67, 0, 0, 0xFF, 0x2F, 0])
    data = smf(conductor, notes, division=96)
    path = tmp_path / 'song.mid'
    path.write_bytes(data)
    assert TMIDIX.midi2notes(str(path), unit='ticks') == [['note', 0, 384, 0, 60, 100], ['note', 384, 96, 0, 67, 50]]
    assert TMIDIX.midi2notes(path, unit='beats') == [['note', 0.0, 4.0, 0, 60, 100], ['note', 4.0, 1.0, 0, 67, 50]]
    notes_ms, tempo = TMIDIX.midi2notes(data, with_tempo=True)
    assert [(n[1], n[2]) for n in notes_ms] == [(0.0, 4000.0), (4000.0, 500.0)]
    assert tempo == 1000000  # 4 s at 1,000,000 against 0.5 s at 500,000
    assert TMIDIX.midi2notes(smf(notes), with_tempo=True)[1] == 500000
    with pytest.raises(ValueError):
        TMIDIX.midi2notes(data, unit='seconds')


def test_single_track_ms_score_merges_tracks_and_can_recalculate_channels():
    data = pop_multitrack_bytes(seed=5, n_notes=10)
    score = TMIDIX.midi2single_track_ms_score(data)
    assert score[0] == 1000 and len(score) == 2
    times = [ev[1] for ev in score[1]]
    assert times == sorted(times) and all(isinstance(t, int) for t in times)
    assert not any(ev[0] in ('set_tempo', 'end_track') for ev in score[1])
    assert any(ev[0] == 'set_tempo' for ev in TMIDIX.midi2single_track_ms_score(data, pass_old_timings_events=True)[1])
    # two tracks on channel 0 become two channels; drums stay on 9
    mid = mido.MidiFile(type=1, ticks_per_beat=96)
    for channel in (0, 0, 9):
        mid.tracks.append(absolute_track([(0, mido.Message('note_on', channel=channel, note=40, velocity=9)),
                                          (96, mido.Message('note_off', channel=channel, note=40))]))
    merged = TMIDIX.midi2single_track_ms_score(mido_bytes(mid), recalculate_channels=True)
    assert sorted(ev[3] for ev in merged[1]) == [0, 1, 9]


# ---------------------------------------------------------------------------------------------
# writer and plot
# ---------------------------------------------------------------------------------------------

def test_written_song_reads_back_the_same_in_mido_pretty_midi_symusic_and_tmidix(tmp_path):
    rng = random.Random(5)
    song = []
    free_from = {}  # (channel, pitch) -> end of its last note: MIDI cannot tell overlapping twins apart
    for _ in range(400):
        channel, pitch = rng.choice([0, 1, 9]), rng.randrange(30, 90)
        start = free_from.get((channel, pitch), 0) + rng.randrange(0, 2000)
        song.append(['note', start, rng.randrange(1, 3000), channel, pitch, rng.randrange(1, 128)])
        free_from[(channel, pitch)] = start + song[-1][2]
    song.sort(key=lambda n: n[1])
    path = TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter(song, output_file_name=str(tmp_path / 'song'), verbose=False)
    assert path == str(tmp_path / 'song.mid')
    data = (tmp_path / 'song.mid').read_bytes()
    expected = [(n[1], n[2], n[4], n[5]) for n in song]
    assert_same_notes(TMIDIX.midi2notes(path), expected, tolerance_ms=1e-6)
    assert_same_notes(notes_of(TMIDIX.midi2single_track_ms_score(data)[1]), expected, tolerance_ms=0)
    assert_same_notes([['note', s, d, 0, p, v] for s, d, p, v in symusic_notes_ms(data)], expected)
    pm = pretty_midi.PrettyMIDI(path)
    assert_same_notes([['note', n.start * 1000, (n.end - n.start) * 1000, 0, n.pitch, n.velocity]
                       for inst in pm.instruments for n in inst.notes], expected)
    mid = mido.MidiFile(path)
    assert sum(1 for m in mid.merged_track if m.type == 'note_on' and m.velocity > 0) == len(song)
    assert mid.tracks[0].name == 'Basic MIDI Transformer' and mid.tracks[1].name == 'Composition Track'


def test_writer_does_not_double_the_mid_extension(tmp_path):
    path = TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter([['note', 0, 10, 0, 60, 90]],
                                                   output_file_name=str(tmp_path / 'a.mid'), verbose=False)
    assert path == str(tmp_path / 'a.mid') and (tmp_path / 'a.mid').exists()
    assert not (tmp_path / 'a.mid.mid').exists()


def test_writer_applies_timings_multiplier_patches_and_text_encoding(tmp_path):
    song = [['note', 0, 10, 0, 60, 90, 40], ['note', 32, 16, 0, 62, 90, 41], ['note', 64, 8, 1, 64, 0]]
    path = TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter(song, track_name='Café', output_file_name=str(tmp_path / 'b'),
                                                   list_of_MIDI_patches=[0, 19] + [0] * 14,
                                                   timings_multiplier=1.5, verbose=False)
    score = TMIDIX.midi2score(path)
    assert score[0] == 1000 and ['set_tempo', 0, 1000000] in score[1]
    track = score[2]
    assert ['track_name', 0, 'Café'.encode('ISO-8859-1')] in track
    assert notes_of(track) == [['note', 0, 15, 0, 60, 90], ['note', 48, 24, 0, 62, 90], ['note', 96, 12, 1, 64, 1]]
    patches = [ev[1:] for ev in track if ev[0] == 'patch_change']
    assert [0, 1, 19] in patches and [0, 0, 40] in patches and [48, 0, 41] in patches


def test_writer_rejects_values_that_do_not_fit_in_midi(tmp_path):
    for bad in (['note', 0, 10, 16, 60, 90], ['note', 0, 10, 0, 128, 90], ['note', 0, -5, 0, 60, 90]):
        with pytest.raises(MIDIError):
            TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter([bad], output_file_name=str(tmp_path / 'c'), verbose=False)


def test_plot_ms_song_saves_png_headless_with_block_lines(tmp_path):
    import matplotlib.pyplot as plt
    song = [['note', i * 250, 200, i % 3, 60 + i, 90] for i in range(12)] + [['note', 3000, 100, 9, 36, 90, 0]]
    figure = TMIDIX.plot_ms_SONG(song, block_lines_times_list=[1500], preview_length_in_notes=4,
                                 save_path=tmp_path / 'roll.png', return_plt=True)
    assert (tmp_path / 'roll.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    ax = figure.axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.lines) == [1.0, 1.5]  # 4th note at 1 s, block at 1.5 s
    assert [t.get_text() for t in ax.get_yticklabels()] == ['C2', 'C3', 'C4', 'C5']
    assert plt.get_fignums() == []
    TMIDIX.plot_ms_SONG(song, save_path=tmp_path / 'roll2.png')
    assert (tmp_path / 'roll2.png').stat().st_size > 1000 and plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

GOOD_BODY = bytes([0, 0x90, 60, 100, 10, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])


@pytest.mark.parametrize('data, words', [
    (b'', 'not a MIDI file'),
    (b'RIFF\x04\x00\x00\x00WAVE', 'not RMID'),
    (b'hello, this is not a MIDI file at all', 'not a MIDI file'),
    (smf(GOOD_BODY[:-3]), 'ends in the middle'),                                                 # truncated
    (smf(GOOD_BODY)[:14] + b'MTrk\x00\x00\x01\x00' + GOOD_BODY, 'runs past the end of the file'),  # chunk length
    (smf(bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0x90, 60, 1]) + GOOD_BODY), 'longer than 4 bytes'),
    (smf(bytes([0, 60, 100]) + GOOD_BODY), 'where a status byte is required'),
    (smf(bytes([0, 0x90, 60, 0xC0]) + GOOD_BODY), 'above 127'),
    (smf(bytes([0, 0xF4]) + GOOD_BODY), 'not allowed'),
    (smf(bytes([0, 0xFF, 0x01, 0x8F, 0xFF, 0xFF, 0x7F]) + GOOD_BODY), 'runs past the end of its track'),
    (smf(GOOD_BODY, division=0), 'bad division'),
    (smf(GOOD_BODY, file_format=7), 'unknown MIDI format'),
    (smf(GOOD_BODY)[:10] + b'\x00\x05' + smf(GOOD_BODY)[12:], 'declares 5 tracks'),
])
def test_malformed_files_raise_midierror_with_byte_offset(data, words):
    for reader in (TMIDIX.midi2opus, TMIDIX.midi2notes, TMIDIX.midi2single_track_ms_score, TMIDIX.midi2ms_score):
        with pytest.raises(MIDIError, match='byte') as info:
            reader(data)
        assert words in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value.offset, int)


def test_lenient_mode_keeps_readable_tracks_with_one_warning():
    damaged = bytes([0, 0x90, 64, 80, 10, 0x80, 64, 0, 0, 0xF4, 1, 2])
    data = smf(GOOD_BODY, damaged)
    with pytest.raises(MIDIError):
        TMIDIX.midi2notes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        notes = TMIDIX.midi2notes(data, unit='ticks', lenient=True)
    assert len(caught) == 1 and 'not allowed' in str(caught[0].message)
    assert notes == [['note', 0, 10, 0, 60, 100], ['note', 0, 10, 0, 64, 80]]
    truncated = smf(GOOD_BODY, GOOD_BODY)[:-5]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert len(TMIDIX.midi2opus(truncated, lenient=True)) == 3
    assert ['runs past the end of the file' in str(w.message) for w in caught] == [True, False]
    assert 'ends in the middle of an event' in str(caught[1].message)


def test_fuzzed_files_give_a_score_or_midierror():
    rng = random.Random(2024)
    seeds = [piano_performance_bytes(seed=1, n_notes=60, n_tempos=10), pop_multitrack_bytes(seed=2, n_notes=15),
             smf(bytes([0, 0x90, 60, 100, 10, 0xFF, 0x01, 1, 65, 0, 62, 90, 0, 0xF0, 1, 0xF7, 5, 60, 0,
                        0, 0xF7, 1, 0, 0, 62, 0, 0, 0xFF, 0x2F, 0]), file_format=0)]
    outcomes = {'score': 0, 'error': 0}
    deadline = time.monotonic() + 8
    for i in range(3000):
        if time.monotonic() > deadline:
            break
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            kind = rng.randrange(4)
            spot = rng.randrange(len(data) + 1)
            if kind == 0 and spot < len(data):
                data[spot] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del data[spot:]
            elif kind == 2:
                data[spot:spot] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
            else:
                chunk = data.find(b'MTrk', rng.randrange(len(data) // 2 + 1))
                if chunk >= 0 and chunk + 8 <= len(data):
                    data[chunk + 4:chunk + 8] = rng.randrange(0, 1 << 32).to_bytes(4, 'big')
        data = bytes(data)
        try:
            score = TMIDIX.midi2score(data)
            TMIDIX.midi2notes(data)
            TMIDIX.midi2single_track_ms_score(data)
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                TMIDIX.midi2score(data, lenient=True)
        except MIDIError:
            outcomes['error'] += 1
        else:
            assert isinstance(score, list) and score[0] > 0
            outcomes['score'] += 1
    assert outcomes['score'] > 20 and outcomes['error'] > 20, outcomes


def test_plot_of_a_narrow_melody_names_every_natural_note(tmp_path):
    song = [['note', i * 250, 200, 0, p, 90] for i, p in enumerate((62, 64, 66, 67, 69, 71, 72))]
    figure = TMIDIX.plot_ms_SONG(song, save_path=tmp_path / 'roll.png', return_plt=True)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ['D4', 'E4', 'F4', 'G4', 'A4', 'B4', 'C5']


def test_readers_and_writer_leave_the_garbage_collector_as_they_found_it(tmp_path):
    import gc
    data = pop_multitrack_bytes(seed=5, n_notes=20)
    assert gc.isenabled()
    TMIDIX.midi2notes(data)
    TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter(TMIDIX.midi2single_track_ms_score(data)[1],
                                             output_file_name=str(tmp_path / 'x'), verbose=False)
    assert gc.isenabled()
    with pytest.raises(MIDIError):
        TMIDIX.midi2score(data[:-3])  # an error inside still turns the collector back on
    assert gc.isenabled()
    gc.disable()
    try:
        TMIDIX.midi2score(data)
        assert not gc.isenabled()  # a caller who turned it off keeps it off
    finally:
        gc.enable()


def test_opus2score_rejects_note_channel_or_pitch_out_of_range():
    with pytest.raises(MIDIError, match='out of range'):
        TMIDIX.opus2score([96, [['note_on', 0, 0, 128, 100], ['note_off', 10, 0, 128, 0]]])
    with pytest.raises(MIDIError, match='out of range'):
        TMIDIX.opus2score([96, [['note_on', 0, 16, 60, 100]]])
    assert TMIDIX.opus2score([96, [['note_on', 0, 15, 127, 1], ['note_off', 5, 15, 127, 0]]]) == \
        [96, [['note', 0, 5, 15, 127, 1]]]


@pytest.mark.parametrize('delta', [0, 1, 127, 128, 129, 1000, 16383, 16384, 2 ** 21 - 1, 2 ** 21, 0x0FFFFFFF])
def test_delta_times_at_every_variable_length_boundary_round_trip(delta):
    opus = [96, [['note_on', delta, 0, 60, 100], ['note_off', delta, 0, 60, 0], ['end_track', 0]]]
    data = TMIDIX.opus2midi(opus)
    assert TMIDIX.midi2opus(data) == opus
    assert [m.time for m in mido.MidiFile(file=io.BytesIO(data)).tracks[0]][:2] == [delta, delta]


def test_many_overlapping_notes_of_one_pitch_pair_in_order():
    # 20,000 note_ons of one channel and pitch, then as many note_offs: first in, first out. A pairing that
    # searched or shifted a list per note_off would take quadratic time here.
    n = 20_000
    body = bytearray([0, 0x90, 60, 1])
    body += bytes([1, 60, 1]) * (n - 1)  # running status, velocity 1, one tick apart
    body += bytes([1, 60, 0]) * n  # note_on velocity 0 = note_off
    body += bytes([0, 0xFF, 0x2F, 0])
    notes = TMIDIX.midi2notes(smf(bytes(body), file_format=0), unit='ticks')
    assert len(notes) == n
    assert all(note[1] == i and note[2] == n for i, note in enumerate(notes))


# ---------------------------------------------------------------------------------------------
# tracks and their names: midi2notes(with_track=True), for the dataset's 'melody' tracks
# ---------------------------------------------------------------------------------------------

def test_midi2notes_with_track_numbers_each_note_and_names_each_track():
    def part(channel, pitch, *names):
        events = [(0, mido.MetaMessage('track_name', name=name)) for name in names]
        events += [(0, mido.Message('note_on', channel=channel, note=pitch, velocity=90)),
                   (96, mido.Message('note_off', channel=channel, note=pitch))]
        return absolute_track(events)

    mid = mido.MidiFile(type=1, ticks_per_beat=96)
    mid.tracks += [absolute_track([(0, mido.MetaMessage('track_name', name='Song')),
                                   (0, mido.MetaMessage('set_tempo', tempo=250000))]),
                   part(0, 72, 'MELODY'), part(1, 40), part(2, 55, 'Bass', 'renamed later'), part(3, 60, 'Mélodie')]
    data = mido_bytes(mid)
    notes, tempo, names = TMIDIX.midi2notes(data, unit='ticks', with_tempo=True, with_track=True)
    assert names == [b'Song', b'MELODY', b'', b'Bass', 'Mélodie'.encode('latin-1')]  # the first name; raw bytes
    assert notes == [['note', 0, 96, 1, 40, 90, 2], ['note', 0, 96, 2, 55, 90, 3], ['note', 0, 96, 3, 60, 90, 4],
                     ['note', 0, 96, 0, 72, 90, 1]]
    assert tempo == 250000
    assert [n[:6] for n in notes] == TMIDIX.midi2notes(data, unit='ticks')  # the default: six fields, no names
    ms_notes, ms_names = TMIDIX.midi2notes(data, with_track=True)
    assert ms_names == names and [n[6] for n in ms_notes] == [2, 3, 4, 1] and ms_notes[0][2] == 250.0
    # the full decoders still see every name
    bass_track = TMIDIX.midi2opus(data)[1 + 3]
    assert [ev for ev in bass_track if ev[0] == 'track_name'] == [['track_name', 0, b'Bass'],
                                                                  ['track_name', 0, b'renamed later']]


def test_midi2notes_with_track_of_a_format_0_file_is_track_0_for_every_channel():
    body = bytes([0, 0xFF, 0x03, 4]) + b'Tune' + bytes([0, 0x90, 60, 90, 0, 0x91, 72, 90, 0x60, 0x80, 60, 0,
                                                        0, 0x81, 72, 0, 0, 0xFF, 0x2F, 0])
    notes, names = TMIDIX.midi2notes(smf(body, file_format=0), unit='ticks', with_track=True)
    assert names == [b'Tune']
    assert notes == [['note', 0, 96, 0, 60, 90, 0], ['note', 0, 96, 1, 72, 90, 0]]


def test_midi2notes_with_programs_gives_the_first_program_of_each_track_and_channel():
    # track 1: program 65 on channel 0, changed to 66 later; channel 1 without a program; track 2: 33 on channel 2,
    # set before its track name (the name is still found)
    lead = bytes([0, 0xFF, 0x03, 4]) + b'Lead' + bytes([0, 0xC0, 65, 0, 0x90, 60, 90, 0, 0x91, 48, 90,
                                                        0x60, 0x80, 60, 0, 0, 0x81, 48, 0, 0, 0xC0, 66,
                                                        0, 0xFF, 0x2F, 0])
    bass = bytes([0, 0xC2, 33, 0, 0xFF, 0x03, 4]) + b'Bass' + bytes([0, 0x92, 36, 90, 0x60, 0x82, 36, 0,
                                                                     0, 0xFF, 0x2F, 0])
    data = smf(bytes([0, 0xFF, 0x2F, 0]), lead, bass)
    notes, names, programs = TMIDIX.midi2notes(data, unit='ticks', with_track=True, with_programs=True)
    assert programs == {(1, 0): 65, (2, 2): 33}
    assert names == [b'', b'Lead', b'Bass']
    assert [n[:6] for n in notes] == TMIDIX.midi2notes(data, unit='ticks')
    _, tempo, _, same = TMIDIX.midi2notes(data, unit='ticks', with_tempo=True, with_track=True, with_programs=True)
    assert same == programs and tempo == 500000
    with pytest.raises(ValueError, match='with_track'):
        TMIDIX.midi2notes(data, with_programs=True)
