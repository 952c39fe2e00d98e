"""generate.py: samples from a checkpoint, melody continuation, audio rendering."""

import os
import subprocess
import sys

import pytest

import sampling
import TMIDIX
from dataset import tokenization_settings
from tests.conftest import ROOT
from tests.test_dataset import melody, write_midi


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
    # every prompt note is there at its time (a generated note may share the last prompt note's onset and sort
    # before it, so compare as sets), and the continuation adds notes after them
    assert all(any(o[4] == n[4] and abs(o[1] - n[1]) < 32 for o in out[:13]) for n in original)
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
