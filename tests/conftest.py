"""Shared fixtures: a small MIDI folder and one tiny training run that several test files look at."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer
from tokens import tokenization_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--dim', '32', '--depth', '2', '--heads', '2', '--dim_head', '16', '--seq_len', '32', '--batch_size', '4',
        '--grad_accum', '2', '--generate_length', '24', '--prompt_length', '8', '--min_notes', '10',
        '--print_stats_every', '2', '--dtype', 'float32']

# tiny models for the model, kernel and sampling tests: a vocabulary of 40 with the last id as padding
VOCAB = 40
PAD = VOCAB - 1


def tiny_model(depth=2, max_seq_len=16, dropout_p=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = MusicTransformer(num_tokens=VOCAB, dim=32, depth=depth, heads=4, dim_head=8, max_seq_len=max_seq_len,
                           dropout=dropout_p, **kwargs)
    return AutoregressiveWrapper(net, pad_value=PAD, ignore_index=PAD)


def random_tokens(*shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, shape, generator=generator)


# MIDI files built in code, so each test shows its input

def write_midi(path, notes, ticks_per_beat=480, tempos=((0, 500000),), channel=0, program=0):
    """notes: (start_tick, duration_tick, pitch) on one track; tempos: (tick, usec) on a separate tempo track."""
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    tempo_track = mido.MidiTrack()
    last = 0
    for tick, usec in tempos:
        tempo_track.append(mido.MetaMessage('set_tempo', tempo=usec, time=tick - last))
        last = tick
    events = []
    for start, dur, pitch in notes:
        events.append((start, 1, pitch))
        events.append((start + dur, 0, pitch))
    track = mido.MidiTrack([mido.Message('program_change', program=program, channel=channel, time=0)])
    last = 0
    for tick, on, pitch in sorted(events):
        kind = 'note_on' if on else 'note_off'
        track.append(mido.Message(kind, note=pitch, velocity=80 if on else 0, channel=channel, time=tick - last))
        last = tick
    mid.tracks += [tempo_track, track]
    mid.save(str(path))
    return path


def write_parts(path, parts, file_format=1):
    """parts: (track name or None, channel, [(start_tick, duration_tick, pitch), ...][, GM program]), 480 ticks per
    quarter. Format 1: a tempo track, then a track per part; format 0: every part on one track, named after the
    first part."""
    def track(events):  # (tick, rank, message): at one tick names, then note_offs, then note_ons
        out, previous = mido.MidiTrack(), 0
        for tick, _, message in sorted(events, key=lambda e: e[:2]):
            out.append(message.copy(time=tick - previous))
            previous = tick
        return out

    tempo = [(0, 0, mido.MetaMessage('set_tempo', tempo=500000))]
    bodies = []
    for name, channel, notes, *program in parts:
        events = [(0, 0, mido.MetaMessage('track_name', name=name))] if name else []
        events += [(0, 0, mido.Message('program_change', channel=channel, program=p)) for p in program]
        for start, duration, pitch in notes:
            events.append((start, 2, mido.Message('note_on', channel=channel, note=pitch, velocity=80)))
            events.append((start + duration, 1, mido.Message('note_off', channel=channel, note=pitch, velocity=0)))
        bodies.append(events)
    mid = mido.MidiFile(type=file_format, ticks_per_beat=480)
    if file_format == 0:
        mid.tracks.append(track(tempo + [event for body in bodies for event in body]))
    else:
        mid.tracks += [track(tempo)] + [track(body) for body in bodies]
    mid.save(str(path))
    return path


def melody(n=60, seed=0, step=240):
    rng = np.random.default_rng(seed)
    return [(i * step, int(rng.integers(60, 480)), int(rng.integers(48, 84))) for i in range(n)]


def make_folder(root, n=12, notes=60):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_midi(root / f'song_{i:02d}.mid', melody(notes, seed=i))
    return root


def run(args, cwd, check=True, timeout=240, torchrun=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    cmd = [sys.executable, str(ROOT / 'custom_training.py')] + args
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] + cmd[1:]
        env.setdefault('GLOO_SOCKET_IFNAME', 'lo')  # keep gloo on loopback whatever the hostname resolves to
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def in_process(main, argv, capsys):
    """A script's main(argv) as `python script.py argv` runs it: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def stopped_and_resumed(common, tmp_path):
    """An unbroken run of `common` (ending at --max_steps 8, last in common) and one stopped at step 5 with a
    checkpoint from step 4, resumed from it to step 8: (unbroken latest.pt, resumed latest.pt, the step-5 file)."""
    run(common + ['--save_dir', str(tmp_path / 'full'), '--samples_dir', str(tmp_path / 's1')], cwd=tmp_path)
    part = ['--save_dir', str(tmp_path / 'part'), '--samples_dir', str(tmp_path / 's2')]
    run(common[:-1] + ['5'] + part, cwd=tmp_path)  # stops at step 5 with a checkpoint saved at step 4 ...
    shutil.copy(tmp_path / 'part' / 'latest.pt', tmp_path / 'part' / 'at5.pt')
    run(common + part + ['--checkpoint', str(tmp_path / 'part' / 'at5.pt')], cwd=tmp_path)
    load = lambda path: torch.load(path, weights_only=True)
    return load(tmp_path / 'full' / 'latest.pt'), load(tmp_path / 'part' / 'latest.pt'), tmp_path / 'part' / 'at5.pt'


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data') / 'midi', n=16, notes=80)


@pytest.fixture(scope='session')
def trained(data, tmp_path_factory):
    """One tiny run that writes everything a user looks at."""
    tmp = tmp_path_factory.mktemp('run')
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp / 'cache'), '--save_dir', str(tmp / 'ckpt'),
                   '--samples_dir', str(tmp / 'samples'), '--max_steps', '6', '--validate_every', '3',
                   '--generate_every', '3', '--save_every', '3']
    proc = run(args, cwd=tmp)
    return tmp, proc


def generate_arguments(monkeypatch, name):
    """A list that receives the keyword argument `name` (None when not given) of every AutoregressiveWrapper.generate
    call from now on."""
    values = []
    real_generate = AutoregressiveWrapper.generate

    def generate(self, *args, **kwargs):
        values.append(kwargs.get(name))
        return real_generate(self, *args, **kwargs)
    monkeypatch.setattr(AutoregressiveWrapper, 'generate', generate)
    return values


def allowed_next_tables(monkeypatch):
    """A list that receives the allowed_next table of every AutoregressiveWrapper.generate call from now on."""
    return generate_arguments(monkeypatch, 'allowed_next')


# -----------------------------------------------------------------------------
# tokenization settings and a pop song's parts, for the tokens, token cache and dataset tests

MS = tokenization_settings('ms')
BEATS = tokenization_settings('beats')
SIXTEENTHS = tokenization_settings('beats', 4)  # a step is a 16th note: 120 ticks at 480 ticks per quarter
ONE_LINE = tokenization_settings('beats', 4, tracks='melody')

# a pop song's parts, (start_tick, duration_tick, pitch): 16 quarter notes of tune, 8 half notes of bass, 4 bars of
# whole-note triads, 32 eighth notes of kick and hi-hat
TUNE = [(i * 480, 480, p) for i, p in enumerate([72, 74, 76, 77, 79, 77, 76, 74] * 2)]  # mean pitch 75.6
BASS = [(i * 960, 960, p) for i, p in enumerate([36, 43, 41, 43] * 2)]
CHORDS = [(bar * 1920, 1920, p) for bar, chord in enumerate([(60, 64, 67), (65, 69, 72), (67, 71, 74), (60, 64, 67)])
          for p in chord]  # mean pitch 66.7
DRUMS = [(i * 240, 120, 42 if i % 2 else 36) for i in range(32)]


def pop_song(tmp_path):
    return write_parts(tmp_path / 'pop.mid', [(None, 0, TUNE), (None, 1, BASS), (None, 2, CHORDS), (None, 9, DRUMS)])
