"""Build the bundled datasets from music21's corpus, each a zip of MIDI files.

--set essen (the default): the Essen Folksong Collection, one MIDI file per tune, into
content/default_dataset/essen_folksongs.zip, the training data to use when content/dataset holds no
MIDI. music21's corpus carries the collection as ABC text (Seymour Schlien's conversion of the EsAC
encodings). This tool reads every tune with music21, keeps the melody (onset, duration and pitch of
each note), the meter, the key and the tempo, and writes each tune as MIDI with TMIDIX.score2midi.

--set irish: O'Neill's, Ryan's and Aird's Irish and Scottish tunes the same way, repeats written
out, into content/irish_scottish_dataset/irish_scottish_tunes.zip.

--set parts: the four-part Bach chorales and string quartets, one track per part, into
content/parts_dataset/chorales_and_quartets.zip.

music21 is needed only here (`pip install music21`), never at run time. The README.md next to each
zip says what was converted, how, and under which terms.

    python tools/build_default_dataset.py              # rebuild the Essen zip and print a summary
    python tools/build_default_dataset.py --check 20   # also read 20 written files back and compare
    python tools/build_default_dataset.py --set parts  # the multi-part set
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import io
import math
import os
import pathlib
import re
import statistics
import sys
import time
import unicodedata
import warnings
import zipfile
from fractions import Fraction

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # TMIDIX.py lives at the repository root

DEFAULT_OUTPUT = REPO_ROOT / 'content' / 'default_dataset' / 'essen_folksongs.zip'
TICKS_PER_QUARTER = 480     # divisible by 3 and 5, so triplets and quintuplets land on whole ticks
DEFAULT_QPM = 120.0         # quarter notes per minute; no Essen tune in music21 has a Q: field
CHANNEL = 0
PROGRAM = 0                 # General MIDI acoustic grand piano: the plain choice for a melody-only corpus
VELOCITY = 90               # EsAC encodes no dynamics, so every note gets the same loudness
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)   # earliest date a zip can hold; fixed so rebuilds are byte-identical
# music21's own parser test files: copies of a few Essen tunes under made-up origins, not real data.
FIXTURE_FILES = {'test0', 'test1', 'testd', 'teste'}
# The files carry no ABC version line, and music21 then reads them as ABC 1.3, where an accidental
# applies to one note only. Schlien's files follow the 2.x rule (an accidental lasts to the bar
# line): within a bar they write a sign again only when it changes (141 times) and never repeat
# one, while a bare note follows an altered one of the same pitch 2,649 times. '_B2B2' is two B flats.
ABC_VERSION_LINE = '%abc-2.1\n'
ESAC_ID = re.compile(r'^N:\s*([A-Z]*\d+[A-Z]*)\s*$', re.MULTILINE)   # e.g. 'N: E0001A'
HIGHLAND_PIPES_KEY = re.compile(r'^K:\s*H[Pp]\b', re.MULTILINE)
TITLE = re.compile(r'^T:\s*(.*?)\s*$', re.MULTILINE)
NUMBER = re.compile(r'^X:\s*(\d+)', re.MULTILINE)
HEADER_LINE = re.compile(r'^([A-Za-z]:|%)')
# What may stand in a tune body besides notes, rests, ties and bar lines is punctuation; a digit or
# letter left over means the conversion lost a note letter ('3A2c22A2', 'K: H' tunes) or a comment
# line lost its 'N:' and would be read as notes. music21 reads such tunes without complaint, wrongly.
BODY_TOKEN = re.compile(r"[_^=]*[A-Ga-gz][,']*\d*(/\d*)?|\(\d|[|\s-]")

MAJOR_THIRD_MODES = {'major', 'ionian', 'mixolydian', 'lydian'}
MINOR_THIRD_MODES = {'minor', 'aeolian', 'dorian', 'phrygian', 'locrian'}


@dataclasses.dataclass(frozen=True)
class TuneSet:
    """A collection of single-line ABC tunes in music21's corpus, and how to read it."""
    output: pathlib.Path    # the zip written
    corpus: str             # folder under music21/corpus
    folders: tuple          # (subfolder whose .abc files are read, top folder of its tunes in the zip, '' for none)
    essen_format: bool      # EsAC catalogue ids in N: lines, and Schlien's body conventions
    expand_repeats: bool    # write repeats and first/second endings out as played


TUNE_SETS = {
    'essen': TuneSet(DEFAULT_OUTPUT, 'essenFolksong', (('.', ''),), essen_format=True, expand_repeats=False),
    # one short lowercase top folder per printed collection, as a conditioned model's style is the
    # first folder of a file's name
    'irish': TuneSet(REPO_ROOT / 'content' / 'irish_scottish_dataset' / 'irish_scottish_tunes.zip', '.',
                     (('airdsAirs', 'airds'), ('oneills1850', 'oneills1850'), ('ryansMammoth', 'ryans')),
                     essen_format=False, expand_repeats=True),
}


class SkipTune(Exception):
    """A tune that cannot become a melody; the message is the reason, counted in the summary."""


@dataclasses.dataclass
class Melody:
    name: str               # path inside the zip, e.g. 'erk10/0001_E0001_es-freit-ein-wilder-wassermann.mid'
    title: str              # ASCII form of the T: field
    qpm: float              # tempo in quarter notes per minute
    time_signatures: list   # (tick, numerator, denominator)
    key_signatures: list    # (tick, sharps (negative: flats), 1 for minor else 0)
    notes: list             # (start_tick, duration_ticks, midi_pitch), sorted by start
    graces_dropped: int
    repeats_as_written: bool = False    # the set writes repeats out, but music21 could not do it right for this tune


def music21_corpus_dir():
    import music21
    return pathlib.Path(music21.__file__).parent / 'corpus'


def split_tunes(text):
    """One ABC file holds many tunes, each starting at its own X: line."""
    return [chunk for chunk in re.split(r'(?m)^(?=X:)', text) if chunk.startswith('X:')]


def ascii_text(text):
    # Titles are German, Dutch, Chinese pinyin...; drop accents rather than whole letters.
    return unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode('ascii')


def slugify(title, max_length=40):
    slug = re.sub(r'[^a-z0-9]+', '-', ascii_text(title).lower()).strip('-')
    return slug[:max_length].rstrip('-') or 'untitled'


def tune_name(collection, abc_text, with_esac_id=True):
    number = NUMBER.search(abc_text)
    esac_id = with_esac_id and ESAC_ID.search(abc_text)
    title = TITLE.search(abc_text)
    title = ascii_text(title.group(1)) if title else ''
    parts = [f'{int(number.group(1)):04d}' if number else '0000']
    if esac_id:
        parts.append(esac_id.group(1))
    parts.append(slugify(title))
    return f'{collection}/{"_".join(parts)}.mid', title


def check_abc_body(abc_text):
    body = '\n'.join(line for line in abc_text.splitlines() if not HEADER_LINE.match(line))
    leftover = BODY_TOKEN.sub('', body)
    if re.search(r'[0-9A-Za-z]', leftover):
        raise SkipTune('malformed ABC body (a length without a note, or stray text)')


def to_ticks(quarters):
    # music21 offsets are floats when exact in binary and Fractions otherwise (triplets).
    return round(Fraction(quarters) * TICKS_PER_QUARTER)


def signatures_of(score, kind):
    """(offset in quarters, signature) in time order, kind 'TimeSignature' or 'KeySignature' (a Key
    is one too). Not via flatten(): music21 puts one signature object into several bars, and a
    flattened stream keeps it at one place only."""
    found = []
    for part in getattr(score, 'parts', None) or [score]:   # a Score, or a Part on its own
        # A tune with (almost) no bar lines gets no Measures; its signature then sits in the part.
        for signature in part.getElementsByClass(kind):
            found.append((Fraction(part.elementOffset(signature)), signature))
        for measure in part.getElementsByClass('Measure'):
            for signature in measure.getElementsByClass(kind):
                found.append((Fraction(measure.offset) + Fraction(measure.elementOffset(signature)), signature))
    return sorted(found, key=lambda item: item[0])


def midi_key(signature):
    """(sharps, minor) for a MIDI key signature event, or None when MIDI cannot hold it.

    MIDI knows only major and minor. A modal key keeps its tonic and becomes the major or minor key
    with the same third (A dorian -> A minor, D mixolydian -> D major), so a reader of the event
    still finds the tune's home note; its signature may then differ from the written one by one
    accidental. A bare signature with no mode (music21 reads 'K: Es' that way) is taken as major."""
    from music21 import key
    mode = getattr(signature, 'mode', None)
    if mode in MAJOR_THIRD_MODES or mode in MINOR_THIRD_MODES:
        minor = mode in MINOR_THIRD_MODES
        sharps = key.Key(signature.tonic, 'minor' if minor else 'major').sharps
    else:
        minor, sharps = False, signature.sharps
    return (sharps, int(minor)) if -7 <= sharps <= 7 else None


def key_name(sharps, minor):
    """'D major', 'E minor': the key a MIDI key signature event names."""
    tonics = ('Ab Eb Bb F C G D A E B F# C# G# D# A#' if minor else 'Cb Gb Db Ab Eb Bb F C G D A E B F# C#').split()
    return f'{tonics[sharps + 7]} {"minor" if minor else "major"}'


def changes_at_ticks(signatures, shift, value):
    """[(tick, *value(signature))] with repeats and several at one tick dropped; value(signature)
    is a tuple, or None for a signature MIDI cannot hold."""
    changes = []
    for offset, signature in signatures:
        fields = value(signature)
        if fields is None:
            continue
        # A signature at offset 0 sits in the pickup bar, which now starts mid-bar; it belongs at 0.
        tick = to_ticks(offset + shift) if offset else 0
        if changes and changes[-1][0] == tick:
            changes.pop()   # an empty bar between two signatures: the later one counts
        if not changes or changes[-1][1:] != fields:
            changes.append((tick, *fields))
    return changes


def meter_of(signature):
    # MIDI stores the denominator as a power of two; nothing else fits
    exponent = math.log2(signature.denominator)
    return (signature.numerator, signature.denominator) if exponent == int(exponent) else None


def parse_tune(abc_text, tune_set):
    """music21's score of one ABC tune, its repeats written out when the set asks for it and music21 can:
    (score, whether its repeats were kept as written instead)."""
    from music21 import converter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')     # music21 warns about cosmetic things (beams, clefs)
            score = converter.parse(ABC_VERSION_LINE + abc_text, format='abc')
    except Exception as error:  # music21 raises many unrelated exception types for bad ABC
        raise SkipTune(f'music21 cannot parse it ({type(error).__name__})') from None
    if not tune_set.expand_repeats:
        return score, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            expanded = score.expandRepeats()
    except Exception:   # repeats music21 cannot follow: kept as written, the tune played once through
        return score, True
    # music21 takes a ':|' with no '|:' since the last ':|' back to the start of the tune (ABC means the
    # section just ended), and repeats sections cumulatively: 'A:|B:|' gives AABAAB, Aird's Yanky Doodle
    # 190 times its written notes. Played repeats at most double a tune, so more means a misreading.
    if len(expanded.flatten().notes) > 2 * len(score.flatten().notes):
        return score, True
    return expanded, False


def read_melody(collection, abc_text, default_qpm=DEFAULT_QPM, tune_set=TUNE_SETS['essen']):
    """Parse one ABC tune with music21 and keep what a melody model needs; raise SkipTune if unusable."""
    from music21 import tempo
    name, title = tune_name(collection, abc_text, tune_set.essen_format)
    if tune_set.essen_format:
        check_abc_body(abc_text)
    if HIGHLAND_PIPES_KEY.search(abc_text):
        raise SkipTune("K:Hp (bagpipe key), whose implied F and C sharps music21 does not apply")
    score, repeats_as_written = parse_tune(abc_text, tune_set)
    try:
        flat = score.stripTies().flatten()  # stripTies merges tied notes into one longer note
    except Exception as error:
        raise SkipTune(f'music21 cannot parse it ({type(error).__name__})') from None

    # A pickup bar makes music21 start the tune at offset 0; shift everything by the missing part
    # of that bar so bar lines in the MIDI file fall where the meter says.
    shift = Fraction(0)
    if score.parts:
        measures = score.parts[0].getElementsByClass('Measure')
        if measures and measures[0].paddingLeft:
            shift = Fraction(measures[0].paddingLeft)

    notes, graces_dropped = [], 0
    for element in flat.notes:      # rests are simply not written: they stay gaps between notes
        if 'Harmony' in element.classes:
            continue    # a chord symbol over the tune ('"G"' in ABC): an accompaniment hint, not a note
        if element.duration.isGrace:
            graces_dropped += 1
            continue
        if element.isChord:
            raise SkipTune('has a chord (not a single melody line)')
        start = to_ticks(Fraction(element.offset) + shift)
        end = to_ticks(Fraction(element.offset) + shift + Fraction(element.quarterLength))
        notes.append((start, max(end - start, 1), element.pitch.midi))
    if not notes:
        raise SkipTune('has no notes')
    notes.sort()
    for (start, duration, _), (next_start, _, _) in zip(notes, notes[1:]):
        if next_start < start + duration:
            raise SkipTune('has overlapping notes (not a single melody line)')

    # Essen bars are often irregular (a phrase end plus the next pickup in one bar). music21 keeps
    # the bar lines and gives such a bar its own signature (a 4/4 bar inside 4/2), so its signatures
    # describe the bars as written; they are kept, minus repeats and several at one tick.
    time_signatures = changes_at_ticks(signatures_of(score, 'TimeSignature'), shift, meter_of)
    key_signatures = changes_at_ticks(signatures_of(score, 'KeySignature'), shift, midi_key)

    qpm = default_qpm
    marks = flat.getElementsByClass(tempo.MetronomeMark)
    if marks and marks[0].getQuarterBPM():
        qpm = float(marks[0].getQuarterBPM())
    return Melody(name, title, qpm, time_signatures, key_signatures, notes, graces_dropped, repeats_as_written)


def melody_to_score(melody):
    """The melody in TMIDIX's score format: [ticks_per_quarter, [events...]]."""
    events = [
        ['track_name', 0, melody.title or 'untitled'],
        ['set_tempo', 0, round(60_000_000 / melody.qpm)],   # microseconds per quarter note
    ]
    for tick, numerator, denominator in melody.time_signatures:
        # 24 MIDI clocks per metronome click and 8 32nd notes per quarter are the usual defaults.
        events.append(['time_signature', tick, numerator, int(math.log2(denominator)), 24, 8])
    for tick, sharps, minor in melody.key_signatures:
        events.append(['key_signature', tick, sharps, minor])
    events.append(['patch_change', 0, CHANNEL, PROGRAM])
    for start, duration, pitch in melody.notes:
        events.append(['note', start, duration, CHANNEL, pitch, VELOCITY])
    return [TICKS_PER_QUARTER, events]


def read_abc_file(path, collection, tune_set, default_qpm=DEFAULT_QPM, limit=0):
    """All melodies of one ABC file: (melodies, [(tune name, skip reason)])."""
    melodies, skipped = [], []
    tunes = split_tunes(path.read_text(encoding='utf-8', errors='replace'))
    for abc_text in tunes[:limit] if limit else tunes:
        try:
            melodies.append(read_melody(collection, abc_text, default_qpm, tune_set))
        except SkipTune as reason:
            skipped.append((tune_name(collection, abc_text, tune_set.essen_format)[0], str(reason)))
    return melodies, skipped


def read_corpus(corpus_dir, tune_set, limit, jobs, default_qpm):
    """Every usable melody in the corpus, in a fixed order, plus the skipped tunes with reasons."""
    # the collection is the file's name under its zip folder: 'erk10', 'airds/book1'
    paths = sorted((path, f'{zip_folder}/{path.stem}' if zip_folder else path.stem)
                   for folder, zip_folder in tune_set.folders for path in (corpus_dir / folder).glob('*.abc')
                   if path.stem not in FIXTURE_FILES)
    if not paths:
        sys.exit(f'error: no .abc files in {corpus_dir}; is music21 installed with its corpus?')
    melodies, skipped = [], []
    # Each file is parsed independently; map() keeps results in file order, so output is stable.
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(read_abc_file, path, collection, tune_set, default_qpm, limit)
                   for path, collection in paths]
        for future in futures:
            file_melodies, file_skipped = future.result()
            melodies += file_melodies
            skipped += file_skipped
            if limit and len(melodies) >= limit:
                pool.shutdown(cancel_futures=True)  # files not started yet are not needed
                break
    return melodies[:limit] if limit else melodies, skipped


def melody_identity(melody):
    return tuple(melody.notes), tuple(melody.time_signatures)


def drop_duplicates(items, identity=melody_identity):
    """Keep the first of items that are note-for-note identical (the collections overlap)."""
    seen, kept, dropped = set(), [], []
    for item in items:
        key = identity(item)
        if key in seen:
            dropped.append((item.name, 'exact duplicate of an earlier one'))
        else:
            seen.add(key)
            kept.append(item)
    return kept, dropped


def write_zip(files, output):
    """Pack {name: bytes} so that the same input gives the same zip bytes (sorted, fixed dates)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3              # 'made on Unix' everywhere, not whatever builds it
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name], compresslevel=9)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buffer.getvalue())


def music21_view(corpus_dir, name, tune_set):
    """music21's reading of the tune a zip member came from: onsets (quarters), pitches, meters, and
    keys as pretty_midi numbers them (tonic pitch class, plus 12 for minor)."""
    from music21 import key, meter
    collection, file_name = name.rsplit('/', 1)
    number = int(file_name.split('_')[0])
    zip_folder, _, stem = collection.rpartition('/')
    folder = next(folder for folder, named in tune_set.folders if named == zip_folder)
    text = (corpus_dir / folder / f'{stem}.abc').read_text(encoding='utf-8', errors='replace')
    abc_text = next(t for t in split_tunes(text) if int(NUMBER.search(t).group(1)) == number)
    score = parse_tune(abc_text, tune_set)[0].stripTies()
    notes = [(Fraction(n.getOffsetInHierarchy(score)), n.pitch.midi)
             for n in score.recurse().notes if not n.duration.isGrace and 'Harmony' not in n.classes]
    meters = []     # (offset, numerator, denominator): one per instant, repeats dropped
    for signature in score.recurse().getElementsByClass(meter.TimeSignature):
        offset = Fraction(signature.getOffsetInHierarchy(score))
        if meters and meters[-1][0] == offset:
            meters.pop()
        if not meters or meters[-1][1:] != (signature.numerator, signature.denominator):
            meters.append((offset, signature.numerator, signature.denominator))
    keys = []
    for signature in score.recurse().getElementsByClass(key.KeySignature):
        mode = getattr(signature, 'mode', None)
        if mode in MAJOR_THIRD_MODES or mode in MINOR_THIRD_MODES:
            number = signature.tonic.pitchClass + 12 * (mode in MINOR_THIRD_MODES)
        else:
            number = signature.sharps * 7 % 12     # the major key with that many sharps
        if not keys or keys[-1] != number:
            keys.append(number)
    return notes, meters, keys


def check_files(output, corpus_dir, tune_set, count):
    """Read `count` files back with TMIDIX, mido and pretty_midi and compare each with music21's
    own reading of the ABC: same pitches, same onsets (relative to the first note), same meters and keys."""
    import mido
    import pretty_midi

    import TMIDIX
    with zipfile.ZipFile(output) as archive:
        names = sorted(archive.namelist())
        picked = names[::max(len(names) // count, 1)][:count]
        failures = 0
        for name in picked:
            data = archive.read(name)
            expected_notes, expected_meters, expected_keys = music21_view(corpus_dir, name, tune_set)
            first_onset = expected_notes[0][0]
            expected = [(to_ticks(onset - first_onset), pitch) for onset, pitch in expected_notes]
            # Later signatures sit at bar lines, a fixed distance from the first note; the first
            # one is at tick 0 in the file, which is before the first note when there is a pickup.
            expected_meters = [(to_ticks(offset - first_onset) if offset else None, numerator, denominator)
                               for offset, numerator, denominator in expected_meters]

            tmidix = [(note[1], note[4]) for note in TMIDIX.midi2notes(data, unit='ticks')]
            midi = mido.MidiFile(file=io.BytesIO(data))
            tick, mido_notes, mido_meters = 0, [], []
            for message in midi.tracks[0]:
                tick += message.time
                if message.type == 'note_on' and message.velocity > 0:
                    mido_notes.append((tick, message.note))
                elif message.type == 'time_signature':
                    mido_meters.append((tick, message.numerator, message.denominator))
            first_tick = mido_notes[0][0] if mido_notes else 0
            mido_meters = [(tick - first_tick if tick else None, numerator, denominator)
                           for tick, numerator, denominator in mido_meters]
            problems = []
            try:
                pretty = pretty_midi.PrettyMIDI(io.BytesIO(data))
            except (ValueError, IndexError) as error:   # pretty_midi refuses files past a sanity limit of ticks
                pretty, problems = None, [f'pretty_midi cannot read it: {error}']
            pretty_notes = [] if pretty is None else [
                (pretty.time_to_tick(note.start), note.pitch)
                for note in sorted(pretty.instruments[0].notes, key=lambda n: n.start)]
            readers = [('TMIDIX', tmidix), ('mido', mido_notes)]
            readers += [('pretty_midi', pretty_notes)] if pretty is not None else []
            for reader, found in readers:
                shifted = [(t - found[0][0], pitch) for t, pitch in found] if found else []
                if shifted != expected:
                    problems.append(f'{reader} notes differ')
            keys = [] if pretty is None else [signature.key_number for signature in pretty.key_signature_changes]
            if pretty is not None and keys != expected_keys:
                problems.append(f'keys {keys} != music21 {expected_keys}')
            if mido_meters != expected_meters:
                problems.append(f'meters {mido_meters} != music21 {expected_meters}')
            if midi.ticks_per_beat != TICKS_PER_QUARTER:
                problems.append(f'ticks per quarter {midi.ticks_per_beat}')
            failures += bool(problems)
            meters = ' '.join(f'{numerator}/{denominator}' for _, numerator, denominator in expected_meters)
            print(f'check {name}: {len(expected)} notes, meters {meters[:30]}: {"; ".join(problems) or "ok"}')
    print(f'check: {len(picked) - failures} of {len(picked)} files match music21')
    return failures == 0


def print_read_and_skipped(label, read, skipped):
    print(f'{label} {read}')
    print(f'skipped:       {len(skipped)}')
    for reason, count in collections.Counter(reason for _, reason in skipped).most_common():
        print(f'  {count:6d}  {reason}')


def print_summary(tunes_read, melodies, skipped, output, seconds):
    print_read_and_skipped('tunes read:   ', tunes_read, skipped)
    counts = sorted(len(melody.notes) for melody in melodies)
    print(f'files written: {len(melodies)} -> {output} ({output.stat().st_size / 1e6:.2f} MB)')
    print(f'total notes:   {sum(counts)}')
    print(f'grace notes dropped: {sum(melody.graces_dropped for melody in melodies)}')
    print(f'repeats kept as written (music21 cannot write them out right): '
          f'{sum(melody.repeats_as_written for melody in melodies)}')
    print(f'tunes without a time signature (M: none): '
          f'{sum(not melody.time_signatures for melody in melodies)}')
    print(f'tunes without a key signature: {sum(not melody.key_signatures for melody in melodies)}')
    for folder, count in sorted(collections.Counter(melody.name.split('/')[0] for melody in melodies).items()):
        print(f'  {folder}: {count} tunes')
    meters = collections.Counter(f'{melody.time_signatures[0][1]}/{melody.time_signatures[0][2]}'
                                 for melody in melodies if melody.time_signatures)
    print('first meters: ' + ', '.join(f'{meter} {count}' for meter, count in meters.most_common()))
    keys = collections.Counter(key_name(*melody.key_signatures[0][1:]) for melody in melodies if melody.key_signatures)
    print('first keys:   ' + ', '.join(f'{key} {count}' for key, count in keys.most_common()))
    if len(counts) >= 2:
        q1, median, q3 = statistics.quantiles(counts, n=4)
        print(f'notes per tune: min {counts[0]}, q1 {q1:g}, median {median:g}, q3 {q3:g}, max {counts[-1]}')
    for threshold in (16, 24, 32, 40):
        kept = sum(count >= threshold for count in counts)
        print(f'  tunes with >= {threshold} notes: {kept} ({100 * kept / max(len(counts), 1):.1f}%)')
    print(f'time:          {seconds:.0f} s')

# ----------------------------------------------------------------------------------------------
# The multi-part set: four-part Bach chorales and string quartets, one MIDI track per part

PARTS_OUTPUT = REPO_ROOT / 'content' / 'parts_dataset' / 'chorales_and_quartets.zip'
# (files under music21/corpus, the ensemble they are written for); see content/parts_dataset/README.md
# for what else the corpus holds and why it is left out (licences, keyboard music)
PARTS_SOURCES = (
    ('bach/bwv*.mxl', 'choir'), ('bach/bwv*.xml', 'choir'),
    ('haydn/*/*.mxl', 'strings'), ('mozart/*/*.mxl', 'strings'),
    ('beethoven/*.mxl', 'strings'), ('beethoven/*/*.mxl', 'strings'),
)
# Per ensemble, its parts in score order: (track name, pattern of music21's part name, GM program).
# Voices get Choir Aahs: the chorales are sung, and one program for all four keeps the timbre from
# telling the parts apart. Each quartet part gets its own solo string (Violin, Viola, Cello), not
# String Ensemble, as one player plays it. The chorales in the corpus that carry instruments
# doubling the voices (trumpets, oboes, continuo) keep their four voices only.
ENSEMBLES = {
    'choir': (('Soprano', r'soprano', 52), ('Alto', r'alto', 52), ('Tenor', r'tenor', 52), ('Bass', r'bass', 52)),
    'strings': (('Violin I', r'violin i|violin 1|1st violin', 40), ('Violin II', r'violin ii|violin 2|2nd violin', 40),
                ('Viola', r'viola', 41), ('Cello', r'(violon)?cello', 42)),
}


@dataclasses.dataclass
class Piece:
    name: str               # path inside the zip: the corpus file's path, e.g. 'bach/bwv66.6.mid'
    title: str
    tempos: list            # (tick, microseconds per quarter)
    time_signatures: list   # (tick, numerator, denominator)
    key_signatures: list    # (tick, sharps, minor)
    parts: list             # (track name, GM program, [(start_tick, duration_ticks, midi_pitch)])
    repeats_written_out: bool
    tempo_marked: bool      # False: the first tempo is the default, as the score has no mark there


def part_label(part_name, ensemble):
    """The ensemble's track name for a music21 part name ('1st Violin.' -> 'Violin I'), or None."""
    words = re.sub(r'[^a-z0-9 ]+', ' ', (part_name or '').lower()).strip()
    for label, pattern, _ in ENSEMBLES[ensemble]:
        if re.fullmatch(pattern, words):
            return label
    return None


def without_same_pitch_overlaps(notes):
    """One pitch sounds once at a time on a MIDI channel (a note-off ends every copy), so an earlier
    note ends where the next of its pitch starts, and two at one onset (a unison inside a part)
    become one."""
    kept, last = [], {}
    for start, duration, pitch in sorted(notes):
        if pitch in last:
            index = last[pitch]
            previous_start, previous_duration, _ = kept[index]
            if previous_start == start:
                kept[index] = (start, max(duration, previous_duration), pitch)
                continue
            if previous_start + previous_duration > start:
                kept[index] = (previous_start, start - previous_start, pitch)
        last[pitch] = len(kept)
        kept.append((start, duration, pitch))
    return kept


def parse_piece(path, ensemble):
    """music21's score of one file, only the ensemble's parts, repeats written out where music21
    can: (score, labels in part order, whether the repeats were written out)."""
    from music21 import converter, stream
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            parsed = converter.parse(path)
    except Exception as error:
        raise SkipTune(f'music21 cannot parse it ({type(error).__name__})') from None
    if not isinstance(parsed, stream.Score):
        raise SkipTune(f'holds a {type(parsed).__name__}, not one score')
    found = {}
    for part in parsed.parts:
        label = part_label(part.partName, ensemble)
        if label in found:
            raise SkipTune(f'two parts read as {label}')
        if label:
            found[label] = part
    labels = [label for label, _, _ in ENSEMBLES[ensemble]]
    missing = [label for label in labels if label not in found]
    if missing:
        names = ', '.join(repr(part.partName) for part in parsed.parts)
        raise SkipTune(f'not a {ensemble} piece: no {missing[0]} part among {names or "no parts"}')
    score = stream.Score()
    score.metadata = parsed.metadata
    for label in labels:
        score.insert(0, found[label])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return score.expandRepeats(), labels, True
    except Exception:   # repeats music21 cannot follow (e.g. da capo with codas): kept as written
        return score, labels, False


def read_piece(corpus_dir, path, ensemble, default_qpm):
    """One score file as a Piece; raise SkipTune if unusable."""
    name = path.relative_to(corpus_dir).with_suffix('.mid').as_posix()
    score, labels, repeats_written_out = parse_piece(path, ensemble)
    try:
        score = score.stripTies()
    except Exception as error:
        raise SkipTune(f'music21 cannot join its tied notes ({type(error).__name__})') from None
    first = score.parts[0]
    shift = Fraction(0)
    measures = first.getElementsByClass('Measure')
    if measures and measures[0].paddingLeft:
        shift = Fraction(measures[0].paddingLeft)
    parts = []
    for (label, _, program), part in zip(ENSEMBLES[ensemble], score.parts):
        notes = []
        for element in part.flatten().notes:
            if element.duration.isGrace or 'Harmony' in element.classes:
                continue
            start = to_ticks(Fraction(element.offset) + shift)
            end = to_ticks(Fraction(element.offset) + shift + Fraction(element.quarterLength))
            for pitch in element.pitches:   # a chord in a string part is a double stop
                notes.append((start, max(end - start, 1), pitch.midi))
        parts.append((label, program, without_same_pitch_overlaps(notes)))
    if not any(notes for _, _, notes in parts):
        raise SkipTune('has no notes')

    def usec_per_quarter(mark):
        qpm = mark.getQuarterBPM()
        return (round(60_000_000 / qpm),) if qpm else None
    tempos = changes_at_ticks(signatures_of(first, 'MetronomeMark'), shift, usec_per_quarter)
    tempo_marked = bool(tempos) and tempos[0][0] == 0
    if not tempo_marked:
        tempos.insert(0, (0, round(60_000_000 / default_qpm)))
    title = score.metadata.bestTitle if score.metadata else None
    if not title or title.lower().endswith(('.mxl', '.xml')):   # music21 falls back on the file name
        title = path.relative_to(corpus_dir).with_suffix('').as_posix()
    return Piece(name, ascii_text(title).strip(), tempos,
                 changes_at_ticks(signatures_of(first, 'TimeSignature'), shift, meter_of),
                 changes_at_ticks(signatures_of(first, 'KeySignature'), shift, midi_key),
                 parts, repeats_written_out, tempo_marked)


def read_piece_or_reason(corpus_dir, path, ensemble, default_qpm):
    try:
        return read_piece(corpus_dir, path, ensemble, default_qpm), None
    except SkipTune as reason:
        return None, (path.relative_to(corpus_dir).as_posix(), str(reason))


def read_pieces(corpus_dir, limit, jobs, default_qpm):
    """Every usable piece of PARTS_SOURCES in a fixed order, plus the skipped files with reasons."""
    sources = sorted((path, ensemble) for pattern, ensemble in PARTS_SOURCES for path in corpus_dir.glob(pattern))
    if not sources:
        sys.exit(f'error: no score files in {corpus_dir}; is music21 installed with its corpus?')
    sources = sources[:limit] if limit else sources
    pieces, skipped = [], []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(read_piece_or_reason, corpus_dir, path, ensemble, default_qpm)
                   for path, ensemble in sources]
        for future in futures:
            piece, reason = future.result()
            pieces += [piece] if piece else []
            skipped += [reason] if reason else []
    return pieces, skipped


def piece_to_score(piece):
    """TMIDIX score of a format 1 file: a first track with the title, tempo, meter and key, then
    one track per part, on its own channel, named after the part."""
    conductor = [['track_name', 0, piece.title]]
    conductor += [['set_tempo', tick, usec] for tick, usec in piece.tempos]
    conductor += [['time_signature', tick, numerator, int(math.log2(denominator)), 24, 8]
                  for tick, numerator, denominator in piece.time_signatures]
    conductor += [['key_signature', tick, sharps, minor] for tick, sharps, minor in piece.key_signatures]
    tracks = [conductor]
    for channel, (label, program, notes) in enumerate(piece.parts):
        track = [['track_name', 0, label], ['patch_change', 0, channel, program]]
        track += [['note', start, duration, channel, pitch, VELOCITY] for start, duration, pitch in notes]
        tracks.append(track)
    return [TICKS_PER_QUARTER, *tracks]


def check_pieces(output, corpus_dir, count):
    """Read `count` files back with mido and compare each track with music21's own reading of that
    part (onsets found through the measures, not the flattened part): same (onset, pitch) pairs,
    part names and programs."""
    import mido
    sources = {path.relative_to(corpus_dir).with_suffix('.mid').as_posix(): (path, ensemble)
               for pattern, ensemble in PARTS_SOURCES for path in corpus_dir.glob(pattern)}
    failures = 0
    with zipfile.ZipFile(output) as archive:
        names = sorted(archive.namelist())
        picked = names[::max(len(names) // count, 1)][:count]
        for name in picked:
            path, ensemble = sources[name]
            score, labels, _ = parse_piece(path, ensemble)
            score = score.stripTies()
            midi = mido.MidiFile(file=io.BytesIO(archive.read(name)))
            problems = []
            for (label, _, program), part, track in zip(ENSEMBLES[ensemble], score.parts, midi.tracks[1:]):
                expected = sorted({(Fraction(n.getOffsetInHierarchy(score)), p.midi) for n in part.recurse().notes
                                   if not n.duration.isGrace for p in n.pitches})
                tick, found, programs = 0, set(), set()
                for message in track:
                    tick += message.time
                    if message.type == 'note_on' and message.velocity > 0:
                        found.add((tick, message.note))
                    elif message.type == 'program_change':
                        programs.add(message.program)
                    elif message.type == 'track_name' and message.name != label:
                        problems.append(f'track named {message.name!r}, not {label!r}')
                found = sorted(found)
                shift = found[0][0] - to_ticks(expected[0][0]) if found and expected else 0
                if [(t - shift, p) for t, p in found] != [(to_ticks(o), p) for o, p in expected]:
                    problems.append(f'{label} notes differ')
                if programs != {program}:
                    problems.append(f'{label} programs {sorted(programs)}')
            if len(midi.tracks) != len(labels) + 1:
                problems.append(f'{len(midi.tracks)} tracks')
            failures += bool(problems)
            print(f'check {name}: {len(midi.tracks) - 1} parts: {"; ".join(problems) or "ok"}')
    print(f'check: {len(picked) - failures} of {len(picked)} files match music21')
    return failures == 0


def print_parts_summary(files_read, pieces, skipped, output, seconds):
    print_read_and_skipped('files read:   ', files_read, skipped)
    for folder, count in sorted(collections.Counter(piece.name.split('/')[0] for piece in pieces).items()):
        print(f'  {folder}: {count} pieces')
    print(f'files written: {len(pieces)} -> {output} ({output.stat().st_size / 1e6:.2f} MB)')
    print(f'total notes:   {sum(len(notes) for piece in pieces for _, _, notes in piece.parts)}')
    print(f'repeats kept as written (music21 cannot write them out): '
          f'{sum(not piece.repeats_written_out for piece in pieces)}')
    print(f'pieces without a tempo mark at the start: {sum(not piece.tempo_marked for piece in pieces)}')
    print(f'time:          {seconds:.0f} s')



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--set', choices=sorted([*TUNE_SETS, 'parts']), default='essen',
                        help='which collection to build (default: %(default)s); see content/*/README.md')
    parser.add_argument('--output', type=pathlib.Path, default=None,
                        help="zip file to write (default: the set's zip under content/)")
    parser.add_argument('--corpus', type=pathlib.Path, default=None,
                        help="folder the set's files are read from (default: its folder in music21's corpus)")
    parser.add_argument('--limit', type=int, default=0,
                        help='stop after this many tunes, for a quick trial (default: all)')
    parser.add_argument('--qpm', type=float, default=DEFAULT_QPM,
                        help='tempo in quarter notes per minute for tunes without a Q: field (default: %(default)s)')
    parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1,
                        help='processes parsing ABC files in parallel (default: %(default)s)')
    parser.add_argument('--check', type=int, default=0, metavar='N',
                        help='after building, read N files back and compare them with music21 (default: 0)')
    args = parser.parse_args()
    if args.qpm <= 0 or args.limit < 0 or args.jobs < 1 or args.check < 0:
        parser.error('--qpm and --jobs must be positive, --limit and --check not negative')

    try:
        import music21  # noqa: F401  (only to fail early with a clear message)
    except ImportError:
        sys.exit('error: this tool needs music21: pip install music21')
    import TMIDIX

    started = time.time()
    if args.set == 'parts':
        build_parts(args, started)
        return
    tune_set = TUNE_SETS[args.set]
    output = args.output or tune_set.output
    corpus_dir = args.corpus or music21_corpus_dir() / tune_set.corpus
    melodies, skipped = read_corpus(corpus_dir, tune_set, args.limit, args.jobs, args.qpm)
    tunes_read = len(melodies) + len(skipped)
    melodies, duplicates = drop_duplicates(melodies)
    for name, reason in skipped:
        print(f'warning: skipped {name}: {reason}')
    skipped += duplicates
    files = {melody.name: TMIDIX.score2midi(melody_to_score(melody)) for melody in melodies}
    write_zip(files, output)
    print_summary(tunes_read, melodies, skipped, output, time.time() - started)
    if args.check and not check_files(output, corpus_dir, tune_set, args.check):
        sys.exit(1)


def build_parts(args, started):
    import TMIDIX
    output = args.output or PARTS_OUTPUT
    corpus_dir = args.corpus or music21_corpus_dir()
    pieces, skipped = read_pieces(corpus_dir, args.limit, args.jobs, args.qpm)
    files_read = len(pieces) + len(skipped)
    pieces, duplicates = drop_duplicates(pieces, lambda piece: tuple(tuple(notes) for _, _, notes in piece.parts))
    for name, reason in skipped:
        print(f'warning: skipped {name}: {reason}')
    skipped += duplicates
    write_zip({piece.name: TMIDIX.score2midi(piece_to_score(piece)) for piece in pieces}, output)
    print_parts_summary(files_read, pieces, skipped, output, time.time() - started)
    if args.check and not check_pieces(output, corpus_dir, args.check):
        sys.exit(1)


if __name__ == '__main__':
    main()
