"""One SHA-1 per tokenization over the tokens of every MIDI file in a zip: shows whether a change moves any token id.

    python tools/token_digest.py [ZIP] [--tracks all,melody,parts] [--timing ms,beats] [--every N]

ZIP defaults to the bundled Essen set. Members are read in name order; --every N reads every Nth of them. Prints
one line per (tracks, timing) pair: the pair, the digest, the number of files and of tokens. A file TMIDIX cannot
read adds its name and the error's class to the digest instead of tokens, so a change there shows too.
"""

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokens import tokenization_settings, tokens_or_error  # noqa: E402

ESSEN = Path(__file__).resolve().parents[1] / 'content' / 'default_dataset' / 'essen_folksongs.zip'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('zip', nargs='?', default=str(ESSEN))
    parser.add_argument('--tracks', default='all,melody', help='comma-separated: all, melody, parts')
    parser.add_argument('--timing', default='ms', help="comma-separated: ms, beats (beats at Args' 12 a quarter)")
    parser.add_argument('--every', type=int, default=1)
    args = parser.parse_args()
    try:
        runs = {(tracks, timing): tokenization_settings(timing, tracks=tracks)
                for tracks in args.tracks.split(',') for timing in args.timing.split(',')}
    except ValueError as e:
        sys.exit(f'token_digest: {e}')
    digests = {run: hashlib.sha1() for run in runs}
    counts = {run: [0, 0] for run in runs}
    try:
        with zipfile.ZipFile(args.zip) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(('.mid', '.midi')))[::max(args.every, 1)]
            for name in names:
                data = zf.read(name)
                for run, settings in runs.items():
                    digests[run].update(name.encode())
                    tokens = tokens_or_error(data, settings)
                    if isinstance(tokens, Exception):
                        digests[run].update(type(tokens).__name__.encode())
                        continue
                    digests[run].update(tokens.astype('<u2').tobytes())
                    counts[run][0] += 1
                    counts[run][1] += len(tokens)
    except (OSError, zipfile.BadZipFile) as e:
        sys.exit(f'token_digest: cannot read {args.zip}: {e}')
    for (tracks, timing), digest in digests.items():
        files, tokens = counts[tracks, timing]
        print(f'{tracks} {timing} {digest.hexdigest()} {files} files {tokens} tokens')


if __name__ == '__main__':
    main()
