"""What the model sees of a MIDI file: its tokens summed up, and optionally written back as MIDI.

    python tools/tokenize_file.py FILE [FILE ...] [--tracks all|melody|parts] [--timing ms|beats] [--out OUT.mid]

--tracks melody prints one line per file: the part chosen as the tune and why (see docs/melody.md).
--tracks parts prints the notes of each role (count, pitch range, program, the tracks or channels they come from).
--tracks all prints the notes kept (every non-drum note, merged). --out (one FILE only) writes the tokens back as
MIDI, as generate.py writes samples: what a model trained on these tokens would play back ('parts': a track per
role, each with the program most of the role's notes play in FILE). Tracks are numbered as the file's track chunks,
0 being the first (usually the tempo track, so track 1 is the first a DAW shows); channels count 1-16 (drums 10);
programs count from 0, as in the MIDI bytes. A file that cannot be read or gives no notes gets one line, and the
exit status is 1.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import TMIDIX  # noqa: E402
from options import ArgumentParser  # noqa: E402
from parts import ROLES, part_label, part_roles, pitched_parts, role_programs  # noqa: E402
from runtime import sigterm_as_ctrl_c, stopped_by  # noqa: E402
from token_cache import NotMidiFile, printable, read_midi_file, write_atomically  # noqa: E402
from tokens import (  # noqa: E402
    PITCH_OFFSET,
    bpm_of_tempo,
    detokenize,
    is_pitch,
    midi_pitch,
    tokenization_settings,
    tokenize_midi,
)

NOTE_NAMES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')


def note_name(pitch):
    return f'{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}'  # MIDI 60 is C4


def span(pitches, drums=False):
    low, high = int(min(pitches)), int(max(pitches))
    return f'keys {low}-{high}' if drums else f'{note_name(low)}-{note_name(high)}'


class BadInput(Exception):
    """A file this tool cannot show: one line says why."""


def describe(path, settings):
    """(lines to print, tokens, tempo in usec per quarter, programs per role) of one file."""
    try:
        if not Path(path).exists():
            raise BadInput('no such file')
        data = read_midi_file(path)
        tokens, n_notes, tempo = tokenize_midi(data, settings)
    except NotMidiFile as e:
        raise BadInput(str(e)) from None
    except OSError as e:
        raise BadInput(f'cannot read it: {e.strerror or e}') from None
    except TMIDIX.MIDIError as e:
        raise BadInput(f'cannot read it as MIDI: {e}') from None
    tracks = settings.get('tracks', 'all')
    if n_notes == 0:
        kept = {'all': 'no pitched notes (drums are left out)', 'melody': 'no pitched notes (drums are never the tune)',
                'parts': 'no notes'}[tracks]
        raise BadInput(kept)
    ids = tokens[is_pitch(tokens)].astype(np.int64)
    head = f'{path}: {n_notes} notes, {len(tokens)} tokens'
    if tracks == 'all':
        line = f"{head}, pitches {span(midi_pitch(ids))} (tracks='all': every non-drum note, merged)"
        return [line], tokens, tempo, {}
    notes, names, programs = TMIDIX.midi2notes(data, unit='ticks', with_track=True, with_programs=True)
    roles, members, reason = part_roles(notes, names, programs)
    if tracks == 'melody':
        return [f'{path}: {reason} -- {n_notes} notes {span(midi_pitch(ids))}, {len(tokens)} tokens'], tokens, tempo, {}
    parts = pitched_parts(notes)
    drum_parts = {key: [] for key in members['drums']}
    programs_of = role_programs(notes, roles, programs)
    lines = [f"{head} (tracks='parts')", f'  melody choice: {reason}']
    for number, role in enumerate(ROLES):
        mine = ids[(ids - PITCH_OFFSET) // 128 == number]
        if not len(mine):
            continue
        program = f'program {programs_of[role]}' if role in programs_of else 'kit' if role == 'drums' else 'no program'
        where = ', '.join(part_label(key, {**parts, **drum_parts}, names) for key in members[role])
        lines.append(f'  {role:8s}{len(mine):6d} notes  {span(midi_pitch(mine), role == "drums"):10s} {program:12s} '
                     f'from {where}')
    return lines, tokens, tempo, programs_of


def show(path, settings, out=None):
    """Print what the model sees of one file and write its tokens back to out, when given; False where the file
    cannot be shown (one line says why)."""
    try:
        lines, tokens, tempo, programs = describe(path, settings)
    except BadInput as e:
        print(printable(f'tokenize_file: {path}: {e}'), file=sys.stderr)
        return False
    # file and track names are any bytes: a newline or a terminal escape in one stays on its line, escaped
    print('\n'.join(printable(line) for line in lines))
    if out:
        def write(tmp):
            detokenize(tokens, tmp, settings, tempo_bpm=bpm_of_tempo(tempo), programs=programs)
        try:  # whole or not there; the temporary name ends in .mid, so detokenize adds nothing to it
            write_atomically(out, write, suffix='.mid')
        except OSError as e:
            sys.exit(printable(f'tokenize_file: cannot write {out}: {e.strerror or e}'))
        print(printable(f'wrote {out}'))
    return True


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('files', nargs='+', metavar='FILE')
    parser.add_argument('--tracks', default='all', choices=('all', 'melody', 'parts'))
    parser.add_argument('--timing', default='ms', choices=('ms', 'beats'))
    parser.add_argument('--out', default=None, help='write the tokens back to this MIDI file (one FILE only)')
    args = parser.parse_args(argv)
    if args.out is not None and not args.out:
        sys.exit("tokenize_file: --out '': give the name of the MIDI file to write")
    if args.out and len(args.files) > 1:
        sys.exit(f'tokenize_file: --out takes one FILE, got {len(args.files)}')
    out = None
    if args.out:
        # what detokenize writes: the name with .mid added unless it ends so
        out = Path(args.out if args.out.lower().endswith('.mid') else args.out + '.mid')
        if Path(args.out).is_dir() or out.is_dir():
            sys.exit(printable(f'tokenize_file: --out {args.out} is a folder; give a file name'))
        if out.exists() and out.resolve() == Path(args.files[0]).resolve():
            sys.exit(printable(f'tokenize_file: --out {out} is the input file; write the round trip to another name'))
    settings = tokenization_settings(args.timing, tracks=args.tracks)
    try:
        with sigterm_as_ctrl_c():
            shown = [show(path, settings, out) for path in args.files]
    except KeyboardInterrupt as e:
        how, code = stopped_by(e)
        print(printable(f'tokenize_file: stopped by {how}' + (f'; {out} is not written' if out else '')),
              file=sys.stderr)
        sys.exit(code)
    sys.exit(0 if all(shown) else 1)


if __name__ == '__main__':
    main()
