"""parts.py: which part carries the tune (tracks='melody'), and the roles of tracks='parts'. Files built here."""

import random
import subprocess
import sys

import mido
import numpy as np
import pytest
import torch

import TMIDIX
from dataset import PackedDataset, load_corpus, transpose
from parts import (
    BASS_NAME,
    LEAD_NAME,
    MELODY_NAME,
    TOP_VOICE_NAME,
    _named_like_melody,
    choose_melody,
    format_programs,
    melody_part,
    parse_programs,
    part_roles,
)
from tests.conftest import ROOT, in_process, write_parts
from tests.conftest import run as run_training
from token_cache import load_token_cache
from tokens import (
    DUR_OFFSET,
    PAD_IDX,
    START_IDX,
    detokenize,
    is_pitch,
    tokenization_settings,
    tokenize_midi,
    tokenize_notes,
    tokens_to_notes,
)

Q = 480  # ticks per quarter note in write_parts


def tune(n, seed=0, low=62, high=76, step=Q, length=Q - 20, start=0):
    """A singable line: n notes one after another, moving by steps and small leaps inside low..high."""
    rng = random.Random(seed)
    pitch, notes = (low + high) // 2, []
    for i in range(n):
        notes.append((start + i * step, length, pitch))
        pitch = min(high, max(low, pitch + rng.choice([-2, -1, 1, 2, 3, -3, 0])))
    return notes


def block_chords(bars, top, chord_share=1.0, seed=1, length=4 * Q):
    """A chord part: a chord (top, top-4, top-7) on each bar, or its top note alone for 1 - chord_share of bars."""
    rng = random.Random(seed)
    notes = []
    for bar in range(bars):
        pitch = top + rng.choice([0, 2, -2, 5])
        chord = (pitch, pitch - 4, pitch - 7) if rng.random() < chord_share else (pitch,)
        notes += [(bar * 4 * Q, length, p) for p in chord]
    return notes


def choice(path):
    """(notes of the chosen part as (start, pitch), reason) of a file, as tokenize_midi's melody mode reads it."""
    notes, names, programs = TMIDIX.midi2notes(path.read_bytes(), unit='ticks', with_track=True, with_programs=True)
    part, reason = melody_part(notes, names, programs)
    return [(n[1], n[4]) for n in part], reason


def as_chosen(part):
    return sorted((start, pitch) for start, _, pitch in part)


BASS = [(bar * 4 * Q + beat * 2 * Q, 2 * Q - 20, p) for bar in range(16) for beat, p in enumerate((36, 43))]
DRUMS = [(i * Q // 2, 60, 36 if i % 4 == 0 else 42) for i in range(128)]


def test_cut_off_lead_voca_track_wins_over_a_higher_pad_by_its_name(tmp_path):
    lead = tune(64, seed=3, low=55, high=67)  # program 65 (alto sax sound), one note at a time, mean about 61
    pad = block_chords(16, 79, chord_share=0.5, length=2 * Q)  # program 94 (Halo Pad), higher
    pad += [(bar * 4 * Q + 2 * Q, 2 * Q, 81) for bar in range(16)]  # a single note each half bar: a third in chords
    parts = [('Halo Pad', 1, pad, 94), ('Lead Voca', 0, lead, 65), ('Bass', 2, BASS, 33), ('Drums', 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'lead.mid', parts))
    assert chosen == as_chosen(lead)
    assert reason == "track 2 'Lead Voca': named like a melody"
    # unnamed, the single line still beats the pad: by its shape
    unnamed = [(None, channel, notes, *program) for _, channel, notes, *program in parts]
    chosen, reason = choice(write_parts(tmp_path / 'unnamed.mid', unnamed))
    assert chosen == as_chosen(lead) and reason.startswith('track 2: ') and 'one note at a time' in reason


def test_unnamed_choir_block_chords_above_a_single_line_sax_lose_to_the_sax(tmp_path):
    sax = tune(64, seed=5, low=58, high=70)
    choir = block_chords(16, 81, chord_share=1.0)  # program 52 (choir aahs): every note in a chord, higher
    parts = [(None, 0, choir, 52), (None, 1, sax, 65), (None, 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'choir.mid', parts))
    assert chosen == as_chosen(sax)
    assert reason.startswith('track 2: most one note at a time (100% of its notes alone vs 0%)'), reason


def test_dense_strummed_guitar_loses_to_a_sparse_higher_single_line(tmp_path):
    # 255 strums of 5 notes (1,275 notes), each string 10 ticks after the one below, ringing into the next strum
    rng = random.Random(7)
    guitar = []
    for strum in range(255):
        root = rng.choice([48, 50, 52, 53, 55])
        ring = 600 if strum % 7 else 200  # mostly overlapping the next strum, 240 ticks later
        guitar += [(strum * 240 + 10 * string, ring, root + offset)
                   for string, offset in enumerate((0, 7, 12, 16, 19))]
    line = tune(185, seed=9, low=67, high=81, step=330, length=300)  # over the same 61,200 ticks
    parts = [(None, 0, guitar, 24), (None, 1, line, 73)]
    path = write_parts(tmp_path / 'strum.mid', parts)
    chosen, reason = choice(path)
    assert len(guitar) == 1275 and chosen == as_chosen(line)
    assert 'one note at a time' in reason, reason


def test_octave_doubled_melody_gives_the_higher_track_and_a_unison_double_the_first(tmp_path):
    low = tune(48, seed=11, low=60, high=72)
    high = [(start, length, pitch + 12) for start, length, pitch in low]
    chosen, reason = choice(write_parts(tmp_path / 'octaves.mid', [(None, 0, low), (None, 1, high)]))
    assert chosen == as_chosen(high) and 'higher (mean pitch' in reason, reason
    # the same notes on two tracks: nothing tells them apart, the first track in the file wins
    chosen, reason = choice(write_parts(tmp_path / 'unison.mid', [(None, 3, low), (None, 1, list(low))]))
    assert reason.startswith('track 1: as good a tune as track 2'), reason


def test_melody_moving_between_two_tracks_gives_the_track_with_most_of_it(tmp_path):
    verse1 = tune(32, seed=21, start=0)
    verse2 = tune(32, seed=22, start=32 * Q)
    chorus = tune(32, seed=23, start=64 * Q, low=65, high=79)
    chords = block_chords(24, 67)
    bass = [(bar * 4 * Q, 4 * Q - 20, 36 + bar % 5) for bar in range(24)]
    parts = [(None, 0, verse2), (None, 1, verse1 + chorus), (None, 2, chords), (None, 3, bass)]
    chosen, reason = choice(write_parts(tmp_path / 'verses.mid', parts))
    assert chosen == as_chosen(verse1 + chorus)
    assert reason.startswith('track 2: ') and 'next best track 1' in reason, reason


def test_named_vocal_wins_over_a_higher_busier_unnamed_line(tmp_path):
    # the name overrides the shape: this is how a user picks the tune where the score picks another part
    vocal = tune(20, seed=31, low=55, high=62, step=3 * Q)
    flute = tune(90, seed=32, low=72, high=84, step=Q // 2, length=Q // 2 - 10)
    parts = [(None, 0, flute, 73), ('Vocal', 1, vocal, 52)]
    chosen, reason = choice(write_parts(tmp_path / 'vocal.mid', parts))
    assert chosen == as_chosen(vocal) and reason == "track 2 'Vocal': named like a melody"
    chosen, _ = choice(write_parts(tmp_path / 'novocal.mid', [(None, 0, flute, 73), (None, 1, vocal, 52)]))
    assert chosen == as_chosen(flute)


def test_format_0_reason_names_the_channel_counted_from_one(tmp_path):
    melody_line = tune(40, seed=41)
    parts = [('Song title', 0, block_chords(10, 60)), (None, 2, melody_line), (None, 9, DRUMS)]
    chosen, reason = choice(write_parts(tmp_path / 'f0.mid', parts, file_format=0))
    assert chosen == as_chosen(melody_line) and reason.startswith('channel 3: '), reason


def test_melody_names_include_cut_off_words_and_other_languages_but_not_pads_or_backing_voices():
    for name in ('Lead Voca', 'Melod', 'VOC', 'Chant', 'Tune 2', 'Canto', 'GESANG', 'Singing', 'voz', 'Voix'):
        assert _named_like_melody(name), name
    for name in ('Voice Oohs', 'Choir Aahs', 'Backing Vocals', 'Harmony Vocal', 'Tuned Perc', 'Melodica', 'Vocoder'):
        assert not _named_like_melody(name), name
    assert LEAD_NAME.search('Lead Guitar') and LEAD_NAME.search('SOLO') and not MELODY_NAME.search('Lead Guitar')


def test_choose_melody_of_drums_only_has_no_part_and_says_why():
    key, parts, reason = choose_melody([['note', 0, 1, 9, 36, 80, 0]], [b''])
    assert key is None and parts == {} and reason.startswith('no pitched notes')


def test_bundled_essen_set_gives_the_same_tokens_in_all_and_melody_tracks_as_before_parts_existed():
    # digests of tools/token_digest.py over every 20th of the 8,399 files (the whole set takes too long for a test
    # on a shared machine; docs/melody.md gives the whole set's digests and command), computed with the code before
    # parts.py and tracks='parts' existed: neither may move a single token of these modes
    before = {('all', 'ms'): '81e673f4e53fc48e99d739afb4c2f329df337f3f',
              ('all', 'beats'): '5fe8a2ba3f9554cc9bd6803ca3d1202025215201',
              ('melody', 'ms'): '81e673f4e53fc48e99d739afb4c2f329df337f3f',
              ('melody', 'beats'): 'b515eea9d51baa099e7626585afce0d274cb4851'}
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'token_digest.py'), '--tracks', 'all,melody',
                             '--timing', 'ms,beats', '--every', '20'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = {tuple(line.split()[:2]): line.split()[2] for line in result.stdout.splitlines()}
    assert got == before
    assert all(line.endswith(' 420 files 67401 tokens') for line in result.stdout.splitlines())


# -----------------------------------------------------------------------------
# tracks='parts': every note with its role folded into its pitch id

PARTS = tokenization_settings('beats', 4, tracks='parts')  # a step is a 16th note: 120 ticks


def roles(path):
    """{role: [part keys]} of a file, as tokenize_midi's parts mode reads it."""
    notes, names, programs = TMIDIX.midi2notes(path.read_bytes(), unit='ticks', with_track=True, with_programs=True)
    return part_roles(notes, names, programs)[1]


def role_notes(path):
    """{role: [(start_step, pitch)]} read back from the file's parts tokens."""
    out = {}
    for start, _, pitch, role in tokens_to_notes(tokenize_midi(path.read_bytes(), PARTS)[0], roles=True):
        out.setdefault(role, []).append((start, pitch))
    return out


VOCAL = tune(32, seed=51, low=64, high=76)
PIANO = block_chords(8, 67)
POP = [('Vocal', 0, VOCAL, 54), ('Bass', 1, BASS[:16], 33), ('Piano', 2, PIANO, 0), ('Drums', 9, DRUMS[:64])]


def test_pop_song_tracks_get_melody_bass_harmony_and_drums(tmp_path):
    path = write_parts(tmp_path / 'pop.mid', POP)
    assert roles(path) == {'melody': [(1, 0)], 'bass': [(2, 1)], 'harmony': [(3, 2)], 'drums': [(4, 9)]}
    got = role_notes(path)
    assert got['melody'] == [(s // 120, p) for s, _, p in VOCAL]
    assert sorted(got['harmony']) == sorted((s // 120, p) for s, _, p in PIANO)
    assert len(got['bass']) == 16 and len(got['drums']) == 64
    tokens = tokenize_midi(path.read_bytes(), PARTS)[0]
    pitch_ids = tokens[is_pitch(tokens)]
    assert ((pitch_ids >= 640) == [role == 'drums' for *_, role in tokens_to_notes(tokens, roles=True)]).all()
    assert tokenize_midi(path.read_bytes(), PARTS)[1] == 32 + 16 + len(PIANO) + 64  # drums counted, always kept


def test_format_0_file_gets_the_same_roles_from_its_channels(tmp_path):
    path = write_parts(tmp_path / 'pop0.mid', POP, file_format=0)
    assert roles(path) == {'melody': [(0, 0)], 'bass': [(0, 1)], 'harmony': [(0, 2)], 'drums': [(0, 9)]}
    # without programs the bass is the lowest of three or more pitched parts
    bare = write_parts(tmp_path / 'bare0.mid', [(None, c, notes) for _, c, notes, *_ in POP], file_format=0)
    assert roles(bare) == {'melody': [(0, 0)], 'bass': [(0, 1)], 'harmony': [(0, 2)], 'drums': [(0, 9)]}
    assert role_notes(path) == role_notes(write_parts(tmp_path / 'pop1.mid', POP))


def test_satb_chorale_gives_soprano_melody_named_bass_and_inner_voices_harmony(tmp_path):
    voices = [('Soprano', 0, tune(32, seed=61, low=67, high=77), 52),
              ('Alto', 1, tune(32, seed=62, low=60, high=69), 52),
              ('Tenor', 2, tune(32, seed=63, low=53, high=64), 52),
              ('Bass', 3, tune(32, seed=64, low=40, high=55), 52)]
    assert roles(write_parts(tmp_path / 'satb.mid', voices)) == {
        'melody': [(1, 0)], 'bass': [(4, 3)], 'harmony': [(2, 1), (3, 2)], 'drums': []}


def test_a_soprano_or_first_violin_carries_the_tune_though_an_inner_voice_has_more_notes(tmp_path):
    # a chorale's alto moves in eighths (passing notes) under a soprano in quarters, all in one choir program:
    # by the scores alone the alto would win on its share of the notes
    for top, second in (('Soprano', 'Alto'), ('Violin I', 'Violin II')):
        voices = [(top, 0, tune(24, seed=91, low=67, high=74), 52),
                  (second, 1, tune(48, seed=92, low=62, high=70, step=Q // 2, length=Q // 2 - 20), 52),
                  ('Tenor', 2, tune(24, seed=93, low=53, high=62), 52),
                  ('Bass', 3, tune(24, seed=94, low=40, high=52), 52)]
        path = write_parts(tmp_path / f'{top}.mid', voices)
        assert choice(path) == (as_chosen(voices[0][2]), f"track 1 '{top}': named like the top voice of an ensemble")
        assert roles(path)['melody'] == [(1, 0)]
    assert not TOP_VOICE_NAME.search('Violin II') and not TOP_VOICE_NAME.search('Violini')
    # a vocal line names the tune before a first violin does
    song = [('Violin I', 0, tune(24, seed=95, low=67, high=79), 40), ('Vocal', 1, tune(24, seed=96), 52)]
    assert choice(write_parts(tmp_path / 'song.mid', song)) == (as_chosen(song[1][2]),
                                                                "track 2 'Vocal': named like a melody")


def test_string_quartet_gives_the_cello_the_bass_as_the_lowest_of_four(tmp_path):
    quartet = [('Violin I', 0, tune(40, seed=71, low=67, high=84), 40),
               ('Violin II', 1, tune(40, seed=72, low=62, high=74), 40),
               ('Viola', 2, tune(40, seed=73, low=55, high=67), 41),
               ('Violoncello', 3, tune(40, seed=74, low=40, high=57), 42)]
    assert roles(write_parts(tmp_path / 'quartet.mid', quartet)) == {
        'melody': [(1, 0)], 'bass': [(4, 3)], 'harmony': [(2, 1), (3, 2)], 'drums': []}


def test_piano_solo_is_all_melody_with_the_ids_of_all_tracks(tmp_path):
    right = tune(32, seed=81, low=67, high=79)
    left = [(bar * 4 * Q + beat * Q, Q, p) for bar in range(8) for beat, p in enumerate((48, 55, 52, 55))]
    path = write_parts(tmp_path / 'piano.mid', [('Piano', 0, right + left, 0)])
    assert roles(path) == {'melody': [(1, 0)], 'bass': [], 'harmony': [], 'drums': []}
    # a single pitched part keeps the original's ids: its parts tokens are its 'all' tokens
    parts_tokens = tokenize_midi(path.read_bytes(), PARTS)[0]
    assert parts_tokens.tolist() == tokenize_midi(path.read_bytes(), tokenization_settings('beats', 4))[0].tolist()


def test_drums_only_file_is_all_drum_ids_from_640(tmp_path):
    path = write_parts(tmp_path / 'drums.mid', [('Drums', 9, DRUMS[:16])])
    assert roles(path) == {'melody': [], 'bass': [], 'harmony': [], 'drums': [(1, 9)]}
    tokens = tokenize_midi(path.read_bytes(), PARTS)[0]
    assert sorted(set(tokens[is_pitch(tokens)].tolist())) == [640 + 36, 640 + 42]


def test_bassoon_is_not_a_bass_but_a_bass_program_is():
    assert not BASS_NAME.search('Bassoon') and BASS_NAME.search('E.Bass') and BASS_NAME.search('BASSO CONTINUO')
    notes = [['note', i, 1, 0, 72 + i % 3, 80, 1] for i in range(8)] + [['note', i, 1, 1, 60, 80, 2] for i in range(8)]
    assert part_roles(notes, [b'', b'Flute', b'Bassoon'], {(2, 1): 70})[1]['bass'] == []
    assert part_roles(notes, [b'', b'Flute', b'Synth'], {(2, 1): 38})[1]['bass'] == [(2, 1)]


def test_notes_that_start_together_are_ordered_by_role_then_pitch():
    # melody 72, bass 36, harmony 64 and 60, a drum 36: all on one onset, handed over in the file's pitch order
    notes = [['note', 0, 100, 1, 36, 80], ['note', 0, 100, 9, 36, 80], ['note', 0, 100, 2, 60, 80],
             ['note', 0, 100, 2, 64, 80], ['note', 0, 100, 0, 72, 80]]
    ids = tokenize_notes(notes, tokenization_settings(tracks='parts'),
                         roles=['bass', 'drums', 'harmony', 'harmony', 'melody'])
    assert ids == [START_IDX, DUR_OFFSET + 3, 256 + 72, DUR_OFFSET + 3, 384 + 36, DUR_OFFSET + 3, 512 + 60,
                   DUR_OFFSET + 3, 512 + 64, DUR_OFFSET + 3, 640 + 36]


def test_parts_settings_keep_drums_and_leave_the_other_modes_keys_alone():
    assert tokenization_settings(tracks='parts')['include_drums'] is True
    assert tokenization_settings(tracks='parts', include_drums=False) == tokenization_settings(tracks='parts')
    assert tokenization_settings(tracks='parts')['tracks'] == 'parts'
    assert 'tracks' not in tokenization_settings() and tokenization_settings(tracks='melody')['tracks'] == 'melody'


def test_detokenize_writes_a_track_per_role_on_channels_1_2_3_and_10_and_reads_back_the_same_tokens(tmp_path):
    path = write_parts(tmp_path / 'pop.mid', POP)
    tokens = tokenize_midi(path.read_bytes(), PARTS)[0]
    song = detokenize(tokens, tmp_path / 'back.mid', PARTS, tempo_bpm=120, programs={'melody': 54, 'bass': 33})
    assert len(song) == int(is_pitch(tokens).sum())
    back = mido.MidiFile(str(tmp_path / 'back.mid'))
    names = [next(m.name for m in t if m.type == 'track_name') for t in back.tracks[1:]]
    channels = [{m.channel for m in t if m.type == 'note_on'} for t in back.tracks[1:]]
    programs = [[m.program for m in t if m.type == 'program_change'] for t in back.tracks[1:]]
    assert names == ['melody', 'bass', 'harmony', 'drums'] and channels == [{0}, {1}, {2}, {9}]
    assert programs == [[54], [33], [0], [0]]
    assert tokenize_midi((tmp_path / 'back.mid').read_bytes(), PARTS)[0].tolist() == tokens.tolist()


def test_transposition_moves_each_role_inside_its_block_and_never_drums():
    window = torch.tensor([START_IDX, 130, 256 + 60, 130, 384 + 40, 130, 512 + 100, 130, 640 + 36, PAD_IDX])
    up = transpose(window, 2)
    assert up.tolist() == [START_IDX, 130, 318, 130, 426, 130, 614, 130, 676, PAD_IDX]
    # a harmony note at MIDI 126 would leave its block (into the drums') at +2: the shift is cut to +1
    top = window.clone()
    top[6] = 512 + 126
    assert transpose(top, 2).tolist() == [START_IDX, 130, 317, 130, 425, 130, 639, 130, 676, PAD_IDX]
    packed = PackedDataset([top.numpy().astype(np.uint16)[:-1]], max_seq_len=8, aug=True, aug_range=5, seed=3)
    for epoch in range(6):
        packed.set_epoch(epoch)
        got = packed[0]
        assert got[8] == 676 and 512 <= got[6] <= 639 and 384 <= got[4] <= 511 and 256 <= got[2] <= 383


# -----------------------------------------------------------------------------
# writing parts out: a program per role, from the training data or --programs

def test_programs_text_reads_roles_and_gm_numbers_and_refuses_anything_else():
    assert parse_programs('melody=73, bass=33') == {'melody': 73, 'bass': 33} and parse_programs('') == {}
    assert format_programs({'bass': 33, 'melody': 73}) == 'melody=73,bass=33'
    for bad, said in (('lead=73', "unknown role 'lead'"), ('melody=128', 'a number 0-127'),
                      ('bass', 'a number 0-127'), ('melody=-1', 'a number 0-127'),
                      ('melody=73,melody=10', 'melody is given twice')):
        with pytest.raises(ValueError, match=said):
            parse_programs(bad)


def test_cache_meta_and_corpus_summary_carry_the_most_common_program_per_role(tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    for i, vocal_program in enumerate((54, 54, 73)):
        write_parts(folder / f'pop{i}.mid', [('Vocal', 0, VOCAL, vocal_program), ('Bass', 1, BASS[:16], 33),
                                             ('Piano', 2, PIANO, 4 + i), ('Drums', 9, DRUMS[:64])])
    entries = load_token_cache(folder, PARTS, tmp_path / 'cache', num_workers=0, verbose=False)
    assert entries['pop2.mid']['programs'] == {'melody': 73, 'bass': 33, 'harmony': 6}
    train, _, summary = load_corpus(folder, PARTS, tmp_path / 'cache', min_notes=8, val_fraction=0, verbose=False)
    assert summary['role_programs'] == {'melody': 54, 'bass': 33, 'harmony': 4}  # a three-way tie: the lowest
    # the melody modes keep their cache meta as it is
    melody = load_token_cache(folder, tokenization_settings('beats', 4, tracks='melody'), tmp_path / 'cache',
                              num_workers=0, verbose=False)
    assert 'programs' not in melody['pop0.mid']


def test_parts_training_saves_the_role_programs_and_generate_plays_them_or_the_ones_asked_for(tmp_path, capsys):
    import generate
    folder = tmp_path / 'data'
    folder.mkdir()
    for i in range(3):
        vocal = tune(32, seed=i, low=64, high=76)
        write_parts(folder / f'pop{i}.mid', [('Vocal', 0, vocal, 54), ('Bass', 1, BASS[:16], 33),
                                             ('Piano', 2, PIANO, 4), ('Drums', 9, DRUMS[:64])])
    train = ['--dim', '32', '--depth', '1', '--heads', '2', '--dim_head', '16', '--seq_len', '32', '--batch_size', '2',
           '--grad_accum', '1', '--max_steps', '1', '--generate_every', '1', '--generate_length', '24',
           '--prompt_length', '0', '--min_notes', '8', '--validate_every', '100', '--val_fraction', '0',
           '--dtype', 'float32', '--audio', 'false', '--tracks', 'parts', '--data_path', folder,
           '--cache_dir', tmp_path / 'cache', '--save_dir', tmp_path / 'ckpt', '--samples_dir', tmp_path / 'samples']
    run_training(list(map(str, train)), cwd=tmp_path)
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['args']['programs'] == 'melody=54,bass=33,harmony=4'
    sample = mido.MidiFile(str(tmp_path / 'samples' / 'sample_step_1.mid'))
    programs = {t.name: [m.program for m in t if m.type == 'program_change'] for t in sample.tracks[1:]}
    assert all(programs[role] == [number] for role, number in (('melody', 54), ('bass', 33), ('harmony', 4))
               if role in programs)
    gen = ['--checkpoint', tmp_path / 'ckpt' / 'latest.pt', '--output_dir', tmp_path / 'gen', '--num_samples', '1',
           '--length', '48', '--no_audio', '--programs', 'melody=73']
    code, out, err = in_process(generate.main, gen, capsys)
    assert code == 0, err
    written = mido.MidiFile(str(tmp_path / 'gen' / 'sample_0.mid'))
    programs = {t.name: [m.program for m in t if m.type == 'program_change'] for t in written.tracks[1:]}
    assert all(programs[role] == [number] for role, number in (('melody', 73), ('bass', 33), ('harmony', 4))
               if role in programs) and programs
    assert (tmp_path / 'gen' / 'sample_0.png').exists()
    code, _, err = in_process(generate.main, gen[:-1] + ['lead=73'], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --programs 'lead=73': must be None (the training set's most common) or role=program pairs, each "
        "role once, e.g. 'melody=73,bass=33' (roles melody, bass, harmony, drums; programs 0-127)"]


def test_programs_of_a_one_track_checkpoint_are_refused_in_one_line(trained, tmp_path, capsys):
    import generate
    tmp, _ = trained
    code, _, err = in_process(generate.main, ['--checkpoint', tmp / 'ckpt' / 'latest.pt', '--output_dir', tmp_path,
                                              '--programs', 'melody=73', '--no_audio'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs a model trained with tracks='parts'" in err


def test_piano_roll_legend_names_the_roles(tmp_path):
    song = [['note', 0, 500, 0, 72, 90], ['note', 0, 500, 1, 36, 90], ['note', 500, 500, 2, 60, 90],
            ['note', 500, 100, 9, 42, 90]]
    figure = TMIDIX.plot_ms_SONG(song, channel_names={0: 'melody', 1: 'bass', 2: 'harmony'}, max_num_colors=4,
                                 save_path=tmp_path / 'roll.png', return_plt=True)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ['melody', 'bass', 'harmony', 'drums']
