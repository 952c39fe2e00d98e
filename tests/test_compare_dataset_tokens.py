"""tools/compare_dataset_tokens.py: two builds of a dataset zip compared token by token."""

import importlib.util
import io
import zipfile

import mido

from tests.conftest import ROOT, in_process

spec = importlib.util.spec_from_file_location('compare_dataset_tokens', ROOT / 'tools' / 'compare_dataset_tokens.py')
compare_dataset_tokens = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_dataset_tokens)


def tune_bytes(pitches, key=None):
    """One-track MIDI of quarter notes, with a key signature meta event when key is given."""
    track = mido.MidiTrack([mido.MetaMessage('track_name', name='tune'), mido.MetaMessage('set_tempo', tempo=500000)])
    if key:
        track.append(mido.MetaMessage('key_signature', key=key))
    for pitch in pitches:
        track.append(mido.Message('note_on', note=pitch, velocity=90, time=0))
        track.append(mido.Message('note_off', note=pitch, velocity=0, time=480))
    midi = mido.MidiFile(type=0, ticks_per_beat=480)
    midi.tracks.append(track)
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def write_zip(path, files):
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path




def test_added_key_signatures_leave_every_token_unchanged(tmp_path, capsys):
    old = write_zip(tmp_path / 'old.zip', {'a/1.mid': tune_bytes([60, 62, 64]), 'a/2.mid': tune_bytes([67, 65])})
    new = write_zip(tmp_path / 'new.zip', {'a/1.mid': tune_bytes([60, 62, 64], key='G'),
                                           'a/2.mid': tune_bytes([67, 65], key='Dm')})
    code, out, _ = in_process(compare_dataset_tokens.main, [old, new], capsys)
    assert code == 0, out
    assert 'tracks=all, timing=ms: 2 of 2 files give identical tokens' in out
    assert 'tracks=melody, timing=ms: 2 of 2 files give identical tokens' in out


def test_changed_note_and_missing_file_are_named_and_fail(tmp_path, capsys):
    old = write_zip(tmp_path / 'old.zip', {'a/1.mid': tune_bytes([60, 62, 64]), 'a/2.mid': tune_bytes([67, 65])})
    new = write_zip(tmp_path / 'new.zip', {'a/1.mid': tune_bytes([60, 63, 64], key='G')})
    code, out, _ = in_process(compare_dataset_tokens.main, [old, new], capsys)
    assert code == 1
    assert f'only in {old}: a/2.mid' in out
    assert 'tokens differ (tracks=all): a/1.mid' in out


def test_unreadable_zip_gets_one_line(tmp_path, capsys):
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'not a zip')
    code, _, _ = in_process(compare_dataset_tokens.main, [bad, bad], capsys)
    assert code.startswith('error: cannot open a zip:') and '\n' not in code


def test_a_file_both_builds_refuse_alike_counts_as_identical_and_one_refused_by_one_build_differs(tmp_path, capsys):
    old = write_zip(tmp_path / 'old.zip', {'a/1.mid': b'not MIDI', 'a/2.mid': b'not MIDI'})
    new = write_zip(tmp_path / 'new.zip', {'a/1.mid': b'not MIDI', 'a/2.mid': tune_bytes([60, 62])})
    code, out, _ = in_process(compare_dataset_tokens.main, [old, new, '--tracks', 'all'], capsys)
    assert code == 1 and 'tokens differ (tracks=all): a/2.mid' in out and 'a/1.mid' not in out
    assert 'tracks=all, timing=ms: 1 of 2 files give identical tokens' in out
