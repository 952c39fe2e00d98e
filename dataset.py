"""The corpus and its windows: usable files split into train and validation, and the windows training draws.

Vocabulary and tokenization live in tokens.py, the token cache in token_cache.py.
"""

import hashlib
import math
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from condition import (
    LABEL_KINDS,
    MAX_STYLES,
    check_styles,
    dropped_header_tokens,
    header,
    is_header,
    label_slots,
    style_of,
    transpose_keys,
)
from parts import common_programs
from token_cache import MIDI_SUFFIXES, DatasetError, _name_bytes, load_token_cache, printable
from tokens import HEAD_SLOTS, PAD_IDX, bpm_of_tempo, is_tonal, midi_pitch, time_steps

# -----------------------------------------------------------------------------
# the corpus: usable files, split into train and validation

def is_validation_file(name, val_fraction):
    """Stable split by file: a hash of the name relative to the dataset root, so no file is ever on both sides
    and adding files never moves old ones."""
    h = int(hashlib.sha1(_name_bytes(name)).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def _skip_reason(entry, min_notes):
    """Why a file is left out of the corpus, or None to use it."""
    if entry['tokens'] is None:
        return entry['error']
    if entry['n_notes'] == 0 and entry.get('drum_notes'):
        return f"only drum notes ({entry['drum_notes']} on channel 10), which are left out by default (include_drums)"
    if entry['n_notes'] < min_notes:
        return f"only {entry['n_notes']} notes (min_notes={min_notes})"
    return None


def load_corpus(path, settings, cache_dir, min_notes=40, val_fraction=0.05, num_workers=None, verbose=True,
                styles=None, with_names=False, add_styles=False):
    """Token sequences of a folder, split into train and validation by file, plus a summary dict.

    With settings' condition, each sequence carries its file's header after the start token (condition.py) and
    the summary lists the styles (styles: a model's list to keep, e.g. a resumed run's; None: the dataset's top
    folders, sorted; add_styles: the dataset's top folders the list lacks go after it, sorted, as a fine-tuned
    model's new styles) and the commonest labels of the training files. with_names adds the file names of both
    lists, (train names, validation names), in the same order."""
    entries = load_token_cache(path, settings, cache_dir, num_workers=num_workers, verbose=verbose)
    if not entries and not os.path.exists(path):
        raise DatasetError(f'data_path {Path(path).resolve()} does not exist: give a folder, a MIDI file or a .zip')
    if not entries:
        raise DatasetError(f'no MIDI files ({", ".join(MIDI_SUFFIXES)} or .zip archives of them) found in '
                           f'{Path(path).resolve()}')
    train, val, skipped = {}, {}, {}
    for name, e in sorted(entries.items()):
        reason = _skip_reason(e, min_notes)
        if reason:
            skipped[name] = reason
        else:
            (val if is_validation_file(name, val_fraction) else train)[name] = e
    if verbose:
        for name, reason in skipped.items():
            if 'min_notes' not in reason:
                print(f'skipping {printable(name)}: {reason}')
    if not train and not val:
        raise DatasetError(f'nothing usable in {Path(path).resolve()}: {len(entries)} MIDI files found, all '
                           f'skipped ({len(skipped)}); e.g. {next(iter(skipped.items()))}')
    # a tiny folder may hash every file to one side: move the first file over so both splits exist
    if val_fraction > 0 and not val and len(train) > 1:
        name = min(train, key=lambda n: hashlib.sha1(_name_bytes(n)).hexdigest())
        val[name] = train.pop(name)
    if not train:
        name = next(iter(val))
        train[name] = val.pop(name)
    if not val and verbose:
        reason = f'val_fraction={val_fraction}' if val_fraction <= 0 else 'only 1 usable file'
        print(f'no validation files ({reason}): training without validation')
    if settings.get('condition'):
        styles = add_headers(train, val, styles, verbose, add_styles)
    tempos = sorted(e['tempo'] for e in train.values())
    summary = {
        'files': len(entries), 'skipped': len(skipped),
        'skipped_short': sum('min_notes' in r for r in skipped.values()),
        'train_files': len(train), 'val_files': len(val),
        'train_tokens': int(sum(len(e['tokens']) for e in train.values())),
        'val_tokens': int(sum(len(e['tokens']) for e in val.values())),
        'median_tempo_bpm': round(bpm_of_tempo(tempos[len(tempos) // 2]), 2),
        'role_programs': common_programs(e.get('programs', {}) for e in train.values()),  # tracks='parts'
    }
    if settings.get('condition'):
        combos = Counter(tuple(sorted(e['labels'].items())) for e in train.values())
        summary.update(styles=styles, common_labels=[dict(c) for c, _ in combos.most_common(COMMON_LABELS) if c])
    corpus = ([e['tokens'] for e in train.values()], [e['tokens'] for e in val.values()], summary)
    return corpus + ((list(train), list(val)),) if with_names else corpus


COMMON_LABELS = 4  # training samples of a conditioned run are asked for these many commonest labels in turn


def add_headers(train, val, styles, verbose, add_styles=False):
    """Put each entry's header (key and meter from its cached labels, style from its name) after its start token,
    keeping the labels in entry['labels']; returns the style list used (load_corpus says which). Raises DatasetError
    for more styles than style ids."""
    named = {**train, **val}
    if styles is None or add_styles:
        found = sorted({style for style in map(style_of, named) if style})
        kept = [] if styles is None else list(styles)
        new = [style for style in found if style not in kept]
        styles = kept + new
        try:
            check_styles(styles)
        except ValueError as e:
            message, room = str(e), MAX_STYLES - len(kept)
            if kept:  # a fine-tuned model keeps its own styles: the dataset's new folders come on top of them
                message = (f'the model\'s {len(kept)} styles and the dataset\'s {len(new)} new top folders '
                           f'({", ".join(map(printable, new[:5]))}{", ..." if len(new) > 5 else ""}) make '
                           f'{len(styles)} styles, but conditioning holds at most {MAX_STYLES}; group the new files '
                           f'into at most {room} folder{"s" if room != 1 else ""}, or into folders named as the '
                           f'model\'s styles')
            raise DatasetError(message) from None
    unknown = sorted({style for style in map(style_of, named) if style and style not in styles})
    if unknown and verbose:
        print(f'styles {", ".join(map(printable, unknown))} are not among the model\'s {len(styles)}: their files '
              f'get no style token')
    heads = {}
    for name, entry in named.items():
        entry['labels'] = dict(entry.get('labels') or {},
                               **({'style': style_of(name)} if style_of(name) in styles else {}))
        heads[name] = header(entry['labels'], styles)
    # every tune with its header in one array, each entry a slice of it: the training stream reads that array in
    # place (PackedDataset), so the corpus is in memory once, 2 bytes a token, however the header dropout falls
    joined = np.empty(sum(len(entry['tokens']) + len(heads[name]) for name, entry in named.items()), dtype=np.uint16)
    at = 0
    for name, entry in named.items():
        tokens, head = entry['tokens'], heads[name]
        end = at + len(tokens) + len(head)
        joined[at], joined[at + 1:at + 1 + len(head)], joined[at + 1 + len(head):end] = tokens[0], head, tokens[1:]
        entry['tokens'] = joined[at:end]
        at = end
    return list(styles)


# -----------------------------------------------------------------------------
# windows for training

class MIDI_Dataset(Dataset):
    """Windows of max_seq_len + 1 tokens over a list of token sequences.

    An epoch holds about one window per max_seq_len tokens of each file (at least one per file), so a folder of
    short melodies and a folder of long piano pieces both see their data about once per epoch. Training windows
    are random crops (the original's rule: a random start in 85% of draws, the beginning otherwise) with optional
    transposition; validation windows (rand_start=False) tile each file in order, covering every token once.
    Randomness comes from (seed, epoch, index) alone, so a resumed or multi-process run draws the same windows.
    end_token (training: the start token) follows each tune, so a crop that reaches the tune's end teaches where
    it ends, as the next tune's start token does in packed windows. header_dropout: the share of header tokens
    (condition.py) each window leaves out. heads: each window comes after its head (split_head), for a tune_labels
    model.
    """

    def __init__(self, sequences, max_seq_len, pad_idx=PAD_IDX, rand_start=True, aug=False, aug_range=2, seed=0,
                 end_token=None, header_dropout=0.0, heads=False):
        self.sequences = sequences
        self.max_seq_len = max_seq_len
        self.pad_idx = pad_idx
        self.rand_start = rand_start
        self.aug = aug
        self.aug_range = aug_range
        self.seed = seed
        self.epoch = 0
        self.end_token = end_token
        self.header_dropout = header_dropout
        self.heads = heads
        ends = end_token is not None
        counts = [max(1, math.ceil((len(s) - 1 + ends) / max_seq_len)) for s in sequences]
        self.window_file = np.repeat(np.arange(len(sequences)), counts)
        self.window_part = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.window_file)

    def window_lengths(self):
        """Tokens in each window as __getitem__ cuts it (a crop holds up to max_seq_len + 1), without cutting it."""
        ends = self.end_token is not None
        lengths = np.array([len(s) + ends for s in self.sequences], dtype=np.int64)[self.window_file]
        if self.rand_start:
            return np.minimum(lengths, self.max_seq_len + 1)
        return np.minimum(lengths - self.window_part * self.max_seq_len, self.max_seq_len + 1)

    def __getitem__(self, idx):
        seq = self.sequences[self.window_file[idx]]
        if self.header_dropout:
            head = int(is_header(np.asarray(seq[1:4])).sum())  # the header follows the start token
            kept = ~dropped_header_tokens(head, self.header_dropout, self.seed, self.epoch, int(idx))
            seq = np.concatenate([seq[:1], seq[1:1 + head][kept], seq[1 + head:]])
        if self.end_token is not None:
            seq = np.append(seq, self.end_token)
        n = self.max_seq_len + 1
        rng = random.Random(hash((self.seed, self.epoch, int(idx))))
        if self.rand_start:
            start = rng.randint(0, max(0, len(seq) - n)) if rng.random() < 0.85 else 0
        else:
            start = int(self.window_part[idx]) * self.max_seq_len
        window = torch.from_numpy(np.asarray(seq[start:start + n], dtype=np.int64))
        shift = fitting_shift(window, rng.randint(-self.aug_range, self.aug_range)) if self.aug else 0
        window = transpose(window, shift)
        if self.heads:  # a file is one tune: its header ids (the key moved with it) and time steps before the window
            before = np.asarray(seq[1:start], dtype=np.int64)
            head = np.append(transpose_keys(label_slots(before[:len(LABEL_KINDS)]), shift), time_steps(before).sum())
            window = torch.cat((torch.from_numpy(head), window))
        return window


PITCH_RANGE_BLOCK = 1 << 22  # tokens a step of PackedDataset's pitch-range pass reads: 32 MB of int64 at a time
# each uint16 id's MIDI pitch when transposition moves it, else a value that never wins the range's max / min: one
# lookup a token instead of comparisons, a modulo and selects (the pass reads every training token at start-up)
_IDS = np.arange(1 << 16)
HIGHEST_OF = np.where(is_tonal(_IDS), midi_pitch(_IDS), 0).astype(np.uint8)
LOWEST_OF = np.where(is_tonal(_IDS), midi_pitch(_IDS), 127).astype(np.uint8)


def _slices_of_one_array(sequences):
    """(array, where each sequence starts in it) when every sequence is a contiguous slice of one 1-D uint16 array
    (the token cache's mapped file), else None."""
    base = getattr(sequences[0], 'base', None) if sequences else None
    if not (isinstance(base, np.ndarray) and base.dtype == np.uint16 and base.ndim == 1 and base.flags.c_contiguous):
        return None
    address = base.__array_interface__['data'][0]
    starts = []
    for s in sequences:
        if not (isinstance(s, np.ndarray) and s.base is base and s.dtype == np.uint16 and s.ndim == 1
                and s.flags.c_contiguous):
            return None
        starts.append((s.__array_interface__['data'][0] - address) // base.itemsize)
    return base, np.array(starts, dtype=np.int64)


class PackedDataset(Dataset):
    """Training windows of max_seq_len + 1 tokens cut from the tunes laid end to end: no padding.

    Every tune keeps its start token (834), so a window may hold the end of one tune and the beginning of the
    next, and the model sees where a tune begins. An epoch is (training tokens - 1) // max_seq_len windows that
    tile the stream from a random offset (a new one each epoch, so cuts fall elsewhere). Transposition is per
    tune, not per window: a tune split over two windows moves by the same shift in both, and two tunes in one
    window keep their own keys, as they would if each were its own window. Randomness comes from
    (seed, epoch, index) and (seed, epoch, tune), so a resumed or multi-process run draws the same windows.

    The stream is read in place when the tunes are slices of one array, as the token cache's mapped file gives
    them: a window's positions in the stream are moved to where its tunes lie in that array, and the corpus costs
    no memory of its own. Tunes given otherwise are copied into one array end to end (2 bytes a token).
    header_dropout: the share of header tokens (condition.py) left out of the stream, drawn anew each epoch from
    (seed, epoch); the tokens stay where they are, and a window's positions skip those left out. heads: each window
    comes after its head (split_head), for a tune_labels model.

    aligned: every window begins at a tune's start token instead (aligned_window_starts), so a tune that fits in a
    window is seen whole, its header and its beginning in view of its ending, as generation sees it; the tune a
    window cuts off begins the next window, and a tune longer than a window goes on from where the window before
    stopped. The same windows every epoch (their tunes transposed anew), in the order the DataLoader shuffles.
    """

    def __init__(self, sequences, max_seq_len, aug=False, aug_range=2, seed=0, header_dropout=0.0, aligned=False,
                 heads=False):
        self.max_seq_len = max_seq_len
        self.heads = heads
        self.aligned = aligned
        self.aug = aug
        self.aug_range = aug_range
        self.seed = seed
        self.epoch = 0
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        self.tune_starts = np.cumsum(lengths) - lengths
        self.length = int(lengths.sum())  # tokens in the stream
        in_place = _slices_of_one_array(sequences)
        if in_place is None:
            self.stream = np.concatenate([np.asarray(s, dtype=np.uint16) for s in sequences])
            self.moved = None
        else:  # tune t's token i lies at stream[tune_starts[t] + moved[t] + i]
            self.stream, at = in_place
            self.moved = None if np.array_equal(at, self.tune_starts) else at - self.tune_starts
        # each tune's pitch range, so its shift can be cut to keep every pitch inside 0-127 of its role's block (127
        # and 0 for a tune without pitches); a block of tunes at a time, so temporary arrays stay small at any size
        self.lowest = np.full(len(sequences), 127)
        self.highest = np.zeros(len(sequences), dtype=np.int64)
        blocks = np.unique(np.searchsorted(self.tune_starts, np.arange(0, self.length, PITCH_RANGE_BLOCK)))
        blocks = blocks[blocks < len(sequences)]
        for first, end in zip(blocks, list(blocks[1:]) + [len(sequences)]):
            if self.moved is None:
                part = self.stream[self.tune_starts[first]:self.tune_starts[end - 1] + lengths[end - 1]]
            else:
                part = np.concatenate(sequences[first:end])
            cuts = self.tune_starts[first:end] - self.tune_starts[first]
            self.highest[first:end] = np.maximum.reduceat(HIGHEST_OF[part], cuts)
            self.lowest[first:end] = np.minimum.reduceat(LOWEST_OF[part], cuts)
        self.header_dropout = header_dropout
        self.full_starts, self.full_length = self.tune_starts, self.length
        # the stream positions of the header tokens: a header follows its tune's start token (add_headers)
        self.header_positions = np.zeros(0, dtype=np.int64)
        if header_dropout and len(sequences):
            at = self.tune_starts[:, None] + np.arange(1, 1 + len(LABEL_KINDS))
            inside = at < (self.tune_starts + lengths)[:, None]
            shift = 0 if self.moved is None else self.moved[:, None]
            heading = inside & is_header(self.stream[np.where(inside, at, self.tune_starts[:, None]) + shift])
            self.header_positions = at[heading]  # in stream order: by tune, then by place in its header
        self.dropped = np.zeros(0, dtype=np.int64)  # the header positions left out this epoch
        self.window_starts = None
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if len(self.header_positions):
            self.dropped = self.header_positions[dropped_header_tokens(len(self.header_positions),
                                                                       self.header_dropout, self.seed, epoch, 0)]
            self.tune_starts = self.full_starts - np.searchsorted(self.dropped, self.full_starts)
            self.length = self.full_length - len(self.dropped)
        if self.aligned and (self.window_starts is None or len(self.header_positions)):  # the stream changed
            self.window_starts = aligned_window_starts(self.tune_starts, self.length, self.max_seq_len)

    def __len__(self):
        if self.window_starts is not None:
            return len(self.window_starts)
        return max(1, (self.length - 1) // self.max_seq_len)

    def kept(self, positions):
        """Positions in this epoch's stream (after the header tokens it leaves out) as positions in the stream of
        every token: each left-out token before a position moves it on by one."""
        if not len(self.dropped):
            return positions
        # the i-th left-out token has dropped[i] - i kept tokens before it
        return positions + np.searchsorted(self.dropped - np.arange(len(self.dropped)), positions, side='right')

    def stream_tokens(self):
        """This epoch's stream as one array, header tokens left out (a copy; windows are read in place)."""
        positions = np.arange(self.length)
        tunes = np.searchsorted(self.tune_starts, positions, side='right') - 1
        return self.stream[self.kept(positions) + (0 if self.moved is None else self.moved[tunes])]

    def tune_shift(self, tune):
        """The semitones tune `tune` moves by this epoch, reduced so none of its pitches leaves 0-127."""
        # a string seed is hashed with SHA-512, the same in every process (hash() of a str is not)
        shift = random.Random(f'{self.seed}/{self.epoch}/tune {tune}').randint(-self.aug_range, self.aug_range)
        return max(min(shift, 127 - int(self.highest[tune])), -int(self.lowest[tune]))

    def __getitem__(self, idx):
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices):
        """The windows of several indices, cut together: one gather from the stream and one transposition pass for
        the whole batch (the DataLoader asks for a batch this way), so assembly keeps ahead of a GPU."""
        n = min(self.max_seq_len + 1, self.length)  # a stream shorter than a window gives it whole
        if self.window_starts is not None:
            starts = np.minimum(self.window_starts[np.asarray(indices, dtype=np.int64)], self.length - n)
        else:
            offset = random.Random(f'{self.seed}/{self.epoch}/offset').randrange(self.max_seq_len)
            starts = np.minimum(offset + np.asarray(indices, dtype=np.int64) * self.max_seq_len, self.length - n)
        positions = starts[:, None] + np.arange(n)
        if self.moved is not None or (self.aug and self.aug_range) or self.heads:
            tunes = np.searchsorted(self.tune_starts, positions, side='right') - 1  # each position's tune
        where = self.kept(positions) + (0 if self.moved is None else self.moved[tunes])
        windows = np.asarray(self.stream[where], dtype=np.int64)
        if self.heads:  # the header ids of each window's first tune that lie before the window
            first = tunes[:, 0]
            ends = np.append(self.tune_starts, self.length)[first + 1]
            at = self.tune_starts[first][:, None] + np.arange(1, 1 + len(LABEL_KINDS))
            before = (at < starts[:, None]) & (at < ends[:, None])
            shift = np.zeros_like(first) if self.moved is None else self.moved[first]  # where the stream holds it
            at = self.kept(np.minimum(at, self.length - 1)) + shift[:, None]
            head = label_slots(np.where(before, self.stream[at].astype(np.int64), -1))
            # and the time steps of that tune between its start token and the window (a tune is short: summed a row
            # at a time)
            # (the header tokens left out in between move no time)
            steps = [int(time_steps(self.stream[first_at:window_at].astype(np.int64)).sum())
                     for first_at, window_at in zip(self.kept(self.tune_starts[first] + 1) + shift,
                                                    self.kept(starts) + shift)]
            head = np.concatenate([head, np.array(steps, dtype=np.int64)[:, None]], axis=1)
        if self.aug and self.aug_range:
            # tunes counted from the window's first tune; then each tune's shift, looked up per row
            first = tunes[:, :1]
            spans = first + np.arange(int((tunes[:, -1:] - first).max()) + 1)
            shift_of = {int(t): self.tune_shift(t) for t in np.unique(np.minimum(spans, tunes[:, -1:]))}
            shifts = np.vectorize(shift_of.get, otypes=[np.int64])(np.minimum(spans, tunes[:, -1:]))
            shifts = np.take_along_axis(shifts, tunes - first, axis=1)
            windows = transpose_keys(windows + np.where(is_tonal(windows), shifts, 0), shifts)
            if self.heads:  # the key moves with its tune; the time steps stay
                head[:, :len(LABEL_KINDS)] = transpose_keys(head[:, :len(LABEL_KINDS)], shifts[:, :1])
        if self.heads:
            windows = np.concatenate([head, windows], axis=1)
        return list(torch.from_numpy(windows))


def aligned_window_starts(tune_starts, length, max_seq_len):
    """Where each aligned window begins in a stream of `length` tokens whose tunes begin at tune_starts: at the
    first tune, then each at the last tune start inside the window before (the tune it cuts off, seen again from
    its start token), or, where no tune starts inside it, right after it (a tune longer than a window goes on).
    Every token is in a window; a window holds max_seq_len + 1 tokens, its last one the next window's first."""
    starts, start = [], 0
    while True:
        starts.append(start)
        end = start + max_seq_len  # the window's last token
        if end >= length - 1:
            return np.asarray(starts, dtype=np.int64)
        inside = int(tune_starts[np.searchsorted(tune_starts, end, side='right') - 1])
        start = inside if inside > start else end


VAL_SAMPLE_SEED = 0  # not Args.seed: runs with different seeds score the same windows, so their curves compare


def validation_sample(dataset, max_tokens):
    """Indices of the validation windows that training scores: every window when their targets add up to at most
    max_tokens (None: no limit), else a random choice of windows up to that many targets. The choice comes from a
    fixed seed and the split alone, so every validation of a run, and every run on the same data and seq_len,
    scores the same windows; windows from all over the split estimate its loss better than whole files would."""
    targets = np.maximum(dataset.window_lengths() - 1, 0)
    if max_tokens is None or targets.sum() <= max_tokens:
        return list(range(len(dataset)))
    order = np.random.default_rng(VAL_SAMPLE_SEED).permutation(len(dataset))
    fits = int(np.searchsorted(np.cumsum(targets[order]), max_tokens, side='right'))
    return sorted(order[:max(1, fits)].tolist())


def fitting_shift(window, shift):
    """shift semitones reduced so that no pitch token of window leaves 0-127 (so no role's pitch leaves its block
    of ids); 0 for a window without pitches that transposition moves."""
    pitch = is_tonal(window)
    if shift == 0 or not pitch.any():
        return 0
    pitches = midi_pitch(window[pitch])
    return max(min(shift, 127 - int(pitches.max())), -int(pitches.min()))


def transpose(window, shift):
    """Shift pitch tokens by up to `shift` semitones (fitting_shift), and a header's key id with them; drum ids
    name instruments and stay."""
    shift = fitting_shift(window, shift)
    if shift == 0:
        return window
    window = window.clone()
    window[is_tonal(window)] += shift
    return transpose_keys(window, shift)  # a header's key moves with the tune


def split_head(batch, heads):
    """(head, windows) of a batch (b, n) a dataset made: with heads, each row's first HEAD_SLOTS columns are its head,
    the label slots (custom_basic_transformer.tune_labels) of the tune the window is cut from, -1 where its header
    has no id of that kind before the window, then the time steps of that tune before the window (0 for a window
    that begins with a start token); without, the head is None."""
    if not heads:
        return None, batch
    return batch[:, :HEAD_SLOTS], batch[:, HEAD_SLOTS:]


def collate_fn(batch, pad_idx=PAD_IDX):
    """Pad windows of a batch to the same length with pad_idx."""
    return torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad_idx)
