"""tools/build_default_dataset.py's Irish/Scottish set, and the zip it wrote into content/irish_scottish_dataset/.

The tests that parse ABC need music21, which only the build tool needs; they skip where it is not installed.
"""

import collections
import importlib.util
import io
import sys
import zipfile

import mido
import pytest

import TMIDIX
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location('build_default_dataset', ROOT / 'tools' / 'build_default_dataset.py')
build = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = build     # read_corpus's worker processes find its functions by module name
spec.loader.exec_module(build)

IRISH = build.TUNE_SETS['irish']
IRISH_ZIP = ROOT / 'content' / 'irish_scottish_dataset' / 'irish_scottish_tunes.zip'
KEY_SIGNATURE = b'\xff\x59\x02'     # meta event type and length, as every MIDI file spells them
TIME_SIGNATURE = b'\xff\x58\x04'

JIG = """X:7
T:The Test Jig
M:6/8
L:1/8
Q:1/4=100
K:Ador
|:A2B c2d|e2d c2B:|
|:"G"e2f g2a|1 g2e d2B:|2 g2e A3|]
"""


def messages(data):
    """(track count, [(absolute tick, message)] of the first track) of MIDI bytes."""
    midi = mido.MidiFile(file=io.BytesIO(data))
    tick, found = 0, []
    for message in midi.tracks[0]:
        tick += message.time
        found.append((tick, message))
    return len(midi.tracks), found


def test_key_name_names_the_tonic_of_major_and_minor_signatures():
    assert build.key_name(0, 0) == 'C major' and build.key_name(2, 0) == 'D major'
    assert build.key_name(0, 1) == 'A minor' and build.key_name(1, 1) == 'E minor'
    assert build.key_name(-3, 1) == 'C minor' and build.key_name(-7, 0) == 'Cb major'


def test_written_tune_is_one_track_with_its_key_and_time_signature_at_the_start():
    melody = build.Melody('airds/book1/0007_the-test-jig.mid', 'The Test Jig', 100.0, [(0, 6, 8)], [(0, 0, 1)],
                          [(0, 480, 69), (480, 240, 71), (720, 480, 72)], 0)
    tracks, found = messages(TMIDIX.score2midi(build.melody_to_score(melody)))
    assert tracks == 1
    meters = [(t, m.numerator, m.denominator) for t, m in found if m.type == 'time_signature']
    keys = [(t, m.key) for t, m in found if m.type == 'key_signature']
    notes = [(t, m.note) for t, m in found if m.type == 'note_on' and m.velocity]
    assert meters == [(0, 6, 8)] and keys == [(0, 'Am')]
    assert notes == [(0, 69), (480, 71), (720, 72)]


# -----------------------------------------------------------------------------
# reading ABC with music21

def test_irish_tune_gets_key_from_k_meter_from_m_and_its_repeats_played():
    pytest.importorskip('music21')
    melody = build.read_melody('airds/book1', JIG, tune_set=IRISH)
    assert melody.name == 'airds/book1/0007_the-test-jig.mid' and melody.title == 'The Test Jig'
    assert melody.time_signatures == [(0, 6, 8)]
    assert melody.key_signatures == [(0, 0, 1)]     # A dorian: A minor's signature, the tonic kept
    assert melody.qpm == 100.0
    # A part 8 notes twice; B part 4 notes, first ending 4, B part again, second ending 3; no note for "G"
    assert len(melody.notes) == 16 + 4 + 4 + 4 + 3
    assert [pitch for _, _, pitch in melody.notes[:9]] == [69, 71, 72, 74, 76, 74, 72, 71, 69]
    assert melody.notes[-1][2] == 69


def test_sections_each_ending_in_a_repeat_are_played_twice_or_kept_as_written_never_misread():
    pytest.importorskip('music21')
    header = 'X:1\nT:Two Parts\nM:2/4\nL:1/8\nK:C\n'
    opened = build.read_melody('ryans/Test', header + '|:CDEF|CDEF:|\n|:GABc|GABc:|\n', tune_set=IRISH)
    assert [pitch for _, _, pitch in opened.notes] == [60, 62, 64, 65] * 4 + [67, 69, 71, 72] * 4
    assert not opened.repeats_as_written
    # music21 takes the second ':|' back to the start (AABAAB); the tune is then kept as written, played once
    unopened = build.read_melody('ryans/Test', header + 'CDEF|CDEF:|\nGABc|GABc:|\n', tune_set=IRISH)
    assert [pitch for _, _, pitch in unopened.notes] == [60, 62, 64, 65] * 2 + [67, 69, 71, 72] * 2
    assert unopened.repeats_as_written


def test_modal_keys_become_the_major_or_minor_key_with_the_same_third():
    pytest.importorskip('music21')
    for written, expected in (('Dmix', (0, 2, 0)), ('Edor', (0, 1, 1)), ('Bm', (0, 2, 1)), ('F', (0, -1, 0))):
        melody = build.read_melody('ryans/Test', JIG.replace('K:Ador', f'K:{written}'), tune_set=IRISH)
        assert melody.key_signatures == [expected], written


def test_meter_c_is_four_four_and_tune_without_meter_gets_no_time_signature():
    pytest.importorskip('music21')
    assert build.read_melody('ryans/Test', JIG.replace('M:6/8', 'M:C'), tune_set=IRISH).time_signatures == [(0, 4, 4)]
    assert build.read_melody('ryans/Test', JIG.replace('M:6/8', 'M:none'), tune_set=IRISH).time_signatures == []


def test_tune_with_a_double_stop_or_a_bagpipe_key_is_skipped_with_its_reason():
    pytest.importorskip('music21')
    with pytest.raises(build.SkipTune, match='chord'):
        build.read_melody('airds/book1', JIG.replace('c2d|', '[ce]2d|'), tune_set=IRISH)
    with pytest.raises(build.SkipTune, match='bagpipe'):
        build.read_melody('airds/book1', JIG.replace('K:Ador', 'K:Hp'), tune_set=IRISH)


def small_corpus(folder):
    """music21's folder layout of the three collections, one or two tiny tunes each."""
    files = {'airdsAirs/book1.abc': JIG + '\n' + JIG.replace('X:7', 'X:8').replace('Test Jig', 'Other Jig')
             .replace('A2B c2d', 'B2c d2e'),
             'oneills1850/0001-0050.abc': JIG.replace('X:7', 'X:1').replace('K:Ador', 'K:G'),
             'ryansMammoth/TestReel.abc': JIG.replace('X:7', 'X:1').replace('M:6/8', 'M:C|')
             .replace('A2B c2d', 'A2B c2d e2')}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_each_collection_becomes_one_short_lowercase_top_folder_of_the_zip(tmp_path):
    pytest.importorskip('music21')
    melodies, skipped = build.read_corpus(small_corpus(tmp_path), IRISH, limit=0, jobs=1, default_qpm=120.0)
    assert skipped == []
    assert [m.name for m in melodies] == ['airds/book1/0007_the-test-jig.mid', 'airds/book1/0008_the-other-jig.mid',
                                          'oneills1850/0001-0050/0001_the-test-jig.mid',
                                          'ryans/TestReel/0001_the-test-jig.mid']


def test_check_finds_each_zip_member_in_its_corpus_file_and_reports_a_changed_note(tmp_path, capsys):
    pytest.importorskip('music21')
    pytest.importorskip('pretty_midi')
    corpus = small_corpus(tmp_path / 'corpus')
    melodies, _ = build.read_corpus(corpus, IRISH, limit=0, jobs=1, default_qpm=120.0)
    files = {m.name: TMIDIX.score2midi(build.melody_to_score(m)) for m in melodies}
    build.write_zip(files, tmp_path / 'good.zip')
    assert build.check_files(tmp_path / 'good.zip', corpus, IRISH, 4)
    assert 'check: 4 of 4 files match music21' in capsys.readouterr().out

    wrong = melodies[2]
    wrong.notes[3] = (*wrong.notes[3][:2], wrong.notes[3][2] + 1)
    files[wrong.name] = TMIDIX.score2midi(build.melody_to_score(wrong))
    build.write_zip(files, tmp_path / 'bad.zip')
    assert not build.check_files(tmp_path / 'bad.zip', corpus, IRISH, 4)
    out = capsys.readouterr().out
    assert f'check {wrong.name}: ' in out and 'notes differ' in out and 'check: 3 of 4' in out


# -----------------------------------------------------------------------------
# the committed zip

def test_bundled_irish_zip_has_a_folder_per_collection_and_single_track_files_with_key_and_meter():
    with zipfile.ZipFile(IRISH_ZIP) as archive:
        names = sorted(archive.namelist())
        members = {name: archive.read(name) for name in names}
    tops = collections.Counter(name.split('/')[0] for name in names)
    assert set(tops) == {'airds', 'oneills1850', 'ryans'} and min(tops.values()) > 500, tops
    assert all(name.endswith('.mid') and name.count('/') == 2 for name in names)
    assert all(KEY_SIGNATURE in data for data in members.values())
    # a tune whose M: says 'none' has no meter to write; the README counts them
    with_meter = sum(TIME_SIGNATURE in data for data in members.values())
    assert with_meter >= 0.99 * len(names)
    for name in names[::97]:    # a spread of files read as MIDI: one track, signatures before the first note
        tracks, found = messages(members[name])
        first_note = next(t for t, m in found if m.type == 'note_on' and m.velocity)
        assert tracks == 1, name
        assert any(m.type == 'key_signature' and t <= first_note for t, m in found), name
