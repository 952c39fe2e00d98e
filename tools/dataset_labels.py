"""Key and meter labels of the MIDI files in zips: how many files carry a key signature and a time signature event,
and which key and meter each file starts in.

    python tools/dataset_labels.py content/default_dataset/essen_folksongs.zip [more.zip ...] [--by-folder]

Prints, per zip (and with --by-folder per top folder inside it), the number of files, the share with a key
signature and with a time signature event in any track, and the histograms of each file's first key and first
meter as mido names them ('Am', 'F#', '6/8'). Files mido cannot read are counted and named.
"""

import argparse
import collections
import io
import sys
import zipfile

import mido


def first_labels(data):
    """(first key, first meter) of MIDI bytes, each None when the file has no such event."""
    midi = mido.MidiFile(file=io.BytesIO(data))
    keys, meters = [], []
    for track in midi.tracks:
        tick = 0
        for message in track:
            tick += message.time
            if message.type == 'key_signature':
                keys.append((tick, message.key))
            elif message.type == 'time_signature':
                meters.append((tick, f'{message.numerator}/{message.denominator}'))
    return min(keys)[1] if keys else None, min(meters)[1] if meters else None


def histogram(counter):
    by_count = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return ', '.join(f'{label} {count}' for label, count in by_count)


def report(title, labels):
    files = len(labels)
    keys = collections.Counter(key for key, _ in labels if key)
    meters = collections.Counter(meter for _, meter in labels if meter)
    print(f'{title}: {files} files, key signature {sum(keys.values())} ({100 * sum(keys.values()) / files:.1f}%), '
          f'time signature {sum(meters.values())} ({100 * sum(meters.values()) / files:.1f}%)')
    print(f'  first keys:   {histogram(keys)}')
    print(f'  first meters: {histogram(meters)}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('zips', nargs='+')
    parser.add_argument('--by-folder', action='store_true', help='also report each top folder inside a zip')
    args = parser.parse_args(argv)
    for path in args.zips:
        labels, unreadable = {}, []
        try:
            with zipfile.ZipFile(path) as archive:
                for name in sorted(archive.namelist()):
                    if not name.lower().endswith(('.mid', '.midi')):
                        continue
                    try:
                        labels[name] = first_labels(archive.read(name))
                    except (OSError, EOFError, ValueError, KeyError, IndexError) as error:
                        unreadable.append(f'{name} ({type(error).__name__})')
        except (OSError, zipfile.BadZipFile) as error:
            sys.exit(f'dataset_labels: cannot read {path}: {error}')
        if not labels:
            sys.exit(f'dataset_labels: {path} holds no readable .mid or .midi files')
        report(path, list(labels.values()))
        if args.by_folder:
            for folder in sorted({name.split('/')[0] for name in labels}):
                report(f'  {folder}/', [label for name, label in labels.items() if name.split('/')[0] == folder])
        if unreadable:
            print(f'  unreadable: {len(unreadable)}: {", ".join(unreadable[:10])}')


if __name__ == '__main__':
    main()
