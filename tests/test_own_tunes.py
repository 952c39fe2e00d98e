"""tools/own_tunes.py: a conditioned model's own whole tunes, kept where they end on the asked key's tonic, written as
a zip of MIDI files that the corpus reads back as the same tokens and labels."""

import importlib.util
import os
import signal
import time
import zipfile

import numpy as np
import torch

import condition
from accompany import melody_notes
from dataset import load_corpus
from tests.conftest import ROOT, in_process
from tests.test_condition import conditioned  # noqa: F401  (the tiny conditioned run, a fixture)
from tests.test_parts_measures import parts_run  # noqa: F401  (a tiny parts run)
from tokens import DUR_OFFSET, PITCH_OFFSET, ROLE_OFFSET, START_IDX, TIME_OFFSET

spec = importlib.util.spec_from_file_location('own_tunes', ROOT / 'tools' / 'own_tunes.py')
own_tunes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(own_tunes)


def ending_on(pitch_class, notes=3):
    """Tokens of `notes` notes, a step of 8 apart, the last one on pitch_class (above middle C)."""
    tokens = []
    for i in range(notes):
        pitch = 60 + (pitch_class if i == notes - 1 else (2 * i) % 12)
        tokens += ([8] if i else []) + [DUR_OFFSET + 8, PITCH_OFFSET + pitch]
    return tokens


def test_a_tune_is_kept_only_when_the_model_ended_it_on_the_asked_tonic():
    d_major = condition.header({'key': 'D major', 'meter': '6/8'})
    tunes = [[START_IDX, *d_major, *ending_on(2)], [START_IDX, *d_major, *ending_on(2)],
             [START_IDX, *d_major, *ending_on(9)], [START_IDX, *d_major]]
    kept = own_tunes.kept_tunes(tunes, [True, False, True, True], [d_major] * 4, styles=())
    assert kept == [(ending_on(2), {'key': 'D major', 'meter': '6/8'})]


def test_training_headers_are_drawn_from_training_tunes_with_a_key():
    keyed = [START_IDX, *condition.header({'key': 'G major'}), *ending_on(7)]
    unkeyed = [START_IDX, *condition.header({'meter': '3/4'}), *ending_on(7)]
    headers = own_tunes.training_headers([np.array(keyed), np.array(unkeyed)], 20, seed=0)
    assert headers == [condition.header({'key': 'G major'})] * 20


def test_the_kept_tunes_read_back_as_their_tokens_with_the_asked_labels(conditioned, tmp_path, monkeypatch,  # noqa: F811
                                                                       capsys):
    written = []

    def fake_tunes(model, machine, prompts, max_length, **sampling):
        """Every other tune ends on its asked tonic, the others on the fifth above it."""
        tunes = []
        for i, prompt in enumerate(prompts):
            key = condition.header_labels(prompt[1:])['key']
            tonic = condition.TONIC_NAMES[key.split()[1]].index(key.split()[0])
            tunes.append(prompt + ending_on((tonic + (0 if i % 2 == 0 else 7)) % 12, notes=4 + i))
        written.extend(tunes[::2])
        return tunes, [True] * len(tunes)
    monkeypatch.setattr(own_tunes, 'generate_tunes', fake_tunes)
    out = tmp_path / 'own' / 'own_tunes.zip'
    code, printed, _ = in_process(own_tunes.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--tunes', 6,
                                                   '--out', out], capsys)
    assert code == 0 and '6 tunes sampled' in printed and '3 of them keep the tonic rule' in printed
    names = zipfile.ZipFile(out).namelist()
    assert len(names) == 3 and all(name.split('/')[0] in ('reels', 'waltzes') for name in names)
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'own_tunes.zip').symlink_to(out)
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', map_location='cpu', weights_only=False)
    read, _, _ = load_corpus(tmp_path / 'data', ckpt['tokenization'], tmp_path / 'cache', min_notes=1,
                             val_fraction=0.0, styles=ckpt['styles'], verbose=False)
    assert sorted(map(list, read)) == sorted(written)


def test_an_unconditioned_or_missing_checkpoint_or_no_tunes_is_refused_in_one_line(trained, tmp_path, capsys):
    out = tmp_path / 'own.zip'
    code, _, err = in_process(own_tunes.main, ['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--out', out],
                              capsys)
    assert code == 2 and 'trained without condition' in err.strip().splitlines()[-1]
    code, _, err = in_process(own_tunes.main, ['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--out', out,
                                               '--rule', 'voice_leading'], capsys)
    assert code == 2 and 'no melody and bass roles' in err.strip().splitlines()[-1]
    code, _, err = in_process(own_tunes.main, ['--checkpoint', tmp_path / 'missing.pt', '--out', out], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and 'missing.pt not found' in err
    code, _, err = in_process(own_tunes.main, ['--checkpoint', 'x.pt', '--tunes', 0, '--out', out], capsys)
    assert code == 2 and '--tunes 0' in err.strip().splitlines()[-1]
    assert not out.exists()


def melody_and_bass(melody, bass, step=4):
    """Parts tokens of melody and bass notes starting together, a step apart."""
    tokens = []
    for i, (high, low) in enumerate(zip(melody, bass)):
        tokens += ([TIME_OFFSET + step] if i else []) + [DUR_OFFSET + step, ROLE_OFFSET['melody'] + high,
                                                         DUR_OFFSET + step, ROLE_OFFSET['bass'] + low]
    return tokens


def test_a_parts_models_pieces_are_sampled_with_the_mask_and_kept_without_parallels_and_read_back_with_roles(
        parts_run, tmp_path, monkeypatch, capsys):  # noqa: F811
    contrary = melody_and_bass([72, 74, 76, 77], [48, 47, 45, 43])
    octaves = melody_and_bass([72, 74, 76, 77], [48, 50, 52, 53])
    crossed = melody_and_bass([60, 62, 64, 65], [62, 64, 66, 67])
    masked = []

    def fake_tunes(model, machine, prompts, max_length, voice_leading=False, **sampling):
        masked.append(voice_leading)
        return [p + (contrary, octaves, crossed)[i % 3] for i, p in enumerate(prompts)], [True] * len(prompts)
    monkeypatch.setattr(own_tunes, 'generate_tunes', fake_tunes)
    out = tmp_path / 'own_parts.zip'
    code, printed, _ = in_process(own_tunes.main, ['--checkpoint', parts_run / 'ckpt' / 'latest.pt', '--tunes', 6,
                                                   '--out', out], capsys)
    assert code == 0 and masked == [True] and '2 of them keep the voice_leading rule' in printed
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'own_parts.zip').symlink_to(out)
    ckpt = torch.load(parts_run / 'ckpt' / 'latest.pt', map_location='cpu', weights_only=False)
    read, _, _ = load_corpus(tmp_path / 'data', ckpt['tokenization'], tmp_path / 'cache', min_notes=1,
                             val_fraction=0.0, verbose=False)
    assert [list(s) for s in read] == [[START_IDX] + contrary] * 2


def test_sigterm_while_sampling_writes_nothing_and_says_so_in_one_line(conditioned, tmp_path, monkeypatch,  # noqa: F811
                                                                       capsys):
    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler would, in the middle of sampling
        time.sleep(5)
        raise AssertionError('SIGTERM did not stop the sampling')
    monkeypatch.setattr(own_tunes, 'generate_tunes', stopped)
    out = tmp_path / 'own.zip'
    code, _, err = in_process(own_tunes.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--tunes', 2,
                                               '--out', out], capsys)
    assert (code, err) == (143, 'stopped by SIGTERM: nothing written\n') and not out.exists()


def test_accompaniments_of_the_training_melodies_keep_the_melody_and_are_kept_without_parallels(
        parts_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / 'own_acc.zip'
    code, printed, err = in_process(own_tunes.main, ['--checkpoint', parts_run / 'ckpt' / 'latest.pt', '--tunes', 16,
                                                     '--accompany', '--out', out], capsys)
    assert code == 0, err
    ckpt = torch.load(parts_run / 'ckpt' / 'latest.pt', map_location='cpu', weights_only=False)
    train, _, _ = load_corpus(parts_run / 'midi', ckpt['tokenization'], tmp_path / 'cache', min_notes=1,
                              val_fraction=ckpt['args']['val_fraction'], verbose=False)
    sampled = int(printed.split(' tunes sampled')[0].split()[-1])
    assert sampled == round(16 / len(train)) * len(train)  # as many rows for each training melody
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'own_acc.zip').symlink_to(out)
    read, _, _ = load_corpus(tmp_path / 'data', ckpt['tokenization'], tmp_path / 'cache', min_notes=1,
                             val_fraction=0.0, verbose=False)
    melodies = {tuple(melody_notes(s)) for s in train}
    assert read and all(tuple(melody_notes(s)) in melodies for s in read)  # the training melody, as given
    for piece in read:
        notes = own_tunes.tokens_to_notes(piece, roles=True)
        assert sum(own_tunes.measures.parallels(notes)) == 0 and not own_tunes.measures.voice_crossing(notes) > 0


def test_accompany_is_refused_in_one_line_for_the_tonic_rule(conditioned, tmp_path, capsys):  # noqa: F811
    out = tmp_path / 'own.zip'
    code, _, err = in_process(own_tunes.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--out', out,
                                               '--accompany'], capsys)
    assert code == 2 and err.strip().splitlines()[-1].endswith('--accompany: only with --rule voice_leading (a parts '
                                                               'model accompanies melodies)')
    assert not out.exists()
