"""Conditioning: a header of key, meter and style tokens after a tune's start token, and the labels it is made of.

A conditioned model (Args.condition) reads each training tune as

    834, key, meter, style, notes ...

with every label the tune lacks left out (the order stays key, meter, style), and some of the rest left out at
random while training (Args.condition_dropout), so it also writes tunes with less asked or nothing asked.
generate.py --key "D major" --meter 6/8 --style irl puts the asked header after the start token.

Labels come from the MIDI file itself, so a user's files work as they are: the key from its first key signature
event, the meter from its first time signature event (a meter outside METERS gives none), the style from the folder
the file lies in (style_of). The ids: TOKEN_RANGES['key'], ['meter'] and ['style'] in tokens.py.
"""

import re

import numpy as np
import torch

import TMIDIX
from tokens import (
    DUR_OFFSET,
    LABEL_KINDS,
    LABEL_RANGES,
    NUM_TOKENS,
    PITCH_OFFSET,
    START_IDX,
    TOKEN_RANGES,
    TONAL_END,
    time_steps,
)

MODES = ('major', 'minor')
# the usual name of each tonic (pitch class 0 = C) in each mode: the names key signatures spell
TONIC_NAMES = {'major': ('C', 'Db', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'Ab', 'A', 'Bb', 'B'),
               'minor': ('C', 'C#', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'G#', 'A', 'Bb', 'B')}
METERS = ('2/4', '3/4', '4/4', '6/8', '9/8', '12/8', '3/8', '2/2', '6/4', '5/4')  # one token each, in this order
KEY_FIRST, KEY_LAST = TOKEN_RANGES['key']
METER_FIRST, METER_LAST = TOKEN_RANGES['meter']
STYLE_FIRST, STYLE_LAST = TOKEN_RANGES['style']
MAX_STYLES = STYLE_LAST - STYLE_FIRST + 1
LETTER_PITCH_CLASS = {'C': 0, 'D': 2, 'E': 4, 'F': 5, 'G': 7, 'A': 9, 'B': 11}
KEY_FORMS = 'a tonic A-G with an optional # or b, then major or minor (e.g. "D major", "F# minor", "Bbm", "G")'
KEY_PATTERN = re.compile(r'([A-Ga-g])([#b]?) ?([A-Za-z]*)')
MODE_WORDS = {'': 'major', 'major': 'major', 'maj': 'major', 'minor': 'minor', 'min': 'minor', 'm': 'minor'}


# -----------------------------------------------------------------------------
# labels: names, parsing, and reading them from a MIDI file

def key_name(pitch_class, mode):
    return f'{TONIC_NAMES[mode][pitch_class % 12]} {mode}'


def parse_key(text):
    """A key as the user writes it -> its name here ('d minor', 'Dm' -> 'D minor'; 'C#' -> 'Db major').
    Raises ValueError saying what is allowed."""
    match = KEY_PATTERN.fullmatch(' '.join(str(text).split()))
    if match is None or match.group(3).lower() not in MODE_WORDS:
        raise ValueError(f'unknown key {text!r}: a key is {KEY_FORMS}')
    letter, accidental, mode = match.groups()
    pitch_class = LETTER_PITCH_CLASS[letter.upper()] + {'#': 1, 'b': -1, '': 0}[accidental]
    return key_name(pitch_class, MODE_WORDS[mode.lower()])


def parse_meter(text):
    """A meter as the user writes it ('6/8', ' 6 / 8', '06/08') -> '6/8'; ValueError listing METERS for any other."""
    meter = ''.join(str(text).split())
    numbers = meter.split('/')
    if len(numbers) == 2 and all(n.isascii() and n.isdigit() for n in numbers):
        # not int(): past 4,300 digits it raises a message of its own
        meter = '/'.join(n.lstrip('0') or '0' for n in numbers)
    if meter not in METERS:
        raise ValueError(f'unknown meter {text!r}: the meters with a token are {", ".join(METERS)}')
    return meter


def key_of_signature(sharps, minor):
    """The key a key signature names (sharps negative for flats, minor 1 or 0), or None for a malformed one."""
    if minor not in (0, 1) or not -7 <= sharps <= 7:
        return None
    return key_name(7 * sharps + 9 * minor, MODES[minor])  # each sharp moves the tonic a fifth up


def signature_of_key(key):
    """(sharps, minor) of a key's name: the signature it is written with (F# major: 6 sharps, Eb minor: 6 flats)."""
    tonic, mode = key.split()
    minor = MODES.index(mode)
    pitch_class = TONIC_NAMES[mode].index(tonic)
    candidates = [sharps for sharps in range(-7, 8) if (7 * sharps + 9 * minor) % 12 == pitch_class]
    if '#' in tonic:
        return max(candidates), minor
    if 'b' in tonic:
        return min(candidates), minor
    return min(candidates, key=abs), minor


def midi_labels(midi, every_meter=False):
    """{'key': 'D major', 'meter': '6/8'} of MIDI bytes (or a path), from its first key and time signature events; a
    label the file lacks, or a meter outside METERS unless every_meter (labels.py: a classifier learns every meter
    the data holds), is left out. Raises TMIDIX.MIDIError for a malformed file."""
    time_signature, key_signature = TMIDIX.first_signatures(midi)
    labels = {}
    if key_signature is not None:
        key = key_of_signature(key_signature[2], key_signature[3])
        if key:
            labels['key'] = key
    # a numerator of 0 is no meter, nor a denominator past 2**15
    if time_signature is not None and time_signature[2] and time_signature[3] < 16:
        meter = f'{time_signature[2]}/{2 ** time_signature[3]}'
        if every_meter or meter in METERS:
            labels['meter'] = meter
    return labels


def style_of(name):
    """The style of a file named as token_cache.find_midi_sources names it (relative to the dataset folder): the
    first folder on its path, where a zip's inside continues the path ('reels/x.mid' and 'tunes.zip::reels/x.mid'
    are 'reels'); None for a file at the top."""
    folders = [part for segment in name.split('::') for part in segment.split('/')[:-1] if part not in ('', '.')]
    return folders[0] if folders else None


def check_styles(styles):
    """ValueError when there are more styles than style ids."""
    if len(styles) > MAX_STYLES:
        raise ValueError(f'{len(styles)} styles (top folders of the dataset: {", ".join(styles[:5])}, ...) but '
                         f'conditioning holds at most {MAX_STYLES}; group the files into at most {MAX_STYLES} '
                         f'folders, or train with --condition False')


# -----------------------------------------------------------------------------
# the header's tokens

def header(labels, styles=()):
    """Token ids of labels ({'key', 'meter', 'style'}, any of them missing), in the order key, meter, style. A style
    not in styles (the model's sorted list) gives no token."""
    ids = []
    if labels.get('key'):
        tonic, mode = labels['key'].split()
        ids.append(KEY_FIRST + 12 * MODES.index(mode) + TONIC_NAMES[mode].index(tonic))
    if labels.get('meter') in METERS:
        ids.append(METER_FIRST + METERS.index(labels['meter']))
    if labels.get('style') in styles:
        ids.append(STYLE_FIRST + list(styles).index(labels['style']))
    return ids


def header_labels(tokens, styles=()):
    """The labels a header's token ids say (header's inverse); ids outside the header ranges are ignored."""
    labels = {}
    for token in (int(t) for t in tokens):
        if KEY_FIRST <= token <= KEY_LAST:
            mode = MODES[(token - KEY_FIRST) // 12]
            labels['key'] = key_name(token - KEY_FIRST, mode)
        elif METER_FIRST <= token <= METER_LAST and token - METER_FIRST < len(METERS):
            labels['meter'] = METERS[token - METER_FIRST]
        elif STYLE_FIRST <= token <= STYLE_LAST and token - STYLE_FIRST < len(styles):
            labels['style'] = styles[token - STYLE_FIRST]
    return labels


def tune_header(tokens):
    """The header ids (a list of ints) after a tune's start token, tokens[0]."""
    return [int(t) for t in tokens[1:4] if is_header(int(t))]


def label_slots(ids):
    """The label slots (..., 3) of ids (..., k), numpy: the header id of each kind of LABEL_KINDS, -1 where there is
    none; any other id (-1 included) is ignored. A window's head (dataset.py) is the slots of its tune's header ids
    that lie before the window."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([np.where((ids >= first) & (ids <= last), ids, -1).max(axis=-1, initial=-1)
                     for first, last in LABEL_RANGES], axis=-1)


def is_header(tokens):
    """Elementwise, numpy or torch: which ids are header tokens."""
    return (tokens >= KEY_FIRST) & (tokens <= STYLE_LAST)


def without_header(prompts):
    """Prompts ((n,) or (b, n) ids, each row with a header of one length) with their header tokens left out: what
    classifier-free guidance compares the asked prompts against. None where none holds a header: nothing is
    asked, and guidance would compare a prompt with itself."""
    keep = ~is_header(prompts)
    if bool(keep.all()):
        return None
    return prompts[keep].reshape(*prompts.shape[:-1], -1)


def transpose_keys(tokens, shift):
    """Key ids moved by shift semitones (an int, or an array broadcast against tokens), the mode kept: a tune
    transposed for augmentation keeps a header that names its key. Other ids are returned as they are."""
    where = torch.where if torch.is_tensor(tokens) else np.where
    rel = tokens - KEY_FIRST
    moved = KEY_FIRST + rel - rel % 12 + (rel % 12 + shift) % 12
    return where((tokens >= KEY_FIRST) & (tokens <= KEY_LAST), moved, tokens)


def dropped_header_tokens(count, rate, seed, epoch, stream):
    """count booleans, True for a header token left out this epoch: a draw from (seed, epoch, stream) alone, so a
    resumed run and every process leave out the same ones (stream: a window's index, or one number for a whole
    packed stream)."""
    return np.random.default_rng([seed, epoch, stream, 0x4EAD]).random(count) < rate


def off_tonic_endings(x, head=None):
    """For training windows x (rows, length): a bool tensor (rows, length - 1, NUM_TOKENS), True at the start
    token's id after every pitch of a tune whose header names its key where ending the tune there would end it off
    the tonic (the lowest pitch of the onset so far, as evaluate.final_pitch_class reads a tune's end, is not the
    key's tonic). Args.tonic_ending_loss pushes the model's probability of ending there down. The window's own next
    token is never avoided: a tune that does end off its tonic is music, not an error. A tune whose key token was left
    out is not read, nor one whose header lies before the window unless head (rows, 3; dataset.split_head) gives it;
    drum notes are no pitches."""
    rows, positions = [], []
    keys = [-1] * x.shape[0] if head is None else head[:, LABEL_KINDS.index('key')].tolist()
    for r, row in enumerate(x.tolist()):
        tonic = (keys[r] - KEY_FIRST) % 12 if keys[r] >= 0 else None
        lowest = None
        new_onset = True
        for t, token in enumerate(row[:-1]):
            if token == START_IDX:
                tonic, new_onset = None, True
            elif KEY_FIRST <= token <= KEY_LAST:
                tonic = (token - KEY_FIRST) % 12
            elif token < DUR_OFFSET:  # a time delta: a delta above 0 starts a new onset
                new_onset = new_onset or token > 0
            elif PITCH_OFFSET <= token < TONAL_END:
                pitch = (token - PITCH_OFFSET) % 128
                lowest = pitch if new_onset else min(lowest, pitch)
                new_onset = False
                if tonic is not None and lowest % 12 != tonic and row[t + 1] != START_IDX:
                    rows.append(r)
                    positions.append(t)
    avoid = torch.zeros(x.shape[0], x.shape[1] - 1, NUM_TOKENS, dtype=torch.bool)
    avoid[rows, positions, START_IDX] = True
    return avoid.to(x.device)


# -----------------------------------------------------------------------------
# the length a tune_length model is asked where no one asks a length

LENGTHS_KEPT = 256  # evenly spaced lengths kept of each style's sorted ones: the checkpoint stays small at any size


def tune_lengths(seqs, styles=()):
    """{style: sorted time steps from the start to the last onset of the tunes (token arrays, each from its start
    token) whose header names that style, '': of all tunes}, at most LENGTHS_KEPT evenly spaced ones each. A
    tune_length run stores this of its training tunes, and generate.py and evaluate.py ask each tune one of its
    style's lengths where no length is asked (drawn_lengths)."""
    found = {'': []}
    for seq in seqs:
        steps = int(time_steps(np.asarray(seq, dtype=np.int64)).sum())
        found[''].append(steps)
        style = header_labels(tune_header(seq), styles).get('style')
        if style:
            found.setdefault(style, []).append(steps)
    kept = {}
    for style, steps in found.items():
        steps = np.sort(np.asarray(steps, dtype=np.int64))
        if len(steps) > LENGTHS_KEPT:
            steps = steps[np.round(np.linspace(0, len(steps) - 1, LENGTHS_KEPT)).astype(np.int64)]
        kept[style] = steps.tolist()
    return kept


def drawn_lengths(lengths, styles_asked, rng):
    """A length (time steps) for each tune, drawn at random (rng: numpy's Generator) from lengths (tune_lengths)
    among those of the style it is asked, among all where it asks none or one the table lacks."""
    return [int(rng.choice(lengths.get(style) or lengths[''])) for style in styles_asked]


# -----------------------------------------------------------------------------
# labels in the MIDI files written

def write_labels(path, labels):
    """Give the MIDI file at path the key signature and time signature of labels (those it has) at its start, in
    place of any it holds: a sample asked for D major in 6/8 says so in every notation program."""
    events = []
    if labels.get('key'):
        events.append(['key_signature', 0, *signature_of_key(labels['key'])])
    if labels.get('meter'):
        numerator, denominator = labels['meter'].split('/')
        events.append(['time_signature', 0, int(numerator), int(denominator).bit_length() - 1, 24, 8])
    if not events:
        return
    kinds = {event[0] for event in events}
    with open(path, 'rb') as f:
        score = TMIDIX.midi2score(f.read())
    tracks = [[event for event in track if event[0] not in kinds] for track in score[1:]]
    tracks[0] = events + tracks[0]
    with open(path, 'wb') as f:
        f.write(TMIDIX.score2midi([score[0]] + tracks))
