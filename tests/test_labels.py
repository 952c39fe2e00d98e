"""labels.py: a tune's key and meter read from MIDI files written here with mido, its style from its name."""

import zipfile

import mido
import pytest

import condition
import labels

NOTES = [(i * 480, 480, p) for i, p in enumerate([62, 64, 66, 67, 69, 71, 73, 74])]


def labelled_midi(path, key=None, meter=None, later_key=None, signatures_track=0):
    """A format-1 file: a tempo track, then a note track; key and time signatures at tick 0 on track
    signatures_track (0 or 1), later_key a second key signature later on the other track."""
    tempo, notes = mido.MidiTrack(), mido.MidiTrack()
    tempo.append(mido.MetaMessage('set_tempo', tempo=500000))
    tracks = (tempo, notes)
    if meter:
        numerator, denominator = meter
        tracks[signatures_track].append(mido.MetaMessage('time_signature', numerator=numerator,
                                                         denominator=denominator))
    if key:
        tracks[signatures_track].append(mido.MetaMessage('key_signature', key=key))
    last = 0
    for start, duration, pitch in NOTES:
        notes.append(mido.Message('note_on', note=pitch, velocity=80, time=start - last))
        notes.append(mido.Message('note_off', note=pitch, velocity=0, time=duration))
        last = start + duration
    if later_key:  # on the tempo track 960 ticks in, on the note track after the last note
        tracks[1 - signatures_track].append(mido.MetaMessage('key_signature', key=later_key, time=960))
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    mid.tracks += [tempo, notes]
    mid.save(str(path))
    return path


@pytest.mark.parametrize('key, meter, expected', [
    ('D', (6, 8), {'key': 'D major', 'meter': '6/8'}),
    ('Bbm', (3, 4), {'key': 'Bb minor', 'meter': '3/4'}),      # 5 flats, minor
    ('Ebm', (2, 2), {'key': 'Eb minor', 'meter': '2/2'}),      # 6 flats, minor
    ('F#m', (9, 8), {'key': 'F# minor', 'meter': '9/8'}),      # 3 sharps, minor
    ('Ab', (4, 4), {'key': 'Ab major', 'meter': '4/4'}),       # 4 flats
    ('Gb', (5, 4), {'key': 'F# major', 'meter': '5/4'}),       # 6 flats: the same key as 6 sharps
    ('C#', (2, 4), {'key': 'Db major', 'meter': '2/4'}),       # 7 sharps: the same key as 5 flats
    ('Am', (3, 2), {'key': 'A minor', 'meter': '3/2'}),
])
def test_key_and_meter_come_from_the_files_key_and_time_signatures(tmp_path, key, meter, expected):
    path = labelled_midi(tmp_path / 'tune.mid', key=key, meter=meter)
    assert labels.midi_labels(path.read_bytes()) == expected


def test_a_file_without_signatures_has_no_key_and_no_meter(tmp_path):
    assert labels.midi_labels(labelled_midi(tmp_path / 'bare.mid').read_bytes()) == {}
    assert labels.midi_labels(labelled_midi(tmp_path / 'key.mid', key='G').read_bytes()) == {'key': 'G major'}
    assert labels.midi_labels(labelled_midi(tmp_path / 'meter.mid', meter=(3, 8)).read_bytes()) == {'meter': '3/8'}


@pytest.mark.parametrize('signatures_track', [0, 1])
def test_the_earliest_key_signature_counts_whichever_track_holds_it(tmp_path, signatures_track):
    path = labelled_midi(tmp_path / 'modulates.mid', key='Dm', later_key='F', signatures_track=signatures_track)
    assert labels.midi_labels(path.read_bytes()) == {'key': 'D minor'}


def test_key_of_signature_names_all_fifteen_signatures_and_refuses_malformed_ones():
    majors = [condition.key_of_signature(sharps, 0) for sharps in range(-7, 8)]
    assert majors == ['B major', 'F# major', 'Db major', 'Ab major', 'Eb major', 'Bb major', 'F major', 'C major',
                      'G major', 'D major', 'A major', 'E major', 'B major', 'F# major', 'Db major']
    assert condition.key_of_signature(0, 1) == 'A minor' and condition.key_of_signature(-1, 1) == 'D minor'
    assert condition.key_of_signature(8, 0) is None and condition.key_of_signature(0, 2) is None


def test_corpus_labels_reads_folders_and_zip_members_and_keeps_the_style_of_a_damaged_file(tmp_path):
    data = tmp_path / 'data'
    (data / 'jigs').mkdir(parents=True)
    labelled_midi(data / 'jigs' / 'one.mid', key='G', meter=(6, 8))
    (data / 'jigs' / 'broken.mid').write_bytes(b'MThd\x00\x00')
    with zipfile.ZipFile(data / 'collection.zip', 'w') as zf:
        zf.writestr('waltzes/two.mid', labelled_midi(tmp_path / 'two.mid', key='Em', meter=(3, 4)).read_bytes())
    labelled_midi(data / 'top.mid', meter=(2, 4))
    names = ['jigs/one.mid', 'jigs/broken.mid', 'collection.zip::waltzes/two.mid', 'top.mid']
    assert labels.corpus_labels(data, names) == {
        'jigs/one.mid': {'key': 'G major', 'meter': '6/8', 'style': 'jigs'},
        'jigs/broken.mid': {'style': 'jigs'},
        'collection.zip::waltzes/two.mid': {'key': 'E minor', 'meter': '3/4', 'style': 'waltzes'},
        'top.mid': {'meter': '2/4'}}
    assert labels.corpus_labels(data, ['top.mid']) == {'top.mid': {'meter': '2/4'}}  # only the names asked
