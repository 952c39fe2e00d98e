"""Conditioning (condition.py) and whole tunes: labels from MIDI files and folders, the header in the corpus and
its dropout, conditioned training, generate.py's --key/--meter/--style and its stop at a tune's end."""

import json
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

import condition
import generate
from condition import header, header_labels, midi_labels, parse_key, parse_meter, style_of
from custom_basic_transformer import AutoregressiveWrapper
from dataset import MIDI_Dataset, PackedDataset, load_corpus, transpose
from sampling import save_sample, until_tune_end
from tests.conftest import MS, ROOT, TINY, in_process, melody, run, stopped_and_resumed
from token_cache import DatasetError
from tokens import (
    DUR_OFFSET,
    PITCH_OFFSET,
    START_IDX,
    TOKEN_RANGES,
    grammar_table,
    time_steps,
    tokenization_settings,
    tokenize_midi,
)

CONDITIONED = tokenization_settings(condition=True)


def write_labelled(path, notes, key=None, meter=None, later_key=None):
    """A MIDI file of notes (start_tick, duration_tick, pitch) with a key signature (mido's names: 'D', 'Gm') and a
    time signature (numerator, denominator) at its start where given, and a second key signature at tick 960."""
    meta = mido.MidiTrack([mido.MetaMessage('set_tempo', tempo=500000, time=0)])
    if meter:
        meta.append(mido.MetaMessage('time_signature', numerator=meter[0], denominator=meter[1], time=0))
    if key:
        meta.append(mido.MetaMessage('key_signature', key=key, time=0))
    if later_key:
        meta.append(mido.MetaMessage('key_signature', key=later_key, time=960))
    events = sorted([(s, 1, p) for s, _, p in notes] + [(s + d, 0, p) for s, d, p in notes])
    track, last = mido.MidiTrack(), 0
    for tick, on, pitch in events:
        track.append(mido.Message('note_on' if on else 'note_off', note=pitch, velocity=80 if on else 0,
                                  time=tick - last))
        last = tick
    mid = mido.MidiFile(type=1, ticks_per_beat=480)
    mid.tracks += [meta, track]
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(str(path))
    return path


def styled_dataset(root, per_style=6):
    """reels/ (D major, 6/8) as a folder, waltzes/ (G minor, 3/4) inside tunes.zip, and one unlabelled file at the
    top."""
    for i in range(per_style):
        write_labelled(root / 'reels' / f'reel_{i}.mid', melody(40, seed=i), key='D', meter=(6, 8))
    with zipfile.ZipFile(root / 'tunes.zip', 'w') as zf:
        for i in range(per_style):
            made = write_labelled(root / f'w{i}.mid', melody(40, seed=20 + i), key='Gm', meter=(3, 4))
            zf.write(made, f'waltzes/waltz_{i}.mid')
            made.unlink()
    write_labelled(root / 'loose.mid', melody(40, seed=99))
    return root


# -----------------------------------------------------------------------------
# labels

def test_labels_come_from_the_first_key_and_time_signature_and_a_file_without_them_has_none(tmp_path):
    both = write_labelled(tmp_path / 'a.mid', melody(20), key='Bb', meter=(6, 8), later_key='Em')
    minor = write_labelled(tmp_path / 'b.mid', melody(20), key='F#m', meter=(2, 2))
    bare = write_labelled(tmp_path / 'c.mid', melody(20))
    odd_meter = write_labelled(tmp_path / 'd.mid', melody(20), key='C', meter=(7, 8))
    assert midi_labels(both.read_bytes()) == {'key': 'Bb major', 'meter': '6/8'}
    assert midi_labels(minor.read_bytes()) == {'key': 'F# minor', 'meter': '2/2'}
    assert midi_labels(bare.read_bytes()) == {}
    assert midi_labels(odd_meter.read_bytes()) == {'key': 'C major'}  # an uncommon meter has no token


def test_style_is_the_first_folder_on_the_path_and_a_zips_inside_continues_it():
    assert style_of('reels/x.mid') == 'reels'
    assert style_of('reels/fast/x.mid') == 'reels'
    assert style_of('tunes.zip::reels/x.mid') == 'reels'
    assert style_of('irish/tunes.zip::reels/x.mid') == 'irish'
    assert style_of('outer.zip::inner.zip::han1/x.mid') == 'han1'
    assert style_of('x.mid') is None and style_of('tunes.zip::x.mid') is None


def test_key_and_meter_strings_parse_and_unknown_ones_say_what_is_allowed():
    assert [parse_key(text) for text in ('D major', 'd', 'Dm', 'g minor', 'F#', 'Bb min', 'C#')] == [
        'D major', 'D major', 'D minor', 'G minor', 'F# major', 'Bb minor', 'Db major']
    assert parse_meter(' 6 / 8') == '6/8'
    for bad in ('H major', 'D dorian', ''):
        with pytest.raises(ValueError, match='major or minor'):
            parse_key(bad)
    with pytest.raises(ValueError, match='2/4, 3/4, 4/4, 6/8'):
        parse_meter('7/8')


def test_the_signature_written_for_every_key_reads_back_as_that_key():
    keys = [condition.key_name(pitch_class, mode) for mode in condition.MODES for pitch_class in range(12)]
    assert [condition.key_of_signature(*condition.signature_of_key(key)) for key in keys] == keys
    assert condition.signature_of_key('F# major') == (6, 0) and condition.signature_of_key('Eb minor') == (-6, 1)


def test_header_ids_lie_in_their_named_ranges_in_the_order_key_meter_style_and_read_back():
    styles = ['jigs', 'reels']
    labels = {'key': 'B minor', 'meter': '5/4', 'style': 'reels'}
    ids = header(labels, styles)
    assert [TOKEN_RANGES[name][0] <= i <= TOKEN_RANGES[name][1] for name, i in zip(('key', 'meter', 'style'), ids)] \
        == [True] * 3
    assert header_labels(ids, styles) == labels
    assert header({'meter': '6/8', 'style': 'polkas'}, styles) == [TOKEN_RANGES['meter'][0] + 3]  # unknown style: none
    assert len({header({'key': condition.key_name(p, m)})[0] for p in range(12) for m in condition.MODES}) == 24
    assert condition.MAX_STYLES >= 30 and TOKEN_RANGES['style'][1] == TOKEN_RANGES['start'][0] - 1


# -----------------------------------------------------------------------------
# the corpus and its windows

def test_conditioned_corpus_puts_key_meter_style_after_the_start_token_and_other_tokens_stay_the_same(tmp_path):
    root = styled_dataset(tmp_path / 'data')
    train, val, summary = load_corpus(root, CONDITIONED, tmp_path / 'cache', min_notes=10, val_fraction=0.0)
    plain, _, plain_summary = load_corpus(root, MS, tmp_path / 'cache', min_notes=10, val_fraction=0.0)
    assert summary['styles'] == ['reels', 'waltzes']
    assert 'styles' not in plain_summary and 'condition' not in MS  # unconditioned settings: the same cache key
    heads = {tuple(header_labels(seq[1:4], summary['styles']).items()) for seq in train}
    assert heads == {(('key', 'D major'), ('meter', '6/8'), ('style', 'reels')),
                     (('key', 'G minor'), ('meter', '3/4'), ('style', 'waltzes')), ()}
    for with_header, without in zip(train, plain):
        size = len(with_header) - len(without)
        assert size in (0, 3) and with_header[0] == START_IDX
        assert with_header[1 + size:].tolist() == without[1:].tolist()
    assert summary['common_labels'][0] in ({'key': 'D major', 'meter': '6/8', 'style': 'reels'},
                                           {'key': 'G minor', 'meter': '3/4', 'style': 'waltzes'})


def test_more_styles_than_style_ids_is_one_dataset_error_naming_the_count_and_the_limit(tmp_path):
    root = tmp_path / 'data'
    for i in range(condition.MAX_STYLES + 1):
        write_labelled(root / f'style_{i:02d}' / 'tune.mid', melody(12, seed=i))
    with pytest.raises(DatasetError, match=f'^{condition.MAX_STYLES + 1} styles .* at most {condition.MAX_STYLES}'):
        load_corpus(root, CONDITIONED, tmp_path / 'cache', min_notes=10, verbose=False)
    # fine-tuning keeps the model's styles: the message counts its own and the dataset's new folders apart
    own = [f'style_{i:02d}' for i in range(3)] + [f'old_{i}' for i in range(condition.MAX_STYLES - 4)]
    with pytest.raises(DatasetError) as error:
        load_corpus(root, CONDITIONED, tmp_path / 'cache', min_notes=10, verbose=False, styles=own, add_styles=True)
    assert str(error.value).startswith(f"the model's {condition.MAX_STYLES - 1} styles and the dataset's "
                                       f"{condition.MAX_STYLES - 2} new top folders (style_03, style_04, ")
    assert 'group the new files into at most 1 folder, or into folders named as the model' in str(error.value)


def headed(n_tunes, notes=6):
    """Token sequences of n_tunes tunes, each with a full header (D major, 6/8, style 0) and notes of pitch 60 first,
    then 61, 62, 63, 64, 60, ..."""
    head = header({'key': 'D major', 'meter': '6/8', 'style': 'a'}, ['a'])
    body = [token for j in range(notes) for token in (DUR_OFFSET + 4, PITCH_OFFSET + 60 + j % 5)]
    return [np.array([START_IDX] + head + body, dtype=np.uint16) for _ in range(n_tunes)]


def test_packed_header_dropout_is_drawn_from_seed_and_epoch_and_leaves_out_about_its_rate():
    seqs = headed(400)
    full = PackedDataset(seqs, 16, seed=3)
    dropping = PackedDataset(seqs, 16, seed=3, header_dropout=0.3)
    assert np.array_equal(full.stream, np.concatenate(seqs))  # no dropout: the stream as it was
    left_out = 1 - condition.is_header(dropping.stream_tokens()).sum() / (3 * 400)
    assert 0.25 < left_out < 0.35
    assert np.array_equal(dropping.stream, np.concatenate(seqs))  # the tokens stay: windows skip those left out
    again = PackedDataset(seqs, 16, seed=3, header_dropout=0.3)
    assert np.array_equal(dropping.stream_tokens(), again.stream_tokens())
    assert torch.equal(torch.stack(dropping.__getitems__([5, 6])), torch.stack(again.__getitems__([5, 6])))
    # a window is the stream without the tokens left out, cut where the epoch's offset says
    offset = random.Random('3/0/offset').randrange(16)
    assert dropping.__getitems__([5])[0].tolist() == dropping.stream_tokens()[offset + 80:offset + 97].tolist()
    dropping.set_epoch(1)
    assert not np.array_equal(dropping.stream_tokens(), again.stream_tokens())
    # every tune still begins at a start token, so the tune mask and transposition find it
    assert (dropping.stream_tokens()[dropping.tune_starts] == START_IDX).all()
    dropping.set_epoch(0)
    assert np.array_equal(dropping.stream_tokens(), again.stream_tokens())


def test_unpacked_windows_end_with_a_start_token_and_drop_header_tokens_by_seed_epoch_and_index():
    seqs = headed(50, notes=3)  # 10 tokens: each tune fits a window whole
    windows = MIDI_Dataset(seqs, 32, seed=1, end_token=START_IDX, header_dropout=0.3)
    drawn = [windows[i] for i in range(len(windows))]
    assert all(int(w[-1]) == START_IDX and int(w[0]) == START_IDX for w in drawn)
    kept = sum(int(condition.is_header(w).sum()) for w in drawn)
    assert 0.5 < kept / (3 * 50) < 0.9
    assert all(torch.equal(a, windows[i]) for i, a in enumerate(drawn))  # the same draw again
    windows.set_epoch(1)
    assert any(not torch.equal(a, windows[i]) for i, a in enumerate(drawn))
    plain = MIDI_Dataset(seqs, 32, seed=1)
    assert plain[0].tolist() == seqs[0].tolist()  # without an end token or dropout: the tune as it is


def test_transposition_moves_the_key_token_with_the_tune():
    d_major = header({'key': 'D major'})[0]
    window = torch.tensor([START_IDX, d_major, DUR_OFFSET + 4, PITCH_OFFSET + 62])
    moved = transpose(window, 2)
    assert moved.tolist() == [START_IDX, header({'key': 'E major'})[0], DUR_OFFSET + 4, PITCH_OFFSET + 64]
    packed = PackedDataset(headed(20), 12, aug=True, aug_range=3, seed=0)
    checked = 0
    for window in packed.__getitems__(list(range(len(packed)))):
        keys = (window >= TOKEN_RANGES['key'][0]) & (window <= TOKEN_RANGES['key'][1])
        for place in torch.nonzero(keys).flatten().tolist():
            if place + 4 < len(window):  # key, meter, style, duration, then the first note: pitch 60 moved
                shift = int(window[place + 4]) - PITCH_OFFSET - 60
                assert header_labels(window[place:place + 1])['key'] == condition.key_name(2 + shift, 'major')
                checked += 1
    assert checked >= 5


# -----------------------------------------------------------------------------
# conditioned training, generate.py

@pytest.fixture(scope='module')
def conditioned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('conditioned')
    data = styled_dataset(tmp / 'data')
    run(TINY + ['--data_path', str(data), '--cache_dir', str(tmp / 'cache'), '--save_dir', str(tmp / 'ckpt'),
                '--samples_dir', str(tmp / 'samples'), '--max_steps', '4', '--validate_every', '2',
                '--generate_every', '2', '--save_every', '2', '--condition', 'true', '--audio', 'false'], cwd=tmp)
    return tmp


def test_a_conditioned_checkpoint_lists_its_styles_and_its_samples_are_asked_for_common_labels(conditioned):
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['styles'] == ['reels', 'waltzes'] and ckpt['tokenization']['condition'] is True
    entries = json.loads((conditioned / 'samples' / 'index.json').read_text())
    asked = [{k: v for k, v in e['asked'].items() if k != 'step'} for e in entries]
    assert {tuple(a.items()) for a in asked} == {
        (('key', 'D major'), ('meter', '6/8'), ('style', 'reels')),
        (('key', 'G minor'), ('meter', '3/4'), ('style', 'waltzes'))}
    for entry in entries:  # each sample's MIDI file carries the key and meter it was asked
        assert midi_labels((conditioned / 'samples' / entry['midi']).read_bytes()) == {
            'key': entry['asked']['key'], 'meter': entry['asked']['meter']}


def prompts_seen(monkeypatch, end_after=None):
    """The prompts of every AutoregressiveWrapper.generate call from now on; end_after=N makes every row draw the
    start token as its N-th new token (the model ending its tune)."""
    seen = []
    real = AutoregressiveWrapper.generate

    def spy(self, prompt, seq_len, **kwargs):
        seen.append((prompt.clone(), kwargs))
        if end_after is not None:
            kwargs['force'] = lambda out, token: token.masked_fill(
                torch.tensor(out.shape[1] - prompt.shape[-1] == end_after - 1), START_IDX)
        return real(self, prompt, seq_len, **kwargs)
    monkeypatch.setattr(AutoregressiveWrapper, 'generate', spy)
    return seen


def test_generate_puts_the_asked_header_after_the_start_token_and_writes_its_signatures(conditioned, tmp_path,
                                                                                         monkeypatch, capsys):
    seen = prompts_seen(monkeypatch)
    code, out, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                                tmp_path, '--num_samples', '2', '--length', '30', '--no_audio',
                                                '--key', 'am', '--meter', '6/8', '--style', 'waltzes'], capsys)
    assert code == 0, err
    asked = {'key': 'A minor', 'meter': '6/8', 'style': 'waltzes'}
    assert seen[0][0][0].tolist() == [START_IDX] + header(asked, ['reels', 'waltzes'])
    assert midi_labels((tmp_path / 'sample_0.mid').read_bytes()) == {'key': 'A minor', 'meter': '6/8'}
    entry = json.loads((tmp_path / 'index.json').read_text())[0]
    assert {k: entry['asked'][k] for k in asked} == {'key': 'A minor', 'meter': '6/8', 'style': 'waltzes'}


def test_a_continuation_keeps_its_prompts_key_and_meter_unless_others_are_asked_and_is_guided_without_them(
        conditioned, tmp_path, monkeypatch, capsys):
    prompt = write_labelled(tmp_path / 'prompt.mid', melody(20), key='Eb', meter=(3, 4))
    seen = prompts_seen(monkeypatch)
    code, _, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                              tmp_path / 'out', '--num_samples', '2', '--length', '10', '--no_audio',
                                              '--prompt', prompt, '--prompt_notes', '4', '--meter', '2/4',
                                              '--guidance', '2'], capsys)
    assert code == 0, err
    asked, kwargs = seen[0]
    assert asked[:, 1:3].tolist() == [header({'key': 'Eb major', 'meter': '2/4'})] * 2
    written = tmp_path / 'out' / 'continuation_prompt_0.mid'
    assert midi_labels(written.read_bytes()) == {'key': 'Eb major', 'meter': '2/4'}
    # guidance: the same prompt, its notes included, without the header
    assert kwargs['guidance'] == 2.0
    assert kwargs['unconditioned'].tolist() == [[asked[0, 0].item()] + asked[0, 3:].tolist()] * 2
    assert json.loads((tmp_path / 'out' / 'index.json').read_text())[0]['asked']['guidance'] == 2.0


@pytest.mark.parametrize('flags, says', [
    (['--key', 'H major'], "error: unknown key 'H major': a key is a tonic A-G"),
    (['--meter', '7/8'], "error: unknown meter '7/8': the meters with a token are 2/4, 3/4"),
    (['--style', 'jigs'], "error: --style 'jigs': .* knows the styles reels, waltzes"),
])
def test_an_unknown_key_meter_or_style_is_refused_in_one_line_listing_what_is_allowed(conditioned, tmp_path, capsys,
                                                                                      flags, says):
    code, out, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                                tmp_path / 'out', '--no_audio'] + flags, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.match(says, err)
    assert not (tmp_path / 'out').exists()


def test_a_style_name_holding_a_newline_is_listed_on_one_line(conditioned, tmp_path, capsys):
    # style names are folder names: one may hold any character, and the list of them stays one line
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    torch.save({**ckpt, 'styles': ['reels\nfake line', 'waltzes']}, tmp_path / 'odd.pt')
    code, out, err = in_process(generate.main, ['--checkpoint', tmp_path / 'odd.pt', '--output_dir', tmp_path / 'out',
                                                '--no_audio', '--style', 'jigs'], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --style 'jigs': {tmp_path / 'odd.pt'} knows the styles reels\\nfake line, waltzes"]


def test_a_shipped_conditioned_model_keeps_its_styles_so_generate_can_be_asked_for_one(conditioned, tmp_path, capsys):
    shipped = tmp_path / 'shipped.pt'
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'ship_model.py'), str(conditioned / 'ckpt' / 'latest.pt'),
                    str(shipped)], check=True, capture_output=True)
    assert torch.load(shipped, weights_only=True)['styles'] == ['reels', 'waltzes']
    code, _, err = in_process(generate.main, ['--checkpoint', shipped, '--output_dir', tmp_path / 'out',
                                              '--num_samples', '1', '--length', '12', '--no_audio',
                                              '--style', 'reels'], capsys)
    assert code == 0, err


def test_a_shipped_model_names_its_data_folder_as_the_third_argument_says_or_relative_to_the_repository(
        conditioned, tmp_path):
    def shipped_data_path(source, *data_path):
        subprocess.run([sys.executable, str(ROOT / 'tools' / 'ship_model.py'), str(source), str(tmp_path / 's.pt'),
                        *data_path], check=True, capture_output=True)
        return torch.load(tmp_path / 's.pt', weights_only=True)['args']['data_path']

    trained = conditioned / 'ckpt' / 'latest.pt'
    assert shipped_data_path(trained, './content/parts_dataset') == './content/parts_dataset'
    outside = torch.load(trained, weights_only=True)['args']['data_path']
    assert shipped_data_path(trained) == outside  # a folder outside the repository keeps its name
    ckpt = torch.load(trained, weights_only=True)
    ckpt['args']['data_path'] = str(ROOT / 'content' / 'folk_dataset')  # as a run in this clone saves it
    torch.save(ckpt, tmp_path / 'in_repo.pt')
    assert shipped_data_path(tmp_path / 'in_repo.pt') == './content/folk_dataset'
    # the token cache is the clone's own, wherever the run kept its cache
    assert torch.load(tmp_path / 's.pt', weights_only=True)['args']['cache_dir'] == './content/cache'


@pytest.mark.parametrize('shipped', sorted((ROOT / 'models').glob('*.pt')), ids=lambda path: path.name)
def test_a_shipped_model_names_no_folder_of_the_machine_it_was_trained_on(shipped):
    args = torch.load(shipped, weights_only=True, map_location='cpu')['args']
    assert not Path(args['cache_dir']).is_absolute() and not Path(args['data_path']).is_absolute()


def test_shipping_a_missing_checkpoint_or_too_many_arguments_says_so_in_one_line(tmp_path):
    for argv in ([str(tmp_path / 'missing.pt'), str(tmp_path / 's.pt')], ['a.pt', 'b.pt', 'c', 'd']):
        proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'ship_model.py'), *argv], capture_output=True,
                              text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert 'missing.pt not found' in subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'ship_model.py'), str(tmp_path / 'missing.pt')], capture_output=True,
        text=True).stderr
    assert not (tmp_path / 's.pt').exists()


def test_guidance_with_nothing_asked_says_it_changes_nothing(conditioned, tmp_path, monkeypatch, capsys):
    seen = prompts_seen(monkeypatch)
    code, _, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                              tmp_path, '--num_samples', '1', '--length', '6', '--no_audio',
                                              '--guidance', '2'], capsys)
    assert code == 0 and 'so --guidance changes nothing' in err
    assert seen[0][1]['unconditioned'] is None


def test_guidance_0_says_that_what_is_asked_does_not_steer_the_notes(conditioned, tmp_path, capsys):
    argv = ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir', tmp_path, '--num_samples', '1',
            '--length', '6', '--no_audio', '--guidance', '0']
    code, _, err = in_process(generate.main, argv + ['--key', 'D major'], capsys)
    assert code == 0 and err.splitlines() == ['note: --guidance 0 draws every token as the model asked nothing '
                                              'would: what is asked is written into the files but does not steer '
                                              'the notes'], err
    code, _, err = in_process(generate.main, argv, capsys)  # nothing asked: the note that guidance changes nothing
    assert code == 0 and 'so --guidance changes nothing' in err and 'steer' not in err


def test_a_checkpoint_whose_run_sampled_with_guidance_is_guided_unless_told_otherwise(conditioned, tmp_path,
                                                                                     monkeypatch, capsys):
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    ckpt['args']['guidance'], ckpt['args']['end_guidance'] = 1.5, 3.0  # as a recipe with guidance saves it
    torch.save(ckpt, tmp_path / 'guided.pt')
    seen = prompts_seen(monkeypatch)
    for flags in (['--key', 'D'], ['--key', 'D', '--guidance', '1'], [], ['--key', 'D', '--end_guidance', 'none'],
                  ['--key', 'D', '--end_guidance', '4']):
        code, _, err = in_process(generate.main, ['--checkpoint', tmp_path / 'guided.pt', '--output_dir', tmp_path,
                                                  '--num_samples', '1', '--length', '6', '--no_audio'] + flags, capsys)
        assert code == 0 and 'changes nothing' not in err  # the run's guidance, not the user's: no note
    assert [kwargs['guidance'] for _, kwargs in seen] == [1.5, 1.0, 1.5, 1.5, 1.5]
    assert [kwargs['end_guidance'] for _, kwargs in seen] == [3.0, 3.0, 3.0, None, 4.0]
    assert [kwargs['unconditioned'] is None for _, kwargs in seen] == [False, False, True, False, False]
    asked = json.loads((tmp_path / 'index.json').read_text())
    assert [entry['asked'].get('end_guidance') for entry in asked] == [3.0, 3.0, 3.0, None, 4.0]


def test_end_guidance_that_cannot_steer_an_end_says_it_changes_nothing(conditioned, tmp_path, capsys):
    argv = ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir', tmp_path, '--num_samples', '1',
            '--length', '6', '--no_audio', '--end_guidance', '4']
    code, _, err = in_process(generate.main, argv, capsys)  # nothing asked
    assert code == 0 and 'so --end_guidance changes nothing' in err, err
    code, _, err = in_process(generate.main, argv + ['--key', 'D', '--no_stop'], capsys)
    assert code == 0 and err.splitlines() == ['note: --no_stop draws no tune end, so --end_guidance changes nothing']
    code, _, err = in_process(generate.main, argv + ['--key', 'D'], capsys)
    assert code == 0 and 'changes nothing' not in err


@pytest.mark.parametrize('script', ['generate', 'evaluate'])
@pytest.mark.parametrize('option', ['guidance', 'end_guidance'])
def test_guidance_asked_of_an_unconditioned_checkpoint_is_refused_in_one_line(trained, tmp_path, capsys, script,
                                                                              option):
    import evaluate
    main = {'generate': generate.main, 'evaluate': evaluate.main}[script]
    code, _, err = in_process(main, ['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                     tmp_path / 'out', f'--{option}', '1.5'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f'error: --{option} needs a model trained with condition on;')
    assert not (tmp_path / 'out').exists()


def test_conditioning_asked_of_an_unconditioned_checkpoint_is_refused_in_one_line(trained, tmp_path, capsys):
    code, _, err = in_process(generate.main, ['--checkpoint', trained[0] / 'ckpt' / 'latest.pt', '--output_dir',
                                              tmp_path / 'out', '--key', 'D', '--style', 'reels'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith('error: --key, --style need a model trained with condition on;')
    assert not (tmp_path / 'out').exists()


# -----------------------------------------------------------------------------
# whole tunes

def test_the_grammar_lets_a_tune_end_after_a_note_only_when_asked():
    ends, plain = grammar_table(ends=True), grammar_table()
    pitch, duration, time = PITCH_OFFSET + 60, DUR_OFFSET + 4, 3
    assert ends[pitch, START_IDX] and not plain[pitch, START_IDX]
    assert not ends[duration, START_IDX] and not ends[time, START_IDX] and not ends[START_IDX, START_IDX]
    assert torch.equal(ends & ~plain, torch.zeros_like(plain).index_put_(
        (torch.arange(256, 768), torch.full((512,), START_IDX)), torch.tensor(True)))


def test_a_sample_ends_where_the_model_draws_the_start_token_which_is_not_written(conditioned, tmp_path,
                                                                                 monkeypatch, capsys):
    seen = prompts_seen(monkeypatch, end_after=7)
    code, _, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                              tmp_path, '--num_samples', '2', '--length', '40', '--no_audio'], capsys)
    assert code == 0, err
    assert seen[0][1]['eos_token'] == START_IDX
    for i in range(2):
        tokens = tokenize_midi((tmp_path / f'sample_{i}.mid').read_bytes(), MS)[0]
        assert START_IDX not in tokens[1:]
    # at most 6 new tokens before the end: at most 3 notes
    assert all(e['notes'] <= 3 for e in json.loads((tmp_path / 'index.json').read_text()))


def test_training_samples_stop_at_the_tunes_end(tmp_path, monkeypatch, capsys):
    import custom_training
    from options import parse_args_and_given
    seen = prompts_seen(monkeypatch, end_after=4)
    data = styled_dataset(tmp_path / 'data', per_style=3)
    argv = TINY + ['--data_path', data, '--max_steps', '1', '--audio', 'false', '--condition', 'true', '--save_dir',
                   tmp_path / 'ckpt', '--samples_dir', tmp_path / 'samples', '--cache_dir', tmp_path / 'cache']
    code, _, err = in_process(lambda a: custom_training.main(*parse_args_and_given(custom_training.Args(), a)),
                              argv, capsys)
    assert code == 0, err
    assert seen[0][1]['eos_token'] == START_IDX and seen[0][1]['allowed_next'][PITCH_OFFSET + 60, START_IDX]
    entry = json.loads((tmp_path / 'samples' / 'index.json').read_text())[0]
    assert entry['notes'] <= 1  # 3 tokens before the start token: one note at most


def test_guided_training_samples_compare_their_header_with_the_start_token_alone(tmp_path, monkeypatch, capsys):
    import custom_training
    from options import parse_args_and_given
    seen = prompts_seen(monkeypatch)
    data = styled_dataset(tmp_path / 'data', per_style=3)
    argv = TINY + ['--data_path', data, '--max_steps', '1', '--audio', 'false', '--condition', 'true', '--save_dir',
                   tmp_path / 'ckpt', '--samples_dir', tmp_path / 'samples', '--cache_dir', tmp_path / 'cache',
                   '--guidance', '2', '--end_guidance', '4', '--generate_length', '6']
    code, _, err = in_process(lambda a: custom_training.main(*parse_args_and_given(custom_training.Args(), a)),
                              argv, capsys)
    assert code == 0, err
    prompt, kwargs = seen[0]
    assert len(prompt) > 1 and condition.is_header(prompt[1:]).all()  # asked a header ...
    assert kwargs['guidance'] == 2.0 and kwargs['unconditioned'].tolist() == [START_IDX]  # ... against nothing
    assert kwargs['end_guidance'] == 4.0


def test_no_stop_writes_length_tokens_past_a_tunes_end(conditioned, tmp_path, monkeypatch, capsys):
    seen = prompts_seen(monkeypatch)
    code, _, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                              tmp_path, '--num_samples', '1', '--length', '12', '--no_stop',
                                              '--no_audio'], capsys)
    assert code == 0, err
    assert seen[0][1]['eos_token'] is None and not seen[0][1]['allowed_next'][PITCH_OFFSET + 60, START_IDX]


def test_until_tune_end_cuts_before_the_first_start_token_after_the_prompt():
    assert until_tune_end([START_IDX, 1, 2, START_IDX, 3], 1) == [START_IDX, 1, 2]
    assert until_tune_end([START_IDX, 1, 2], 1) == [START_IDX, 1, 2]
    assert until_tune_end([START_IDX, 5, START_IDX, 1, START_IDX], 3) == [START_IDX, 5, START_IDX, 1]


def test_a_sample_given_labels_carries_them_as_its_first_key_and_time_signature(tmp_path):
    tokens = [START_IDX, DUR_OFFSET + 8, PITCH_OFFSET + 62, 8, DUR_OFFSET + 8, PITCH_OFFSET + 66]
    for timing in ('ms', 'beats'):
        stem = tmp_path / timing / 'tune'
        save_sample(tokens, stem, tokenization_settings(timing), audio=False, log=lambda *a: None,
                    labels={'key': 'F# minor', 'meter': '9/8', 'style': 'jigs'})
        messages = [m for track in mido.MidiFile(str(stem) + '.mid').tracks for m in track]
        assert [m.key for m in messages if m.type == 'key_signature'] == ['F#m']
        assert [(m.numerator, m.denominator) for m in messages if m.type == 'time_signature'] == [(9, 8)]
        assert tokenize_midi((stem.parent / 'tune.mid').read_bytes(), tokenization_settings(timing))[1] == 2


def test_a_stop_while_a_sample_is_written_leaves_no_midi_file_and_none_half_written(tmp_path, monkeypatch):
    import sampling
    tokens = [START_IDX, DUR_OFFSET + 8, PITCH_OFFSET + 62, 8, DUR_OFFSET + 8, PITCH_OFFSET + 66]
    save_sample(tokens, tmp_path / 'kept', tokenization_settings(), audio=False, log=lambda *a: None)
    kept = (tmp_path / 'kept.mid').read_bytes()

    def stop(path, labels):  # Ctrl-C once the notes are written, before the key and meter are
        raise KeyboardInterrupt
    monkeypatch.setattr(sampling, 'write_labels', stop)
    for stem in ('kept', 'new'):
        with pytest.raises(KeyboardInterrupt):
            save_sample(tokens, tmp_path / stem, tokenization_settings(), audio=False, log=lambda *a: None,
                        labels={'key': 'D major'})
    assert sorted(p.name for p in tmp_path.iterdir()) == ['kept.mid', 'kept.png']  # no new.mid, no temporary file
    assert (tmp_path / 'kept.mid').read_bytes() == kept  # the sample written before, as it was


# -----------------------------------------------------------------------------
# resuming

def test_fine_tuning_a_conditioned_model_keeps_its_style_ids_and_adds_the_new_folders_after_them(conditioned,
                                                                                                 tmp_path):
    data = tmp_path / 'data'
    for i in range(4):  # jigs/ sorts before reels/: renumbered, reels would take the id the model knows as reels
        write_labelled(data / 'jigs' / f'jig_{i}.mid', melody(40, seed=40 + i), key='G', meter=(6, 8))
        write_labelled(data / 'reels' / f'reel_{i}.mid', melody(40, seed=50 + i), key='D', meter=(6, 8))
    proc = run(TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                       str(tmp_path / 'tuned'), '--samples_dir', str(tmp_path / 's'), '--max_steps', '1',
                       '--validate_every', '100', '--generate_every', '100', '--condition', 'true', '--audio', 'false',
                       '--init_from', str(conditioned / 'ckpt' / 'latest.pt')], cwd=tmp_path)
    assert 'conditioning: 3 styles: reels, waltzes, jigs' in proc.stdout
    assert torch.load(tmp_path / 'tuned' / 'latest.pt', weights_only=True)['styles'] == ['reels', 'waltzes', 'jigs']



@pytest.mark.parametrize('pack', ['true', 'false'])
def test_a_resumed_conditioned_run_ends_where_an_unbroken_run_would(tmp_path, pack):
    data = styled_dataset(tmp_path / 'data', per_style=4)
    common = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--validate_every', '100',
                     '--generate_every', '100', '--save_every', '4', '--condition', 'true', '--pack', pack,
                     '--audio', 'false', '--max_steps', '8']
    full, resumed, _ = stopped_and_resumed(common, tmp_path)
    assert full['step'] == resumed['step'] == 8 and resumed['styles'] == ['reels', 'waltzes']
    assert abs(full['loss'] - resumed['loss']) < 1e-4
    for key, value in full['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=1e-4, atol=1e-5)
    shutil.rmtree(tmp_path / 'cache')


# -----------------------------------------------------------------------------
# evaluate.py's whole-tune measures

def test_a_conditioned_models_report_judges_the_grammar_of_notes_not_of_the_headers_asked(conditioned, tmp_path,
                                                                                           capsys):
    import evaluate
    # sampled only where the grammar allows, after each piece's header a note may begin with a time shift
    code, out, err = in_process(evaluate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                                tmp_path, '--num_samples', '8', '--sample_length', '16', '--no_c2st',
                                                '--tunes', '0'], capsys)
    report = json.loads((tmp_path / 'evaluation.json').read_text())
    assert code == 0 and report['samples']['asked'] != 'nothing', err
    assert report['music']['grammar_validity']['generated'] == 1.0  # 1 by construction, as the table says
    assert report['music']['grammar_validity']['held_out'] == 1.0  # the tokenizer's own tunes, headers and all


def test_a_tunes_final_pitch_class_is_the_lowest_note_of_its_last_onset():
    import evaluate
    chord_end = [START_IDX, DUR_OFFSET + 4, PITCH_OFFSET + 64, 4, DUR_OFFSET + 8, PITCH_OFFSET + 50,
                 DUR_OFFSET + 8, PITCH_OFFSET + 74]
    assert evaluate.final_pitch_class(chord_end) == 2  # D of the final D-D chord, not the earlier E
    assert evaluate.ends_on_tonic(chord_end, 'D minor') and not evaluate.ends_on_tonic(chord_end, 'G major')
    assert evaluate.ends_on_tonic([START_IDX], 'D major') is None and evaluate.ends_on_tonic(chord_end, None) is None


def test_whole_tune_measures_compare_median_notes_and_tonic_endings_with_the_held_out_tunes(monkeypatch):
    import evaluate
    styles = ['a']
    d_major = [START_IDX] + header({'key': 'D major', 'meter': '6/8', 'style': 'a'}, styles)
    note = lambda pitch: [DUR_OFFSET + 4, PITCH_OFFSET + pitch, 4]
    held = [np.array(d_major + note(60) * 3 + note(62), dtype=np.uint16),   # 4 notes, ends on D
            np.array(d_major + note(60) * 5 + note(64), dtype=np.uint16)]   # 6 notes, ends on E
    tunes = [d_major + note(62) * 7] * 3  # 7 notes, on D
    asked = [{'key': 'D major', 'meter': '6/8', 'style': 'a'}] * 3
    report = evaluate.whole_tune_section(tunes, [True] * 3, asked, held, styles, 40)
    assert report['median_notes']['held_out'] == 5 and report['median_notes']['generated'] == 7
    assert report['median_notes']['relative_difference'] == pytest.approx(0.4)
    assert not report['median_notes']['within_goal'] and report['ended'] == 1.0
    tonic = report['tonic_ending']
    assert (tonic['generated'], tonic['held_out'], tonic['points']) == (1.0, 0.5, 0.5) and not tonic['within_goal']
    g_major = evaluate.whole_tune_section(tunes, [True] * 3, [{'key': 'G major'}] * 3, held, styles, 40)
    assert g_major['tonic_ending']['generated'] == 0.0  # D is not G's tonic
    unconditioned = evaluate.whole_tune_section(tunes, [True, False, True], [{}] * 3, held, None, 40)
    assert 'skipped' in unconditioned['tonic_ending'] and unconditioned['ended'] == pytest.approx(2 / 3)
    # apart: the tunes whose start token stays in view to their end (at most a window of tokens) and the longer ones
    long_off = d_major + note(62) * 7 + note(64)  # 8 notes, 28 tokens, on E
    split = evaluate.whole_tune_section(tunes + [long_off], [True] * 4, asked + asked[:1], held, styles, 40, window=25)
    parts = split['tonic_ending']['by_length']
    assert parts['in_window'] == {'generated': 1.0, 'generated_tunes': 3, 'held_out': 0.5, 'held_out_tunes': 2}
    assert parts['past_window'] == {'generated': 0.0, 'generated_tunes': 1, 'held_out': None, 'held_out_tunes': 0}
    assert split['tonic_ending']['generated'] == 0.75 and 'by_length' not in report['tonic_ending']
    assert any('more than 25 tokens' in line for line in evaluate.whole_tune_lines(split))
    # each style asked: its tunes' median notes and those cut at the length, beside the held-out tunes of that style
    other = [{'key': 'D major', 'style': 'b'}] * 2
    styled = evaluate.whole_tune_section(tunes + [long_off] * 2, [True, True, False, False, True], asked + other, held,
                                         styles, 40)
    assert styled['by_style'] == {'a': {'generated_tunes': 3, 'generated_median_notes': 7.0, 'cut': 1,
                                        'held_out_median_notes': 5.0},
                                  'b': {'generated_tunes': 2, 'generated_median_notes': 8.0, 'cut': 1,
                                        'held_out_median_notes': None}}
    monkeypatch.setattr(evaluate, 'STYLE_LINE_TUNES', 3)
    assert [line.split() for line in evaluate.whole_tune_lines(styled) if 'asked' in line] == [
        ['asked', 'a', '7.0', '5.0', '(3', 'tunes,', '1', 'cut', 'at', '40', 'tokens)']]
    # where the model ends each held-out tune (held_out_ends' rows), in all and for the held-out tunes of each style
    ends = [(0, 0.5, 0.25), (1, 0.25, 0.75)]
    read = evaluate.whole_tune_section(tunes + [long_off] * 2, [True, True, False, False, True], asked + other, held,
                                       styles, 40, ends=ends)
    assert read['held_out_ends'] == {'tunes': 2, 'after_last_note': 0.375, 'after_other_notes': 0.5}
    assert read['by_style']['a']['held_out_ends'] == read['held_out_ends']
    assert read['by_style']['b']['held_out_ends'] == {'tunes': 0, 'after_last_note': None, 'after_other_notes': None}
    lines = evaluate.whole_tune_lines(read)
    assert [line for line in lines if 'asked a' in line][0].endswith('; held-out: end 0.38 at theirs, 0.50 before)')
    assert any(line.startswith("the model's end on held-out tunes (unguided): 0.375 after the last note, 0.500")
               for line in lines)
    assert 'held_out_ends' not in styled
    assert not any("model's end" in line for line in evaluate.whole_tune_lines(styled))


def test_generated_whole_tunes_end_at_the_start_token_each_row_draws(conditioned, monkeypatch):
    import evaluate
    from runtime import load_model, start_machine
    model, _ = load_model(conditioned / 'ckpt' / 'latest.pt')
    prompts_seen(monkeypatch, end_after=5)
    prompts = [[START_IDX], [START_IDX] + header({'key': 'D major', 'meter': '6/8'}), [START_IDX]]
    tunes, ended = evaluate.generate_tunes(model, start_machine('cpu', 'float32'), prompts, 20, temperature=1.0,
                                           top_p=None, top_k=None)
    assert ended == [True] * 3
    assert [len(tune) for tune in tunes] == [len(prompt) + 4 for prompt in prompts]
    assert [tune[:len(prompt)] for tune, prompt in zip(tunes, prompts)] == prompts


def test_tune_lengths_lists_each_styles_training_tune_lengths_and_draws_among_the_asked_styles():
    reel, waltz = header({'style': 'reels'}, ['reels', 'waltzes']), header({'style': 'waltzes'}, ['reels', 'waltzes'])
    note = lambda delta: [delta, DUR_OFFSET + 4, PITCH_OFFSET + 60]  # noqa: E731
    tune = lambda head, deltas: np.array([START_IDX, *head, *[t for d in deltas for t in note(d)]])  # noqa: E731
    seqs = [tune(reel, [0, 8, 8]), tune(reel, [0, 4]), tune(waltz, [0, 12, 12, 12]),
            tune(header({'key': 'D major'}), [0, 2])]  # no style: counted in all tunes only
    table = condition.tune_lengths(seqs, ['reels', 'waltzes'])
    assert table == {'': [2, 4, 16, 36], 'reels': [4, 16], 'waltzes': [36]}
    rng = np.random.default_rng(0)
    drawn = condition.drawn_lengths(table, ['reels'] * 20 + ['waltzes', None, 'jigs'] * 20, rng)
    assert set(drawn[:20]) == {4, 16} and set(drawn[20::3]) == {36}
    assert set(drawn[21::3]) | set(drawn[22::3]) <= {2, 4, 16, 36} and len(set(drawn[21::3])) > 1  # any tune's
    many = [tune(reel, [0] + [1] * n) for n in range(1000)]  # thinned to evenly spaced lengths, the extremes kept
    kept = condition.tune_lengths(many, ['reels'])['reels']
    assert len(kept) == condition.LENGTHS_KEPT and kept[0] == 0 and kept[-1] == 999 and kept == sorted(kept)


def test_a_tune_length_run_stores_its_training_tunes_lengths_and_the_shipped_model_keeps_them(tmp_path):
    data = styled_dataset(tmp_path / 'data')
    run(TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir', str(tmp_path / 'ckpt'),
                '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '1', '--condition', 'true',
                '--tune_clock', 'true', '--tune_length', 'true', '--audio', 'false'], cwd=tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    train, _, _ = load_corpus(data, ckpt['tokenization'], tmp_path / 'cache', ckpt['args']['min_notes'],
                              ckpt['args']['val_fraction'], verbose=False, styles=ckpt['styles'])
    assert ckpt['tune_lengths'] == condition.tune_lengths(train, ckpt['styles'])
    assert set(ckpt['tune_lengths']) == {'', 'reels', 'waltzes'}  # the loose file has no style
    assert len(ckpt['tune_lengths']['']) == len(train)
    subprocess.run([sys.executable, str(ROOT / 'tools' / 'ship_model.py'), str(tmp_path / 'ckpt' / 'latest.pt'),
                    str(tmp_path / 'shipped.pt')], check=True, capture_output=True)
    assert torch.load(tmp_path / 'shipped.pt', weights_only=True)['tune_lengths'] == ckpt['tune_lengths']


def told_model(ckpt, path, lengths=None):
    """The conditioned fixture's model as a tune_length model (a length table of zeros), with lengths (a
    tune_lengths table) stored where given."""
    from custom_basic_transformer import UNTOLD
    torch.save({**ckpt, 'args': {**ckpt['args'], 'tune_length': True},
                'model_state_dict': {**ckpt['model_state_dict'],
                                     'net.length_emb.weight': torch.zeros(UNTOLD + 1, ckpt['args']['dim'])},
                **({'tune_lengths': lengths} if lengths else {})}, path)
    return path


LENGTHS = {'': [10, 20, 30, 300], 'reels': [100, 110], 'waltzes': [200, 210]}


def test_evaluate_asks_a_tune_length_model_the_length_of_a_training_tune_of_each_tunes_style(conditioned, monkeypatch,
                                                                                              tmp_path):
    import evaluate
    from runtime import load_model, start_machine
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    data = conditioned / 'data'
    _, val, _, names = load_corpus(data, ckpt['tokenization'], conditioned / 'cache', ckpt['args']['min_notes'],
                                   ckpt['args']['val_fraction'], verbose=False, styles=ckpt['styles'],
                                   with_names=True)
    sampling = {'temperature': 1.0, 'top_p': None, 'top_k': None}
    for lengths in (LENGTHS, None):
        path = told_model(ckpt, tmp_path / f'told_{bool(lengths)}.pt', lengths)
        model, saved = load_model(path)
        seen = prompts_seen(monkeypatch, end_after=3)
        asked, _, generator, _ = evaluate.whole_tunes_section(model, start_machine('cpu', 'float32'), saved, data,
                                                              names, val, sampling, 12, False, 0, {})
        assert sum(len(call) for call, _ in seen) == 12
        if lengths is None:  # a run that stored no lengths: each tune is told nothing, as generate.py tells it
            assert all(kwargs['length'] is None for _, kwargs in seen)
            assert 'asked the length' not in generator.how_they_end()
            continue
        rows = [(header_labels(prompt, ckpt['styles']).get('style'), int(length)) for call, kwargs in seen
                for prompt, length in zip(call.tolist(), kwargs['length'].tolist())]
        assert {style for style, _ in rows} >= {'reels', 'waltzes'}
        for style, length in rows:
            assert length in LENGTHS.get(style, LENGTHS[''])
        assert 'each asked the length of a training tune of its style' in generator.how_they_end()


def test_generate_asks_a_model_told_tune_lengths_for_seconds_and_refuses_them_of_another(conditioned, tmp_path,
                                                                                            monkeypatch, capsys):
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    told = told_model(ckpt, tmp_path / 'told.pt', LENGTHS)
    seen = prompts_seen(monkeypatch, end_after=4)
    code, out, err = in_process(generate.main, ['--checkpoint', told, '--output_dir', tmp_path / 'out',
                                                '--num_samples', '2', '--no_audio', '--seconds', '2.4'], capsys)
    assert code == 0, err
    assert seen[0][1]['length'] == 75  # 2.4 s of 32 ms steps
    entries = json.loads((tmp_path / 'out' / 'index.json').read_text())
    assert all(entry['asked']['seconds'] == 2.4 for entry in entries)
    code, out, err = in_process(generate.main, ['--checkpoint', conditioned / 'ckpt' / 'latest.pt', '--output_dir',
                                                tmp_path / 'no', '--seconds', '2'], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --seconds needs a model trained with tune_length on; {conditioned / 'ckpt' / 'latest.pt'} was "
        f"trained without it"]
    assert not (tmp_path / 'no').exists()
    code, out, err = in_process(generate.main, ['--checkpoint', told, '--output_dir', tmp_path / 'no', '--seconds',
                                                '1e300'], capsys)  # would overflow the length the model reads
    assert code == 2 and err.strip().splitlines() == [
        'error: --seconds 1e+300: must be None (not asked) or a number in (0, 86400]']


def test_generate_asks_a_tune_length_model_not_told_seconds_a_training_tune_length_of_the_asked_style(
        conditioned, tmp_path, monkeypatch, capsys):
    ckpt = torch.load(conditioned / 'ckpt' / 'latest.pt', weights_only=True)
    seen = prompts_seen(monkeypatch, end_after=4)
    base = ['--num_samples', '6', '--no_audio', '--length', '12']
    code, out, err = in_process(generate.main, ['--checkpoint', told_model(ckpt, tmp_path / 't.pt', LENGTHS),
                                                '--output_dir', tmp_path / 'reels', '--style', 'reels', *base], capsys)
    assert code == 0, err
    assert 'each tune asked the length of a tune of style reels drawn at random (--seconds asks one)' in out
    drawn = seen[-1][1]['length'].tolist()
    assert set(drawn) <= {100, 110} and len(drawn) == 6
    entries = sorted(json.loads((tmp_path / 'reels' / 'index.json').read_text()), key=lambda e: e['midi'])
    assert [e['asked']['seconds'] for e in entries] == [f"{steps * 0.032:.1f} (a training tune's)" for steps in drawn]
    code, out, err = in_process(generate.main, ['--checkpoint', tmp_path / 't.pt', '--output_dir', tmp_path / 'any',
                                                *base, '--seed', '3'], capsys)
    assert code == 0, err  # no style asked: any training tune's length
    assert 'of the training data' in out and set(seen[-1][1]['length'].tolist()) <= set(LENGTHS[''])
    # a run that stored no lengths, a model without tune_length that holds a table (hand-edited), --no_stop and a
    # continuation tell the model nothing
    prompt = write_labelled(tmp_path / 'tune.mid', melody(20, seed=1), key='D', meter=(6, 8))
    torch.save({**ckpt, 'tune_lengths': LENGTHS}, tmp_path / 'untold.pt')
    for path, flags in ((told_model(ckpt, tmp_path / 'bare.pt'), []), (tmp_path / 'untold.pt', []),
                        (tmp_path / 't.pt', ['--no_stop']), (tmp_path / 't.pt', ['--prompt', str(prompt)])):
        code, out, err = in_process(generate.main, ['--checkpoint', path, '--output_dir', tmp_path / 'x', *base,
                                                    *flags], capsys)
        assert code == 0, err
        assert seen[-1][1]['length'] is None and 'asked the length' not in out


def test_first_notes_pieces_of_a_conditioned_model_are_asked_for_held_out_headers_which_are_not_returned(
        conditioned, monkeypatch):
    import evaluate
    from runtime import load_model, start_machine
    d_major, g_minor = header({'key': 'D major', 'meter': '6/8'}), header({'key': 'G minor'})
    held = [np.array([START_IDX] + d_major + [200, 300]), np.array([START_IDX] + g_minor + [200, 310, 5, 200, 312])]
    headers = evaluate.held_out_headers(held, 6, seed=0)
    assert {tuple(h) for h in headers} == {tuple(d_major), tuple(g_minor)}  # 6 draws of 2 headers: both come
    model, _ = load_model(conditioned / 'ckpt' / 'latest.pt')
    seen = prompts_seen(monkeypatch)
    pieces = evaluate.generate_pieces(model, start_machine('cpu', 'float32'), 6, 9, temperature=1.0, top_p=None,
                                      top_k=None, headers=headers)
    assert pieces.shape == (6, 9)
    asked = sorted(row for prompt, _ in seen for row in prompt.tolist())
    assert asked == sorted([START_IDX] + h for h in headers)
    assert all(kwargs['unconditioned'] is None for _, kwargs in seen)  # guidance off: no second pass
    seen.clear()
    evaluate.generate_pieces(model, start_machine('cpu', 'float32'), 6, 9, temperature=1.0, top_p=None, top_k=None,
                             headers=headers, guidance=2.0)
    assert all(kwargs['guidance'] == 2.0 and kwargs['unconditioned'].tolist() == [[START_IDX]] * len(prompt)
               for prompt, kwargs in seen)
    assert not condition.is_header(pieces).any()  # the grammar never draws a header id, and the header is cut off


def test_the_report_samples_a_conditioned_models_pieces_asked_for_held_out_headers(conditioned, monkeypatch):
    import evaluate
    seen = prompts_seen(monkeypatch)
    report = evaluate.evaluate(conditioned / 'ckpt' / 'latest.pt', num_samples=3, sample_length=12, c2st=False,
                               tunes=0, device='cpu', log=lambda *a: None)
    first = seen[0][0].tolist()  # part 3's pieces, before anything else is generated
    assert all(row[0] == START_IDX and len(row) > 1 and condition.is_header(np.array(row[1:])).all() for row in first)
    assert report['samples']['asked'] == "each piece a held-out tune's header"
    assert report['goals']['c2st_points'] == 0.03  # a conditioned model's first notes: at most control + 3 points


def test_the_report_steers_the_ends_of_its_whole_tunes_alone_with_end_guidance(conditioned, monkeypatch):
    import evaluate
    seen = prompts_seen(monkeypatch)
    report = evaluate.evaluate(conditioned / 'ckpt' / 'latest.pt', num_samples=3, sample_length=12, c2st=False,
                               tunes=4, device='cpu', log=lambda *a: None, guidance=1.5, end_guidance=3.0)
    pieces = [kwargs for _, kwargs in seen if kwargs.get('eos_token') is None]
    tunes = [kwargs for _, kwargs in seen if kwargs.get('eos_token') == START_IDX]
    assert pieces and tunes and len(pieces) + len(tunes) == len(seen)
    assert all(kwargs['guidance'] == 1.5 and kwargs.get('end_guidance') is None for kwargs in pieces)
    assert all(kwargs['guidance'] == 1.5 and kwargs['end_guidance'] == 3.0 and kwargs['unconditioned'] is not None
               for kwargs in tunes)
    assert report['samples']['end_guidance'] == 3.0


def test_a_c2st_report_is_judged_and_shown_by_the_goal_it_was_given():
    import evaluate
    row = lambda boosted: {'linear': 0.5, 'boosted': boosted, 'pieces_per_class': 40}
    report = {'notes': 32, 'generated_used': 40, 'generated_pieces': 40, 'held_out_used': 40, 'held_out_pieces': 40,
              'generated_vs_held_out': row(0.54), 'control': {**row(0.50), 'splits': 5}, 'giveaways': [['x', 0.0]],
              'repetition': {'generated': 0.1, 'held_out': 0.1}, 'goal_points': 3.0, 'within_goal': False}
    assert any(line.endswith('MISSED (at most control + 3 points)') for line in evaluate.c2st_lines(report))
    del report['goal_points']  # a report written before reports carried their goal: the kind's
    assert any('(at most control + 5 points)' in line for line in evaluate.c2st_lines(report))


def test_the_shipped_conditioned_model_knows_the_folk_styles_and_writes_the_asked_signatures(tmp_path, capsys):
    shipped = ROOT / 'models' / 'conditioned_cpu.pt'
    ckpt = torch.load(shipped, weights_only=True)
    assert ckpt['tokenization']['condition'] is True
    assert {'han1', 'irl', 'oneills1850', 'ryans', 'airds'} <= set(ckpt['styles']) and len(ckpt['styles']) == 30
    code, _, err = in_process(generate.main, ['--checkpoint', shipped, '--output_dir', tmp_path, '--num_samples', '1',
                                              '--length', '60', '--seed', '0', '--no_audio', '--key', 'G major',
                                              '--meter', '3/4', '--style', 'han1'], capsys)
    assert code == 0, err
    assert midi_labels((tmp_path / 'sample_0.mid').read_bytes()) == {'key': 'G major', 'meter': '3/4'}


@pytest.mark.parametrize('model, recipe', [
    ('conditioned_key_cpu.pt', ['conditioned_cpu.py', 'conditioned_key_cpu.py']),
    ('conditioned_key_long_cpu.pt', ['conditioned_cpu.py', 'conditioned_key_cpu.py', 'conditioned_key_long_cpu.py']),
    ('conditioned_key_1024_cpu.pt', ['conditioned_cpu.py', 'conditioned_key_cpu.py', 'conditioned_key_long_cpu.py',
                                     'conditioned_key_1024_cpu.py']),
    ('conditioned_key_length_cpu.pt', ['conditioned_cpu.py', 'conditioned_key_cpu.py', 'conditioned_key_long_cpu.py',
                                       'conditioned_key_1024_cpu.py', 'conditioned_key_length_cpu.py'])])
def test_the_shipped_key_models_are_their_recipes_runs_and_sample_as_their_recipes_say(model, recipe, tmp_path,
                                                                                        monkeypatch, capsys):
    import custom_training
    from options import parse_args
    shipped = ROOT / 'models' / model
    args = torch.load(shipped, weights_only=True)['args']
    recipe = vars(parse_args(custom_training.Args(), [str(ROOT / 'config' / name) for name in recipe]))
    for name in ('dim', 'depth', 'condition', 'tune_key', 'tune_labels', 'tune_clock', 'tune_length',
                 'tonic_ending_loss', 'lr', 'min_lr', 'warmup_steps', 'max_steps', 'seq_len', 'batch_size',
                 'data_path', 'guidance', 'end_guidance'):
        assert args[name] == recipe[name], name
    seen = prompts_seen(monkeypatch)
    length = ['--seconds', '20'] if args['tune_length'] else []  # a length model is asked one as well
    code, _, err = in_process(generate.main, ['--checkpoint', shipped, '--output_dir', tmp_path, '--num_samples', '1',
                                              '--length', '60', '--no_audio', '--key', 'D major', '--meter', '6/8',
                                              *length], capsys)
    assert code == 0, err
    # its run's, not told otherwise: the notes at 2, the end at 2 or (the length model) 1.5
    assert (seen[0][1]['guidance'], seen[0][1]['end_guidance']) == (2.0, recipe['end_guidance'])
    assert (seen[0][1]['length'] is not None) == bool(length)
    assert midi_labels((tmp_path / 'sample_0.mid').read_bytes()) == {'key': 'D major', 'meter': '6/8'}


def test_a_meter_written_with_leading_zeros_is_that_meter_and_other_spellings_are_refused():
    assert [parse_meter(text) for text in ('06/08', '6/008', ' 012 / 08 ', '02/2')] == ['6/8', '6/8', '12/8', '2/2']
    for bad in ('6/8/', '6/8.0', '+6/8', '0/8', '00/00', '6/0', '\uff16/\uff18', '6//8', '6-8', '0' * 5000 + '6/8x'):
        with pytest.raises(ValueError, match='the meters with a token are 2/4'):
            parse_meter(bad)


# -----------------------------------------------------------------------------
# the tonic-ending term (Args.tonic_ending_loss)

def test_ending_off_the_tonic_is_avoided_after_every_pitch_of_a_keyed_tune_but_where_the_music_ends():
    d_major = condition.KEY_FIRST + 2  # header(): 12 * mode + tonic
    dur, d4, e4, f4_sharp = DUR_OFFSET + 4, PITCH_OFFSET + 62, PITCH_OFFSET + 64, PITCH_OFFSET + 66
    drum = TOKEN_RANGES['drums'][0] + 36
    row = [START_IDX, d_major, dur, d4, 4, dur, e4, 4, dur, f4_sharp, dur, PITCH_OFFSET + 50,  # F#, then D3 with it
           0, dur, e4,       # a 0 time delta: the same onset, D3 still its lowest
           4, dur, drum,     # a drum note: no pitch, not judged
           4, dur, e4,       # E alone: the tune ends here, off the tonic, as the music does
           START_IDX, dur, e4, 4, dur, d4]  # a tune without a key: not read
    avoid = condition.off_tonic_endings(torch.tensor([row]))
    assert avoid.shape == (1, len(row) - 1, condition.NUM_TOKENS)
    assert avoid.nonzero().tolist() == [[0, 6, START_IDX], [0, 9, START_IDX]]  # after E, after F# (its onset's lowest)
    # a window cut after its tune's header: the tune is not read until the next start token's header
    assert not condition.off_tonic_endings(torch.tensor([row[2:12]])).any()


def test_the_tonic_ending_loss_is_refused_without_conditioning_and_bounded():
    from custom_training import Args
    from options import OptionError, check_args, parse_args
    check_args(parse_args(Args(), ['--tonic_ending_loss', '5', '--condition', 'true']))
    with pytest.raises(OptionError, match=r'^--tonic_ending_loss 5.0: needs --condition true'):
        check_args(parse_args(Args(), ['--tonic_ending_loss', '5']))
    for bad in ('-1', '101', 'nan'):
        with pytest.raises(OptionError, match=f'^--tonic_ending_loss {bad}'):
            check_args(parse_args(Args(), ['--tonic_ending_loss', bad, '--condition', 'true']))


def test_the_tune_key_is_refused_without_conditioning():
    from custom_training import Args
    from options import OptionError, check_args, parse_args
    check_args(parse_args(Args(), ['--tune_key', 'true', '--condition', 'true']))
    with pytest.raises(OptionError, match=r'^--tune_key true: needs --condition true'):
        check_args(parse_args(Args(), ['--tune_key', 'true']))


def test_a_conditioned_run_with_the_tonic_ending_loss_and_a_tune_key_reads_each_micro_batch(tmp_path, capsys,
                                                                                              monkeypatch):
    import custom_training
    from options import parse_args_and_given
    seen = []
    real = custom_training.off_tonic_endings
    monkeypatch.setattr(custom_training, 'off_tonic_endings',
                        lambda x, head=None: seen.append(real(x, head)) or seen[-1])
    data = styled_dataset(tmp_path / 'data')
    argv = TINY + ['--data_path', data, '--max_steps', '2', '--audio', 'false', '--condition', 'true',
                   '--tonic_ending_loss', '2', '--tune_key', 'true', '--save_dir', tmp_path / 'ckpt', '--samples_dir',
                   tmp_path / 'samples', '--cache_dir', tmp_path / 'cache', '--generate_every', '100']
    code, out, err = in_process(lambda a: custom_training.main(*parse_args_and_given(custom_training.Args(), a)),
                                argv, capsys)
    assert code == 0, err
    assert len(seen) == 4 and any(avoid.any() for avoid in seen)  # 2 steps of grad_accum 2; keyed tunes in view
    saved = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=False)
    assert saved['args']['tonic_ending_loss'] == 2 and saved['args']['tune_key'] is True
    assert 'net.key_emb.weight' in saved['model_state_dict']


# -----------------------------------------------------------------------------
# the tune's labels past the window (Args.tune_labels): each window's head

def varied(n_tunes, notes=12, seed=0):
    """Token sequences of n_tunes tunes of varied headers (some without a key, meter or style) and notes."""
    rng = np.random.default_rng(seed)
    tunes = []
    for i in range(n_tunes):
        labels = {'key': condition.key_name(int(rng.integers(12)), ('major', 'minor')[i % 2]),
                  'meter': condition.METERS[i % 4], 'style': 'ab'[i % 2]}
        labels.pop(('key', 'meter', 'style', 'none')[i % 4], None)
        body = [t for j in range(int(rng.integers(2, notes))) for t in (4, DUR_OFFSET + 4, PITCH_OFFSET + 60 + j % 7)]
        tunes.append(np.array([START_IDX] + header(labels, ['a', 'b']) + body, dtype=np.uint16))
    return tunes


def reference_heads(stream, starts):
    """The heads of windows beginning at starts of stream: custom_basic_transformer.tune_labels and the clock's
    elapsed time steps of the whole stream, read at the position before each window (the tune in progress there);
    none and 0 for a window that begins at a start token (no tune is in progress before it)."""
    from custom_basic_transformer import tune_clock, tune_labels
    seq = torch.as_tensor(np.asarray(stream, dtype=np.int64))[None]
    labels, (_, elapsed) = tune_labels(seq)[0], tune_clock(seq, len(stream))
    return [[-1] * 3 + [0] if stream[start] == START_IDX else labels[start - 1].tolist() + [int(elapsed[0, start - 1])]
            for start in starts]


@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_a_packed_windows_head_is_its_tunes_header_ids_before_it_as_the_model_reads_them(dropout):
    from dataset import split_head
    tunes = varied(60)
    ds = PackedDataset(tunes, 16, seed=4, header_dropout=dropout, heads=True)
    plain = PackedDataset(tunes, 16, seed=4, header_dropout=dropout)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        batch = torch.stack(ds.__getitems__(list(range(len(ds)))))
        head, windows = split_head(batch, True)
        assert torch.equal(windows, torch.stack(plain.__getitems__(list(range(len(plain))))))  # the same windows
        offset = random.Random(f'4/{epoch}/offset').randrange(16)
        starts = np.minimum(offset + np.arange(len(ds)) * 16, ds.length - 17)
        assert head.tolist() == reference_heads(ds.stream_tokens(), starts)
        cut = [row for row, start in enumerate(starts) if ds.stream_tokens()[start] != START_IDX]
        whole = [r for r in range(len(ds)) if r not in cut]
        assert (head[cut, :3] >= 0).any() and (head[whole, :3] == -1).all() and (head[whole, 3] == 0).all()
        assert (head[cut, 3] > 0).sum() >= len(cut) // 2  # the time of the tune before the window


def test_transposition_moves_a_heads_key_and_leaves_its_time_steps_as_they_are():
    # a tune whose elapsed time before a window falls in the key ids' range (768-791 steps, packed) or in the pitch
    # ids' (unpacked): the head's last column counts time, so transposition must not read it as an id
    key = condition.KEY_FIRST + 2  # D major
    note = lambda pitch: [DUR_OFFSET + 12, PITCH_OFFSET + pitch]  # noqa: E731

    def shift_of(a, b):  # the semitones between the first melody pitch of two windows, None without one
        pitched = lambda w: w[(w >= PITCH_OFFSET) & (w < PITCH_OFFSET + 128)]  # noqa: E731
        return int(pitched(b)[0] - pitched(a)[0]) if len(pitched(a)) else None

    def same_but_key(a, b):
        shift = shift_of(a[4:], b[4:])
        assert a[3] == b[3]  # the time steps before the window
        assert b[0] == (a[0] if a[0] < 0 or not shift else condition.KEY_FIRST + (2 + shift) % 12)
        return shift

    tune = np.array([START_IDX, key] + [110] * 7 + note(62) + [5] + note(64) * 10, dtype=np.uint16)
    plain = PackedDataset([tune, tune.copy()], 9, seed=0, heads=True)
    moved = PackedDataset([tune, tune.copy()], 9, aug=True, aug_range=2, seed=0, heads=True)
    times = [int(plain[i][3]) for i in range(len(plain))]
    assert any(768 <= t <= 791 for t in times)  # the case is there
    shifts = [same_but_key(plain[i], moved[i]) for i in range(len(plain))]
    assert any(shifts)
    tune = np.array([START_IDX, key] + [100] * 3 + note(62) + ([5] + note(64)) * 30, dtype=np.uint16)
    met = 0
    for seed in range(20):
        a = MIDI_Dataset([tune], 16, seed=seed, heads=True)[0]
        b = MIDI_Dataset([tune], 16, aug=True, seed=seed, heads=True)[0]
        met += PITCH_OFFSET <= int(a[3]) < PITCH_OFFSET + 128 and bool(same_but_key(a, b))
    assert met  # a time in the pitch ids' range met a transposition


@pytest.mark.parametrize('dropout', [0.0, 0.3])
def test_a_packed_windows_head_moves_its_key_with_its_tune_and_reads_in_place_as_copied(dropout):
    from dataset import split_head
    tunes = varied(40, seed=2)
    base = np.concatenate(tunes)
    at = np.cumsum([len(t) for t in tunes]) - [len(t) for t in tunes]
    in_place = [base[a:a + len(t)] for i, (a, t) in enumerate(zip(at, tunes)) if i % 5 != 2]
    moved = PackedDataset(in_place, 16, aug=True, aug_range=3, seed=1, heads=True, header_dropout=dropout)
    copied = PackedDataset([t.copy() for t in in_place], 16, aug=True, aug_range=3, seed=1, heads=True,
                           header_dropout=dropout)
    plain = PackedDataset([t.copy() for t in in_place], 16, seed=1, heads=True, header_dropout=dropout)
    assert moved.moved is not None and moved.stream is base  # read in place, whatever the dropout
    indices = list(range(len(plain)))
    for epoch in (0, 1):
        for ds in (moved, copied, plain):
            ds.set_epoch(epoch)
        assert [w.tolist() for w in moved.__getitems__(indices)] == [w.tolist() for w in
                                                                     copied.__getitems__(indices)]
    indices = list(range(len(plain)))
    head, windows = split_head(torch.stack(copied.__getitems__(indices)), True)
    plain_head, plain_windows = split_head(torch.stack(plain.__getitems__(indices)), True)
    checked = 0
    for row in range(len(indices)):
        pitched = torch.nonzero((windows[row] >= PITCH_OFFSET) & (windows[row] < PITCH_OFFSET + 128)).flatten()
        if plain_head[row, 0] >= 0 and len(pitched):  # a key before the window: it moves as the first tune's pitches
            shift = int(windows[row, pitched[0]] - plain_windows[row, pitched[0]])
            assert int(head[row, 0]) == int(condition.transpose_keys(plain_head[row, 0], shift))
            assert head[row, 1:].tolist() == plain_head[row, 1:].tolist()
            checked += shift != 0
    assert checked >= 3


def test_an_unpacked_windows_head_is_its_files_header_ids_before_it():
    from dataset import split_head
    tunes = varied(30, notes=30, seed=3)
    tiles = MIDI_Dataset(tunes, 16, rand_start=False, heads=True)  # validation: each file tiled in order
    plain = MIDI_Dataset(tunes, 16, rand_start=False)
    for i in range(len(tiles)):
        head, window = split_head(tiles[i][None], True)
        assert window[0].tolist() == plain[i].tolist()
        tune, start = tunes[tiles.window_file[i]], 16 * int(tiles.window_part[i])
        ids = condition.tune_header(tune) if start else []
        steps = int(time_steps(tune[1:start].astype(np.int64)).sum())  # the file's time before the window
        assert head[0].tolist() == condition.label_slots(ids).tolist() + [steps]
        assert steps > 0 or not start
    assert (tiles.window_part > 0).sum() >= 10
    # training crops, transposed, some header ids left out: a head holds only the file's own, its key moved
    crops = MIDI_Dataset(tunes, 16, seed=2, aug=True, end_token=START_IDX, header_dropout=0.3, heads=True)
    cut = 0
    for i in range(len(crops)):
        head, window = split_head(crops[i][None], True)
        own = condition.label_slots(condition.tune_header(tunes[crops.window_file[i]])).tolist()
        for kind, (got, file_id) in enumerate(zip(head[0].tolist(), own)):
            if kind == 0 and got >= 0:  # the same mode
                assert (got - condition.KEY_FIRST) // 12 == (file_id - condition.KEY_FIRST) // 12
            elif got >= 0:
                assert got == file_id
        cut += int(window[0, 0]) != START_IDX and bool((head >= 0).any())
    assert cut >= 5


def test_the_tonic_ending_term_reads_a_tune_whose_header_is_before_the_window_from_its_head():
    d_major = condition.KEY_FIRST + 2
    dur, e4 = DUR_OFFSET + 4, PITCH_OFFSET + 64
    row = torch.tensor([[4, dur, e4, 4, dur, e4]])
    assert not condition.off_tonic_endings(row).any()
    head = torch.tensor([[d_major, -1, -1, 40]])
    assert condition.off_tonic_endings(row, head=head).nonzero().tolist() == [[0, 2, START_IDX]]


def test_tune_labels_are_refused_without_conditioning():
    from custom_training import Args
    from options import OptionError, check_args, parse_args
    check_args(parse_args(Args(), ['--tune_labels', 'true', '--condition', 'true']))
    with pytest.raises(OptionError, match=r'^--tune_labels true: needs --condition true'):
        check_args(parse_args(Args(), ['--tune_labels', 'true']))


def test_a_run_with_tune_labels_trains_on_heads_and_fine_tunes_from_a_run_without(tmp_path, capsys, monkeypatch):
    import custom_training
    from options import parse_args_and_given
    heads = []
    real = custom_training.off_tonic_endings
    monkeypatch.setattr(custom_training, 'off_tonic_endings',
                        lambda x, head=None: heads.append(head) or real(x, head))
    data = styled_dataset(tmp_path / 'data')
    common = TINY + ['--data_path', data, '--max_steps', '2', '--audio', 'false', '--condition', 'true',
                     '--tonic_ending_loss', '2', '--tune_key', 'true', '--cache_dir', tmp_path / 'cache',
                     '--generate_every', '100', '--seq_len', '16']
    main = lambda a: custom_training.main(*parse_args_and_given(custom_training.Args(), a))
    code, out, err = in_process(main, common + ['--save_dir', tmp_path / 'plain', '--samples_dir', tmp_path / 's1'],
                                capsys)
    assert code == 0, err
    assert heads and all(h is None for h in heads)
    heads.clear()
    code, out, err = in_process(main, common + ['--tune_labels', 'true', '--init_from', tmp_path / 'plain' / 'best.pt',
                                                '--save_dir', tmp_path / 'labels', '--samples_dir', tmp_path / 's2'],
                                capsys)
    assert code == 0, err
    # windows of 16 tokens cut from tunes of 12 notes: some are given a header from before them
    assert heads and all(h.shape[1] == 4 for h in heads) and any((h[:, :3] >= 0).any() for h in heads)
    saved = torch.load(tmp_path / 'labels' / 'latest.pt', weights_only=False)
    assert saved['args']['tune_labels'] is True and 'net.labels_emb.weight' in saved['model_state_dict']
    assert saved['model_state_dict']['net.labels_emb.weight'].abs().max() > 0  # trained from its zeros
    # evaluate.py scores the validation windows with their heads, as training's validation did
    import evaluate
    best = torch.load(tmp_path / 'labels' / 'best.pt', weights_only=False)
    report = evaluate.evaluate(tmp_path / 'labels' / 'best.pt', num_samples=2, sample_length=12, c2st=False, tunes=2,
                               adherence=False, device='cpu', log=lambda *a: None)
    assert report['model']['nll'] == pytest.approx(best['best_val_loss'], rel=1e-6)
