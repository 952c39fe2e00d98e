"""repeat_memory.py: matching the phrase being played against earlier ones and mixing their continuations in."""

import pytest
import torch

from repeat_memory import REPEAT_MAX_MATCH, REPEAT_MAX_STRENGTH, REPEAT_MIN_MATCH, extend_match, repeat_mix
from tests.conftest import VOCAB, random_tokens, tiny_model


def common_suffix(tokens, j, last):
    """How many tokens ending at j equal those ending at last, counted by hand."""
    count = 0
    while j - count >= 0 and tokens[j - count] == tokens[last - count]:
        count += 1
    return count


def test_extend_match_counts_the_common_suffix_of_every_earlier_position():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    tokens = torch.cat((tokens, random_tokens(1, 12, seed=5) % 3))  # a row of many short repeats
    match = torch.zeros_like(tokens[:, :0])
    for length in range(2, tokens.shape[1] + 1):
        match = extend_match(match, tokens[:, :length])
        assert match.tolist() == [[common_suffix(row, j, length - 1) for j in range(length - 1)]
                                  for row in tokens[:, :length].tolist()]
        if length == 9:  # 1 2 3 1 2 3 1 2 3: the phrase ending at 2 matches 3 tokens, the one ending at 5 all 6
            assert match[0].tolist() == [0, 0, 3, 0, 0, 6, 0, 0]
    assert match[0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1, 2, 3]  # then 3 3 3: only runs of 3s match


def test_repeat_mix_follows_earlier_continuations_with_the_documented_weight():
    probs = torch.full((3, 10), 0.1)
    phrase = [1, 2, 3, 4, 5, 6, 7]
    # row 0 repeats 6 tokens of the phrase (two notes), row 1 all 7, row 2 only 5: below REPEAT_MIN_MATCH
    tokens = torch.tensor([phrase + [9, 9] + phrase[:6], phrase + [9] + phrase,
                           [0, 0] + phrase[:5] + [9] + phrase[:5] + [8, 8]])
    assert REPEAT_MIN_MATCH == 6
    match = torch.zeros_like(tokens[:, :0])
    for length in range(2, tokens.shape[1] + 1):
        match = extend_match(match, tokens[:, :length])
    mixed = repeat_mix(probs, tokens, match, 0.3)
    assert torch.allclose(mixed.sum(-1), torch.ones(3))
    weight = 0.3  # 6 matched tokens: two notes, the weight is the strength
    assert mixed[0, 7].item() == pytest.approx((1 - weight) * 0.1 + weight)
    assert mixed[0, 3].item() == pytest.approx((1 - weight) * 0.1)
    # row 1's tokens 1..7 follow 9 and repeat the phrase's last 7: weight 1 - 0.7 ** (7 / 3 - 1), votes for 9
    weight = 1 - 0.7 ** (7 / 3 - 1)
    assert mixed[1, 9].item() == pytest.approx((1 - weight) * 0.1 + weight)
    assert torch.equal(mixed[2], probs[2])  # no match long enough: unchanged
    assert torch.equal(repeat_mix(probs, tokens, match, 0.0), probs)
    banned = torch.ones(3, 10, dtype=torch.bool).index_fill(1, torch.tensor([7]), False)
    assert torch.equal(repeat_mix(probs, tokens, match, 0.3, banned)[0], probs[0])  # its one vote is banned


def test_repeat_mix_leaves_the_kept_token_its_probability_and_gives_it_no_votes():
    phrase = [1, 2, 3, 4, 5, 6]
    # the phrase was followed by 7 and once by 9 (the kept token): only 7's vote counts
    tokens = torch.tensor([[8] + phrase + [7] + phrase + [9] + phrase])
    match = torch.zeros_like(tokens[:, :0])
    for length in range(2, tokens.shape[1] + 1):
        match = extend_match(match, tokens[:, :length])
    probs = torch.softmax(torch.linspace(-1, 1, 10), dim=0)[None]
    mixed = repeat_mix(probs, tokens, match, 0.3, keep=9)
    assert mixed[0, 9].item() == pytest.approx(probs[0, 9].item())
    assert mixed.sum().item() == pytest.approx(1.0)
    rest = 1 - probs[0, 9].item()
    assert mixed[0, 7].item() == pytest.approx(0.7 * probs[0, 7].item() + 0.3 * rest)
    assert mixed[0, 3].item() == pytest.approx(0.7 * probs[0, 3].item())
    # without keep the end is voted for and shrinks like any other token
    plain = repeat_mix(probs, tokens, match, 0.3)
    assert plain[0, 9].item() == pytest.approx(0.7 * probs[0, 9].item() + 0.15)
    assert plain[0, 7].item() == pytest.approx(0.7 * probs[0, 7].item() + 0.15)


def test_repeat_weight_stops_growing_at_the_longest_counted_match():
    phrase = random_tokens(40, seed=2)
    probs = torch.full((1, VOCAB), 1 / VOCAB)
    weights = []
    for repeated in (REPEAT_MAX_MATCH - 3, REPEAT_MAX_MATCH, REPEAT_MAX_MATCH + 9):
        tokens = torch.cat((phrase, phrase[:repeated]))[None]
        match = torch.zeros_like(tokens[:, :0])
        for length in range(2, tokens.shape[1] + 1):
            match = extend_match(match, tokens[:, :length])
        weights.append(repeat_mix(probs, tokens, match, 0.2)[0, phrase[repeated]].item() - (1 / VOCAB))
    assert weights[0] < weights[1] == pytest.approx(weights[2])
    assert weights[2] == pytest.approx((1 - 0.8 ** (REPEAT_MAX_MATCH / 3 - 1)) * (1 - 1 / VOCAB))


def test_repeat_mix_splits_its_weight_among_every_spot_that_matches():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 8, 1, 2, 3, 4, 5, 6]])
    match = torch.zeros_like(tokens[:, :0])
    for length in range(2, tokens.shape[1] + 1):
        match = extend_match(match, tokens[:, :length])
    mixed = repeat_mix(torch.full((1, 10), 0.1), tokens, match, 0.3)
    assert mixed[0, 7].item() == pytest.approx(mixed[0, 8].item())  # both earlier continuations, halves
    assert mixed[0, 7].item() == pytest.approx(0.7 * 0.1 + 0.3 / 2)


@pytest.mark.parametrize('use_cache', [True, False])
def test_a_strong_repeat_memory_carries_a_started_repeat_on_and_keeps_the_grammar(use_cache):
    model = tiny_model(max_seq_len=8)
    phrase = random_tokens(30, seed=7)
    prompt = torch.cat((phrase, phrase[:24]))[None].repeat(50, 1)  # the phrase, and its start played again
    torch.manual_seed(0)
    out = model.generate(prompt, 6, temperature=1.0, repeat_memory=REPEAT_MAX_STRENGTH, use_cache=use_cache)
    # 24 tokens matched: weight 1 - 0.5 ** (24 / 3 - 1) = 0.992 on the phrase's next token, so about 0.992 ** 6
    # of the rows copy all 6 tokens (a row that misses one leaves the repeat)
    assert (out == phrase[24:30]).all(dim=1).float().mean() > 0.8
    torch.manual_seed(0)
    plain = model.generate(prompt, 6, temperature=1.0, use_cache=use_cache)
    assert (plain == phrase[24:30]).float().mean() < 0.2  # the untrained model alone does not copy
    greedy = model.generate(prompt[:1], 6, temperature=0, repeat_memory=REPEAT_MAX_STRENGTH, use_cache=use_cache)
    assert torch.equal(greedy[0], phrase[24:30])
    # with a grammar table the memory never votes for a token the table bans, even for a prompt that breaks it
    allowed = torch.ones(VOCAB, VOCAB, dtype=torch.bool)
    allowed[phrase[25], phrase[26]] = False
    torch.manual_seed(0)
    out = model.generate(prompt, 20, temperature=1.0, repeat_memory=REPEAT_MAX_STRENGTH, allowed_next=allowed,
                         use_cache=use_cache)
    assert bool(allowed[out[:, :-1].flatten(), out[:, 1:].flatten()].all())


def test_repeat_memory_off_and_without_matches_samples_exactly_as_before():
    model = tiny_model()
    prompt = random_tokens(4, 3)
    torch.manual_seed(0)
    plain = model.generate(prompt, 12)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 12, repeat_memory=0.0), plain)
