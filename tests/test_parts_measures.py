"""parts_measures.py on hand-built notes with known answers, and evaluate.py's tracks='parts' sections: per-role NLL
against the n-gram, the music per role and across roles, and the accompaniment of held-out melodies, end to end on
a tiny model trained here on a four-part set."""

import json
import math

import numpy as np
import pytest
import torch

import evaluate
from parts_measures import (
    mean_over_pieces,
    onset_consonance,
    parallels,
    parallels_per_100_notes,
    role_notes_per_second,
    role_pitch_range,
    role_sounding_share,
    simultaneity,
    voice_crossing,
)
from tests.conftest import TINY, in_process, run, write_parts
from tests.test_evaluate import REPORT_KEYS
from tokens import ROLE_OFFSET, START_IDX


def line(role, pitches, start=0, step=4):
    """One note a step apart per pitch, each lasting the step: [start, duration, pitch, role] notes."""
    return [[start + i * step, step, pitch, role] for i, pitch in enumerate(pitches)]


# -----------------------------------------------------------------------------
# one role

def test_pitch_range_notes_per_second_and_sounding_share_of_one_role():
    piece = line('melody', [60, 67]) + [[12, 4, 72, 'melody']] + line('bass', [40, 41, 42, 43])  # melody rests 8-12
    assert role_pitch_range(piece, 'melody') == 12 and role_pitch_range(piece, 'bass') == 3
    assert math.isnan(role_pitch_range(piece, 'harmony'))
    # 16 steps of 0.125 s: 2 s; 3 melody notes, 4 bass notes, no harmony
    assert role_notes_per_second(piece, 'melody', 0.125) == pytest.approx(1.5)
    assert role_notes_per_second(piece, 'bass', 0.125) == pytest.approx(2.0)
    assert role_notes_per_second(piece, 'harmony', 0.125) == 0
    assert role_sounding_share(piece, 'melody') == pytest.approx(12 / 16)
    assert role_sounding_share(piece, 'bass') == 1.0


def test_sounding_share_counts_overlapping_notes_of_a_role_once():
    chord = [[0, 8, 60, 'harmony'], [0, 8, 64, 'harmony'], [4, 8, 67, 'harmony']]  # sounds 0-12
    piece = chord + [[0, 16, 36, 'bass']]
    assert role_sounding_share(piece, 'harmony') == pytest.approx(12 / 16)


# -----------------------------------------------------------------------------
# across roles

def test_simultaneity_is_the_mean_number_of_pitched_notes_sounding_when_any_does():
    four_voices = [line(role, [p]) for role, p in (('melody', 72), ('harmony', 67), ('harmony', 64), ('bass', 48))]
    assert simultaneity([n for voice in four_voices for n in voice]) == pytest.approx(4.0)
    # melody 0-8, bass 0-4, then a rest of 8 steps, then melody alone 16-20: (8 + 4 + 4) notes-steps over 12 steps
    piece = line('melody', [72, 74]) + line('bass', [48]) + [[16, 4, 76, 'melody']]
    assert simultaneity(piece) == pytest.approx(16 / 12)
    assert simultaneity(piece + [[0, 20, 36, 'drums']]) == pytest.approx(16 / 12)  # drums are no pitches
    assert math.isnan(simultaneity([[0, 4, 36, 'drums']]))


def test_voice_crossing_is_the_share_of_shared_time_the_melody_sounds_below_the_bass():
    piece = line('melody', [50, 72]) + [[0, 8, 55, 'bass']]  # melody below the bass for 4 of 8 steps
    assert voice_crossing(piece) == pytest.approx(0.5)
    # a melody chord counts by its top note, a bass chord by its bottom one: 50 under 55, but the top 60 is above
    assert voice_crossing([[0, 4, 50, 'melody'], [0, 4, 60, 'melody'], [0, 4, 55, 'bass'], [0, 4, 40, 'bass']]) == 0
    # time only one of them sounds does not count: the bass enters at step 4, under the melody
    assert voice_crossing(line('melody', [70, 70]) + [[4, 4, 40, 'bass']]) == 0
    assert math.isnan(voice_crossing(line('melody', [70, 72])))


def test_onset_consonance_counts_every_pair_sounding_at_each_onset():
    assert onset_consonance(line('melody', [67]) + line('harmony', [64]) + line('bass', [60])) == 1.0  # 3, 4, 7
    # C E G C: the pairs 4, 7, 12, 3, 8 and the fourth G-C (5) of six
    chord = [[0, 4, p, role] for p, role in ((60, 'bass'), (64, 'harmony'), (67, 'harmony'), (72, 'melody'))]
    assert onset_consonance(chord) == pytest.approx(5 / 6)
    # a held bass note sounds at the melody's later onsets: C-E, then C-F (a fourth), then C-G; 2 of 3
    held = [[0, 12, 48, 'bass']] + line('melody', [64, 65, 67])
    assert onset_consonance(held) == pytest.approx(2 / 3)
    assert onset_consonance(held + [[0, 12, 49, 'drums']]) == pytest.approx(2 / 3)  # drum keys are no pitches
    assert math.isnan(onset_consonance(line('melody', [60, 62])))  # one line: no pair ever sounds


def test_onset_consonance_against_the_melody_leaves_out_pairs_of_the_lower_parts():
    # melody E5 over C4 and D4: E-C a tenth (16 % 12 = 4), E-D a ninth (14 % 12 = 2); C-D, a second, left out
    notes = [[0, 4, 76, 'melody'], [0, 4, 60, 'bass'], [0, 4, 62, 'harmony']]
    assert onset_consonance(notes, against='melody') == pytest.approx(1 / 2)
    assert onset_consonance(notes) == pytest.approx(1 / 3)


def test_bass_and_melody_moving_in_parallel_fifths_count_each_move():
    melody, bass = line('melody', [72, 74, 76, 77]), line('bass', [65, 67, 69, 70])  # fifths, all moving up
    assert parallels(melody + bass) == (3, 0)
    assert parallels_per_100_notes(melody + bass) == pytest.approx(100 * 3 / 8)
    # compound fifths count: twelfth to twelfth (19 semitones), fifth to twelfth, both voices rising
    assert parallels(line('melody', [72, 81]) + line('bass', [53, 62])) == (1, 0)
    assert parallels(line('melody', [72, 86]) + line('bass', [65, 67])) == (1, 0)


def test_octaves_contrary_and_oblique_motion_and_rests_between():
    assert parallels(line('melody', [72, 74, 72]) + line('bass', [60, 62, 60])) == (0, 2)
    # fifth to fifth by contrary motion (67 over 60, 74 over 55 is a twelfth) is no parallel
    assert parallels(line('melody', [67, 74]) + line('bass', [60, 55])) == (0, 0)
    # the melody holds while the bass moves: oblique; then both move to a fifth from a sixth: not a parallel
    assert parallels([[0, 8, 72, 'melody']] + line('bass', [65, 63]) + [[8, 4, 74, 'melody'], [8, 4, 67, 'bass']]) \
        == (0, 0)
    # a rest in the bass between two fifths breaks the line
    rest = line('melody', [72, 73, 74]) + [[0, 4, 65, 'bass'], [8, 4, 67, 'bass']]
    assert parallels(rest) == (0, 0)
    # a harmony note starting between two fifths changes neither line: the fifths are still in a row
    through = line('melody', [72, 74], step=8) + line('bass', [65, 67], step=8) + [[4, 4, 69, 'harmony']]
    assert parallels(through) == (1, 0)
    assert math.isnan(parallels_per_100_notes(line('melody', [72, 74])))


def test_mean_over_pieces_leaves_out_pieces_without_the_measure():
    pieces = [line('melody', [50, 72]) + [[0, 8, 55, 'bass']], line('melody', [70]), []]
    assert mean_over_pieces(pieces, voice_crossing) == pytest.approx(0.5)
    assert math.isnan(mean_over_pieces(pieces[1:], voice_crossing))


# -----------------------------------------------------------------------------
# evaluate.py's sections on hand-made tokens

def note_tokens(role, pitch, duration=4, delta=None):
    return ([delta] if delta else []) + [128 + duration, ROLE_OFFSET[role] + pitch]


def test_time_and_duration_tokens_belong_to_the_role_of_the_pitch_after_them():
    tokens = np.array([START_IDX] + note_tokens('melody', 72) + note_tokens('bass', 48)
                      + note_tokens('harmony', 60, delta=4) + note_tokens('drums', 36, delta=2) + [800])
    roles = evaluate.target_roles(tokens, np.arange(1, len(tokens)))
    assert roles.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, -1]


def test_role_nll_puts_each_targets_nll_in_its_role_and_compares_with_the_ngram():
    tokens = np.array([START_IDX] + note_tokens('melody', 72) + note_tokens('bass', 48)
                      + note_tokens('melody', 74, delta=4) + note_tokens('bass', 50))
    positions = np.arange(1, len(tokens))
    model = np.array([1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    ngram = 2 * model
    section = evaluate.role_nll_section((tokens, positions, positions), model, '5-gram', ngram)
    assert set(section) == {'melody', 'bass'}
    melody = section['melody']
    assert (melody['targets'], melody['notes']) == (5, 2)
    assert melody['model']['nll'] == pytest.approx(1.0) and melody['5-gram']['nll'] == pytest.approx(2.0)
    assert melody['model']['bits_per_note']['total'] == pytest.approx(5 / 2 / math.log(2))
    assert section['bass']['model']['bits_per_note']['pitch'] == pytest.approx(2 / math.log(2))
    assert melody['model_margin'] == pytest.approx(0.5) and melody['model_within_goal']


def test_a_statistic_compared_with_held_out_zero_is_within_goal_only_at_zero():
    assert evaluate.compared(0.0, 0.0)['within_goal'] and not evaluate.compared(0.01, 0.0)['within_goal']
    assert evaluate.compared(1.9, 1.0, at_most_twice=True)['within_goal']
    assert not evaluate.compared(2.1, 1.0, at_most_twice=True)['within_goal']
    assert evaluate.compared(1.05, 1.0)['within_goal'] and not evaluate.compared(1.2, 1.0)['within_goal']


def test_a_share_near_zero_is_compared_by_an_absolute_margin_above_held_out():
    assert evaluate.compared(0.0001, 0.0, at_most_above=0.005)['within_goal']  # no relative difference from 0
    assert not evaluate.compared(0.0051, 0.0, at_most_above=0.005)['within_goal']
    assert evaluate.compared(0.012, 0.01, at_most_above=0.005)['within_goal']
    crossing = evaluate.parts_music_section([[START_IDX] + [140, ROLE_OFFSET['melody'] + 40, 140,
                                                            ROLE_OFFSET['bass'] + 60]],
                                            [[START_IDX, 140, ROLE_OFFSET['melody'] + 72, 140,
                                              ROLE_OFFSET['bass'] + 48]], 0.1)['across_roles']['voice_crossing']
    assert (crossing['generated'], crossing['held_out'], crossing['within_goal']) == (1.0, 0.0, False)


# -----------------------------------------------------------------------------
# end to end: a tiny parts model trained on four-part pieces written here

def chorale(seed, bars=6):
    """Soprano, Alto, Tenor, Bass tracks of quarter notes, each voice a random walk in its own register."""
    rng = np.random.default_rng(seed)
    voices = []
    for name, low in (('Soprano', 67), ('Alto', 60), ('Tenor', 53), ('Bass', 43)):
        pitches = low + np.clip(np.cumsum(rng.integers(-2, 3, 4 * bars)), -4, 7)
        voices.append((name, len(voices), [(i * 480, 480, int(p)) for i, p in enumerate(pitches)]))
    return voices


@pytest.fixture(scope='module')
def parts_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('parts')
    (tmp / 'midi').mkdir()
    for i in range(12):
        write_parts(tmp / 'midi' / f'chorale_{i:02d}.mid', chorale(i))
    run(TINY + ['--data_path', tmp / 'midi', '--cache_dir', tmp / 'cache', '--save_dir', tmp / 'ckpt',
                '--samples_dir', tmp / 'samples', '--tracks', 'parts', '--timing', 'beats', '--beat_division', '4',
                '--val_fraction', '0.3', '--max_steps', '4', '--validate_every', '4', '--generate_every', '100',
                '--save_every', '4'], cwd=tmp)
    return tmp


def test_report_of_a_parts_model_has_per_role_nll_music_and_accompaniment(parts_run, capsys):
    out = parts_run / 'report'
    code, stdout, err = in_process(evaluate.main, ['--checkpoint', parts_run / 'ckpt' / 'latest.pt', '--num_samples',
                                                   '3', '--sample_length', '90', '--no_c2st', '--accompany_pieces',
                                                   '2', '--output_dir', out, '--device', 'cpu'], capsys)
    assert code == 0, err
    report = json.loads((out / 'evaluation.json').read_text())
    parts = report['parts']
    roles = parts['roles']
    assert set(roles) == {'melody', 'bass', 'harmony'}  # the chorales have no drums
    # every scored target is a note token of one role: the roles' sums are the whole NLL's
    assert sum(r['targets'] for r in roles.values()) == report['validation_targets']
    assert sum(r['notes'] for r in roles.values()) == report['validation_notes']
    for name in ('model', '5-gram'):
        whole = report['model']['nll'] if name == 'model' else report['baselines']['5-gram']['nll']
        assert sum(r[name]['nll'] * r['targets'] for r in roles.values()) == pytest.approx(
            whole * report['validation_targets'], rel=1e-6)
    harmony = roles['harmony']
    assert harmony['model_margin'] == pytest.approx(1 - harmony['model']['nll'] / harmony['5-gram']['nll'])
    assert harmony['notes'] == pytest.approx(2 * roles['melody']['notes'], abs=2)  # alto and tenor
    music = parts['music']
    assert set(music['roles']) >= {'melody', 'bass', 'harmony'}
    assert set(music['roles']['melody']) == {'pitch_range', 'notes_per_second', 'sounding_share'}
    across = music['across_roles']
    assert across['simultaneity']['held_out'] == pytest.approx(4.0)  # four voices of equal quarter notes
    assert across['voice_crossing']['held_out'] == 0  # the soprano's register lies above the bass's
    assert across['parallels_per_100_notes']['within_goal'] == (
        across['parallels_per_100_notes']['generated'] <= 2 * across['parallels_per_100_notes']['held_out'])
    accompaniment = parts['accompaniment']
    assert accompaniment['pieces'] == 2 and accompaniment['unplaced_melody_notes'] == 0
    assert accompaniment['melody_notes'] == 2 * 24
    assert 0 <= accompaniment['onset_consonance']['held_out'] <= 1
    for text in ('per role', 'across roles', 'voice_crossing', 'accompaniment of 2 held-out melodies'):
        assert text in stdout


def test_accompaniment_can_be_skipped_and_a_bad_count_is_refused(parts_run, capsys):
    argv = ['--checkpoint', parts_run / 'ckpt' / 'latest.pt', '--num_samples', '2', '--sample_length', '30',
            '--no_c2st', '--output_dir', parts_run / 'skip', '--device', 'cpu']
    code, stdout, err = in_process(evaluate.main, argv + ['--no_accompany'], capsys)
    assert code == 0, err
    assert json.loads((parts_run / 'skip' / 'evaluation.json').read_text())['parts']['accompaniment'] == {
        'skipped': 'off (--no_accompany)'}
    assert 'accompaniment skipped: off (--no_accompany)' in stdout
    code, _, err = in_process(evaluate.main, argv + ['--accompany_pieces', '0'], capsys)
    assert code == 2 and '--accompany_pieces' in err and 'Traceback' not in err


def test_a_report_sampled_with_voice_leading_says_so_and_a_model_without_parts_is_refused(parts_run, trained, capsys):
    argv = ['--checkpoint', parts_run / 'ckpt' / 'latest.pt', '--num_samples', '2', '--sample_length', '60',
            '--no_c2st', '--tunes', '0', '--no_accompany', '--output_dir', parts_run / 'lead', '--device', 'cpu',
            '--voice_leading']
    code, stdout, err = in_process(evaluate.main, argv, capsys)
    assert code == 0, err
    assert json.loads((parts_run / 'lead' / 'evaluation.json').read_text())['samples']['voice_leading'] is True
    assert 'at most twice held-out; masked while sampling, --voice_leading' in stdout
    melody_model = trained[0] / 'ckpt' / 'best.pt'
    code, _, err = in_process(evaluate.main, ['--checkpoint', melody_model, '--voice_leading', '--no_c2st',
                                              '--output_dir', parts_run / 'refused', '--device', 'cpu'], capsys)
    assert (code, err.strip().splitlines()) == (2, [
        f"error: --voice_leading needs a model trained with tracks='parts'; {melody_model} was trained with "
        f"tracks='all', which has no melody and bass roles"])


def test_a_checkpoint_whose_run_sampled_with_voice_leading_is_sampled_so_unless_told_otherwise(parts_run, tmp_path,
                                                                                             monkeypatch, capsys):
    import generate
    from tests.conftest import generate_arguments
    ckpt = torch.load(parts_run / 'ckpt' / 'latest.pt', weights_only=True)
    ckpt['args']['voice_leading'] = True  # as config/parts_cpu.py's run saves it
    torch.save(ckpt, tmp_path / 'led.pt')
    del ckpt['args']['voice_leading']  # a checkpoint from before the option: Args' default
    torch.save(ckpt, tmp_path / 'plain.pt')
    argv = ['--num_samples', '2', '--sample_length', '30', '--no_c2st', '--tunes', '0', '--no_accompany',
            '--device', 'cpu']
    used = {}
    for name, flags in (('led', []), ('led', ['--no-voice_leading']), ('plain', []), ('plain', ['--voice_leading'])):
        out = tmp_path / f"{name}{''.join(flags)}"
        code, _, err = in_process(evaluate.main, ['--checkpoint', tmp_path / f'{name}.pt', '--output_dir', out]
                                  + argv + flags, capsys)
        assert code == 0, err
        used[name, tuple(flags)] = json.loads((out / 'evaluation.json').read_text())['samples']['voice_leading']
    assert used == {('led', ()): True, ('led', ('--no-voice_leading',)): False, ('plain', ()): False,
                    ('plain', ('--voice_leading',)): True}
    constrains = generate_arguments(monkeypatch, 'constrain')
    for flags in ([], ['--no-voice_leading']):
        code, _, err = in_process(generate.main, ['--checkpoint', tmp_path / 'led.pt', '--output_dir', tmp_path / 'g',
                                                  '--num_samples', '1', '--length', '12', '--no_audio'] + flags, capsys)
        assert code == 0, err
    assert [c is not None for c in constrains] == [True, False]


MELODY_REPORT_KEYS = REPORT_KEYS | {'whole_tunes', 'c2st_whole_tune', 'adherence'}


def test_a_report_of_a_model_without_parts_has_no_parts_section(trained, tmp_path):
    report = evaluate.evaluate(trained[0] / 'ckpt' / 'best.pt', num_samples=2, sample_length=20, c2st=False,
                               tunes=0, device='cpu', log=lambda *a: None)
    assert set(report) == MELODY_REPORT_KEYS and 'parts_s' not in report['seconds']
    assert 'per role' not in evaluate.format_table(report)

