"""The repeat memory, a sampling aid: folk tunes repeat whole phrases, and a small model follows a repeat it is in less
than the data do (evaluate.py: the model's NLL drops when it is mixed with the piece's own continuations).
AutoregressiveWrapper.generate mixes it in when asked (repeat_memory > 0); evaluate.py measures it.
"""

import torch

REPEAT_MIN_MATCH = 6  # repeat memory: tokens that must match (2 notes; one note recurs wherever its pitch does)
REPEAT_MAX_MATCH = 24  # longer matches weigh as 8 notes: the weight stays below 1, so a piece can leave a repeat
REPEAT_MAX_STRENGTH = 0.5  # stronger, most pieces lock into a loop (README); past 0.9 the weight rounds to 1


def extend_match(match, tokens):
    """Suffix matches after tokens (b, n) grew by one token: (b, n-2) -> (b, n-1), starting from (b, 0) at n = 1.

    match[:, j] counts how many tokens ending at position j equal the tokens ending at the last position (0 when
    tokens[:, j] differs from the last token), for every j before the last."""
    last = tokens.shape[1] - 1
    before = torch.cat((torch.zeros_like(tokens[:, :1]), match), dim=1)  # a match at j extends the one at j - 1
    return (tokens[:, :last] == tokens[:, last:]) * (before + 1)


def repeat_mix(probs, tokens, match, strength, allowed=None, keep=None):
    """The next-token distribution probs (b, num_tokens) after tokens (b, n), mixed with the piece's repeats.

    Every earlier position whose last REPEAT_MIN_MATCH or more tokens equal the piece's last tokens (match, from
    extend_match) votes for the token that followed it. The votes get weight 1 - (1 - strength) ** (L / 3 - 1),
    L the longest match up to REPEAT_MAX_MATCH: strength at two matched notes (a note is about 3 tokens), and each
    further matched note takes a (1 - strength) share of what is left. Without the cap a piece that has repeated
    a long phrase would copy on for ever: real tunes leave a repeat after a phrase or two. Rows with no such match
    are unchanged; strength 0 is off. allowed (b, num_tokens) bool: only votes for allowed tokens count.
    """
    if strength == 0 or match.shape[1] == 0:
        return probs
    votes = (match >= REPEAT_MIN_MATCH).to(probs.dtype)
    if allowed is not None:  # the grammar holds in a piece sampled under it, but a prompt may break it
        votes = votes * allowed.gather(1, tokens[:, 1:])
    if keep is not None:
        votes = votes * (tokens[:, 1:] != keep)
    count = votes.sum(dim=1, keepdim=True)
    repeat = torch.zeros_like(probs).scatter_add_(1, tokens[:, 1:], votes) / count.clamp(min=1)
    longest = match.amax(dim=1, keepdim=True).clamp(max=REPEAT_MAX_MATCH).to(probs.dtype)
    weight = torch.where(count > 0, 1 - (1 - strength) ** (longest / 3 - 1), 0.0)
    if keep is None:
        return (1 - weight) * probs + weight * repeat
    kept = probs[:, keep:keep + 1]
    mixed = (1 - weight) * probs + weight * (1 - kept) * repeat
    return mixed.scatter(1, torch.full_like(kept, keep, dtype=torch.long), kept)
