"""Is a trained model any good? Validation NLL against n-gram baselines, and generated music against held-out music.

    python evaluate.py --checkpoint content/checkpoints/best.pt [--data_path DIR] [--num_samples 128]

Writes <output_dir>/evaluation.json and evaluation.png (output_dir defaults to the checkpoint's folder) and prints
a table. Eight parts for every model:

1. Model: NLL per token (nats), perplexity and accuracy over the validation split, pad excluded, on the same
   corpus, split and windows as training's runtime.evaluate_split, so the numbers are the ones training
   reported (the float64 sum of float32 per-target losses here; a test checks the two agree). With a repeat
   memory (--repeat_memory, off by default as in generate.py), the same for the distribution samples are drawn
   from: the model's, mixed where the window repeats itself with what followed the earlier passage.
2. Baselines counted on the training split's tokens and scored on the same validation windows and targets: an
   add-one unigram and an interpolated Witten-Bell n-gram (default 5-gram) that backs off down to that unigram.
   A target's context never reaches before its window's first token, just as the model's does.
3. Music: statistics of num_samples pieces generated from the start token against the validation pieces, each
   the relative difference generated vs held-out (goal: within 10%), the duration histograms compared by their
   total variation distance (goal: at most 0.10). Pieces are sampled as generate.py samples them, only tokens the
   token grammar allows after the one before, so their grammar validity is 1 by construction; --unconstrained
   samples every token as the original did, and grammar validity then measures the model itself. The repeat
   memory is as in generate.py (off by default; --repeat_memory 0.2 leans on the piece's own repeats).
4. Bits per note, the field's unit, for the model and each baseline on the same targets as 1 and 2: the -log2 p of
   all scored targets over the notes scored (a note counts when its pitch token is a target), split into pitch
   (pitch tokens) and timing (time-delta and duration tokens). Goal: pitch bits at least 25% below the n-gram's.
5. Classifier two-sample test (C2ST): the first c2st_notes notes of c2st_pieces generated pieces and of every
   validation piece that long become key- and tempo-invariant features (FEATURE_GROUPS); a logistic regression
   and a boosted-tree model try to tell the two sides apart (stratified 5-fold accuracy, equal class counts). A
   control runs the same test on two random halves of the validation pieces (about 50%). Goal: boosted accuracy
   at most the control's + 5 points (+ 3 for a conditioned model's asked pieces). Needs scikit-learn (pip install
   -r requirements-eval.txt); --no_c2st skips it. The control is the mean over 5 random halvings.
6. Copy test: the NLL of each validation tune's first COPY_TOKENS tokens, and of the same tokens played again
   right after them (the repeat's second half). Repeated motifs are what the C2ST finds missing most; a model
   that has learned to copy what it heard scores near 0 on the repeat.
7. Whole tunes (--tunes, 0 skips): tunes generated until the model ends them (it draws the next start token) or
   the longest held-out tune's length is reached (WholeTunes; where the grammar allows no end, cut at held-out
   lengths, and it says so); a conditioned model's are asked for the labels of validation tunes, a model trained
   with tune_length for the length of a training tune of the style asked, as generate.py asks it. Their median
   number of notes against the held-out tunes' (goal: within 15%), and where the model ends the held-out tunes (its
   start token's probability after a tune's last note and summed after its other notes, held_out_ends, by style for
   a conditioned model); for a conditioned model, the share that end on
   the tonic of their key (the asked key; a held-out tune's from its key signature; the last note is the lowest of
   the last onset) against the held-out share (goal: within 10 points); and the whole-tune C2ST: part 5 over the
   same tunes against every validation tune, on features of the whole tune (WHOLE_TUNE_GROUPS: length, ending,
   opening, phrase repetition, how the halves differ, and part 5's features over all notes). Goal: boosted
   accuracy at most the control's + 8 points.
8. Adherence (adherence.py): key, meter and style classifiers fitted on the training tunes' labels (labels.py:
   the first key and time signatures of each file, its first folder), their cross-validated accuracy (the
   ceiling) and their accuracy on the validation tunes. For a conditioned checkpoint, part 7's tunes, asked for
   the labels of validation tunes: the share read as asked, per label. Goal: at most 5 points below the ceiling.
   Beside the key's: the tonic endings of the tunes read as the key asked and of those read otherwise (a tune can
   miss its tonic at the end because it strayed from the key, or in a tune that kept it).
   --no_adherence skips it; parts 5, 7 and 8 need scikit-learn, and --no_c2st skips all three.

A model of tracks='parts' gets two parts more, under 'parts' in the report (docs/parts.md, "Measuring"; the
measures are parts_measures.py's):

9. Per role (melody, bass, harmony, drums: those with notes in the validation split), the model's and the n-gram's
   NLL and bits per note over the role's tokens (a note's time delta, duration and pitch), and the model's margin
   (goal: at least 20% below the n-gram); per role, generated against held-out pieces, pitch range, notes per second
   and the share of time the role sounds; across roles, simultaneity, onset consonance (goal: within 10%), voice
   crossing (goal: at most held-out + GOAL_CROSSING_POINTS) and parallel fifths and octaves between melody and
   bass (goal: at most twice held-out).
10. Accompaniment: the melodies of --accompany_pieces held-out pieces (the shortest that have a lower part)
   accompanied as generate.py --accompany does; the lower parts' consonance with the melody and the melody-bass
   parallels, against each piece's own lower parts. --no_accompany skips it.
--voice_leading samples parts 9's pieces and 10's accompaniments with voice_leading.py's mask, which decides
crossing and parallels: the report says so beside those goals.

Beat grid rule: an onset is on the grid when it falls on a 16th-note or an 8th-note-triplet line, counted from
the piece's first note. 'beats' timing: step s (1/beat_division of a quarter) is on the grid when 4*s or 3*s is a
multiple of beat_division. 'ms' timing: the onset in ms is converted to beats at the checkpoint's output_tempo
(the training set's median tempo) and counts when it lies within 10 ms of a grid line.
"""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import condition
import parts_measures as measures
from accompany import accompaniable, accompany_piece, melody_notes
from adherence import (
    GOAL_ADHERENCE_POINTS,
    MissingDependencyError,
    adherence_rates,
    asked_labels,
    fit_label_classifiers,
    sklearn_parts,
    training_sample,
)
from dataset import MIDI_Dataset, collate_fn, load_corpus, split_head
from labels import corpus_labels
from options import RULES, ArgumentParser, add_switch, exit_on_bad_args, integer, optional
from parts import ROLES
from repeat_memory import extend_match, repeat_mix
from runtime import (
    CheckpointError,
    DeviceError,
    load_checkpoint,
    load_model,
    resolve_data_path,
    sigterm_as_ctrl_c,
    start_machine,
    stopped_by,
    undecodable_names_on_stdout,
)
from sampling import (
    REPEAT_MEMORY,
    GenerationProgress,
    add_sampling_arguments,
    checkpoint_sampling,
    generation_model,
    graphed_decoding,
    guidance_asked,
    until_tune_end,
)
from token_cache import DatasetError, write_atomically
from tokens import (
    DUR_OFFSET,
    NUM_TOKENS,
    PAD_IDX,
    PITCH_END,
    PITCH_OFFSET,
    START_IDX,
    TIME_OFFSET,
    grammar_table,
    is_pitch,
    seconds_per_step,
    tokens_to_notes,
)
from voice_leading import VoiceLeading

KEY_BITS = 10               # a token id fits in 10 bits (NUM_TOKENS < 1024), so an n-gram of 6 fits in an int64
GOAL_MARGIN = 0.20          # model NLL at least 20% below the n-gram baseline's
GOAL_PITCH_MARGIN = 0.25    # model pitch bits per note at least 25% below the n-gram baseline's
GOAL_C2ST_POINTS = 0.05     # boosted C2ST accuracy at most the control's + 5 points
GOAL_CONDITIONED_C2ST_POINTS = 0.03  # a conditioned model's, each piece asked a held-out header: + 3 points
GOAL_WHOLE_TUNE_C2ST_POINTS = 0.08  # the same over whole tunes: at most the control's + 8 points
GOAL_RELATIVE = 0.10        # generated statistics within 10% of held-out music
GOAL_DURATION_TV = 0.10     # duration histograms at most this far apart (total variation distance)
# voice crossing: at most held-out's share + this much of the time melody and bass sound together. Held-out music
# crosses (near) never, and a share near 0 has no meaningful relative difference: 0.005 is a beat in 200
GOAL_CROSSING_POINTS = 0.005
GRID_TOLERANCE_MS = 10.0    # 'ms' timing: an onset this close to a grid line counts as on the grid
MAJOR_STEPS = (0, 2, 4, 5, 7, 9, 11)
# a natural minor scale holds the same pitch classes as its relative major (A minor = C major), so the 12
# rotations of the major scale are all 24 major and natural-minor keys
DIATONIC_SETS = np.array([[(p - root) % 12 in MAJOR_STEPS for p in range(12)] for root in range(12)])
COPY_TOKENS = 60            # tokens (about 20 notes) of each held-out tune the copy test plays twice
GENERATE_BATCH = 100        # pieces sampled at once: bounds the KV cache and logits of a long --c2st_pieces
STATISTICS = ('pitch_range', 'pitch_class_entropy', 'scale_consistency', 'notes_per_second', 'onsets_on_grid',
              'grammar_validity')


# -----------------------------------------------------------------------------
# baselines

def _context_keys(tokens, positions, k):
    """Integer key of the k tokens before each position (oldest in the highest bits)."""
    key = np.zeros(len(positions), dtype=np.int64)
    for j in range(k, 0, -1):
        key = (key << KEY_BITS) | tokens[positions - j]
    return key


class NGramModel:
    """Interpolated Witten-Bell n-gram over the token vocabulary, down to an add-one unigram.

    P(w|h) = (c(h,w) + T(h) * P(w|h')) / (c(h) + T(h)), where h' drops h's oldest token, c counts training
    occurrences and T(h) is the number of distinct tokens seen after h; an unseen h passes P(w|h') on unchanged.
    Every level is a normalised distribution over all NUM_TOKENS ids because the add-one unigram is, so the
    NLL is a real one (stupid backoff would not be). order=1 is the unigram alone.
    """

    def __init__(self, sequences, order=5):
        if order < 1 or order > 64 // KEY_BITS:
            raise ValueError(f'n-gram order must be 1..{64 // KEY_BITS}, got {order}')
        self.order = order
        tokens, targets, context_lengths = flatten(sequences)
        counts = np.bincount(tokens[targets], minlength=NUM_TOKENS)
        self.unigram = (counts + 1.0) / (counts.sum() + NUM_TOKENS)
        self.tables = []  # per context length k: sorted (h,w) keys and counts, sorted h keys, c(h), T(h)
        for k in range(1, order):
            pos = targets[context_lengths >= k]
            hw = (_context_keys(tokens, pos, k) << KEY_BITS) | tokens[pos]
            hw_keys, hw_counts = np.unique(hw, return_counts=True)
            h_keys, first = np.unique(hw_keys >> KEY_BITS, return_index=True)
            h_counts = np.add.reduceat(hw_counts, first) if len(first) else np.zeros(0, np.int64)
            h_types = np.diff(np.append(first, len(hw_keys)))
            self.tables.append((hw_keys, hw_counts, h_keys, h_counts, h_types))

    def probabilities(self, tokens, positions, context_lengths):
        """P(tokens[p] | up to context_lengths[p] tokens before p), for every p in positions."""
        tokens = tokens.astype(np.int64)
        p = self.unigram[tokens[positions]]
        for k, (hw_keys, hw_counts, h_keys, h_counts, h_types) in enumerate(self.tables, start=1):
            use = context_lengths >= k
            if not use.any():
                break
            pos = positions[use]
            h = _context_keys(tokens, pos, k)
            c_hw = _lookup(hw_keys, hw_counts, (h << KEY_BITS) | tokens[pos])
            c_h = _lookup(h_keys, h_counts, h)
            t_h = _lookup(h_keys, h_types, h)
            seen = c_h > 0
            lower = p[use]
            p[use] = np.where(seen, (c_hw + t_h * lower) / np.maximum(c_h + t_h, 1), lower)
        return p


def flatten(sequences):
    """Sequences end to end: (tokens, positions of the predicted tokens (all but each sequence's first), how many
    tokens of its own sequence precede each of them). Contexts are cut there, never crossing into the previous
    sequence."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if not len(sequences):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    tokens = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    before = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    targets = np.flatnonzero(before > 0)
    return tokens, targets, before[targets]


def _lookup(keys, values, query):
    """values[keys == query] per query, 0 where the key is absent (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(len(query))
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0).astype(np.float64)


def window_targets(dataset):
    """The windows of a dataset end to end: (tokens, target positions, context length available to each target).

    A target's context is capped at its position inside its window, the tokens the model sees. Pad targets are
    dropped, as the model's loss drops them."""
    heads = getattr(dataset, 'heads', False)  # a window's head is no token of it
    tokens, targets, context_lengths = flatten([split_head(dataset[i][None], heads)[1][0].numpy()
                                                for i in range(len(dataset))])
    keep = tokens[targets] != PAD_IDX
    return tokens, targets[keep], context_lengths[keep]


def nll_of(probabilities):
    return float(-np.log(probabilities).mean()) if len(probabilities) else float('nan')


# -----------------------------------------------------------------------------
# per-target NLL and bits per note

@torch.no_grad()
def target_nll(model, dataset, batch_size, machine, repeat_memory=0.0):
    """(-ln p, predicted exactly) of every target runtime.evaluate_split scores: a float64 and a bool numpy array
    in window_targets(dataset)'s order (windows in order, positions in order, pad dropped), so they line up with
    the baselines' targets; their means are evaluate_split's loss and accuracy. With repeat_memory, p is the
    model's distribution mixed with the window's own repeats as sampling mixes it (repeat_mix), at that strength.

    Logits and per-token losses stay float32 on the device (MPS has no float64); only the CPU copy is widened,
    so sums over a whole split add no rounding of their own.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, generator=torch.Generator())
    parts, hits = [], []
    for x in loader:
        head, x = split_head(x.to(machine.device), getattr(dataset, 'heads', False))
        inputs, targets = x[:, :-1], x[:, 1:]
        with machine.autocast():
            logits = model.net(inputs, head=head)
        logits = logits.float()  # as the wrapper's loss: log-softmax in float32 also under bf16 autocast
        if repeat_memory:
            logits = with_repeat_memory(logits, inputs, repeat_memory)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction='none')
        counted = targets.reshape(-1) != PAD_IDX
        parts.append(nll[counted].cpu().numpy().astype(np.float64))
        hits.append((logits.argmax(-1).reshape(-1) == targets.reshape(-1))[counted].cpu().numpy())
    model.train(was_training)
    if not parts:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(parts), np.concatenate(hits)


def held_out_ends(model, val_seqs, machine, heads=False):
    """Where the model ends real tunes: for each held-out tune that one window holds with the next start token after
    it, (its index in val_seqs, the start token's probability after its last note, the start token's probability
    summed after its other notes: the ends the model would draw before the tune's own). Read unguided, each tune from
    its start token, as the NLL pass reads it; a tune_length model is told nothing of the tune's length, as a tune
    generated without --seconds."""
    window = model.net.max_seq_len
    fits = [i for i, s in enumerate(val_seqs) if len(s) <= window]  # the tune and the start token after it
    tunes = [val_seqs[i] for i in fits]
    dataset = MIDI_Dataset(tunes, window, rand_start=False, end_token=START_IDX, heads=heads)
    was_training = model.training
    model.eval()
    ends = []
    # rows of one length: padding would change what a tune_clock or tune_length model reads
    for rows in same_length_batches(tunes):
        head, x = split_head(torch.stack([dataset[r] for r in rows]).to(machine.device), heads)
        inputs = x[:, :-1]
        untold = torch.full((len(rows),), -1, device=x.device) if model.net.tune_length else None
        with torch.no_grad(), machine.autocast():
            logits = model.net(inputs, head=head, length=untold)
        p_end = logits.float().log_softmax(-1)[..., START_IDX].exp().cpu().numpy().astype(np.float64)
        after_note = is_pitch(inputs).cpu().numpy()
        last = inputs.shape[1] - 1  # the input position of each tune's last token; its target: the end
        ends += [(fits[r], float(p_end[b, last]), float(p_end[b, :last][after_note[b, :last]].sum()))
                 for b, r in enumerate(rows)]
    model.train(was_training)
    return sorted(ends)


def with_repeat_memory(logits, inputs, strength):
    """Log-probabilities (b, n, num_tokens) of the model's logits mixed at every position with the repeats of the
    inputs (b, n) up to it, as generation that stops at a tune's end mixes them one token at a time (the start
    token, a tune's end, keeps its probability)."""
    probs = logits.softmax(dim=-1)
    match = torch.zeros_like(inputs[:, :0])
    mixed = [repeat_mix(probs[:, 0], inputs[:, :1], match, strength, keep=START_IDX)]
    for length in range(2, inputs.shape[1] + 1):
        match = extend_match(match, inputs[:, :length])
        mixed.append(repeat_mix(probs[:, length - 1], inputs[:, :length], match, strength, keep=START_IDX))
    return torch.stack(mixed, dim=1).log()


def copy_test(model, sequences, batch_size, machine, length=COPY_TOKENS):
    """Can the model copy? The NLL of held-out tunes' first `length` tokens, and of the same tokens played again
    right after them, over the second half of the repeat (its start follows the tune's end oddly). A model that
    has learned to repeat what it heard gets near 0 there; one that has not stays near the first figure."""
    length = min(length, (model.net.max_seq_len - 1) // 2)
    bodies = [[int(t) for t in s if int(t) != START_IDX][:length] for s in sequences]
    rows = [torch.tensor([START_IDX] + body + body) for body in bodies if len(body) == length]
    if not rows or length < 2:
        return {'tokens': length, 'pieces': 0}
    nll = target_nll(model, rows, batch_size, machine)[0].reshape(len(rows), 2 * length)
    return {'tokens': length, 'pieces': len(rows), 'first_nll': float(nll[:, :length].mean()),
            'repeat_nll': float(nll[:, length + length // 2:].mean())}


def bits_per_note(tokens, positions, nll):
    """{'total', 'pitch', 'timing'}: -log2 p summed over the targets (all of them; pitch tokens; time-delta and
    duration tokens) and divided by the number of notes scored, a note counting when its pitch token is a target.

    A note is [time delta, duration, pitch], so total = pitch + timing on tokenized music; a window that cuts a
    note scores only the part of it inside the window, which is why notes are counted by pitch token alone.
    """
    targets = tokens[positions]
    pitch = is_pitch(targets)
    timing = (targets >= TIME_OFFSET) & (targets < PITCH_OFFSET)
    notes = int(pitch.sum())
    per_note = lambda mask: float(nll[mask].sum() / notes / math.log(2)) if notes else float('nan')
    return {'total': per_note(np.ones(len(nll), dtype=bool)), 'pitch': per_note(pitch), 'timing': per_note(timing)}


# -----------------------------------------------------------------------------
# musical statistics of one piece: notes are [start_step, duration_steps, pitch] as tokens_to_notes gives them

def pitch_range(notes):
    pitches = [n[2] for n in notes]
    return float(max(pitches) - min(pitches))


def pitch_class_entropy(notes):
    """Shannon entropy in bits of the piece's pitch-class distribution (log2(7) for a once-through major scale)."""
    counts = np.bincount([n[2] % 12 for n in notes], minlength=12)
    share = counts[counts > 0] / counts.sum()
    return float(-(share * np.log2(share)).sum())


def scale_consistency(notes):
    """Share of the piece's notes inside its best-fitting major / natural-minor scale."""
    counts = np.bincount([n[2] % 12 for n in notes], minlength=12)
    return float((DIATONIC_SETS @ counts).max() / counts.sum())


def notes_per_second(notes, step_seconds):
    """Notes over the time from the first onset to the last note's end."""
    span = max(n[0] + n[1] for n in notes) - notes[0][0]
    return len(notes) / (span * step_seconds)


def onsets_on_grid(notes, settings, tempo_bpm):
    """Share of onsets on a 16th or 8th-triplet line (the rule in the module docstring)."""
    starts = np.array([n[0] for n in notes], dtype=np.int64) - notes[0][0]
    if settings['timing'] == 'beats':
        division = settings['beat_division']
        return float(((starts * 4 % division == 0) | (starts * 3 % division == 0)).mean())
    beat_ms = 60_000.0 / tempo_bpm
    onset_ms = starts * settings['timing_factor']
    on_grid = np.zeros(len(starts), dtype=bool)
    for lines_per_beat in (4, 3):
        spacing = beat_ms / lines_per_beat
        off = np.abs(onset_ms - np.round(onset_ms / spacing) * spacing)
        on_grid |= off <= GRID_TOLERANCE_MS
    return float(on_grid.mean())


def duration_histogram(pieces):
    """Normalised histogram of duration steps (0-127) over the notes of all pieces."""
    steps = [int(n[1]) for notes in pieces for n in notes]  # tokens_to_notes's 0.5 for a zero step -> 0
    counts = np.bincount(steps, minlength=DUR_OFFSET - TIME_OFFSET).astype(np.float64)
    return counts / max(counts.sum(), 1)


def total_variation(p, q):
    return float(0.5 * np.abs(p - q).sum())


GRAMMAR = grammar_table()


def grammar_validity(tokens):
    """Share of tokens that may follow the token before them in the pattern [time] duration pitch (dataset's
    grammar_table): the start and pad tokens and ids no note carries (768-833) are violations, and after a broken
    token a time or duration may begin the next note. A conditioning header right after a start token is what was
    asked, not a note: its ids are not judged, and a note may begin after it. A sequence without its start token
    is judged as if it had one."""
    tokens = torch.as_tensor([int(t) for t in tokens], dtype=torch.long)
    if len(tokens) and tokens[0] != START_IDX:
        tokens = torch.cat([torch.tensor([START_IDX]), tokens])
    if len(tokens) < 2:
        return float('nan')
    heading = condition.is_header(tokens)  # before the ids outside the vocabulary are replaced
    # an id outside the vocabulary reads as PITCH_END, an id no note carries: never allowed, a note may begin after it
    tokens = tokens.masked_fill((tokens < 0) | (tokens >= NUM_TOKENS), PITCH_END)
    # header ids count as the header only in a run right after a start token: elsewhere they are broken notes. The
    # token before each run is the last non-header one (tokens[0] is a start token, never a header id)
    positions = torch.arange(len(tokens))
    before_run = torch.cummax(torch.where(heading, 0, positions), dim=0).values
    header = heading & (tokens[before_run] == START_IDX)
    return GRAMMAR[tokens[:-1], tokens[1:]][~header[1:]].float().mean().item()


def music_statistics(token_sequences, settings, tempo_bpm):
    """Per-piece statistics averaged over pieces with at least two notes, grammar validity over all tokens."""
    # drum keys are no pitches: tracks='parts' pieces are judged on their pitched notes
    pieces = [[note[:3] for note in tokens_to_notes(t, roles=True) if note[3] != 'drums'] for t in token_sequences]
    pieces = [p for p in pieces if len(p) >= 2]
    step_seconds = seconds_per_step(settings, tempo_bpm)
    per_piece = {'pitch_range': pitch_range, 'pitch_class_entropy': pitch_class_entropy,
                 'scale_consistency': scale_consistency,
                 'notes_per_second': lambda n: notes_per_second(n, step_seconds),
                 'onsets_on_grid': lambda n: onsets_on_grid(n, settings, tempo_bpm)}
    stats = {name: float(np.mean([fn(p) for p in pieces])) if pieces else float('nan')
             for name, fn in per_piece.items()}
    judged = [(grammar_validity(t), len(t)) for t in token_sequences if len(t)]
    stats['grammar_validity'] = float(np.average([g for g, _ in judged], weights=[n for _, n in judged])) \
        if judged else float('nan')
    stats['pieces'] = len(pieces)
    stats['notes'] = sum(len(p) for p in pieces)
    return stats, duration_histogram(pieces)


# -----------------------------------------------------------------------------
# classifier two-sample test: can a classifier tell generated pieces from held-out ones?

C2ST_FOLDS = 5              # stratified folds of the cross-validated accuracy
C2ST_CONTROL_SPLITS = 5     # random halvings of the held-out pieces the control averages over
C2ST_MIN_PIECES = 4 * C2ST_FOLDS  # pieces a side needs: the control's halves then hold 2 per class and fold
MAX_INTERVAL = 12           # melodic intervals are counted one bin a semitone up to an octave either way
# log2 of a ratio of successive time spans, binned around the ratios rhythms use: 1/4 or less, 1/3, 1/2, 2/3 and
# 3/4, equal, 4/3 and 3/2, 2, 3, 4 or more (edges symmetric, so a rhythm and its reverse fill mirrored bins)
RATIO_EDGES = np.array([-2.5, -1.25, -0.75, -0.2, 0.2, 0.75, 1.25, 2.5])
FEATURE_GROUPS = (  # (name, number of features) in piece_features's order; nothing reads absolute pitch or tempo
    ('intervals', 2 * MAX_INTERVAL + 3),        # shares of melodic intervals -12..12, plus 'larger' each way
    ('ioi_ratios', len(RATIO_EDGES) + 2),       # shares of log2(IOI[i+1] / IOI[i]) bins, plus 'a zero IOI' (chord)
    ('duration_ratios', len(RATIO_EDGES) + 1),  # shares of log2(duration[i+1] / duration[i]) bins
    ('articulation', 3),    # legato share (duration >= next IOI), mean duration / IOI (clipped at 2), rest share
    ('scale_fit', 1),       # share of notes inside the best major / natural-minor scale
    ('key_profile', 12),    # pitch-class shares rotated so index 0 is the tonic of the best-fitting major scale
    ('contour', 4),         # up, down and repeat shares of the steps; direction changes per note
    ('repetition', 1),      # share of 4-note patterns (3 intervals + 3 IOIs) that occurred earlier in the piece
    ('pitch_range', 1),     # highest minus lowest pitch in semitones
    ('interval_entropy', 1),  # Shannon entropy (bits) of the interval histogram
)


def first_notes(tokens, count):
    """The first `count` notes [start_step, duration_steps, pitch] of a token sequence; None when it has fewer."""
    notes = tokens_to_notes(tokens)
    return notes[:count] if len(notes) >= count else None


def rest_share(start, duration):
    """Share of the time from the first onset to the last note's end in which no note sounds."""
    end = np.maximum.accumulate(start + duration)  # notes come sorted by start
    span = end[-1] - start[0]
    gaps = np.maximum(start[1:] - end[:-1], 0).sum()
    return float(gaps / span) if span > 0 else 0.0


def earlier_repeats(steps, ioi, size=3, tolerance=1):
    """For each pattern of `size` intervals and the `size` IOIs between its notes (size + 1 notes), how many notes
    back the nearest earlier occurrence of it starts; 0 where it is new.

    IOIs match within `tolerance` steps: a tokenizer floors onsets to whole steps, so a rhythm of equal notes
    62.5 steps apart reads 63 62 63 62 ..., and its repeat may start on the other phase. Exact IOIs would count
    that as no repeat, and so would depend on the tempo, which the features must not.
    """
    back = np.zeros(max(len(steps) - size + 1, 0), dtype=np.int64)
    seen = {}  # intervals of a pattern -> where patterns with those intervals start
    for i in range(len(back)):
        key = tuple(steps[i:i + size].tolist())
        for j in reversed(seen.get(key, ())):
            if np.abs(ioi[i:i + size] - ioi[j:j + size]).max() <= tolerance:
                back[i] = i - j
                break
        seen.setdefault(key, []).append(i)
    return back


def repeated_patterns(steps, ioi, tolerance=1):
    """How many 4-note patterns (3 intervals and the 3 IOIs between them) occurred earlier in the piece."""
    return int((earlier_repeats(steps, ioi, 3, tolerance) > 0).sum())


def scale_root(counts):
    """The root of the major scale that holds most of the pitch-class counts; among equally good scales the one
    whose rotation of counts reads largest, a choice that moves with a transposition."""
    fit = DIATONIC_SETS @ counts
    return max(np.flatnonzero(fit == fit.max()), key=lambda root: tuple(np.roll(counts, -root)))


def piece_features(notes):
    """One vector per piece, laid out as FEATURE_GROUPS says. Intervals, ratios of time spans and shares only:
    transposing a piece or scaling all its times by one factor gives the same vector."""
    notes = np.asarray(notes, dtype=np.float64)
    start, duration, pitch = notes[:, 0], notes[:, 1], notes[:, 2].astype(np.int64)
    steps, ioi = np.diff(pitch), np.diff(start)
    share = lambda count, total: np.asarray(count, dtype=np.float64) / max(total, 1)

    clipped = np.clip(steps, -MAX_INTERVAL - 1, MAX_INTERVAL + 1) + MAX_INTERVAL + 1
    intervals = share(np.bincount(clipped, minlength=2 * MAX_INTERVAL + 3), len(steps))

    # a zero IOI (a chord) has no ratio: such pairs get a bin of their own
    before, after = ioi[:-1], ioi[1:]
    both = (before > 0) & (after > 0)
    ioi_bins = np.bincount(np.digitize(np.log2(after[both] / before[both]), RATIO_EDGES),
                           minlength=len(RATIO_EDGES) + 1)
    ioi_ratios = share(np.append(ioi_bins, (~both).sum()), len(before))
    # tokens_to_notes gives a zero-step note half a step, so every duration is positive
    duration_ratios = share(np.bincount(np.digitize(np.log2(duration[1:] / duration[:-1]), RATIO_EDGES),
                                        minlength=len(RATIO_EDGES) + 1), len(steps))

    moving = ioi > 0
    held = duration[:-1][moving] / ioi[moving]
    articulation = [share((held >= 1).sum(), len(held)), float(np.minimum(held, 2).mean()) if len(held) else 0.0,
                    rest_share(start, duration)]

    counts = np.bincount(pitch % 12, minlength=12)
    fit = DIATONIC_SETS @ counts
    profile = np.roll(counts, -scale_root(counts))

    signs = np.sign(steps[steps != 0])
    contour = [share((steps > 0).sum(), len(steps)), share((steps < 0).sum(), len(steps)),
               share((steps == 0).sum(), len(steps)), share((signs[1:] != signs[:-1]).sum(), len(notes))]

    repeats = repeated_patterns(steps, ioi)

    used = intervals[intervals > 0]
    return np.concatenate([intervals, ioi_ratios, duration_ratios, articulation, [fit.max() / len(notes)],
                           share(profile, len(notes)), contour, [share(repeats, len(notes) - 3)],
                           [pitch.max() - pitch.min()], [-(used * np.log2(used)).sum()]]).astype(np.float64)


WHOLE_TUNE_GROUPS = (  # (name, number of features) in whole_tune_features's order; invariant as FEATURE_GROUPS
    ('length', 2),          # notes (log2); time from the first onset to the last note's end in median IOIs (log2)
    # the last and the one-before-last note's pitch class relative to the root of the tune's best major scale (as
    # key_profile's index 0; a minor tune's tonic is 9), the last interval (semitones / 12, clipped to an octave),
    # the last note's duration over the median duration (log2), and whether it is the tune's longest
    ('ending', 12 + 12 + 3),
    ('opening', 12),        # the first note's pitch class relative to that root
    # shares of the 4-, 8- and 16-note patterns that occurred earlier in the tune (as 'repetition'), the share of
    # notes inside a repeated 8-note pattern, and how far back the repeats of 8-note patterns reach (notes back
    # over the tune's notes, averaged over the repeats)
    ('phrase_repetition', 5),
    ('halves', 2),          # total variation distance of the interval shares, and of the pitch-class shares, of
                            # the tune's first half against its second
) + tuple((f'whole_{name}', size) for name, size in FEATURE_GROUPS)  # the first-notes features over the whole tune
PHRASE_SIZES = (3, 7, 15)   # intervals of the 4-, 8- and 16-note patterns phrase_repetition counts


def whole_tune_features(notes):
    """One vector per tune, laid out as WHOLE_TUNE_GROUPS says: the tune's length, ending, opening, phrase
    repetition and how its halves differ, then piece_features of all its notes. Invariant under transposition and
    a change of tempo, as piece_features is."""
    notes = np.asarray(notes, dtype=np.float64)
    start, duration, pitch = notes[:, 0], notes[:, 1], notes[:, 2].astype(np.int64)
    steps, ioi = np.diff(pitch), np.diff(start)
    moving = ioi[ioi > 0]
    unit = float(np.median(moving)) if len(moving) else 1.0
    length = [np.log2(len(notes)), np.log2(max((start + duration).max() - start[0], unit) / unit)]

    root = scale_root(np.bincount(pitch % 12, minlength=12))
    degree = lambda p: np.eye(12)[(p - root) % 12]
    ending = np.concatenate([degree(pitch[-1]), degree(pitch[-2]),
                             [np.clip(steps[-1], -12, 12) / 12, np.clip(np.log2(duration[-1] / np.median(duration)),
                                                                        -4, 4), float(duration[-1] >= duration.max())]])

    repeats = [earlier_repeats(steps, ioi, size) for size in PHRASE_SIZES]
    shares = [float((back > 0).mean()) if len(back) else 0.0 for back in repeats]
    phrase = repeats[1]
    covered = np.zeros(len(notes), dtype=bool)
    for i in np.flatnonzero(phrase):
        covered[i:i + PHRASE_SIZES[1] + 1] = True
    reach = float(phrase[phrase > 0].mean() / len(notes)) if (phrase > 0).any() else 0.0

    half = len(notes) // 2
    histogram = lambda values, bins: np.bincount(values, minlength=bins) / max(len(values), 1)
    interval_bins = lambda part: histogram(np.clip(part, -MAX_INTERVAL - 1, MAX_INTERVAL + 1) + MAX_INTERVAL + 1,
                                           2 * MAX_INTERVAL + 3)
    halves = [total_variation(interval_bins(np.diff(pitch[:half])), interval_bins(np.diff(pitch[half:]))),
              total_variation(histogram(pitch[:half] % 12, 12), histogram(pitch[half:] % 12, 12))]
    return np.concatenate([length, ending, degree(pitch[0]), shares, [covered.mean(), reach], halves,
                           piece_features(notes)]).astype(np.float64)


# the two C2STs: (features of one piece, their groups, the group whose first column is the repetition share, goal)
C2ST_KINDS = {'first_notes': (piece_features, FEATURE_GROUPS, 'repetition', GOAL_C2ST_POINTS),
              'whole_tune': (whole_tune_features, WHOLE_TUNE_GROUPS, 'phrase_repetition', GOAL_WHOLE_TUNE_C2ST_POINTS)}


def feature_columns(groups=FEATURE_GROUPS):
    """{group name: the column indices of the feature vector (piece_features's by default) that hold it}."""
    ends = np.cumsum([size for _, size in groups])
    return {name: np.arange(end - size, end) for (name, size), end in zip(groups, ends)}


def c2st_accuracy(features_a, features_b, seed=0, importance=False, groups=FEATURE_GROUPS):
    """Cross-validated accuracy of telling feature rows a from rows b, for a linear and a boosted-tree model.

    The larger side is subsampled to the smaller one's count, so 50% is chance. With importance, also how much
    the boosted model's test accuracy drops when one feature group is shuffled across the test rows (the group's
    columns together), averaged over folds and 3 shuffles: the groups (of `groups`) that give side a away.
    """
    sk = sklearn_parts()
    rng = np.random.default_rng(seed)
    per_class = min(len(features_a), len(features_b))
    if per_class < C2ST_FOLDS:
        raise ValueError(f'the C2ST needs at least {C2ST_FOLDS} pieces a side, got {per_class}')
    a = features_a[rng.choice(len(features_a), per_class, replace=False)]
    b = features_b[rng.choice(len(features_b), per_class, replace=False)]
    x, y = np.vstack([a, b]), np.repeat([1, 0], per_class)
    linear, boosted = [], []
    columns_of = feature_columns(groups)
    drops = dict.fromkeys(columns_of, 0.0)
    # one thread: a few hundred rows are less work than waking OpenMP threads, and threads that spin-wait for a
    # core another process holds (a training run beside us) slow every boosted fit several times over
    with sk.threadpool_limits(1):
        for train, test in sk.folds(C2ST_FOLDS, shuffle=True, random_state=seed).split(x, y):
            model = sk.pipeline(sk.scaler(), sk.logistic(max_iter=5000)).fit(x[train], y[train])
            linear.append(model.score(x[test], y[test]))
            model = sk.boosted(random_state=seed).fit(x[train], y[train])
            boosted.append(model.score(x[test], y[test]))
            for name, columns in (columns_of.items() if importance else ()):
                for _ in range(3):
                    shuffled = x[test].copy()
                    shuffled[:, columns] = shuffled[rng.permutation(len(test))][:, columns]
                    drops[name] += (boosted[-1] - model.score(shuffled, y[test])) / (3 * C2ST_FOLDS)
    result = {'linear': float(np.mean(linear)), 'boosted': float(np.mean(boosted)), 'pieces_per_class': per_class}
    if importance:
        result['giveaways'] = sorted(([name, float(d)] for name, d in drops.items()), key=lambda g: -g[1])
    return result


def classifier_two_sample_test(generated, held_out, seed=0, kind='first_notes', goal=None):
    """C2ST of generated pieces (note lists) against held-out ones, and the control: held-out against held-out,
    split into two random halves (the mean over C2ST_CONTROL_SPLITS splits). kind (C2ST_KINDS) names the features:
    'first_notes' (piece_features) or 'whole_tune' (whole_tune_features). 'giveaways' lists the feature groups
    by the boosted model's accuracy drop; 'repetition' is the mean share of repeated 4-note patterns per side.
    goal: the most the boosted accuracy may stand above the control's (None: the kind's)."""
    features, groups, repetition_group, kind_goal = C2ST_KINDS[kind]
    goal = kind_goal if goal is None else goal
    generated = np.array([features(p) for p in generated])
    held_out = np.array([features(p) for p in held_out])
    rng, half = np.random.default_rng(seed), len(held_out) // 2
    # one split's halves hold half the pieces, so its accuracy wanders several points: average a few splits
    splits = [rng.permutation(len(held_out)) for _ in range(C2ST_CONTROL_SPLITS)]
    runs = [c2st_accuracy(held_out[order[:half]], held_out[order[half:2 * half]], seed + i, groups=groups)
            for i, order in enumerate(splits)]
    control = {key: float(np.mean([r[key] for r in runs])) for key in ('linear', 'boosted')}
    control.update(pieces_per_class=runs[0]['pieces_per_class'], splits=len(runs))
    test = c2st_accuracy(generated, held_out, seed, importance=True, groups=groups)
    giveaways = test.pop('giveaways')
    column = feature_columns(groups)[repetition_group][0]
    repetition = {'generated': float(generated[:, column].mean()), 'held_out': float(held_out[:, column].mean())}
    return {'generated_vs_held_out': test, 'control': control, 'giveaways': giveaways, 'repetition': repetition,
            'goal_points': 100 * goal, 'within_goal': bool(test['boosted'] <= control['boosted'] + goal)}


# -----------------------------------------------------------------------------
# whole tunes: does the model end its tunes, at their length, on their tonic?

GOAL_TUNE_NOTES = 0.15      # median notes of a generated tune within 15% of a held-out tune's
GOAL_TONIC_POINTS = 0.10    # share of tunes ending on their key's tonic within 10 points of the held-out share


def final_pitch_class(tokens):
    """Pitch class of a tune's last note (the lowest of its last onset, the bass of a final chord; drums left out),
    None for a tune without notes."""
    return last_onset_pitch_class(pitched_notes(tokens))


def last_onset_pitch_class(notes):
    """Pitch class of the lowest of the notes ([start, duration, pitch, ...]) starting last; None without notes."""
    if not notes:
        return None
    last = max(note[0] for note in notes)
    return min(note[2] for note in notes if note[0] == last) % 12


def ends_on_tonic(tokens, key):
    """Whether a tune in key ('D major') ends on its tonic; None without notes or key."""
    final = final_pitch_class(tokens)
    if final is None or not key:
        return None
    return final == tonic_pitch_class(key)


def tonic_pitch_class(key):
    tonic, mode = key.split()
    return condition.TONIC_NAMES[mode].index(tonic)


# whole tunes are sampled with the grammar that lets a start token (the next tune's) follow a note: a tune ends
# where the model draws it
TUNE_GRAMMAR = grammar_table(ends=True)


def same_length_batches(prompts):
    """Lists of indices into prompts, each of prompts of one length and at most GENERATE_BATCH of them: rows that
    are sampled together."""
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    return [rows[first:first + GENERATE_BATCH] for _, rows in sorted(by_length.items())
            for first in range(0, len(rows), GENERATE_BATCH)]


def generate_tunes(model, machine, prompts, max_length, temperature, top_p, top_k, constrained=True,
                   repeat_memory=0.0, guidance=1.0, lengths=None, voice_leading=False, end_guidance=None):
    """One tune per prompt (a list of token lists), each ended where the model draws the next start token or cut at
    max_length new tokens; returns (tunes without that start token, whether each ended). Prompts of one length
    are sampled together, GENERATE_BATCH at a time; guidance: classifier-free guidance against each prompt without its
    header, end_guidance that of the draw that ends a tune (None: as guidance); lengths: the time steps each tune is
    asked to last (a tune_length model), or None; voice_leading: sampled with voice_leading.VoiceLeading (a
    tracks='parts' model)."""
    allowed_next = TUNE_GRAMMAR if constrained else None
    tunes, ended = [None] * len(prompts), [False] * len(prompts)
    for batch in same_length_batches(prompts):
        length = len(prompts[batch[0]])
        prompt = torch.tensor([prompts[i] for i in batch], device=machine.device)
        net, autocast = generation_model(model, machine, batch=len(batch))
        with autocast:
            out = net.generate(prompt, max_length, temperature=temperature, top_p=top_p, top_k=top_k,
                               allowed_next=allowed_next, repeat_memory=repeat_memory, return_prime=True,
                               eos_token=START_IDX, static_cache=graphed_decoding(machine), guidance=guidance,
                               end_guidance=end_guidance, unconditioned=condition.without_header(prompt),
                               constrain=VoiceLeading(len(batch)) if voice_leading else None,
                               length=None if lengths is None else torch.tensor([lengths[i] for i in batch],
                                                                               device=machine.device))
        out = out.cpu().tolist()
        for i, row in zip(batch, out):
            tunes[i] = [t for t in until_tune_end(row, length) if t != PAD_IDX]
            ended[i] = START_IDX in row[length:]
    return tunes, ended


def ends_summary(ends):
    """held_out_ends' rows -> their tunes and mean probabilities (None for no tune)."""
    mean = lambda values: float(np.mean(values)) if values else None
    return {'tunes': len(ends), 'after_last_note': mean([e[1] for e in ends]),
            'after_other_notes': mean([e[2] for e in ends])}


def whole_tune_section(tunes, ended, asked, val_seqs, styles, max_length, window=None, ends=None):
    """Whole tunes (token lists, each with whether the model ended it, and the labels it was asked for) against
    the held-out tunes: the median number of notes, and, where keys are known (a conditioned model, styles not
    None: the asked key, and each held-out tune's own from its header), the share that end on the tonic, also
    apart for the tunes of at most `window` tokens (the model's seq_len: its start token and header stay in view
    to its end) and the longer ones; and, for each style asked, the median notes of the tunes asked it, how many ran
    to max_length, and the median notes of the held-out tunes of that style. ends (held_out_ends' rows): where the
    model ends the held-out tunes, in all and by style."""
    conditioned = styles is not None
    notes = lambda seqs: [int(is_pitch(np.asarray(s, dtype=np.int64)).sum()) for s in seqs]
    gen_notes, held_notes = notes(tunes), notes(val_seqs)
    generated, held = float(np.median(gen_notes)), float(np.median(held_notes))
    relative = (generated - held) / held if held else float('nan')
    report = {'tunes': len(tunes), 'max_length': max_length, 'ended': float(np.mean(ended)),
              'median_notes': {'generated': generated, 'held_out': held, 'relative_difference': relative,
                               'within_goal': bool(abs(relative) <= GOAL_TUNE_NOTES)}}
    if ends is not None:
        report['held_out_ends'] = ends_summary(ends)
    if not conditioned:
        report['tonic_ending'] = {'skipped': 'the key of a tune generated without conditioning is not known'}
        return report
    labels = [condition.header_labels(s[1:4], styles) for s in val_seqs]
    median = lambda counts: float(np.median(counts)) if counts else None
    report['by_style'] = {}
    for style in sorted({a['style'] for a in asked if a.get('style')}):
        mine = [i for i, a in enumerate(asked) if a.get('style') == style]
        report['by_style'][style] = {
            'generated_tunes': len(mine), 'generated_median_notes': median([gen_notes[i] for i in mine]),
            'cut': sum(not ended[i] for i in mine),
            'held_out_median_notes': median([n for n, k in zip(held_notes, labels) if k.get('style') == style])}
        if ends is not None:
            report['by_style'][style]['held_out_ends'] = ends_summary([e for e in ends
                                                                       if labels[e[0]].get('style') == style])
    # (ends on the tonic, tokens) of each tune with a key and notes, read once for the share and for its split
    on_tonic = lambda pairs: [(e, len(t)) for e, t in ((ends_on_tonic(t, k.get('key')), t) for t, k in pairs)
                              if e is not None]
    gen, held_out = on_tonic(zip(tunes, asked)), on_tonic(zip(val_seqs, labels))
    if not gen or not held_out:
        report['tonic_ending'] = {'skipped': 'no tune asked for a key, or no held-out tune with a key signature'}
        return report
    share = lambda ends: float(np.mean(ends)) if ends else None
    kept = lambda ends, keep: [e for e, n in ends if keep(n)]
    gen_share, held_share = share([e for e, _ in gen]), share([e for e, _ in held_out])
    points = gen_share - held_share
    report['tonic_ending'] = {'generated': gen_share, 'held_out': held_share,
                              'generated_tunes': len(gen), 'held_out_tunes': len(held_out), 'points': points,
                              'within_goal': bool(abs(points) <= GOAL_TONIC_POINTS)}
    if window:
        report['tonic_ending']['by_length'] = {}
        for name, keep in (('in_window', lambda n: n <= window), ('past_window', lambda n: n > window)):
            gen_part, held_part = kept(gen, keep), kept(held_out, keep)
            report['tonic_ending']['by_length'][name] = {
                'generated': share(gen_part), 'generated_tunes': len(gen_part), 'held_out': share(held_part),
                'held_out_tunes': len(held_part)}
        report['tonic_ending']['window'] = window
    return report


STYLE_LINE_TUNES = 20  # the printed table lists the median notes of a style asked of at least this many tunes


def whole_tune_lines(whole):
    if 'skipped' in whole:
        return [f"whole tunes skipped: {whole['skipped']}"]
    n = whole['median_notes']
    lines = [f"whole tunes: {whole['tunes']} generated to their end (at most {whole['max_length']} tokens; "
             f"{whole['ended']:.0%} ended before that)",
             f"{'median notes':24s}{n['generated']:12.1f}{n['held_out']:12.1f}{n['relative_difference']:13.1%}"
             f"  {'ok' if n['within_goal'] else 'MISSED'} (within {GOAL_TUNE_NOTES:.0%})"]
    median = lambda value: '-' if value is None else f'{value:.1f}'
    ending = lambda e: ('' if not e or not e['tunes'] else
                        f"; held-out: end {e['after_last_note']:.2f} at theirs, {e['after_other_notes']:.2f} before")
    for style, part in sorted(whole.get('by_style', {}).items(), key=lambda item: -item[1]['generated_tunes']):
        if part['generated_tunes'] >= STYLE_LINE_TUNES:  # the styles asked often enough for a median to mean much
            lines.append(f"{'  asked ' + style:24s}{median(part['generated_median_notes']):>12s}"
                         f"{median(part['held_out_median_notes']):>12s}  ({part['generated_tunes']} tunes, "
                         f"{part['cut']} cut at {whole['max_length']} tokens{ending(part.get('held_out_ends'))})")
    ends = whole.get('held_out_ends')
    if ends and ends['tunes']:
        lines.append(f"the model's end on held-out tunes (unguided): {ends['after_last_note']:.3f} after the last "
                     f"note, {ends['after_other_notes']:.3f} summed after the others ({ends['tunes']} tunes a window "
                     f"holds)")
    tonic = whole['tonic_ending']
    if 'skipped' in tonic:
        return lines + [f'ending on the tonic: skipped ({tonic["skipped"]})']
    lines.append(f"{'ending on the tonic':24s}{tonic['generated']:12.3f}{tonic['held_out']:12.3f}"
                 f"{tonic['points'] * 100:+12.1f} pt  {'ok' if tonic['within_goal'] else 'MISSED'} "
                 f"(within {GOAL_TONIC_POINTS * 100:.0f} points; {tonic['generated_tunes']} generated and "
                 f"{tonic['held_out_tunes']} held-out tunes with a key)")
    show = lambda share: '-' if share is None else f'{share:.3f}'
    for name, part in tonic.get('by_length', {}).items():
        what = f"at most {tonic['window']} tokens" if name == 'in_window' else f"more than {tonic['window']} tokens"
        lines.append(f"{'  ' + what:24s}{show(part['generated']):>12s}{show(part['held_out']):>12s}"
                     f"  ({part['generated_tunes']} generated, {part['held_out_tunes']} held-out tunes)")
    return lines


# -----------------------------------------------------------------------------
# the report

def generate_pieces(model, machine, count, length, temperature, top_p, top_k, constrained=True, repeat_memory=0.0,
                    voice_leading=False, headers=None, guidance=1.0):
    """count pieces of length tokens sampled from the start token, GENERATE_BATCH at a time; (count, length).
    constrained: only tokens the token grammar allows after the one before, as generate.py samples; voice_leading:
    sampled with voice_leading.VoiceLeading (a tracks='parts' model); headers: a conditioning header (a list of
    ids) for each piece, put after its start token and left out of what is returned (pieces of one header length
    are sampled together); guidance: classifier-free guidance against the start token alone."""
    allowed_next = GRAMMAR if constrained else None
    prompts = [[START_IDX] + list(header) for header in headers or [[]] * count]
    batches = same_length_batches(prompts)
    pieces = np.zeros((count, length), dtype=np.int64)
    with GenerationProgress(None, length, batches=len(batches)) as progress:
        for batch in batches:
            prompt = torch.tensor([prompts[i] for i in batch], device=machine.device)
            net, autocast = generation_model(model, machine, batch=len(batch))  # the fastest path for so many rows
            with autocast:
                out = net.generate(prompt, length, temperature=temperature, top_p=top_p, top_k=top_k,
                                   allowed_next=allowed_next, repeat_memory=repeat_memory,
                                   on_token=progress, static_cache=graphed_decoding(machine),
                                   constrain=VoiceLeading(len(batch)) if voice_leading else None,
                                   guidance=guidance,
                                   unconditioned=condition.without_header(prompt) if guidance != 1 else None)
            pieces[batch] = out.cpu().numpy()
    return pieces


class WholeTunes:
    """generate_tunes(asked) -> one note list per label dict in asked: whole tunes, sampled as the report samples
    (generate_tunes), header(labels) after the start token (a conditioned model's header ids; without a header
    only {} may be asked).

    Where TUNE_GRAMMAR lets a start token follow a note, a tune runs to its own end, or to the longest held-out
    tune's length at the most; where it does not, each tune is cut at a length drawn from the held-out tunes' token
    counts (so length is no giveaway, and the ending is not the model's). .ends counts how the tunes of the last
    call ended; .token_tunes and .ended hold the last call's tunes as tokens (prompt included) and whether each ended.
    """

    def __init__(self, model, machine, sampling, held_out_lengths, seed, header=None):
        self.model, self.machine, self.sampling, self.header = model, machine, sampling, header
        self.lengths = np.asarray(held_out_lengths, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.can_end = bool(TUNE_GRAMMAR[PITCH_OFFSET, START_IDX])
        self.ends = {'by_the_model': 0, 'cut': 0}
        self.told = False  # whether the last call asked each tune a length

    def how_they_end(self):
        if self.can_end:
            told = ", each asked the length of a training tune of its style" if self.told else ''
            return (f'at the next start token the model draws{told}, cut at {int(self.lengths.max())} tokens at the '
                    f'most')
        return ("cut at a length drawn from the held-out tunes' token counts: this grammar lets no tune end by "
                "itself, so length and ending are not the model's")

    def __call__(self, asked, lengths=None):
        """lengths: the time steps each tune is asked to last (a tune_length model), or None."""
        self.told = lengths is not None
        if any(asked) and self.header is None:
            raise ValueError('labels asked of a model without conditioning')
        prompts = [[START_IDX] + (list(self.header(labels)) if self.header else []) for labels in asked]
        caps = (np.full(len(asked), self.lengths.max()) if self.can_end else
                self.rng.choice(self.lengths, len(asked)))
        tunes, ended = [None] * len(asked), [False] * len(asked)
        self.token_tunes = [None] * len(asked)
        # tunes of similar caps are sampled together, so a batch stops near its own tunes' end
        order = sorted(range(len(asked)), key=lambda i: caps[i])
        for first in range(0, len(order), GENERATE_BATCH):
            rows = order[first:first + GENERATE_BATCH]
            out, out_ended = generate_tunes(self.model, self.machine, [prompts[i] for i in rows],
                                            int(max(caps[i] for i in rows)), **self.sampling,
                                            lengths=None if lengths is None else [lengths[i] for i in rows])
            for i, tokens, end in zip(rows, out, out_ended):
                ended[i] = bool(end and len(tokens) - len(prompts[i]) < caps[i])
                self.token_tunes[i] = tokens[:len(prompts[i]) + caps[i]]
                tunes[i] = pitched_notes(self.token_tunes[i][len(prompts[i]):])
        self.ended = ended
        self.ends = {'by_the_model': sum(ended), 'cut': len(asked) - sum(ended)}
        return tunes


def pitched_notes(tokens):
    """[start_step, duration_steps, pitch] of a token sequence's pitched notes (drum keys are no pitches)."""
    return [note[:3] for note in tokens_to_notes(tokens, roles=True) if note[3] != 'drums']


def header_tokens(ckpt):
    """labels -> the header token ids a conditioned checkpoint reads after its start token (condition.header with
    the checkpoint's styles); None for a checkpoint without conditioning."""
    if not ckpt['tokenization'].get('condition'):
        return None
    from condition import header  # only a conditioned checkpoint needs the conditioning module
    styles = ckpt.get('styles') or []
    return lambda labels: header(labels, styles)


def start_model(checkpoint, device, dtype, ckpt=None):
    """(model on the machine, checkpoint, machine): by default at training's precision, the one behind the NLL
    training reported, where this machine has it. ckpt: the checkpoint's dict, where it is read already."""
    model, ckpt = load_model(checkpoint, 'cpu', ckpt)
    try:
        machine = start_machine(device, dtype or ckpt['args'].get('dtype', 'auto'))
    except DeviceError:
        if dtype:
            raise
        machine = start_machine(device, 'auto')
    return model.to(machine.device), ckpt, machine


def held_out_corpus(args, settings, data_path, cache_dir, log, styles=None):
    """(data folder, train sequences, validation sequences, corpus summary, (train names, validation names)) as
    the checkpoint's run split them (a conditioned checkpoint's headers with its own styles)."""
    path = resolve_data_path(data_path or args.data_path, log)
    train_seqs, val_seqs, summary, names = load_corpus(path, settings, cache_dir or args.cache_dir, args.min_notes,
                                                       args.val_fraction, styles=styles, with_names=True)
    if not val_seqs:
        raise DatasetError(f'{path} gives no validation files (val_fraction={args.val_fraction})')
    return path, train_seqs, val_seqs, summary, names


def model_section(model_target_nll, hits):
    """Part 1: the validation NLL, perplexity and accuracy, the figures training reported."""
    nll = float(model_target_nll.mean())
    return {'nll': nll, 'perplexity': math.exp(nll), 'accuracy': float(hits.mean())}


def repeat_memory_section(model, val_ds, targets, batch_size, machine, strength):
    """Part 1 for the distribution sampling draws from with a repeat memory: is the mix a better model of the data?"""
    memory = {'strength': strength}
    if strength:
        memory_target_nll, hits = target_nll(model, val_ds, batch_size, machine, strength)
        memory.update(nll=float(memory_target_nll.mean()), accuracy=float(hits.mean()),
                      bits_per_note=bits_per_note(targets[0], targets[1], memory_target_nll))
    return memory


def baselines_section(train_seqs, targets, ngram, model_target_nll):
    """Parts 2 and 4: the unigram and n-gram baselines on the model's targets, and bits per note of all three,
    with the model's margins over each baseline. (baselines, bits, {baseline name: -ln p of each target})"""
    tokens, positions, context = targets
    model_nll = float(model_target_nll.mean())
    bits = {'model': bits_per_note(tokens, positions, model_target_nll)}
    baselines, target_nlls = {}, {}
    for name, order in (('unigram', 1), (f'{ngram}-gram', ngram)):
        nll = -np.log(NGramModel(train_seqs, order).probabilities(tokens, positions, context))
        mean = float(nll.mean()) if len(nll) else float('nan')
        margin = (mean - model_nll) / mean
        baselines[name] = {'order': order, 'nll': mean, 'perplexity': math.exp(mean), 'model_margin': margin,
                           'model_within_goal': bool(margin >= GOAL_MARGIN)}
        bits[name] = bits_per_note(tokens, positions, nll)
        pitch_margin = (bits[name]['pitch'] - bits['model']['pitch']) / bits[name]['pitch']
        bits[name].update(model_pitch_margin=pitch_margin,
                          model_pitch_within_goal=bool(pitch_margin >= GOAL_PITCH_MARGIN))
        target_nlls[name] = nll
    return baselines, bits, target_nlls


def compared(generated, held_out, at_most_twice=False, at_most_above=None):
    """A statistic of generated music next to held-out music's: their relative difference, and whether it is
    within GOAL_RELATIVE (at_most_twice: whether generated is at most twice held-out; at_most_above: whether it is
    at most held-out + at_most_above). Held-out 0 has no relative difference (NaN, missed by the relative goal)
    unless generated is 0 too."""
    g, h = generated, held_out
    rel = (g - h) / h if h else 0.0 if g == h == 0 else float('nan')
    within = (g <= 2 * h if at_most_twice else g <= h + at_most_above if at_most_above is not None else
              abs(rel) <= GOAL_RELATIVE)
    return {'generated': g, 'held_out': h, 'relative_difference': rel, 'within_goal': bool(within)}


def music_section(generated, val_seqs, settings, tempo):
    """Part 3: each statistic of the generated pieces against the held-out ones, and the duration histograms'
    distance. (comparison, generated statistics and histogram, held-out statistics and histogram)"""
    gen_stats, gen_hist = music_statistics(list(generated), settings, tempo)
    held_stats, held_hist = music_statistics(val_seqs, settings, tempo)
    comparison = {name: compared(gen_stats[name], held_stats[name]) for name in STATISTICS}
    tv = total_variation(gen_hist, held_hist)
    comparison['duration_histogram_tv'] = {'generated': None, 'held_out': None, 'distance': tv,
                                           'within_goal': bool(tv <= GOAL_DURATION_TV)}
    return comparison, (gen_stats, gen_hist), (held_stats, held_hist)


def held_out_headers(val_seqs, count, seed):
    """count conditioning headers, each the one of a held-out tune drawn at random: a conditioned model's pieces
    are asked for labels as often as the held-out tunes carry them, and are compared with those tunes."""
    rng = np.random.default_rng(seed)
    headers = [condition.tune_header(s) for s in val_seqs]
    return [headers[i] for i in rng.integers(0, len(headers), count)]


def first_notes_goal(conditioned):
    return GOAL_CONDITIONED_C2ST_POINTS if conditioned else GOAL_C2ST_POINTS


def c2st_section(model, machine, val_seqs, sampling, pieces, notes, seed, timings, conditioned=False):
    """Part 5: the classifier two-sample test, or why it was skipped. Records its generation and test seconds.
    A conditioned model's pieces are each asked for the header of a held-out tune drawn at random."""
    clock = time.time()
    held_out = [p for p in (first_notes(s, notes) for s in val_seqs) if p is not None]
    # a note is at most 3 tokens (time delta, duration, pitch); half a note more each leaves room for slips
    length = math.ceil(3.5 * notes)
    report = {'notes': notes, 'length': length, 'held_out_pieces': len(val_seqs), 'held_out_used': len(held_out)}
    if len(held_out) < C2ST_MIN_PIECES:
        report['skipped'] = f'{len(held_out)} validation pieces hold {notes} notes; the test needs {C2ST_MIN_PIECES}'
    else:
        torch.manual_seed(seed + 1)  # its own stream: the pieces do not change with --num_samples
        headers = held_out_headers(val_seqs, pieces, seed + 1) if conditioned else None
        tokens_generated = generate_pieces(model, machine, pieces, length, **sampling, headers=headers)
        report['asked'] = "each piece a held-out tune's header" if conditioned else 'nothing (no conditioning)'
        timings['c2st_generate_s'] = time.time() - clock
        clock = time.time()
        generated = [p for p in (first_notes(t, notes) for t in tokens_generated) if p is not None]
        report.update(generated_pieces=pieces, generated_used=len(generated))
        if len(generated) < C2ST_MIN_PIECES:
            report['skipped'] = (f'{len(generated)} of {pieces} generated pieces hold {notes} notes in {length} '
                                 f'tokens; the test needs {C2ST_MIN_PIECES}')
        else:
            report.update(classifier_two_sample_test(generated, held_out, seed, goal=first_notes_goal(conditioned)))
    timings['c2st_s'] = time.time() - clock
    return report


def whole_tunes_section(model, machine, ckpt, path, names, val_seqs, sampling, tunes, labelled, seed, timings):
    """The whole tunes parts 7 and 8 judge: (asked labels, note lists, WholeTunes, the labels of every file or {}).
    A conditioned model is asked for the labels of validation tunes drawn at random (labels come as often as in
    real tunes; one its header cannot say is not asked), any other for nothing. A tune_length model whose run stored
    its training tunes' lengths is asked, as generate.py asks it unless told --seconds, the length of a training
    tune of the style asked (condition.drawn_lengths). labelled: read the labels anyway."""
    clock = time.time()
    header = header_tokens(ckpt)
    read = [names[0][i] for i in training_sample(len(names[0]), seed)] if labelled else []
    labels = corpus_labels(path, read + names[1]) if labelled or header else {}
    asked, lengths = [{}] * tunes, None
    if header:
        asked = asked_labels([labels.get(name, {}) for name in names[1]], tunes, seed,
                             can_ask=lambda label, value: header({label: value}))
    if model.net.tune_length and ckpt.get('tune_lengths'):  # asked a length as generate.py asks one by default
        lengths = condition.drawn_lengths(ckpt['tune_lengths'], [labels.get('style') for labels in asked],
                                          np.random.default_rng(seed + 3))
    generator = WholeTunes(model, machine, sampling, [len(s) for s in val_seqs], seed, header)
    torch.manual_seed(seed + 2)  # a stream of its own, as the 32-note test's
    generated = generator(asked, lengths) if tunes else None
    timings['whole_tunes_generate_s'] = time.time() - clock
    return asked, generated, generator, labels


def whole_tune_c2st_section(generated, generator, val_seqs, seed, timings):
    """Part 7: the classifier two-sample test over whole tunes, or why it was skipped."""
    clock = time.time()
    held_out = [notes for notes in (pitched_notes(s) for s in val_seqs) if len(notes) >= 2]
    used = [notes for notes in generated if len(notes) >= 2]
    report = {'held_out_pieces': len(val_seqs), 'held_out_used': len(held_out), 'ending': generator.how_they_end(),
              'generated_pieces': len(generated), 'generated_used': len(used), 'ends': dict(generator.ends),
              'median_notes': {'generated': float(np.median([len(t) for t in generated])),
                               'held_out': float(np.median([len(t) for t in held_out] or [0]))}}
    if min(len(held_out), len(used)) < C2ST_MIN_PIECES:
        report['skipped'] = (f'{len(used)} of {len(generated)} generated and {len(held_out)} validation tunes hold '
                             f'two notes; the test needs {C2ST_MIN_PIECES} a side')
    else:
        report.update(classifier_two_sample_test(used, held_out, seed, kind='whole_tune'))
    timings['c2st_whole_tune_s'] = time.time() - clock
    return report


def tonic_endings_by_reading(classifier, asked, tunes):
    """Of the tunes (note lists) asked for a key the classifier knows, the share that end on the asked key's tonic
    among those it reads as that key and among the others, each with its count (a share is None without tunes)."""
    rows = [i for i, labels in enumerate(asked) if labels.get('key') in classifier.classes and len(tunes[i]) >= 2]
    split = {'read_as_asked': [], 'read_otherwise': []}
    for i, read in zip(rows, classifier.predict([tunes[i] for i in rows])):
        key = asked[i]['key']
        on_tonic = last_onset_pitch_class(tunes[i]) == tonic_pitch_class(key)
        split['read_as_asked' if read == key else 'read_otherwise'].append(on_tonic)
    return {side: {'tunes': len(ends), 'share': float(np.mean(ends)) if ends else None} for side, ends in split.items()}


def adherence_section(labels, names, train_seqs, val_seqs, conditioned, asked, generated, seed, timings):
    """Part 8: the key, meter and style classifiers fitted on the training tunes' labels, their ceilings and their
    accuracy on the validation tunes; for a conditioned model's tunes (generated, each asked for the labels in
    asked), how often each label is read as asked."""
    clock = time.time()
    train_names, val_names = names
    val_labels = [labels.get(name, {}) for name in val_names]
    val_tunes = [pitched_notes(s) for s in val_seqs]
    picked = training_sample(len(train_seqs), seed)  # the training tunes whose labels whole_tunes_section read
    classifiers = fit_label_classifiers([pitched_notes(train_seqs[i]) for i in picked],
                                        [labels.get(train_names[i], {}) for i in picked], seed)
    report = {'classifiers': {}}
    for label, classifier in classifiers.items():
        report['classifiers'][label] = classifier.report()
        if not classifier.skipped:
            accuracy, tunes = classifier.accuracy(val_tunes, [tune_labels.get(label) for tune_labels in val_labels])
            report['classifiers'][label].update(held_out_accuracy=accuracy, held_out_tunes=tunes)
    timings['adherence_classifiers_s'] = time.time() - clock
    if not conditioned:
        report['skipped'] = ('the checkpoint has no conditioning: how often a tune is read as asked needs a model '
                             'that can be asked for a key, meter or style')
    elif generated is None:
        report['skipped'] = 'off (--tunes 0)'
    else:
        report['asked'] = adherence_rates(classifiers, asked, generated)
        report['pieces'] = len(generated)
        if 'key' in report['asked']:
            report['asked']['key']['tonic_endings'] = tonic_endings_by_reading(classifiers['key'], asked, generated)
        if not report['asked']:
            report['skipped'] = 'no tune was asked for a label that a classifier knows'
    return report


# -----------------------------------------------------------------------------
# tracks='parts': the model per role, the music per role and across roles, accompanying held-out melodies

def target_roles(tokens, positions):
    """The role (an index into ROLES) of the note each target belongs to, -1 for none: a note's tokens are its
    time delta (when it has one), its duration and its pitch, so a time or duration token belongs to the role of
    the pitch that comes next. Validation windows overlap by one token, so the next pitch lies in the next window
    when a window cuts a note."""
    index = np.arange(len(tokens))
    pitch = is_pitch(tokens)
    after = np.minimum.accumulate(np.where(pitch, index, len(tokens))[::-1])[::-1]  # next pitch at or after
    note_token = (tokens >= TIME_OFFSET) & (tokens < PITCH_END) & (after < len(tokens))
    roles = np.where(note_token, (tokens[np.minimum(after, len(tokens) - 1)] - PITCH_OFFSET) // 128, -1)
    return roles[positions]


def role_nll_section(targets, model_target_nll, ngram_name, ngram_target_nll):
    """Per role with notes among the targets: the model's and the n-gram's NLL over the role's tokens and bits per
    note of the role, and the model's margin (the same for both: their sums share the counts)."""
    tokens, positions, _ = targets
    roles = target_roles(tokens, positions)
    report = {}
    for index, role in enumerate(ROLES):
        mine = roles == index
        notes = int(is_pitch(tokens[positions[mine]]).sum())
        if not notes:
            continue
        row = {'targets': int(mine.sum()), 'notes': notes}
        for name, nll in (('model', model_target_nll), (ngram_name, ngram_target_nll)):
            row[name] = {'nll': float(nll[mine].mean()), 'bits_per_note': bits_per_note(tokens, positions[mine],
                                                                                        nll[mine])}
        margin = (row[ngram_name]['nll'] - row['model']['nll']) / row[ngram_name]['nll']
        row.update(model_margin=margin, model_within_goal=bool(margin >= GOAL_MARGIN))
        report[role] = row
    return report


def compared_over_pieces(generated, held_out, measure, **goal):
    """compared() of a measure's mean over generated and over held-out pieces (note lists)."""
    return compared(measures.mean_over_pieces(generated, measure), measures.mean_over_pieces(held_out, measure),
                    **goal)


def parts_music_section(generated, val_seqs, step_seconds):
    """Per role present on either side: pitch range (not for drums), notes per second and the share of time the
    role sounds; across roles: simultaneity, voice crossing, onset consonance and parallels between melody and bass
    (parts_measures.py); each the mean over pieces, generated against held-out."""
    gen = [p for p in (tokens_to_notes(t, roles=True) for t in generated) if p]
    held = [p for p in (tokens_to_notes(t, roles=True) for t in val_seqs) if p]
    both = lambda measure, **goal: compared_over_pieces(gen, held, measure, **goal)
    roles = {}
    for role in ROLES:
        if not any(note[3] == role for piece in gen + held for note in piece):
            continue
        roles[role] = {'notes_per_second': both(lambda p: measures.role_notes_per_second(p, role, step_seconds)),
                       'sounding_share': both(lambda p: measures.role_sounding_share(p, role))}
        if role != 'drums':  # a drum key is an instrument, not a pitch
            roles[role] = {'pitch_range': both(lambda p: measures.role_pitch_range(p, role)), **roles[role]}
    across = {'simultaneity': both(measures.simultaneity),
              'voice_crossing': both(measures.voice_crossing, at_most_above=GOAL_CROSSING_POINTS),
              'onset_consonance': both(measures.onset_consonance),
              'parallels_per_100_notes': both(measures.parallels_per_100_notes, at_most_twice=True)}
    return {'generated_pieces': len(gen), 'held_out_pieces': len(held), 'roles': roles, 'across_roles': across}


def accompaniment_section(model, machine, val_seqs, count, step_seconds, sampling, seed, voice_leading=False):
    """Part 10: the melodies of held-out pieces (those with a melody and a lower part, shortest first) accompanied
    as generate.py --accompany does, the model writing every other role; the lower parts' consonance with the
    melody and the melody-bass parallels, against each piece's own lower parts. voice_leading: the bass is drawn
    with voice_leading.VoiceLeading (the melody stays as given)."""
    candidates = [s for s in val_seqs if accompaniable(s)]
    chosen = sorted(candidates, key=len)[:count]
    report = {'pieces': len(chosen), 'candidates': len(candidates)}
    if not chosen:
        report['skipped'] = 'no held-out piece has a melody and a bass or harmony part'
        return report
    net, autocast = generation_model(model, machine, batch=1)
    torch.manual_seed(seed + 2)  # its own stream: the accompaniments do not change with --num_samples
    generated, own, unplaced = [], [], 0
    with GenerationProgress(None, sum(2 * len(s) for s in chosen)) as progress, autocast:
        for tokens in chosen:
            out, force = accompany_piece(net, tokens, 1, sampling, machine.device, voice_leading, on_token=progress)
            unplaced += force.unplaced()
            generated.append(tokens_to_notes(out[0].tolist(), roles=True))
            own.append(tokens_to_notes(tokens, roles=True))
    both = lambda measure, **goal: compared_over_pieces(generated, own, measure, **goal)
    lower_rate = lambda p: sum(measures.role_notes_per_second(p, role, step_seconds) for role in ('bass', 'harmony'))
    report.update(
        melody_notes=sum(len(melody_notes(s)) for s in chosen), unplaced_melody_notes=unplaced,
        onset_consonance=both(lambda p: measures.onset_consonance(p, against='melody')),
        parallels_per_100_notes=both(measures.parallels_per_100_notes, at_most_twice=True),
        lower_notes_per_second=both(lower_rate))
    return report


def evaluate(checkpoint, data_path=None, cache_dir=None, num_samples=128, sample_length=None, ngram=5,
             temperature=1.0, top_p=None, top_k=None, device='auto', dtype=None, seed=0, log=print, c2st=True,
             c2st_pieces=400, c2st_notes=32, constrained=True, repeat_memory=REPEAT_MEMORY, tunes=400,
             adherence=True, accompany=True, accompany_pieces=16, voice_leading=False, guidance=1.0,
             end_guidance=None, ckpt=None):
    """Everything in the report as a dict (see the module docstring), a section at a time. voice_leading samples
    the generated pieces and accompaniments of a tracks='parts' model with voice_leading.VoiceLeading; guidance
    samples a conditioned model's asked pieces and tunes with classifier-free guidance, end_guidance the draws that
    end its whole tunes (None: as guidance). ckpt: the checkpoint's dict, where the caller has read it."""
    if c2st and importlib.util.find_spec('sklearn') is None:  # stop now, not after minutes of work
        sklearn_parts()
    timings = {}
    clock = time.time()
    model, ckpt, machine = start_model(checkpoint, device, dtype, ckpt)
    args = SimpleNamespace(**ckpt['args'])
    settings = ckpt['tokenization']
    if voice_leading and settings.get('tracks', 'all') != 'parts':
        raise CheckpointError(f"--voice_leading needs a model trained with tracks='parts'; {checkpoint} was trained "
                              f"with tracks={settings.get('tracks', 'all')!r}, which has no melody and bass roles")
    steering = guidance_asked(guidance, end_guidance)
    if steering and not settings.get('condition'):
        raise CheckpointError(f'--{steering[0]} needs a model trained with condition on; {checkpoint} was trained '
                              f'without it')
    path, train_seqs, val_seqs, summary, names = held_out_corpus(args, settings, data_path, cache_dir, log,
                                                                 ckpt.get('styles'))
    tempo = args.output_tempo or summary['median_tempo_bpm']
    timings['load_s'] = time.time() - clock

    clock = time.time()
    val_ds = MIDI_Dataset(val_seqs, args.seq_len, rand_start=False, heads=getattr(args, 'tune_labels', False))
    eval_batch = max(8, 4 * args.batch_size)
    targets = window_targets(val_ds)
    # one pass gives the per-target NLLs the bits per note need; their mean is training's validation loss
    model_target_nll, hits = target_nll(model, val_ds, eval_batch, machine)
    memory = repeat_memory_section(model, val_ds, targets, eval_batch, machine, repeat_memory)
    timings['model_nll_s'] = time.time() - clock

    clock = time.time()
    baselines, bits, baseline_nlls = baselines_section(train_seqs, targets, ngram, model_target_nll)
    timings['baselines_s'] = time.time() - clock
    copying = copy_test(model, val_seqs, eval_batch, machine)

    clock = time.time()
    if sample_length is None:  # range and pitch-class entropy grow with length: compare pieces of the same size
        sample_length = max(1, int(np.median([len(s) for s in val_seqs])) - 1)
    sampling = {'temperature': temperature, 'top_p': top_p, 'top_k': top_k, 'constrained': constrained,
                'repeat_memory': repeat_memory, 'guidance': guidance}
    torch.manual_seed(seed)
    # a conditioned model's pieces are asked held-out headers, as part 5's: the pieces they are compared with have them
    headers = held_out_headers(val_seqs, num_samples, seed) if settings.get('condition') else None
    generated = generate_pieces(model, machine, num_samples, sample_length, **sampling, voice_leading=voice_leading,
                                headers=headers)
    timings['generate_s'] = time.time() - clock
    # judged after the header each piece was asked, as the held-out pieces are after theirs
    asked = generated if headers is None else [[START_IDX, *h, *piece] for h, piece in zip(headers, generated)]
    comparison, (gen_stats, gen_hist), (held_stats, held_hist) = music_section(asked, val_seqs, settings, tempo)

    c2st_report = {'skipped': 'off (--no_c2st)'}
    if c2st:
        c2st_report = c2st_section(model, machine, val_seqs, sampling, c2st_pieces, c2st_notes, seed, timings,
                                   bool(settings.get('condition')))
    whole = {'skipped': 'off (--tunes 0)'}
    whole_report = {'skipped': 'off (--no_c2st)' if not c2st else 'off (--tunes 0)'}
    adherence_report = {'skipped': 'off (--no_c2st)' if not c2st else 'off (--no_adherence)'}
    if tunes or (c2st and adherence):  # one set of whole tunes serves all three
        # a whole tune ends where the model draws the start token: end_guidance steers that draw
        asked, tunes_notes, generator, labels = whole_tunes_section(model, machine, ckpt, path, names, val_seqs,
                                                                  {**sampling, 'end_guidance': end_guidance}, tunes,
                                                                  c2st and adherence, seed, timings)
        if tunes_notes is not None:
            styles = ckpt.get('styles') if settings.get('condition') else None
            clock = time.time()
            ends = held_out_ends(model, val_seqs, machine, heads=getattr(args, 'tune_labels', False))
            timings['held_out_ends_s'] = time.time() - clock
            whole = whole_tune_section(generator.token_tunes, generator.ended, asked, val_seqs, styles,
                                       int(generator.lengths.max()), args.seq_len, ends)
            if c2st:
                whole_report = whole_tune_c2st_section(tunes_notes, generator, val_seqs, seed, timings)
        if c2st and adherence:
            adherence_report = adherence_section(labels, names, train_seqs, val_seqs, generator.header is not None,
                                                 asked, tunes_notes, seed, timings)

    parts = None
    if settings.get('tracks', 'all') == 'parts':
        clock = time.time()
        step_seconds = seconds_per_step(settings, tempo)
        parts = {'roles': role_nll_section(targets, model_target_nll, f'{ngram}-gram', baseline_nlls[f'{ngram}-gram']),
                 'music': parts_music_section(generated, val_seqs, step_seconds),
                 'accompaniment': {'skipped': 'off (--no_accompany)'}}
        timings['parts_s'] = time.time() - clock
        if accompany:
            clock = time.time()
            parts['accompaniment'] = accompaniment_section(model, machine, val_seqs, accompany_pieces, step_seconds,
                                                           sampling, seed, voice_leading)
            timings['accompaniment_s'] = time.time() - clock

    tokens, positions, _ = targets
    report = {
        'checkpoint': str(checkpoint), 'step': ckpt.get('step'), 'data_path': str(path),
        'tokenization': settings, 'output_tempo_bpm': tempo, 'device': str(machine.device),
        'dtype': machine.dtype_name,
        'corpus': summary, 'validation_targets': int(len(positions)),
        'validation_notes': int(is_pitch(tokens[positions]).sum()),
        'model': model_section(model_target_nll, hits),
        'repeat_memory': memory,
        'baselines': baselines,
        'bits_per_note': bits,
        'copy_test': copying,
        'samples': {'count': num_samples, 'length': sample_length, 'temperature': temperature,
                    'grammar_constrained': constrained, 'repeat_memory': repeat_memory, 'top_p': top_p,
                    'voice_leading': voice_leading, 'guidance': guidance, 'end_guidance': end_guidance,
                    'asked': "each piece a held-out tune's header" if headers else 'nothing',
                    'top_k': top_k, 'seed': seed, 'generated_pieces': gen_stats['pieces'],
                    'generated_notes': gen_stats['notes'], 'held_out_pieces': held_stats['pieces'],
                    'held_out_notes': held_stats['notes']},
        'music': comparison,
        'duration_histograms': {'generated': gen_hist.tolist(), 'held_out': held_hist.tolist()},
        'c2st': c2st_report,
        'whole_tunes': whole,
        'c2st_whole_tune': whole_report,
        'adherence': adherence_report,
        'goals': {'relative': GOAL_RELATIVE, 'duration_tv': GOAL_DURATION_TV, 'model_margin': GOAL_MARGIN,
                  'pitch_bits_margin': GOAL_PITCH_MARGIN,
                  'c2st_points': first_notes_goal(settings.get('condition')),
                  'c2st_whole_tune_points': GOAL_WHOLE_TUNE_C2ST_POINTS, 'adherence_points': GOAL_ADHERENCE_POINTS,
                  'voice_crossing_points': GOAL_CROSSING_POINTS},
        'seconds': timings,
    }
    if parts:  # tracks='parts' only: the other modes' reports keep their keys
        report['parts'] = parts
    return report


def json_safe(value):
    """NaN (a statistic of no usable piece) as null, so strict JSON readers accept the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_table(report):
    lines = [f"{'':24s}{'NLL (nats)':>12s}{'perplexity':>12s}{'model margin':>14s}"]
    m = report['model']
    lines.append(f"{'model':24s}{m['nll']:12.4f}{m['perplexity']:12.2f}{'':>14s}   accuracy {m['accuracy']:.4f}")
    memory = report['repeat_memory']
    if memory['strength']:
        lines.append(f"{'+ repeat memory ' + str(memory['strength']):24s}{memory['nll']:12.4f}"
                     f"{math.exp(memory['nll']):12.2f}{'':>14s}   accuracy {memory['accuracy']:.4f} "
                     f"(the distribution sampled from)")
    for name, b in report['baselines'].items():
        verdict = 'ok' if b['model_within_goal'] else 'MISSED'
        goal = f'  {verdict} (at least {GOAL_MARGIN:.0%})' if b['order'] > 1 else ''
        lines.append(f"{name + ' baseline':24s}{b['nll']:12.4f}{b['perplexity']:12.2f}{b['model_margin']:13.1%}{goal}")
    c = report['copy_test']
    if c['pieces']:
        lines.append(f"copy test: {c['tokens']} tokens of {c['pieces']} held-out tunes, NLL {c['first_nll']:.4f} "
                     f"the first time, {c['repeat_nll']:.4f} played again right after (a model that copies: near 0)")
    lines.append('')
    lines.append(f"{'statistic':24s}{'generated':>12s}{'held-out':>12s}{'difference':>14s}  goal")
    for name in STATISTICS:
        note = ''
        if name == 'grammar_validity' and report['samples'].get('grammar_constrained'):
            note = '; 1 by construction: grammar-constrained sampling'
        lines.append(comparison_line(name, report['music'][name], f'within {GOAL_RELATIVE:.0%}{note}'))
    tv = report['music']['duration_histogram_tv']
    lines.append(f"{'duration histogram TV':24s}{'':>24s}{tv['distance']:14.4f}"
                 f"  {'ok' if tv['within_goal'] else 'MISSED'} (at most {GOAL_DURATION_TV})")
    lines.append('')
    lines.append(f"{'bits per note':24s}{'total':>12s}{'pitch':>12s}{'timing':>12s}{'pitch margin':>14s}"
                 f"   ({report['validation_notes']} notes)")
    for name, b in report['bits_per_note'].items():
        row = f"{name if name == 'model' else name + ' baseline':24s}{b['total']:12.4f}{b['pitch']:12.4f}" \
              f"{b['timing']:12.4f}"
        if name != 'model':
            row += f"{b['model_pitch_margin']:13.1%}"
            if name != 'unigram':
                verdict = 'ok' if b['model_pitch_within_goal'] else 'MISSED'
                row += f'  {verdict} (at least {GOAL_PITCH_MARGIN:.0%})'
        lines.append(row)
        if name == 'model' and memory['strength']:
            b = memory['bits_per_note']
            lines.append(f"{'+ repeat memory ' + str(memory['strength']):24s}{b['total']:12.4f}{b['pitch']:12.4f}"
                         f"{b['timing']:12.4f}")
    lines.append('')
    lines.extend(c2st_lines(report['c2st']))
    lines.extend([''] + whole_tune_lines(report['whole_tunes']))
    lines.append('')
    lines.extend(c2st_lines(report['c2st_whole_tune'], 'whole_tune'))
    lines.append('')
    lines.extend(adherence_lines(report['adherence']))
    if 'parts' in report:
        lines.extend(parts_lines(report['parts'], report['samples'].get('voice_leading')))
    return '\n'.join(lines)


def comparison_line(name, s, goal=f'within {GOAL_RELATIVE:.0%}', width=24):
    return (f"{name:{width}s}{s['generated']:12.4f}{s['held_out']:12.4f}{s['relative_difference']:13.1%}"
            f"  {'ok' if s['within_goal'] else 'MISSED'} ({goal})")


def parts_lines(parts, voice_leading=False):
    masked = '; masked while sampling, --voice_leading' if voice_leading else ''
    goals = {'parallels_per_100_notes': 'at most twice held-out' + masked,
             'voice_crossing': f'at most held-out + {GOAL_CROSSING_POINTS}' + masked}
    lines = ['', f"{'per role':28s}{'model NLL':>12s}{'n-gram NLL':>12s}{'model margin':>14s}"
                 f"{'bits/note':>12s}{'n-gram':>10s}   notes"]
    for role, row in parts['roles'].items():
        ngram = next(name for name in row if name.endswith('-gram'))
        lines.append(f"{role:28s}{row['model']['nll']:12.4f}{row[ngram]['nll']:12.4f}{row['model_margin']:13.1%}"
                     f"{row['model']['bits_per_note']['total']:12.3f}{row[ngram]['bits_per_note']['total']:10.3f}"
                     f"   {row['notes']}  {'ok' if row['model_within_goal'] else 'MISSED'} "
                     f"(at least {GOAL_MARGIN:.0%} below the {ngram})")
    music = parts['music']
    lines += ['', f"{'per role, across roles':28s}{'generated':>12s}{'held-out':>12s}{'difference':>14s}  goal   "
                  f"({music['generated_pieces']} generated, {music['held_out_pieces']} held-out pieces)"]
    for role, statistics in music['roles'].items():
        lines.append(role)
        lines.extend(comparison_line('  ' + name, s, width=28) for name, s in statistics.items())
    lines.append('across roles')
    lines.extend(comparison_line('  ' + name, s, goals.get(name, f'within {GOAL_RELATIVE:.0%}'), width=28)
                 for name, s in music['across_roles'].items())
    accompaniment = parts['accompaniment']
    lines.append('')
    if 'skipped' in accompaniment:
        return lines + [f"accompaniment skipped: {accompaniment['skipped']}"]
    lines.append(f"accompaniment of {accompaniment['pieces']} held-out melodies ({accompaniment['melody_notes']} "
                 f"notes, {accompaniment['unplaced_melody_notes']} not placed), against the pieces' own lower parts")
    for name in ('onset_consonance', 'parallels_per_100_notes', 'lower_notes_per_second'):
        lines.append(comparison_line('  ' + name, accompaniment[name], goals.get(name, f'within {GOAL_RELATIVE:.0%}'),
                                     28))
    return lines


def goal_points(c2st, kind):
    """The goal a C2ST report was judged by, in points (reports written without it: the kind's)."""
    return c2st.get('goal_points', 100 * C2ST_KINDS[kind][3])


def c2st_lines(c2st, kind='first_notes'):
    """The table's lines of a two-sample test of C2ST_KINDS's kind."""
    whole = kind == 'whole_tune'
    if 'skipped' in c2st:
        return [f"{'whole-tune' if whole else 'classifier'} two-sample test skipped: {c2st['skipped']}"]
    test, control = c2st['generated_vs_held_out'], c2st['control']
    verdict = 'ok' if c2st['within_goal'] else 'MISSED'
    if whole:
        lines = [f"classifier two-sample test, whole tunes: {c2st['generated_used']} of {c2st['generated_pieces']} "
                 f"generated and {c2st['held_out_used']} held-out tunes; median notes "
                 f"{c2st['median_notes']['generated']:.0f} generated, {c2st['median_notes']['held_out']:.0f} "
                 f"held-out",
                 f"generated tunes end {c2st['ending']} ({c2st['ends']['by_the_model']} ended by the model, "
                 f"{c2st['ends']['cut']} cut)"]
    else:
        lines = [f"classifier two-sample test, first {c2st['notes']} notes: {c2st['generated_used']} of "
                 f"{c2st['generated_pieces']} generated and {c2st['held_out_used']} of {c2st['held_out_pieces']} "
                 f"held-out pieces long enough"
                 + ("; each generated piece asked for a held-out tune's header" if c2st.get('asked', '').startswith(
                     'each') else '')]
    lines += [f"{'accuracy':24s}{'generated':>12s}{'control':>12s}   (generated vs held-out; held-out halves, "
              f"mean of {control['splits']} splits)",
              f"{'linear':24s}{test['linear']:12.4f}{control['linear']:12.4f}",
              f"{'boosted trees':24s}{test['boosted']:12.4f}{control['boosted']:12.4f}"
              f"   {verdict} (at most control + {goal_points(c2st, kind):.0f} points)",
              'one sampling seed: its accuracy moves by about 2 points from seed to seed, so compare models by the '
              'mean over many (tools/c2st_seeds.py)',
              'gives the generated pieces away most (boosted accuracy drop when shuffled): ' +
              ', '.join(f'{name} {drop:+.3f}' for name, drop in c2st['giveaways'][:3])]
    return lines + [f"repeated 4-note patterns: {c2st['repetition']['generated']:.3f} of a generated piece's, "
                    f"{c2st['repetition']['held_out']:.3f} of a held-out piece's"]


def adherence_lines(adherence):
    if 'classifiers' not in adherence:
        return [f"key, meter and style classifiers skipped: {adherence['skipped']}"]
    lines = [f"{'classifier':24s}{'ceiling':>12s}{'held-out':>12s}{'majority':>12s}   (cross-validated on the "
             f"training tunes; accuracy on the validation tunes; share of the commonest label)"]
    for label, c in adherence['classifiers'].items():
        if 'skipped' in c:
            lines.append(f"{label:24s}skipped: {c['skipped']}")
        else:
            lines.append(f"{label:24s}{c['ceiling']:12.4f}{c['held_out_accuracy']:12.4f}{c['majority_share']:12.4f}"
                         f"   {len(c['classes'])} labels, {c['training_tunes']} tunes")
    if 'skipped' in adherence:
        return lines + [f"read as asked: not measured, {adherence['skipped']}"]
    lines.append(f"read as asked, {adherence['pieces']} tunes asked for the labels of validation tunes (the "
                 f"whole tunes above):")
    for label, rate in adherence['asked'].items():
        verdict = 'ok' if rate['within_goal'] else 'MISSED'
        lines.append(f"{label:24s}{rate['read_as_asked']:12.4f}{rate['ceiling']:12.4f}   {rate['gap_points']:+.1f} "
                     f"points below the ceiling, {verdict} (at most {GOAL_ADHERENCE_POINTS * 100:.0f}); "
                     f"{rate['asked']} asked")
    ends = adherence['asked'].get('key', {}).get('tonic_endings')
    if ends:
        shares = {side: 'none' if e['share'] is None else f"{e['share']:.3f}" for side, e in ends.items()}
        lines.append(f"ending on the asked tonic: {shares['read_as_asked']} of the {ends['read_as_asked']['tunes']} "
                     f"tunes read as the key asked, {shares['read_otherwise']} of the "
                     f"{ends['read_otherwise']['tunes']} read otherwise")
    return lines


def plot_report(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_nll, ax_music, ax_c2st) = plt.subplots(1, 3, figsize=(17, 4.8),
                                                     gridspec_kw={'width_ratios': [1, 2, 1]})
    names, values = ['model'], [report['model']['nll']]
    if report['repeat_memory']['strength']:
        names.append(f"+ repeat\nmemory {report['repeat_memory']['strength']}")
        values.append(report['repeat_memory']['nll'])
    colors = ['tab:orange'] * len(names) + ['tab:gray'] * len(report['baselines'])
    names += list(report['baselines'])
    values += [b['nll'] for b in report['baselines'].values()]
    bars = ax_nll.bar(names, values, color=colors)
    ax_nll.bar_label(bars, fmt='%.3f')
    ax_nll.set_ylabel('validation NLL (nats/token)')
    ax_nll.set_title('model vs baselines (lower is better)')
    ratios = [report['music'][n]['generated'] / report['music'][n]['held_out'] if report['music'][n]['held_out']
              else float('nan') for n in STATISTICS]
    ax_music.axhspan(1 - GOAL_RELATIVE, 1 + GOAL_RELATIVE, color='tab:green', alpha=0.15, label='goal: within 10%')
    ax_music.axhline(1.0, color='tab:green', linewidth=1)
    colors = ['tab:blue' if report['music'][n]['within_goal'] else 'tab:red' for n in STATISTICS]
    ax_music.bar([n.replace('_', '\n') for n in STATISTICS], ratios, color=colors)
    tv = report['music']['duration_histogram_tv']['distance']
    ax_music.set_title(f'generated / held-out music (duration histogram TV distance {tv:.3f})')
    ax_music.set_ylabel('ratio')
    ax_music.tick_params(axis='x', labelsize=8)
    ax_music.legend(loc='upper right')
    plot_c2st(report['c2st'], ax_c2st)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')  # path may be a temporary name without the .png suffix
    plt.close(fig)


def plot_c2st(c2st, ax):
    ax.set_title('can a classifier tell generated music?')
    if 'skipped' in c2st:
        ax.text(0.5, 0.5, 'skipped:\n' + c2st['skipped'], ha='center', va='center', wrap=True,
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    x = np.arange(2)
    for offset, side, color, label in ((-0.2, 'generated_vs_held_out', 'tab:orange', 'generated vs held-out'),
                                       (0.2, 'control', 'tab:gray', 'control: held-out halves')):
        values = [c2st[side]['linear'], c2st[side]['boosted']]
        ax.bar_label(ax.bar(x + offset, values, width=0.4, color=color, label=label), fmt='%.2f')
    ax.axhline(0.5, color='black', linewidth=1, linestyle=':', label='chance')
    goal = goal_points(c2st, 'first_notes')
    ax.hlines(c2st['control']['boosted'] + goal / 100, 0.6, 1.4, color='tab:green', linewidth=2,
              label=f'goal: boosted at most control + {goal:.0f} points')
    ax.set_xticks(x, ['linear', 'boosted trees'])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(f"cross-validated accuracy (first {c2st['notes']} notes)")
    ax.legend(loc='upper right', fontsize=8)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default='./content/checkpoints/best.pt', help='checkpoint to evaluate')
    parser.add_argument('--data_path', default=None, help="dataset folder (default: the checkpoint's training data)")
    parser.add_argument('--cache_dir', default=None, help="token cache (default: the checkpoint's)")
    parser.add_argument('--num_samples', type=int, default=128, help='generated pieces for the music statistics')
    parser.add_argument('--sample_length', type=int, default=None,
                        help='tokens per generated piece (default: the median held-out piece length)')
    parser.add_argument('--ngram', type=int, default=5, help='order of the n-gram baseline')
    add_sampling_arguments(parser)  # --unconstrained: grammar validity then measures the model itself
    parser.add_argument('--output_dir', default=None,
                        help="where evaluation.json and .png are written (default: the checkpoint's folder)")
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'mps'")
    parser.add_argument('--dtype', default=None, help="autocast dtype (default: the one training used)")
    parser.add_argument('--seed', type=int, default=0, help='random seed for sampling')
    parser.add_argument('--c2st_pieces', type=int, default=400,
                        help='generated pieces for the classifier two-sample test (held-out: every validation piece '
                             'long enough)')
    parser.add_argument('--c2st_notes', type=int, default=32, help='notes per piece the two-sample test looks at')
    add_switch(parser, 'no_c2st',
               help='skip every part that needs scikit-learn: both two-sample tests and the adherence part')
    parser.add_argument('--tunes', type=int, default=400,
                        help='whole tunes generated to their end: their length and endings, the whole-tune two-'
                             'sample test and, by a conditioned model, adherence to asked labels (0: none)')
    add_switch(parser, 'no_adherence',
               help='skip the key, meter and style classifiers (their ceilings do not change with --seed)')
    parser.add_argument('--accompany_pieces', type=int, default=16,
                        help="tracks='parts' checkpoints: held-out melodies to accompany (the shortest with a lower "
                             "part)")
    add_switch(parser, 'no_accompany',
               help="tracks='parts' checkpoints: skip accompanying held-out melodies")
    args = parser.parse_args(argv)
    # None means "the checkpoint's" for these, so None passes; a piece needs two notes to have an interval
    rules = {**RULES, **{name: optional(RULES[name]) for name in ('dtype', 'output_dir', 'data_path', 'cache_dir')}}
    rules.setdefault('c2st_pieces', integer(min=1))
    rules.setdefault('c2st_notes', integer(min=2))
    rules.setdefault('tunes', integer(min=0))
    rules.setdefault('accompany_pieces', integer(min=1))
    exit_on_bad_args(args, rules=rules)
    output_dir = Path(args.output_dir or Path(args.checkpoint).parent)
    complaint = RULES['output_dir'](str(output_dir))
    if complaint and not args.output_dir:  # checked now, not after minutes of evaluation
        print(f"error: the report goes beside the checkpoint, in {output_dir}, which must be {complaint}; choose "
              f"another folder with --output_dir", file=sys.stderr)
        sys.exit(2)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        checkpoint_sampling(args, ckpt)  # sampled as its run sampled, unless told
        report = evaluate(args.checkpoint, args.data_path, args.cache_dir, args.num_samples, args.sample_length,
                          args.ngram, args.temperature, args.top_p, args.top_k, args.device, args.dtype,
                          args.seed, c2st=not args.no_c2st, c2st_pieces=args.c2st_pieces,
                          c2st_notes=args.c2st_notes, constrained=not args.unconstrained,
                          repeat_memory=args.repeat_memory, tunes=args.tunes, adherence=not args.no_adherence,
                          accompany=not args.no_accompany, accompany_pieces=args.accompany_pieces,
                          voice_leading=args.voice_leading, guidance=args.guidance,
                          end_guidance=args.end_guidance, ckpt=ckpt)
    except (CheckpointError, DeviceError, DatasetError, MissingDependencyError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        how, code = stopped_by(e)
        print(f'stopped by {how}: no report written', file=sys.stderr)
        sys.exit(code)

    def write_report(png):  # the picture is drawn first, then both files are renamed into place one after the other
        plot_report(report, png)
        text = json.dumps(json_safe(report), indent=1, allow_nan=False)
        write_atomically(output_dir / 'evaluation.json', lambda tmp: Path(tmp).write_text(text))
    try:
        print(format_table(report))  # first: a report that cannot be written is still seen
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(output_dir / 'evaluation.png', write_report)
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        print(f'error: cannot write the report into {output_dir}: {e.strerror or e} (the table above is all of it '
              f'that is kept)', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # each file is whole or not there: a reader never finds half a report
        how, code = stopped_by(e)
        print(f'stopped by {how}: no report written', file=sys.stderr)
        sys.exit(code)
    print(f"report: {output_dir / 'evaluation.json'}, {output_dir / 'evaluation.png'} "
          f"({sum(report['seconds'].values()):.0f} s)")


if __name__ == '__main__':
    undecodable_names_on_stdout()
    with sigterm_as_ctrl_c():
        main()
