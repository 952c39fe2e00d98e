"""A tune's labels, read from its own MIDI file and its name in the dataset: key, meter and style.

key    the file's first key signature (meta event 0x59), named by its tonic and mode: 'D major', 'B minor'. The 24
       keys are told apart by pitch class, so 6 sharps and 6 flats in major are both 'F# major'.
meter  the file's first time signature (meta event 0x58): '6/8'.
style  the first folder of the file's name in the dataset, where a zip's inside continues the path: 'reels/a.mid',
       'reels/tunes.zip::a.mid' and 'tunes.zip::reels/a.mid' are 'reels'.
A label the file does not carry (no such event, a file at the top of the dataset) is left out.

midi_labels, style_of and key_of_signature take and give what condition.py's functions of those names do (the
conditioning header's labels), except that every meter is named here, not only those with a header token: a
classifier learns the meters the data holds.
"""

import TMIDIX
from token_cache import read_midi_sources

LABELS = ('key', 'meter', 'style')
# the usual name of each tonic (pitch class 0 = C): the spelling with fewer accidentals
TONIC_NAMES = {'major': ('C', 'Db', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'Ab', 'A', 'Bb', 'B'),
               'minor': ('C', 'C#', 'D', 'Eb', 'E', 'F', 'F#', 'G', 'G#', 'A', 'Bb', 'B')}


def key_of_signature(sharps, minor):
    """'G major' for 1 sharp, 'D minor' for 1 flat and minor (1; 0 is major): the key a key signature names, or
    None for a malformed one."""
    if minor not in (0, 1) or not -7 <= sharps <= 7:
        return None
    mode = ('major', 'minor')[minor]
    # each sharp moves the major tonic a fifth up (7 semitones); the minor tonic is a minor third below it
    return f"{TONIC_NAMES[mode][(7 * sharps + 9 * minor) % 12]} {mode}"


def midi_labels(midi):
    """{'key': 'D major', 'meter': '6/8'} of MIDI bytes (or a path), from its first key and time signature events;
    a label the file lacks is left out. Raises TMIDIX.MIDIError for a file that is no MIDI."""
    time_signature, key_signature = TMIDIX.first_signatures(midi)
    labels = {}
    key = key_of_signature(key_signature[2], key_signature[3]) if key_signature else None
    if key:
        labels['key'] = key
    if time_signature and time_signature[2] and time_signature[3] < 16:  # 2**16 and more is no note value
        labels['meter'] = f'{time_signature[2]}/{2 ** time_signature[3]}'
    return labels


def style_of(name):
    """The style of a file named as token_cache.find_midi_sources names it: the first folder on its path, None for
    a file at the top ('han1' for 'essen.zip::han1/a.mid')."""
    folders = [part for segment in name.split('::') for part in segment.split('/')[:-1] if part not in ('', '.')]
    return folders[0] if folders else None


def corpus_labels(path, names):
    """{name: the labels it has} for the files of the dataset at path named in names; a file that cannot be read
    or parsed now has its style alone."""
    labels = {}
    for name, data in read_midi_sources(path, names):
        try:
            labels[name] = midi_labels(data) if data is not None else {}
        except TMIDIX.MIDIError:
            labels[name] = {}
        if style_of(name):
            labels[name]['style'] = style_of(name)
    return labels
