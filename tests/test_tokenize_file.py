"""tools/tokenize_file.py end to end: what the model sees of a file, per mode, and the tokens written back."""

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import mido
import pytest

from tests.conftest import ROOT, melody, write_midi, write_parts
from tests.test_parts import BASS, DRUMS, POP, block_chords, tune
from tokens import tokenization_settings, tokenize_midi


def tool(*args):
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'tokenize_file.py'), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.splitlines(), result.stderr.splitlines()


def test_melody_mode_prints_one_line_per_file_with_the_part_chosen_and_why(tmp_path):
    pop = write_parts(tmp_path / 'pop.mid', POP)
    lead = tune(64, seed=3, low=55, high=67)
    pad = block_chords(16, 79, chord_share=0.5, length=2 * 480)
    voca = write_parts(tmp_path / 'voca.mid', [('Halo Pad', 1, pad, 94), ('Lead Voca', 0, lead, 65),
                                              ('Bass', 2, BASS, 33), ('Drums', 9, DRUMS)])
    code, out, err = tool(pop, voca, '--tracks', 'melody')
    assert code == 0 and err == []
    assert out == [f"{pop}: track 1 'Vocal': named like a melody -- 32 notes " + out[0].split(' notes ')[1],
                   f"{voca}: track 2 'Lead Voca': named like a melody -- 64 notes " + out[1].split(' notes ')[1]]


def test_parts_mode_prints_each_role_and_writes_a_track_per_role_back(tmp_path):
    pop = write_parts(tmp_path / 'pop.mid', POP)
    out_file = tmp_path / 'roundtrip.mid'
    code, out, err = tool(pop, '--tracks', 'parts', '--timing', 'beats', '--out', out_file)
    assert code == 0 and err == [], err
    tokens = tokenize_midi(pop.read_bytes(), tokenization_settings('beats', tracks='parts'))[0]
    assert out[0] == f"{pop}: {32 + 16 + 24 + 64} notes, {len(tokens)} tokens (tracks='parts')"
    rows = {line.split()[0]: line.split() for line in out[2:6]}
    assert rows['melody'][1:3] == ['32', 'notes'] and "'Vocal'" in out[2] and 'program 54' in out[2]
    assert rows['bass'][1] == '16' and 'program 33' in out[3] and "track 2 'Bass'" in out[3]
    assert rows['harmony'][1] == '24' and "track 3 'Piano'" in out[4]
    assert rows['drums'][1] == '64' and 'keys 36-42' in out[5] and 'kit' in out[5]
    assert out[-1] == f'wrote {out_file}'
    back = mido.MidiFile(str(out_file))
    assert [t.name for t in back.tracks[1:]] == ['melody', 'bass', 'harmony', 'drums']
    # the written file reads back into the same roles and counts
    code, again, _ = tool(out_file, '--tracks', 'parts', '--timing', 'beats')
    assert code == 0 and [line.split()[:2] for line in again[2:]] == [line.split()[:2] for line in out[2:6]]


def test_all_mode_and_bad_input_get_one_line_each_and_exit_1(tmp_path):
    pop = write_parts(tmp_path / 'pop.mid', POP)
    drums = write_parts(tmp_path / 'drums.mid', [('Drums', 9, DRUMS)])
    text = tmp_path / 'notes.txt'
    text.write_text('not MIDI')
    code, out, err = tool(pop, drums, text, tmp_path / 'missing.mid', '--tracks', 'all')
    assert code == 1
    tokens = tokenize_midi(pop.read_bytes(), tokenization_settings())[0]
    assert out == [f"{pop}: 72 notes, {len(tokens)} tokens, pitches C2-E5 (tracks='all': every non-drum note, merged)"]
    assert err[0] == f'tokenize_file: {drums}: no pitched notes (drums are left out)'
    assert err[1].startswith(f'tokenize_file: {text}: cannot read it as MIDI: ')
    assert err[2] == f'tokenize_file: {tmp_path / "missing.mid"}: no such file' and len(err) == 3
    code, _, err = tool(pop, drums, '--out', tmp_path / 'x.mid')
    assert code == 1 and err == ['tokenize_file: --out takes one FILE, got 2']


def test_a_fifo_or_device_is_refused_in_one_line_instead_of_blocking(tmp_path):
    fifo = tmp_path / 'pipe.mid'
    os.mkfifo(fifo)
    code, out, err = tool(fifo, '/dev/zero')
    assert code == 1 and out == []
    assert err == [f'tokenize_file: {fifo}: not a regular file', 'tokenize_file: /dev/zero: not a regular file']


def test_a_folder_or_an_empty_out_name_is_refused_in_one_line(tmp_path):
    (tmp_path / 'songs.mid').mkdir()
    code, out, err = tool(tmp_path / 'songs.mid')
    assert code == 1 and out == [] and err == [f'tokenize_file: {tmp_path / "songs.mid"}: not a regular file']
    tune_file = write_parts(tmp_path / 'tune.mid', POP)
    code, out, err = tool(tune_file, '--out', '')
    assert code == 1 and out == [] and err == ["tokenize_file: --out '': give the name of the MIDI file to write"]


def test_out_never_writes_over_its_input_and_names_the_file_it_writes(tmp_path):
    pop = write_parts(tmp_path / 'pop.mid', POP)
    before = pop.read_bytes()
    code, _, err = tool(pop, '--out', pop)
    assert code == 1 and err == [f'tokenize_file: --out {pop} is the input file; write the round trip to another '
                                 f'name'] and pop.read_bytes() == before
    code, _, err = tool(pop, '--out', tmp_path)
    assert code == 1 and err == [f'tokenize_file: --out {tmp_path} is a folder; give a file name']
    code, out, err = tool(pop, '--out', tmp_path / 'rt')
    assert code == 0 and out[-1] == f'wrote {tmp_path / "rt.mid"}' and (tmp_path / 'rt.mid').is_file()


@pytest.mark.parametrize('argv', [['--tracks', 'lead', 'x.mid'], []])
def test_a_bad_option_or_no_file_is_one_line_and_exit_2(argv):
    code, out, err = tool(*argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith('error: '), err


def test_a_file_whose_tempo_is_0_is_written_back_at_midis_default_tempo(tmp_path):
    tune = write_midi(tmp_path / 'tempo0.mid', melody(n=20), tempos=((0, 0),))
    code, out, err = tool(tune, '--timing', 'beats', '--out', tmp_path / 'back.mid')
    assert (code, err, out[-1]) == (0, [], f"wrote {tmp_path / 'back.mid'}")
    tempos = [m.tempo for track in mido.MidiFile(tmp_path / 'back.mid').tracks for m in track if m.type == 'set_tempo']
    assert tempos == [500000]


def test_names_that_are_not_utf8_or_hold_control_characters_print_escaped_on_their_own_line(tmp_path):
    # a Latin-1 file name (byte 0xe9) and a track name holding a newline and a screen-clearing escape; a desktop's
    # UTF-8 locale writes stdout strictly, as PYTHONIOENCODING=utf-8 does here
    folder = os.fsencode(tmp_path)
    parts = [('Lead\n\x1b[2J', 0, tune(24, seed=1)), ('Bass', 1, BASS)]
    named = write_parts(tmp_path / 'pop.mid', parts).rename(os.fsdecode(folder + b'/caf\xe9.mid'))
    empty = Path(os.fsdecode(folder + b'/\xe9\x1b[2J.mid'))
    empty.write_bytes(b'')

    def strict_utf8(*args):
        result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'tokenize_file.py'), *args],
                                capture_output=True, timeout=120, env=dict(os.environ, PYTHONIOENCODING='utf-8'))
        return result.returncode, result.stdout.decode().splitlines(), result.stderr.decode().splitlines()
    code, out, err = strict_utf8(named, empty, '--tracks', 'parts')
    assert code == 1 and len(out) == 4
    assert out[0].startswith(f'{tmp_path}/caf\\xe9.mid: ') and "from track 1 'Lead\\n\\x1b[2J'" in out[2]
    assert err == [f'tokenize_file: {tmp_path}/\\xe9\\x1b[2J.mid: cannot read it as MIDI: not a MIDI file: no MThd '
                   f'header of 14 bytes (at byte 0)']
    code, out, err = strict_utf8(named, '--out', os.fsdecode(folder + b'/back\xe9'))
    assert (code, err, out[-1]) == (0, [], f'wrote {tmp_path}/back\\xe9.mid')
    assert os.path.getsize(folder + b'/back\xe9.mid') > 0


def test_out_is_written_whole_under_its_own_name_and_a_stop_while_writing_leaves_the_old_file(tmp_path, monkeypatch,
                                                                                             capsys):
    from tests.conftest import in_process
    main = runpy.run_path(str(ROOT / 'tools' / 'tokenize_file.py'))['main']
    tune = write_midi(tmp_path / 'tune.mid', melody(n=20))
    out = tmp_path / 'back.MID'  # written under this very name, not back.mid beside it
    code, printed, _ = in_process(main, [tune, '--out', out], capsys)
    assert (code, printed.splitlines()[-1]) == (0, f'wrote {out}')
    whole = out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['back.MID', 'tune.mid']

    def stopped_halfway(signum):
        def write(tokens, path, *args, **kwargs):
            Path(path).write_bytes(b'MThd\x00\x00')
            raise KeyboardInterrupt(signum) if signum else KeyboardInterrupt
        return write
    for signum, code, how in ((None, 130, 'Ctrl-C'), (signal.SIGTERM, 143, 'SIGTERM')):
        monkeypatch.setitem(main.__globals__, 'detokenize', stopped_halfway(signum))
        result = in_process(main, [tune, '--out', out], capsys)
        assert (result[0], result[2]) == (code, f'tokenize_file: stopped by {how}; {out} is not written\n')
        assert out.read_bytes() == whole and sorted(p.name for p in tmp_path.iterdir()) == ['back.MID', 'tune.mid']
