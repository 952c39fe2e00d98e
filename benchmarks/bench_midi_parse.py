"""Notes per second of MIDI readers (and TMIDIX's writer) over a folder of MIDI files.

    python benchmarks/bench_midi_parse.py [FOLDER] [--repeats N] [--piano N] [--pop N]

Parses every .mid/.midi/.kar/.rmi file in FOLDER, in one run, with TMIDIX.midi2single_track_ms_score
(every event materialised), TMIDIX.midi2notes (the dataset's path), mido (merged-track iteration),
pretty_midi and symusic, and prints notes/s for each plus TMIDIX's ratios to pretty_midi, measured
in the same run. Files are read into memory first, so disk speed is not measured. Each reader's
time is the best of --repeats passes over the whole corpus. Without FOLDER a synthetic corpus is
written (fixed seed, mido) to a temporary folder: piano-performance-like files (type 1, 5-20k notes,
a tempo map of hundreds of changes on its own track, sustain pedal, varied velocities) and
pop-multitrack-like files (several instruments and drums, a few tempo changes).
Goals: midi2single_track_ms_score >= 5x pretty_midi, midi2notes >= 10x, writer >= 500k notes/s.
"""

import argparse
import io
import os
import platform
import random
import sys
import tempfile
import time
import warnings

import mido
import pretty_midi
import symusic

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import TMIDIX  # noqa: E402

MIDI_SUFFIXES = ('.mid', '.midi', '.kar', '.rmi')


def _write_track(pairs):
    """(absolute tick, message) -> mido track with delta times."""
    track = mido.MidiTrack()
    now = 0
    for tick, message in sorted(pairs, key=lambda pair: pair[0]):
        message.time = tick - now
        track.append(message)
        now = tick
    return track


def make_piano_file(rng, path):
    n_notes = rng.randrange(5000, 20001)
    length = n_notes * 60
    tempo_map = [(rng.randrange(length), mido.MetaMessage('set_tempo', tempo=rng.randrange(300000, 1000000)))
                 for _ in range(rng.randrange(100, 600))]
    playing = []
    for _ in range(n_notes):
        tick = rng.randrange(length)
        pitch = rng.randrange(21, 109)
        playing.append((tick, mido.Message('note_on', note=pitch, velocity=rng.randrange(20, 128))))
        playing.append((tick + rng.randrange(10, 1500), mido.Message('note_off', note=pitch, velocity=64)))
    for tick in range(0, length, 400):
        playing.append((tick + rng.randrange(200), mido.Message('control_change', control=64, value=rng.choice((0, 127)))))
    song = mido.MidiFile(type=1, ticks_per_beat=384)
    song.tracks += [_write_track(tempo_map), _write_track(playing)]
    song.save(path)


def make_pop_file(rng, path):
    song = mido.MidiFile(type=1, ticks_per_beat=480)
    song.tracks.append(_write_track([(bar * 1920 * 16, mido.MetaMessage('set_tempo', tempo=rng.randrange(400000, 700000)))
                                     for bar in range(4)]))
    for channel, program in ((0, 0), (1, 33), (2, 25), (3, 48), (9, 0)):
        part = [(0, mido.Message('program_change', channel=channel, program=program))]
        for step in range(0, 1920 * 64, rng.choice((120, 240, 480))):
            pitch = (35 + rng.randrange(12)) if channel == 9 else rng.randrange(40, 84)
            part.append((step, mido.Message('note_on', channel=channel, note=pitch, velocity=rng.randrange(50, 120))))
            part.append((step + 100, mido.Message('note_on', channel=channel, note=pitch, velocity=0)))
        song.tracks.append(_write_track(part))
    song.save(path)


def make_corpus(folder, n_piano, n_pop):
    rng = random.Random(0)
    for i in range(n_piano):
        make_piano_file(rng, os.path.join(folder, f'piano_{i:02d}.mid'))
    for i in range(n_pop):
        make_pop_file(rng, os.path.join(folder, f'pop_{i:02d}.mid'))


def read_mido(data):
    count = 0
    for message in mido.MidiFile(file=io.BytesIO(data)):  # merged tracks, times in seconds
        if message.type == 'note_on' and message.velocity:
            count += 1
    return count


READERS = {
    'TMIDIX.midi2single_track_ms_score': lambda data: TMIDIX.midi2single_track_ms_score(data),
    'TMIDIX.midi2notes': lambda data: TMIDIX.midi2notes(data),
    'mido (merged iteration)': read_mido,
    'pretty_midi': lambda data: pretty_midi.PrettyMIDI(io.BytesIO(data)),
    'symusic': lambda data: symusic.Score.from_midi(data, ttype='second'),
}


def best_time(function, items, repeats):
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', nargs='?', help='folder of MIDI files (default: a synthetic corpus)')
    parser.add_argument('--repeats', type=int, default=2, help='passes per reader; the best is kept')
    parser.add_argument('--piano', type=int, default=20, help='synthetic piano-performance files')
    parser.add_argument('--pop', type=int, default=10, help='synthetic pop-multitrack files')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            folder = os.path.join(scratch, 'corpus')
            os.mkdir(folder)
            make_corpus(folder, args.piano, args.pop)
        files = []
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(MIDI_SUFFIXES):
                with open(os.path.join(folder, name), 'rb') as f:
                    data = f.read()
                try:  # a file every reader can parse, so all of them do the same work
                    for read in READERS.values():
                        with warnings.catch_warnings():
                            warnings.simplefilter('ignore')
                            read(data)
                except Exception as e:
                    print(f'skipping {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}')
                    continue
                files.append(data)
        if not files:
            sys.exit(f'no readable MIDI files in {folder}')
        n_notes = sum(len(TMIDIX.midi2notes(data)) for data in files)
        print(f'{len(files)} files, {n_notes} notes, {sum(map(len, files)) / 1e6:.1f} MB; '
              f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}')

        rates = {}
        for name, read in READERS.items():
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                rates[name] = n_notes / best_time(read, files, args.repeats)
            print(f'{name:36s} {rates[name]:>12,.0f} notes/s')

        songs = [[ev for ev in TMIDIX.midi2single_track_ms_score(data)[1] if ev[0] == 'note'] for data in files]
        out = os.path.join(scratch, 'written')
        write = lambda song: TMIDIX.Tegridy_ms_SONG_to_MIDI_Converter(song, output_file_name=out, verbose=False)
        n_written = sum(map(len, songs))
        writer_rate = n_written / best_time(write, songs, args.repeats)
        print(f'{"TMIDIX writer (Tegridy_ms_SONG...)":36s} {writer_rate:>12,.0f} notes/s')
        # the same without creating a file: with many small files, opening files is most of the writer's time
        memory_rate = n_written / best_time(lambda song: TMIDIX.score2midi([1000, song]), songs, args.repeats)
        print(f'{"TMIDIX score2midi (bytes, no file)":36s} {memory_rate:>12,.0f} notes/s')

    reference = rates['pretty_midi']
    print('\nTMIDIX against pretty_midi, same run:')
    for name, goal in (('TMIDIX.midi2single_track_ms_score', 5), ('TMIDIX.midi2notes', 10)):
        ratio = rates[name] / reference
        print(f'  {name:36s} {ratio:6.1f}x  (goal >= {goal}x: {"met" if ratio >= goal else "NOT met"})')
    print(f'  {"mido":36s} {rates["mido (merged iteration)"] / reference:6.2f}x')
    print(f'  {"symusic (C++ ceiling)":36s} {rates["symusic"] / reference:6.1f}x')
    print(f'  writer {writer_rate:,.0f} notes/s (goal >= 500,000: {"met" if writer_rate >= 500000 else "NOT met"})')


if __name__ == '__main__':
    main()
