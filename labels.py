"""A tune's labels, read from its own MIDI file and its name in the dataset: key, meter and style.

key    the file's first key signature (meta event 0x59), named by its tonic and mode: 'D major', 'B minor'. The 24
       keys are told apart by pitch class, so 6 sharps and 6 flats in major are both 'F# major'.
meter  the file's first time signature (meta event 0x58): '6/8'.
style  the first folder of the file's name in the dataset, where a zip's inside continues the path: 'reels/a.mid',
       'reels/tunes.zip::a.mid' and 'tunes.zip::reels/a.mid' are 'reels'.
A label the file does not carry (no such event, a file at the top of the dataset) is left out.

midi_labels is condition.py's (the conditioning header's labels) with every meter named, not only those with a
header token: a classifier learns the meters the data holds.
"""

import condition
import TMIDIX
from condition import style_of
from token_cache import read_midi_sources

LABELS = ('key', 'meter', 'style')


def midi_labels(midi):
    """{'key': 'D major', 'meter': '7/8'} of MIDI bytes (or a path); a label the file lacks is left out. Raises
    TMIDIX.MIDIError for a file that is no MIDI."""
    return condition.midi_labels(midi, every_meter=True)


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
