"""generate.py --parts (sampling some roles of a tracks='parts' model), --prompt with a parts model, and
--accompany (accompany.py: a given melody placed note by note while the model writes the other roles)."""

import pytest
import torch

import generate
from accompany import Accompanist, melody_notes
from parts import ROLES
from runtime import build_model
from sampling import prompt_from_midi
from tests.conftest import DRUMS, TUNE, in_process, pop_song, write_parts
from tokens import (
    DUR_OFFSET,
    PAD_IDX,
    PITCH_OFFSET,
    START_IDX,
    TOKEN_RANGES,
    grammar_table,
    is_pitch,
    parts_table,
    role_of,
    tokenization_settings,
)

PARTS = tokenization_settings('beats', 4, tracks='parts')  # a step is a 16th note: TUNE is a note every 4 steps
MODEL = {'dim': 32, 'depth': 1, 'heads': 2, 'dim_head': 16, 'seq_len': 32, 'dropout': 0.0}


def checkpoint(path, settings=PARTS):
    """A checkpoint of a tiny model with random weights (seed 0), trained on nothing, with these settings."""
    torch.manual_seed(0)
    torch.save({'model_state_dict': build_model(MODEL).state_dict(), 'args': MODEL, 'tokenization': settings,
                'step': 0}, path)
    return path


def generated(argv, capsys, monkeypatch):
    """(exit code, stderr, [token list of each sample]) of generate.py argv, run in this process."""
    samples = []
    real_save = generate.save_sample
    monkeypatch.setattr(generate, 'save_sample', lambda tokens, *a, **k: (samples.append(tokens),
                                                                          real_save(tokens, *a, **k))[1])
    code, _, err = in_process(generate.main, list(argv) + ['--no_audio'], capsys)
    return code, err, samples


def roles_in(tokens):
    return {role_of(token) for token in tokens if is_pitch(token)}


def test_parts_table_allows_after_a_duration_only_the_pitches_of_the_asked_roles():
    table, grammar = parts_table(['bass', 'drums']), grammar_table()
    for role in ROLES:
        first, last = TOKEN_RANGES[role]
        assert bool(table[DUR_OFFSET + 4, first:last + 1].all()) == (role in ('bass', 'drums'))
        assert not table[:, first:last + 1].any() or role in ('bass', 'drums')
    pitch_columns = is_pitch(torch.arange(len(grammar)))
    assert torch.equal(table[:, ~pitch_columns], grammar[:, ~pitch_columns])  # time and durations as the grammar
    with pytest.raises(ValueError, match="unknown role 'lead': the roles are melody, bass, harmony, drums"):
        parts_table(['melody', 'lead'])


def test_accompanist_cuts_a_time_delta_to_the_next_onset_places_the_melody_and_ends_after_it():
    melody = [(0, 4, 60), (4, 4, 62)]
    force = Accompanist(melody, rows=1)
    bass_pitch = TOKEN_RANGES['bass'][0] + 36
    drawn = [DUR_OFFSET + 8, bass_pitch,            # the first note is due at step 0: it becomes the melody's
             DUR_OFFSET + 8, bass_pitch,            # then the model's bass under it
             10, DUR_OFFSET + 2, bass_pitch,        # a delta of 10 passes onset 4: cut to 4, melody note 2 placed
             2, DUR_OFFSET + 1, bass_pitch,         # step 6 < the melody's end (8): the model's own note
             5]                                     # past the end: the row ends
    placed = [int(force(None, torch.tensor([token]))[0]) for token in drawn]
    assert placed == [DUR_OFFSET + 4, PITCH_OFFSET + 60, DUR_OFFSET + 8, bass_pitch,
                      4, DUR_OFFSET + 4, PITCH_OFFSET + 62, 2, DUR_OFFSET + 1, bass_pitch, PAD_IDX]
    assert melody_notes(placed) == melody and force.unplaced() == 0


def test_accompanist_lands_a_time_delta_one_step_short_of_the_melody_onset_on_it():
    # the tokenizer's rounding makes beats 15 and 16 steps long: a shift of 14 before a 15-step melody note is the
    # same beat, and the model's chord must sound with the melody note, not one step before it
    melody = [(0, 15, 72), (15, 16, 74), (33, 15, 76)]
    force = Accompanist(melody, rows=1)
    bass_pitch = TOKEN_RANGES['bass'][0] + 48
    drawn = [DUR_OFFSET + 15, bass_pitch,           # the melody's first note is due: its two tokens replace these
             DUR_OFFSET + 15, bass_pitch,           # the model's bass under it
             14, DUR_OFFSET + 4, bass_pitch,        # one step short of onset 15: lands on it, the melody note follows
             DUR_OFFSET + 16, bass_pitch,           # the bass at onset 15, after the melody note
             16, DUR_OFFSET + 2, bass_pitch,        # two steps short of onset 33: the model's own onset, step 31
             3, DUR_OFFSET + 4, bass_pitch]         # passes onset 33: cut to it, the last melody note follows
    placed = [int(force(None, torch.tensor([token]))[0]) for token in drawn]
    assert placed == [DUR_OFFSET + 15, PITCH_OFFSET + 72, DUR_OFFSET + 15, bass_pitch,
                      15, DUR_OFFSET + 16, PITCH_OFFSET + 74, DUR_OFFSET + 16, bass_pitch,
                      16, DUR_OFFSET + 2, bass_pitch, 2, DUR_OFFSET + 15, PITCH_OFFSET + 76]
    assert melody_notes(placed) == melody
    assert int(force(None, torch.tensor([14]))[0]) == PAD_IDX  # one step short of the melody's end (48)


def test_parts_samples_only_the_asked_roles(tmp_path, capsys, monkeypatch):
    code, err, samples = generated(['--checkpoint', checkpoint(tmp_path / 'parts.pt'), '--parts', 'bass, drums',
                                    '--output_dir', tmp_path / 'out', '--num_samples', '2', '--length', '60'],
                                   capsys, monkeypatch)
    assert code == 0, err
    assert len(samples) == 2 and all(roles_in(tokens) and roles_in(tokens) <= {'bass', 'drums'} for tokens in samples)


def test_prompt_of_a_parts_model_is_tokenized_with_its_parts_and_continued(tmp_path, capsys, monkeypatch):
    song = pop_song(tmp_path)
    prompt = prompt_from_midi(song, 40, PARTS).tolist()
    assert roles_in(prompt) == set(ROLES)
    code, err, samples = generated(['--checkpoint', checkpoint(tmp_path / 'parts.pt'), '--prompt', song,
                                    '--prompt_notes', '40', '--output_dir', tmp_path / 'out', '--num_samples', '1',
                                    '--length', '30'], capsys, monkeypatch)
    assert code == 0, err
    assert samples[0][:len(prompt)] == prompt and len(samples[0]) == len(prompt) + 30


def test_accompaniment_keeps_the_prompts_melody_exactly_writes_only_the_asked_roles_and_repeats_with_a_seed(
        tmp_path, capsys, monkeypatch):
    song = pop_song(tmp_path)
    argv = ['--checkpoint', checkpoint(tmp_path / 'parts.pt'), '--prompt', song, '--accompany', '--parts', 'bass,drums',
            '--output_dir', tmp_path / 'out', '--num_samples', '2', '--length', '200', '--seed', '3']
    code, err, samples = generated(argv, capsys, monkeypatch)
    assert code == 0 and err == '', err
    tune = [(start // 120, duration // 120, pitch) for start, duration, pitch in TUNE]  # 120 ticks a step
    for tokens in samples:
        assert tokens[0] == START_IDX and melody_notes(tokens) == tune
        assert roles_in(tokens) - {'melody'} and roles_in(tokens) <= {'melody', 'bass', 'drums'}
    first = list(samples)
    assert first[0] != first[1] and generated(argv, capsys, monkeypatch)[2] == first
    assert sorted(p.name for p in (tmp_path / 'out').glob('*.mid')) == ['accompaniment_pop_0.mid',
                                                                        'accompaniment_pop_1.mid',
                                                                        'accompaniment_pop_2.mid',
                                                                        'accompaniment_pop_3.mid']


def test_an_accompaniment_with_voice_leading_keeps_the_melody_and_writes_its_samples(tmp_path, capsys, monkeypatch):
    argv = ['--checkpoint', checkpoint(tmp_path / 'parts.pt'), '--prompt', pop_song(tmp_path), '--accompany',
            '--voice_leading', '--output_dir', tmp_path / 'out', '--num_samples', '2', '--length', '200']
    code, err, samples = generated(argv, capsys, monkeypatch)
    tune = [(start // 120, duration // 120, pitch) for start, duration, pitch in TUNE]
    assert code == 0 and err == '' and [melody_notes(tokens) for tokens in samples] == [tune, tune]


def test_an_accompaniment_cut_short_by_length_says_how_many_melody_notes_are_missing(tmp_path, capsys, monkeypatch):
    argv = ['--checkpoint', checkpoint(tmp_path / 'parts.pt'), '--prompt', pop_song(tmp_path), '--accompany',
            '--output_dir', tmp_path / 'out', '--num_samples', '1', '--length', '2']
    code, err, samples = generated(argv, capsys, monkeypatch)
    missing = len(TUNE) - len(melody_notes(samples[0]))
    assert code == 0 and missing > 0 and err.splitlines() == [
        f'warning: the last {missing} melody notes did not fit in --length 2 tokens of accompaniment; raise --length']


@pytest.mark.parametrize('case', ['unknown role', 'empty parts', 'role twice', 'role twice accompanied', 'melody only',
                                  'melody-mode checkpoint', 'no prompt', 'drums only prompt', 'melody-mode accompany',
                                  'melody-mode voice leading'])
def test_bad_parts_and_accompany_requests_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    parts, single = checkpoint(tmp_path / 'parts.pt'), checkpoint(tmp_path / 'all.pt', tokenization_settings('beats'))
    song = pop_song(tmp_path)
    drums = write_parts(tmp_path / 'drums.mid', [('Drums', 9, DRUMS)])
    argv, expected = {
        'unknown role': (['--checkpoint', parts, '--parts', 'melody,lead'],
                         "error: --parts 'melody,lead': unknown role 'lead': the roles are melody, bass, harmony, "
                         "drums"),
        'empty parts': (['--checkpoint', parts, '--parts', ''],
                        "error: --parts '': no role given: the roles are melody, bass, harmony, drums"),
        'role twice': (['--checkpoint', parts, '--parts', 'melody,bass,melody'],
                       "error: --parts 'melody,bass,melody': melody is given twice: the roles are melody, bass, "
                       "harmony, drums, each at most once"),
        'role twice accompanied': (['--checkpoint', parts, '--parts', 'melody,melody,bass', '--accompany', '--prompt',
                                    song],
                                   "error: --parts 'melody,melody,bass': melody is given twice: the roles are melody, "
                                   "bass, harmony, drums, each at most once (--accompany: one besides melody)"),
        'melody only': (['--checkpoint', parts, '--parts', 'melody', '--accompany', '--prompt', song],
                        "error: --parts 'melody': no role given: the roles are melody, bass, harmony, drums "
                        "(--accompany: one besides melody)"),
        'melody-mode checkpoint': (['--checkpoint', single, '--parts', 'bass'],
                                   f"error: --parts needs a model trained with tracks='parts'; {single} was trained "
                                   f"with tracks='all'"),
        'no prompt': (['--checkpoint', parts, '--accompany'],
                      'error: --accompany needs --prompt FILE, the MIDI file whose melody is accompanied'),
        'drums only prompt': (['--checkpoint', parts, '--accompany', '--prompt', drums],
                              f'error: prompt {drums} has no melody to accompany (no pitched notes)'),
        'melody-mode accompany': (['--checkpoint', single, '--accompany', '--prompt', song],
                                  f"error: --accompany needs a model trained with tracks='parts'; {single} was "
                                  f"trained with tracks='all'"),
        'melody-mode voice leading': (['--checkpoint', single, '--voice_leading'],
                                      f"error: --voice_leading needs a model trained with tracks='parts'; {single} "
                                      f"was trained with tracks='all', which has no melody and bass roles"),
    }[case]
    code, err, samples = generated(argv + ['--output_dir', tmp_path / 'out'], capsys, monkeypatch)
    assert (code, err.strip().splitlines(), samples) == (2, [expected], [])
