"""generate.py: samples from a checkpoint, melody continuation, audio rendering."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sampling
import TMIDIX
from parts import parse_programs
from tests.conftest import ROOT, allowed_next_tables, in_process, melody, write_midi
from tokens import ROLE_CHANNEL, grammar_table, tokenization_settings


def test_generate_writes_samples_from_a_checkpoint(trained, tmp_path):
    tmp, _ = trained
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(tmp / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path), '--num_samples', '2', '--length', '40', '--no_audio']
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    assert (tmp_path / 'sample_0.mid').exists() and (tmp_path / 'sample_1.png').exists()
    subprocess.run(cmd + ['--int8', '--num_samples', '1', '--output_dir', str(tmp_path / 'q')], check=True,
                   env=env, capture_output=True, timeout=120)
    assert len(TMIDIX.midi2notes(str(tmp_path / 'q' / 'sample_0.mid'))) > 0


def test_generate_continues_a_prompt_keeping_it_verbatim(trained, tmp_path):
    import TMIDIX
    tmp, _ = trained
    prompt = write_midi(tmp_path / 'tune.mid', melody(30, seed=5))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(tmp / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path / 'out'), '--num_samples', '1', '--length', '30', '--prompt', str(prompt),
           '--prompt_notes', '12', '--no_audio']
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    original = TMIDIX.midi2notes(str(prompt), unit='ms')[:12]
    out = TMIDIX.midi2notes(str(tmp_path / 'out' / 'continuation_tune_0.mid'), unit='ms')
    # every prompt note is there at its time (generated notes may share the last prompt note's onset and sort
    # before it, so compare as sets), and the continuation adds notes after them
    assert all(any(o[4] == n[4] and abs(o[1] - n[1]) < 32 for o in out) for n in original)
    assert len(out) > 12
    assert (tmp_path / 'out' / 'continuation_tune_0.png').exists()


def test_samples_are_rendered_to_wav_when_fluidsynth_is_installed(tmp_path):
    import shutil
    import wave
    if shutil.which('fluidsynth') is None or not any(os.path.isfile(p) for p in sampling.SOUNDFONT_PATHS):
        pytest.skip('FluidSynth or a GM SoundFont is not installed')
    sampling.find_synth.cache_clear()
    tokens = [834] + [3, 140, 316, 3, 140, 319, 3, 140, 323] * 3
    sampling.save_sample(tokens, tmp_path / 's', tokenization_settings(), log=lambda *a: None)
    with wave.open(str(tmp_path / 's.wav')) as w:
        frames = w.readframes(w.getnframes())
        assert w.getnframes() > w.getframerate() * 0.5  # about a second of music (plus the synth's release)
    assert any(frames[i] for i in range(0, len(frames), 97))  # not silence


def test_without_fluidsynth_a_one_line_hint_and_nothing_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sampling.shutil, 'which', lambda name: None)
    sampling.find_synth.cache_clear()
    try:
        for i in range(2):
            sampling.save_sample([834, 140, 316], tmp_path / f's{i}', tokenization_settings(),
                                 log=lambda *a: None)
    finally:
        sampling.find_synth.cache_clear()
    out = capsys.readouterr().out
    assert out.count('apt install fluidsynth fluid-soundfont-gm') == 1
    assert (tmp_path / 's1.mid').exists() and not (tmp_path / 's1.wav').exists()


@pytest.mark.skipif(sys.platform == 'win32', reason='a shell script stands in for fluidsynth')
def test_a_synth_stopped_part_way_leaves_no_broken_wav(tmp_path, monkeypatch, capsys):
    # what Ctrl-C does to fluidsynth in the middle of a training sample: half a file, then a non-zero exit
    fake = tmp_path / 'fluidsynth'
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "-F" ]; do shift; done\nprintf RIFFhalf > "$2"\nexit 130\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sampling, 'find_synth', lambda: (str(fake), str(tmp_path / 'font.sf2')))
    sampling.save_sample([834, 3, 140, 316] * 4, tmp_path / 's', tokenization_settings(), log=lambda *a: None)
    out = capsys.readouterr().out
    assert out == f"audio: fluidsynth failed on {tmp_path / 's.mid'} (exit code 130); no .wav written\n"
    assert (tmp_path / 's.mid').exists() and sorted(p.name for p in tmp_path.glob('s*')) == ['s.mid', 's.png']


def test_beats_model_checkpoint_carries_its_timing_and_samples_land_on_the_grid(data, tmp_path):
    import torch

    from tests.conftest import TINY, run
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '2',
                   '--validate_every', '2', '--generate_every', '2', '--timing', 'beats', '--output_tempo', '90']
    run(args, cwd=tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['tokenization']['timing'] == 'beats' and ckpt['tokenization']['beat_division'] == 12
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(tmp_path / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path / 'out'), '--num_samples', '1', '--length', '60', '--no_audio']
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    opus = TMIDIX.midi2opus((tmp_path / 'out' / 'sample_0.mid').read_bytes())
    assert opus[0] == 480  # ticks per quarter of the beats grid
    tempos = [e[2] for track in opus[1:] for e in track if e[0] == 'set_tempo']
    assert tempos == [round(60_000_000 / 90)]
    notes = TMIDIX.midi2notes(str(tmp_path / 'out' / 'sample_0.mid'), unit='ticks')
    assert notes and all(n[1] % (480 // 12) == 0 for n in notes)


# -----------------------------------------------------------------------------
# bad input: one line on stderr naming what is wrong, a non-zero exit, no traceback

# kind of file given as --checkpoint: what load_checkpoint's one line says about it (None: a script's own wording)
BAD_CHECKPOINTS = {
    'empty': 'not a readable checkpoint',
    'truncated': 'not a readable checkpoint',
    'text': 'not a readable checkpoint',
    'midi': 'not a readable checkpoint',
    'state_dict': 'not a checkpoint of this project',
    'folder': 'is a folder',
    'missing': 'not found',
    'weights_of_another_size': None,  # saved args say dim 64 for weights of dim 32
    'args_without_dim': None,
}


def make_bad_checkpoint(kind, good, folder):
    """A path that is no usable checkpoint, made in folder from the good checkpoint file `good`."""
    import torch

    from runtime import load_model
    path = folder / f'{kind}.pt'
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'truncated':
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == 'text':
        path.write_text('step = 6\n')
    elif kind == 'midi':
        path = write_midi(folder / 'tune.mid', melody(20))
    elif kind == 'state_dict':
        torch.save(load_model(good)[0].state_dict(), path)
    elif kind == 'folder':
        path.mkdir()
    elif kind in ('weights_of_another_size', 'args_without_dim'):
        ckpt = torch.load(good, weights_only=True)
        args = dict(ckpt['args'], dim=64) if kind == 'weights_of_another_size' else \
            {k: v for k, v in ckpt['args'].items() if k != 'dim'}
        torch.save(dict(ckpt, args=args), path)
    return path


def generate_in_process(argv, capsys):
    import generate
    return in_process(generate.main, argv, capsys)


@pytest.mark.parametrize('kind', BAD_CHECKPOINTS)
def test_a_bad_checkpoint_file_is_one_line_naming_it(trained, tmp_path, capsys, kind):
    path = make_bad_checkpoint(kind, trained[0] / 'ckpt' / 'latest.pt', tmp_path)
    code, out, err = generate_in_process(['--checkpoint', path, '--output_dir', tmp_path / 'out', '--no_audio'],
                                         capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith('error: ') and str(path) in err and 'Traceback' not in err
    assert BAD_CHECKPOINTS[kind] is None or BAD_CHECKPOINTS[kind] in err
    assert not (tmp_path / 'out').exists()


def test_a_truncated_checkpoint_stops_the_real_command_with_one_line(trained, tmp_path):
    path = make_bad_checkpoint('truncated', trained[0] / 'ckpt' / 'latest.pt', tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(path), '--output_dir',
                           str(tmp_path / 'out')], env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert str(path) in proc.stderr and 'not a readable checkpoint' in proc.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('field, value', [('num_samples', '0'), ('length', '0'), ('top_p', '0'),
                                          ('temperature', '-1'), ('repeat_memory', '1'), ('repeat_memory', '0.6'),
                                          ('repeat_memory', 'nan')])
def test_a_bad_generation_value_exits_2_naming_the_field(trained, tmp_path, capsys, monkeypatch, field, value):
    monkeypatch.chdir(tmp_path)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', f'--{field}', value], capsys)
    assert code == 2 and err.splitlines() == [err.strip()] and err.startswith(f'error: --{field} '), err
    assert not (tmp_path / 'out').exists()


def test_too_many_samples_for_the_memory_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from custom_basic_transformer import AutoregressiveWrapper

    def out_of_memory(*args, **kwargs):  # what the CPU allocator raised for --num_samples 100000000
        raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can\'t allocate memory: you '
                           'tried to allocate 78643200000000 bytes. Error code 12 (Cannot allocate memory)')
    monkeypatch.setattr(AutoregressiveWrapper, 'generate', out_of_memory)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '7'], capsys)
    assert code == 1 and err == ('error: not enough memory to generate 7 samples of 512 tokens at once on cpu; '
                                 'lower --num_samples or --length\n'), err


@pytest.mark.parametrize('during', ['sampling', 'writing'])
def test_ctrl_c_is_one_line_saying_what_was_written(trained, tmp_path, capsys, monkeypatch, during):
    import generate
    from custom_basic_transformer import AutoregressiveWrapper

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    if during == 'sampling':
        monkeypatch.setattr(AutoregressiveWrapper, 'generate', interrupt)
    else:  # the second sample's files
        save = generate.save_sample
        monkeypatch.setattr(generate, 'save_sample', lambda tokens, path, *a, **k: (
            interrupt() if path.name.endswith('_1') else save(tokens, path, *a, **k)))
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '3', '--length', '8', '--no_audio'],
                                         capsys)
    written = 0 if during == 'sampling' else 1
    assert code == 130 and err == f'stopped by Ctrl-C: {written} of 3 samples written\n', err
    assert len(list(tmp_path.glob('out/*.mid'))) == written


@pytest.mark.parametrize('argv', [['--length', 'abc'], ['--num_samples', '2.5'], ['--no_such_option']])
def test_text_that_is_not_a_value_exits_2_with_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, out, err = generate_in_process(argv, capsys)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1, err


def test_top_p_none_turns_nucleus_sampling_off_and_writes_samples(trained, tmp_path, capsys):
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path, '--top_p', 'none', '--num_samples', '2', '--length', '20',
                                          '--no_audio'], capsys)
    assert code == 0, err
    assert (tmp_path / 'sample_0.mid').stat().st_size > 0 and (tmp_path / 'sample_1.mid').stat().st_size > 0


@pytest.mark.parametrize('flags, constrained', [([], True), (['--no_stop'], True), (['--unconstrained'], False)])
def test_samples_follow_the_token_grammar_unless_unconstrained(trained, tmp_path, capsys, monkeypatch, flags,
                                                               constrained):
    # the grammar lets a tune end (a start token after a pitch) unless --no_stop asks for --length tokens
    tables = allowed_next_tables(monkeypatch)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path, '--num_samples', '2', '--length', '20', '--no_audio'] + flags,
                                         capsys)
    assert code == 0, err
    assert len(tables) == 1 and (tables[0] is not None) == constrained
    if constrained:
        assert torch.equal(tables[0], grammar_table(ends='--no_stop' not in flags))


def test_a_prompt_whose_name_has_a_dot_gives_one_file_per_sample(trained, tmp_path, capsys):
    prompt = write_midi(tmp_path / 'bwv103.6.mid', melody(30, seed=5))
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--prompt', prompt, '--prompt_notes', '8',
                                          '--num_samples', '4', '--length', '20', '--no_audio'], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.mid')) == \
        [f'continuation_bwv103.6_{i}.mid' for i in range(4)]


def test_best_pt_of_a_run_without_validation_falls_back_to_its_latest_pt(trained, tmp_path, capsys):
    import shutil
    shutil.copy(trained[0] / 'ckpt' / 'latest.pt', tmp_path / 'latest.pt')
    code, out, err = generate_in_process(['--checkpoint', tmp_path / 'best.pt', '--output_dir', tmp_path / 'out',
                                          '--num_samples', '1', '--length', '20', '--no_audio'], capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if 'best.pt does not exist' in line]
    assert len(notes) == 1 and f'using {tmp_path / "latest.pt"}' in notes[0]
    assert (tmp_path / 'out' / 'sample_0.mid').exists()


def test_a_sample_that_cannot_be_written_is_one_line_and_exit_1(trained, tmp_path, capsys):
    (tmp_path / 'sample_0.mid').mkdir()  # a folder where the first sample's file should go
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path, '--num_samples', '1', '--length', '20', '--no_audio'], capsys)
    assert code == 1 and err.splitlines() == [err.strip()], err
    assert err.startswith(f'error: cannot write {tmp_path / "sample_0.mid"}') and 'Traceback' not in err


def test_a_fresh_clone_without_a_trained_model_generates_from_the_shipped_model(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    import generate
    monkeypatch.setattr(generate, 'SHIPPED_MODEL', trained[0] / 'ckpt' / 'latest.pt')  # stands in for models/
    monkeypatch.setattr(generate, 'ROOT', trained[0])
    monkeypatch.chdir(tmp_path)  # no content/checkpoints here: nothing trained yet
    code, out, err = generate_in_process(['--num_samples', '1', '--length', '20', '--no_audio', '--output_dir',
                                          tmp_path / 'out'], capsys)
    assert code == 0, err
    assert out.count('using the shipped model') == 1 and (tmp_path / 'out' / 'sample_0.mid').exists()


def test_a_second_run_into_the_same_folder_numbers_on_and_keeps_every_earlier_sample(trained, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    argv = ['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir', out_dir, '--num_samples', '2',
            '--length', '16', '--no_audio']
    code, out, err = generate_in_process(argv, capsys)
    assert code == 0 and f'wrote sample_0 to sample_1 in {out_dir}' in out, err
    first = {p.name: p.read_bytes() for p in out_dir.glob('sample_*')}  # index.html lists them all
    assert len(first) == 4
    (out_dir / 'sample_4.wav').write_bytes(b'RIFF')  # a rendering whose .mid was removed still holds its number
    code, out, err = generate_in_process(argv + ['--seed', '1', '--num_samples', '1'], capsys)
    assert code == 0 and out.splitlines()[-1] == f'wrote sample_5 in {out_dir}', err
    assert {name: (out_dir / name).read_bytes() for name in first} == first
    assert sorted(p.name for p in out_dir.glob('*.mid')) == ['sample_0.mid', 'sample_1.mid', 'sample_5.mid']


def test_without_checkpoint_from_another_directory_generate_finds_the_run_in_the_repository_folder(
        trained, tmp_path, capsys, monkeypatch):
    import shutil

    import generate
    project, elsewhere = tmp_path / 'project', tmp_path / 'elsewhere'
    (project / 'content' / 'checkpoints').mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(trained[0] / 'ckpt' / 'latest.pt', project / 'content' / 'checkpoints' / 'latest.pt')
    monkeypatch.setattr(generate, 'ROOT', project)  # stands in for this repository's folder
    monkeypatch.chdir(elsewhere)
    code, out, err = generate_in_process(['--num_samples', '1', '--length', '16', '--no_audio'], capsys)
    assert code == 0, err
    # a run without validation has no best.pt: its latest.pt is used, and said
    assert f"using {project / 'content' / 'checkpoints' / 'latest.pt'}" in out and 'shipped' not in out
    assert (elsewhere / 'content' / 'samples' / 'sample_0.mid').exists()


def test_samples_are_listed_on_their_folders_page_newest_first_with_what_they_were_asked(trained, tmp_path, capsys):
    from tests.test_sample_page import read_page
    checkpoint = trained[0] / 'ckpt' / 'latest.pt'
    common = ['--checkpoint', checkpoint, '--output_dir', tmp_path / 'out', '--length', '20', '--no_audio']
    code, out, err = generate_in_process(common + ['--num_samples', '2', '--seed', '7', '--top_k', '5'], capsys)
    assert code == 0, err
    prompt = write_midi(tmp_path / 'tune.mid', melody(30, seed=5))
    code, out, err = generate_in_process(common + ['--num_samples', '1', '--prompt', prompt, '--prompt_notes', '8'],
                                         capsys)
    assert code == 0, err
    page = read_page(tmp_path / 'out')
    assert page.names == ['continuation_tune_0', 'sample_1', 'sample_0']
    assert f'checkpoint {checkpoint} (step 6) · seed 7 · temperature 1.0 · top_k 5 · length 20' in page.texts
    assert f'checkpoint {checkpoint} (step 6) · seed 0 · temperature 1.0 · prompt {prompt} · prompt_notes 8 · ' \
           f'length 20' in page.texts
    assert all((tmp_path / 'out' / path).is_file() for _, path in page.links) and len(page.links) == 6


@pytest.mark.parametrize('kind', ['fifo', 'device', 'folder', 'dangling link', 'huge', 'drums'])
def test_a_prompt_that_is_not_a_midi_file_of_notes_is_one_line(trained, tmp_path, capsys, monkeypatch, kind):
    if kind == 'fifo':
        prompt = tmp_path / 'prompt.mid'
        os.mkfifo(prompt)  # reading it would wait for a writer for ever
        reason = 'not a regular file'
    elif kind == 'folder':
        prompt, reason = tmp_path / 'songs.mid', 'not a regular file'
        prompt.mkdir()
    elif kind == 'dangling link':
        prompt, reason = tmp_path / 'x.mid', f'a link to {tmp_path / "gone.mid"}, which does not exist'
        prompt.symlink_to(tmp_path / 'gone.mid')
    elif kind == 'device':
        prompt, reason = '/dev/zero', 'not a regular file'  # reading it never ends
    elif kind == 'huge':
        monkeypatch.setattr(sampling, 'MAX_MIDI_BYTES', 1000, raising=False)
        prompt = write_midi(tmp_path / 'prompt.mid', melody(300))
        reason = 'far more than a MIDI file holds'
    else:
        prompt = write_midi(tmp_path / 'drums.mid', melody(30), channel=9)
        reason = 'holds no usable notes: only drum notes (30 on channel 10), which this model leaves out'
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--prompt', prompt, '--no_audio'], capsys)
    assert code == 2 and err.splitlines() == [err.strip()] and reason in err and str(prompt) in err, err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('option, expected', [
    ('--prompt', "error: --prompt '': must be None (no prompt) or a file path"),
    ('--checkpoint', "error: --checkpoint '': must be a file path")])
def test_an_empty_prompt_or_checkpoint_path_is_one_line_not_taken_for_the_option_left_out(tmp_path, capsys, option,
                                                                                           expected):
    code, out, err = generate_in_process([option, '', '--output_dir', tmp_path / 'out'], capsys)
    assert code == 2 and err == expected + '\n' and not (tmp_path / 'out').exists()


def test_ctrl_c_while_the_model_loads_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import generate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, 'load_model', interrupt)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '3'], capsys)
    assert code == 130 and err == 'stopped by Ctrl-C: 0 of 3 samples written\n', err


def test_a_checkpoint_that_is_a_fifo_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / 'best.pt')  # torch.load would wait for a writer for ever
    code, out, err = generate_in_process(['--checkpoint', tmp_path / 'best.pt', '--output_dir', tmp_path / 'out'],
                                         capsys)
    assert code == 2 and err == f'error: {tmp_path / "best.pt"} is not a regular file (a checkpoint is best.pt or ' \
                                'latest.pt in the save_dir of a training run)\n', err


def test_ctrl_c_while_generating_writes_the_samples_so_far(trained, tmp_path, capsys, monkeypatch):
    from custom_basic_transformer import AutoregressiveWrapper
    real = AutoregressiveWrapper.generate

    def stopped_after_10_tokens(self, prompt, *args, on_token, **kwargs):
        def watch(out):
            on_token(out)
            if out.shape[1] == prompt.shape[1] + 10:
                raise KeyboardInterrupt
        return real(self, prompt, *args, on_token=watch, **kwargs)
    monkeypatch.setattr(AutoregressiveWrapper, 'generate', stopped_after_10_tokens)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '2', '--length', '30', '--no_audio'],
                                         capsys)
    assert code == 130 and err == ('stopped by Ctrl-C: writing the samples so far, 10 of 30 new tokens each\n'
                                   'stopped by Ctrl-C: 2 of 2 samples written, 10 of 30 new tokens each\n'), err
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.mid')) == ['sample_0.mid', 'sample_1.mid']


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGTERM')
def test_sigterm_while_generating_writes_the_samples_so_far_and_exits_143(trained, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(trained[0] / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path / 'out'), '--num_samples', '2', '--length', '100000', '--no_stop',
           '--no_audio']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stdout.readline()  # printed as the generation starts
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # as `kill PID`, `timeout` or a scheduler does
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stops = [line.split('\r')[-1] for line in err.splitlines() if 'stopped by' in line]
    assert started.startswith('checkpoint ') and proc.returncode == 143 and 'Traceback' not in err, err
    assert len(stops) == 2 and stops[0].startswith('stopped by SIGTERM: writing the samples so far, '), err
    assert stops[1].startswith('stopped by SIGTERM: 2 of 2 samples written, '), err
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.mid')) == ['sample_0.mid', 'sample_1.mid']


def test_ctrl_c_while_drawing_a_piano_roll_counts_the_sample_whose_midi_is_written(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    def interrupt(song, plot_title, **kwargs):
        if plot_title.startswith('sample_1 '):
            raise KeyboardInterrupt
    monkeypatch.setattr(sampling.TMIDIX, 'plot_ms_SONG', interrupt)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '3', '--length', '8', '--no_audio'],
                                         capsys)
    assert code == 130 and err == 'stopped by Ctrl-C: 2 of 3 samples written\n', err
    assert len(list(tmp_path.glob('out/*.mid'))) == 2


def test_a_long_generation_shows_a_progress_bar(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sampling, 'LONG_GENERATION', 20, raising=False)
    code, out, err = generate_in_process(['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                          tmp_path / 'out', '--num_samples', '1', '--length', '25', '--no_audio'],
                                         capsys)
    assert code == 0 and 'generating: 100%' in err and '25/25' in err, err


def test_the_shipped_parts_model_writes_its_roles_on_their_channels_with_its_programs(tmp_path, capsys):
    shipped = ROOT / 'models' / 'parts_cpu.pt'
    code, out, err = generate_in_process(['--checkpoint', shipped, '--num_samples', '1', '--length', '90', '--seed',
                                          '0', '--no_audio', '--output_dir', tmp_path], capsys)
    assert code == 0, err
    ckpt = torch.load(shipped, weights_only=True)
    assert ckpt['tokenization']['tracks'] == 'parts'
    notes, names, programs = TMIDIX.midi2notes(tmp_path / 'sample_0.mid', with_track=True, with_programs=True)
    channels = {note[3] for note in notes}
    # the chorales and quartets it learned from: melody, bass and harmony (channels 1-3), no drums
    assert channels == {0, 1, 2}, channels
    expected = parse_programs(ckpt['args']['programs'])
    assert {channel: program for (_, channel), program in programs.items()} == {
        ROLE_CHANNEL[role]: expected[role] for role in ('melody', 'bass', 'harmony')}


def test_on_off_options_take_true_or_false_as_the_training_script_does(monkeypatch):
    import generate

    def parsed(argv):
        def stop(args, rules):
            raise SystemExit(vars(args))
        monkeypatch.setattr(generate, 'exit_on_bad_args', stop)
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        return {name: e.value.code.get(name) for name in (
            'voice_leading', 'int8', 'unconstrained', 'no_audio', 'no_stop', 'accompany')}

    words = ['--voice_leading', 'false', '--int8', 'false', '--unconstrained', 'true', '--no_audio', 'yes',
             '--no_stop', 'true', '--accompany', 'false']
    assert parsed(words) == {'voice_leading': False, 'int8': False, 'unconstrained': True, 'no_audio': True,
                             'no_stop': True, 'accompany': False}
    assert parsed(['--no_voice_leading', '--no-int8', '--unconstrained', '--no_audio']) == {
        'voice_leading': False, 'int8': False, 'unconstrained': True, 'no_audio': True, 'no_stop': False,
        'accompany': False}


def test_a_prompt_and_folder_named_in_bytes_that_are_not_utf8_give_samples_named_in_those_bytes(trained, tmp_path):
    tmp, _ = trained
    folder = os.fsencode(tmp_path)
    prompt = write_midi(tmp_path / 'tune.mid', melody(20, seed=5)).rename(os.fsdecode(folder + b'/caf\xe9.mid'))
    out = os.fsdecode(folder + b'/out\xe9')
    # a desktop's UTF-8 locale writes stdout strictly, as PYTHONIOENCODING=utf-8 does here
    proc = subprocess.run([sys.executable, str(ROOT / 'generate.py'), '--checkpoint', tmp / 'ckpt' / 'latest.pt',
                           '--output_dir', out, '--num_samples', '1', '--length', '12', '--prompt', prompt,
                           '--no_audio'], env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1',
                                                   PYTHONIOENCODING='utf-8'), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.splitlines()[-1] == b'wrote continuation_caf\xe9_0 in ' + folder + b'/out\xe9'
    names = sorted(os.listdir(folder + b'/out\xe9'))  # on disk, the prompt's own bytes
    assert names == [b'continuation_caf\xe9_0.mid', b'continuation_caf\xe9_0.png', b'index.html', b'index.json']


def test_without_length_a_tune_may_run_as_long_as_the_models_window(trained, tmp_path, capsys, monkeypatch):
    # a model taught on windows longer than 512 tokens writes tunes that need them: the default maximum follows
    # its window when the sample ends with its tune; --no_stop and a given --length keep their lengths
    from custom_basic_transformer import AutoregressiveWrapper
    from generate import default_length
    assert default_length(True, 1024) == 1024 and default_length(False, 1024) == 512
    assert default_length(True, 256) == 512 and default_length(True, None) == 512
    assert default_length(True, 10**6) == 100_000  # a hand-edited window keeps --length's own limit
    ckpt = torch.load(trained[0] / 'ckpt' / 'latest.pt', weights_only=True)
    ckpt['args']['seq_len'] = 600
    torch.save(ckpt, tmp_path / 'wide.pt')
    lengths = []
    real_generate = AutoregressiveWrapper.generate
    monkeypatch.setattr(AutoregressiveWrapper, 'generate',
                        lambda self, prompt, seq_len, **kw: lengths.append(seq_len) or real_generate(
                            self, prompt, 8, **kw))  # drawn short: only the maximum asked matters here
    common = ['--checkpoint', tmp_path / 'wide.pt', '--num_samples', '1', '--no_audio']
    for extra in ([], ['--no_stop'], ['--length', '40']):
        code, out, err = generate_in_process(common + ['--output_dir', tmp_path / f'out{len(extra)}'] + extra, capsys)
        assert code == 0, err
    assert lengths == [600, 512, 40]
    from tests.test_sample_page import read_page
    assert any('length 600' in text for text in read_page(tmp_path / 'out0').texts)
