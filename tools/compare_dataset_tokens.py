"""Check that two builds of a dataset zip give the model the same tokens, file by file.

A rebuilt zip may differ in bytes (a key signature added, a title changed) while every file still
tokenizes to the same ids; then caches, splits and checkpoints made from the old zip stay valid.
This tool tokenizes every member of both zips with tokens.tokenize_midi under each setting asked for
and reports the members whose tokens differ, and the names found in only one zip.

    python tools/compare_dataset_tokens.py OLD.zip NEW.zip              # tracks 'all' and 'melody', ms timing
    python tools/compare_dataset_tokens.py OLD.zip NEW.zip --timing beats
"""

import argparse
import pathlib
import sys
import zipfile
import zlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the project's modules live at the repository root

from tokens import tokenization_settings, tokens_or_error  # noqa: E402


def same_tokens(old, new):
    """Equal token arrays, or the same refusal (a TMIDIX.MIDIError of the same message) of both files."""
    if isinstance(old, Exception) or isinstance(new, Exception):
        return repr(old) == repr(new)
    return np.array_equal(old, new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('old', type=pathlib.Path)
    parser.add_argument('new', type=pathlib.Path)
    parser.add_argument('--timing', choices=('ms', 'beats'), default='ms', help='default: %(default)s')
    parser.add_argument('--tracks', nargs='+', choices=('all', 'melody'), default=['all', 'melody'],
                        help='default: all melody')
    args = parser.parse_args(argv)
    try:
        old, new = zipfile.ZipFile(args.old), zipfile.ZipFile(args.new)
    except (OSError, zipfile.BadZipFile) as error:
        sys.exit(f'error: cannot open a zip: {error}')
    old_names = {name for name in old.namelist() if not name.endswith('/')}
    new_names = {name for name in new.namelist() if not name.endswith('/')}
    for name in sorted(old_names ^ new_names):
        print(f'only in {args.old if name in old_names else args.new}: {name}')
    differing = 0
    try:
        for tracks in args.tracks:
            settings = tokenization_settings(timing=args.timing, tracks=tracks)
            changed = [name for name in sorted(old_names & new_names)
                       if not same_tokens(tokens_or_error(old.read(name), settings),
                                          tokens_or_error(new.read(name), settings))]
            for name in changed[:20]:
                print(f'tokens differ (tracks={tracks}): {name}')
            print(f'tracks={tracks}, timing={args.timing}: {len(old_names & new_names) - len(changed)} of '
                  f'{len(old_names & new_names)} files give identical tokens')
            differing += len(changed)
    except (OSError, zipfile.BadZipFile, zlib.error) as error:
        sys.exit(f'error: cannot read a member: {error}')
    if differing or old_names != new_names:
        sys.exit(1)


if __name__ == '__main__':
    main()
