"""voice_leading.py: which melody and bass pitches the mask takes out after hand-built sequences, sampling with it
(AutoregressiveWrapper.generate's constrain hook) on a tiny random model, and the same pitches as training targets
to avoid (avoided_targets, the unlikelihood term of Args.voice_leading_loss)."""

import torch

from parts_measures import parallels, voice_crossing
from runtime import build_model
from tokens import DUR_OFFSET, NUM_TOKENS, ROLE_OFFSET, START_IDX, TIME_OFFSET, grammar_table, tokens_to_notes
from voice_leading import VoiceLeading, avoided_targets

MODEL = {'dim': 32, 'depth': 1, 'heads': 2, 'dim_head': 16, 'seq_len': 64, 'dropout': 0.0}


def note(role, pitch, duration=8, after=0):
    """A note's tokens: its time delta (when after > 0), duration and pitch id in the role's block."""
    return ([TIME_OFFSET + after] if after else []) + [DUR_OFFSET + duration, ROLE_OFFSET[role] + pitch]


def allowed(tokens, role):
    """The pitches of a role the mask leaves after tokens (ending with a duration token), as a set."""
    limit = VoiceLeading(1)(torch.tensor([tokens]))
    first = ROLE_OFFSET[role]
    return {pitch for pitch in range(128) if limit[0, first + pitch]}


def test_a_bass_pitch_moving_in_parallel_octaves_or_above_the_melody_is_masked():
    # C5 over C4 (an octave), then the melody steps up to D5: a bass D4 is a parallel octave, E4 is not
    tokens = [START_IDX] + note('melody', 72) + note('bass', 60) + note('melody', 74, after=8) + [DUR_OFFSET + 8]
    left = allowed(tokens, 'bass')
    assert 62 not in left and 74 not in left  # an octave and a unison, both voices moving up from (72, 60)
    assert {64, 60, 55, 50, 38} <= left       # a sixth, C4 again (oblique), a fifth, octaves in contrary motion
    assert not {75, 80, 127} & left           # above the melody's D5: voice crossing
    limit = VoiceLeading(1)(torch.tensor([tokens]))
    assert bool(limit[0, :ROLE_OFFSET['bass']].all()) and bool(limit[0, ROLE_OFFSET['harmony']:].all())


def test_a_melody_pitch_moving_in_parallel_fifths_with_a_bass_placed_first_is_masked():
    # G4 over C4 (a fifth); at the next onset the bass moves to D4 first, then the melody is drawn
    tokens = [START_IDX] + note('melody', 67) + note('bass', 60) + note('bass', 62, after=8) + [DUR_OFFSET + 8]
    left = allowed(tokens, 'melody')
    assert 69 not in left and 81 not in left  # A4, A5: fifths moving up with the bass
    assert {62, 65, 67, 71} <= left           # a unison, F4 against the rising bass, G4 again (oblique), a sixth
    assert not set(range(62)) & left          # below the bass's D4


def test_nothing_is_masked_against_a_held_voice_or_across_a_rest():
    held = [START_IDX] + note('melody', 67) + note('bass', 60, duration=16) + note('melody', 69, after=8)
    assert allowed(held + [DUR_OFFSET + 8], 'bass') >= {60, 62}  # the bass sounds on: only a new one is judged
    # a fifth, then an onset of the harmony alone (melody and bass rest), then the bass a step up: the rest breaks
    # the line, so A4 over D4 is no parallel fifth, and only a melody below the bass is masked
    rest = [START_IDX] + note('melody', 67, duration=4) + note('bass', 60, duration=4) + note('harmony', 64, after=8)
    resumed = rest + note('bass', 62, after=8) + [DUR_OFFSET + 8]
    assert allowed(resumed, 'melody') == set(range(62, 128))
    joined = rest[:5] + note('bass', 62, after=8) + [DUR_OFFSET + 8]  # the same without the harmony's onset
    assert 69 not in allowed(joined, 'melody')


def test_rows_keep_their_own_pieces_and_only_rows_about_to_draw_a_pitch_are_limited():
    octaves = [START_IDX] + note('melody', 72) + note('bass', 60) + note('melody', 74, after=8) + [DUR_OFFSET + 8]
    other = [START_IDX] + note('melody', 72) + note('bass', 57) + note('melody', 74, after=8) + [TIME_OFFSET + 4]
    hook = VoiceLeading(2)
    limit = hook(torch.tensor([octaves, other]))
    assert not limit[0, ROLE_OFFSET['bass'] + 62] and bool(limit[1].all())  # row 1 draws a duration next
    assert VoiceLeading(1)(torch.tensor([other])) is None
    step = hook(torch.tensor([octaves + [ROLE_OFFSET['bass'] + 55], other + [DUR_OFFSET + 8]]))
    assert bool(step[0].all()) and limit.shape == (2, NUM_TOKENS)
    assert not step[1, ROLE_OFFSET['bass'] + 75]  # row 1's melody D5: a bass above it crosses


def test_generate_draws_as_without_the_limit_where_it_would_leave_no_token():
    torch.manual_seed(0)
    model = build_model(MODEL)
    prompt = torch.full((2, 1), START_IDX)
    nothing = lambda out: torch.zeros(out.shape[0], NUM_TOKENS, dtype=torch.bool)
    torch.manual_seed(1)
    free = model.generate(prompt, 30, allowed_next=grammar_table())
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, 30, allowed_next=grammar_table(), constrain=nothing), free)


def lines_table():
    """A grammar of a melody note (8 steps) then a bass or harmony note (7 steps) every 8 steps, with a few pitches
    each: no note sounds past the next onset, so every change of the melody-bass pair is an onset's, and the pairs
    (72, 60) and (74, 62) make parallel octaves often."""
    table = torch.zeros(NUM_TOKENS, NUM_TOKENS, dtype=torch.bool)
    melody = [ROLE_OFFSET['melody'] + p for p in (59, 72, 74)]
    lower = [ROLE_OFFSET['bass'] + p for p in (60, 62)] + [ROLE_OFFSET['harmony'] + 67]  # harmony: never masked
    table[[START_IDX, TIME_OFFSET + 8], DUR_OFFSET + 8] = True
    table[DUR_OFFSET + 8, melody] = True
    table[[[m] for m in melody], DUR_OFFSET + 7] = True
    table[DUR_OFFSET + 7, lower] = True
    table[[[p] for p in lower], TIME_OFFSET + 8] = True
    table[table.sum(dim=1) == 0, DUR_OFFSET + 8] = True  # ids the pieces never reach: generate wants a token allowed
    return table


def test_a_tiny_random_model_sampled_with_voice_leading_writes_no_parallel_and_no_crossing():
    torch.manual_seed(0)
    model = build_model(MODEL)
    prompt = torch.full((8, 1), START_IDX)
    counts = {}
    for option in (False, True):
        torch.manual_seed(1)
        out = model.generate(prompt, 240, allowed_next=lines_table(),
                             constrain=VoiceLeading(8) if option else None)
        pieces = [tokens_to_notes(row, roles=True) for row in out.tolist()]
        counts[option] = (sum(sum(parallels(piece)) for piece in pieces),
                          sum(voice_crossing(piece) > 0 for piece in pieces))
    assert counts[False][0] > 5 and counts[False][1] > 0  # the model alone writes both
    assert counts[True] == (0, 0)


# -----------------------------------------------------------------------------
# training: the pitches the mask takes out, as targets the loss pushes the model away from

def test_avoided_targets_are_the_sampling_masks_pitches_at_each_position_before_a_pitch_but_the_one_written():
    octaves = [START_IDX] + note('melody', 72) + note('bass', 60) + note('melody', 74, after=8)
    window = torch.tensor([octaves + note('bass', 62), octaves + note('bass', 55)])  # the first is a parallel octave
    avoid = avoided_targets(window)
    assert avoid.shape == (2, window.shape[1] - 1, NUM_TOKENS) and avoid.dtype == torch.bool
    before_pitch = window.shape[1] - 2  # the duration token before the last bass pitch
    masked = ~VoiceLeading(1)(window[:1, :before_pitch + 1])[0]
    assert torch.equal(avoid[1, before_pitch], masked)  # G3 is a fifth in contrary motion: nothing left out
    written = ROLE_OFFSET['bass'] + 62
    assert masked[written] and not avoid[0, before_pitch, written]  # the music's own parallel is not avoided
    assert torch.equal(avoid[0, before_pitch] | (torch.arange(NUM_TOKENS) == written), masked)
    # before the melody's pitches (no bass yet, then a bass held below) and before time or duration tokens
    pitch_positions = [t for t in range(window.shape[1] - 1) if DUR_OFFSET <= window[0, t] < DUR_OFFSET + 128]
    assert not avoid[:, [t for t in range(window.shape[1] - 1) if t not in pitch_positions]].any()
    assert not avoid[:, 1].any()  # the first melody note: no bass to move against


def unlikelihood_model():
    torch.manual_seed(0)
    return build_model(MODEL)


def test_the_loss_adds_the_weighted_log_of_the_avoided_tokens_missing_probability():
    model = unlikelihood_model()
    x = torch.randint(0, 700, (2, 12))
    avoid = torch.zeros(2, 11, NUM_TOKENS, dtype=torch.bool)
    avoid[0, 3, [400, 401, 402]] = True
    avoid[1, 7, 300] = True
    plain, _ = model(x)
    weighted, _ = model(x, avoid=[(avoid, 2.5, None)])
    probs = model.net(x[:, :-1]).float().softmax(-1).detach()
    expected = -torch.log(1 - probs[0, 3, [400, 401, 402]].sum()) - torch.log(1 - probs[1, 7, 300])
    assert torch.allclose(weighted, plain + 2.5 * expected / 22, rtol=1e-5)
    nothing = [(torch.zeros_like(avoid), 1.0, None)]
    assert torch.equal(model(x, avoid=nothing)[0], plain)  # nothing avoided: the same loss
    # with a floor: the log of the avoided probability above the floor's, and nothing where it is below
    first, second = probs[0, 3, [400, 401, 402]].sum(), probs[1, 7, 300]
    floor = float(first + second) / 2  # between the two when they differ
    low, high = sorted((float(first), float(second)))
    floored, _ = model(x, avoid=[(avoid, 2.5, floor)])
    assert low < floor < high
    assert torch.allclose(floored, plain + 2.5 * torch.log(torch.tensor(high / floor)) / 22, rtol=1e-4)


def test_a_few_steps_with_the_unlikelihood_term_take_the_probability_off_the_avoided_tokens():
    torch.manual_seed(1)
    x = torch.randint(0, 700, (4, 16))
    avoid = torch.zeros(4, 15, NUM_TOKENS, dtype=torch.bool)
    avoid[:, :, 384:512] = True  # every bass id
    avoid[torch.arange(4)[:, None], torch.arange(15), x[:, 1:]] = False
    mass = {}
    for weight in (0.0, 10.0):
        model = unlikelihood_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(30):
            loss, _ = model(x, avoid=[(avoid, weight, None)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            mass[weight] = (model.net(x[:, :-1]).float().softmax(-1) * avoid).sum(-1).mean().item()
    assert mass[10.0] < mass[0.0] / 2
