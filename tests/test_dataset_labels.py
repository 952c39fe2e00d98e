"""tools/dataset_labels.py: key and meter labels of the MIDI files in a zip."""

import importlib.util
import io
import zipfile

import mido

from tests.conftest import ROOT, in_process

spec = importlib.util.spec_from_file_location('dataset_labels', ROOT / 'tools' / 'dataset_labels.py')
dataset_labels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dataset_labels)


def tune_bytes(*meta, conductor=False):
    """Four quarter notes; the meta messages go at tick 0 of the note track, or of a track of their own."""
    notes = [mido.Message(kind, note=60, velocity=90 if kind == 'note_on' else 0, time=480 * (kind == 'note_off'))
             for _ in range(4) for kind in ('note_on', 'note_off')]
    midi = mido.MidiFile(type=1 if conductor else 0, ticks_per_beat=480)
    midi.tracks += [mido.MidiTrack(meta), mido.MidiTrack(notes)] if conductor else [mido.MidiTrack([*meta, *notes])]
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def test_labels_count_files_with_key_and_time_signatures_in_any_track_per_top_folder(tmp_path, capsys):
    files = {'reels/a.mid': tune_bytes(mido.MetaMessage('key_signature', key='D'),
                                       mido.MetaMessage('time_signature', numerator=4, denominator=4)),
             'reels/b.mid': tune_bytes(mido.MetaMessage('key_signature', key='Em'), conductor=True),
             'jigs/c.mid': tune_bytes(mido.MetaMessage('time_signature', numerator=6, denominator=8),
                                      mido.MetaMessage('key_signature', key='D'),
                                      mido.MetaMessage('key_signature', key='G', time=1920)),
             'jigs/d.mid': b'MThd damaged', 'jigs/notes.txt': b'not MIDI'}
    with zipfile.ZipFile(tmp_path / 'set.zip', 'w') as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    code, out, _ = in_process(dataset_labels.main, [tmp_path / 'set.zip', '--by-folder'], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith('set.zip: 3 files, key signature 3 (100.0%), time signature 2 (66.7%)')
    assert lines[1] == '  first keys:   D 2, Em 1' and lines[2] == '  first meters: 4/4 1, 6/8 1'
    assert lines[3] == '  jigs/: 1 files, key signature 1 (100.0%), time signature 1 (100.0%)'
    assert lines[6] == '  reels/: 2 files, key signature 2 (100.0%), time signature 1 (50.0%)'
    assert lines[-1].startswith('  unreadable: 1: jigs/d.mid (')


def test_labels_of_a_missing_zip_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    code, out, err = in_process(dataset_labels.main, [tmp_path / 'none.zip'], capsys)
    assert code != 0 and 'cannot read' in str(code) and out == ''
