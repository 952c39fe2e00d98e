"""TMIDIX: read and write Standard MIDI Files with the MIDI.py / TMIDIX family's API.

Written from scratch for this project, standard library only (matplotlib is imported lazily by
plot_ms_SONG). The data model is the family's:

    opus   [ticks_per_quarter, track, track, ...], events with delta times,
           e.g. ['note_on', dtime, channel, pitch, velocity], ['set_tempo', dtime, usec_per_quarter]
    score  the same with absolute times and note_on/note_off paired into
           ['note', start, duration, channel, pitch, velocity]
    ms score  a score whose times are milliseconds: [1000, track, ...]

The module has four layers, each a section below:
    1. bytes <-> events: chunks, variable-length quantities, running status, meta and sysex.
       The only code that touches raw bytes; one decoder serves midi2opus and midi2notes.
    2. opus <-> score: delta <-> absolute times and note pairing (one pairing routine).
    3. ticks -> milliseconds: one tempo-map routine used by everything that converts time.
    4. convenience: midi2notes, single-track ms score, song writer, piano-roll plot.

Rules, where files leave room for choice:
  * Note pairing (per track): a note_on with velocity 0 is a note_off. Overlapping notes of the same
    channel and pitch pair first-in-first-out: the first note_on is ended by the first note_off (as
    symusic does). A note_off with nothing sounding is ignored. Notes still sounding when a track
    ends end at that track's last event time (its end_track, or its last event).
  * Time: 500,000 microseconds per quarter until the first set_tempo; every set_tempo applies from
    its exact tick to the whole file, whichever track it sits on. Several tempo events at one tick:
    the last one read (track order) wins.
  * SMPTE division (top bit of the header's division set): opus[0] keeps the raw 16-bit division
    value so files round-trip; milliseconds use the frame rate (29 means 29.97 fps) times ticks
    per frame and ignore set_tempo. 'beats' for such files are milliseconds / 500.
  * Running status is kept across meta and sysex events, as real files need, although the
    specification says they cancel it; the writer never relies on that (it re-sends the status).
  * RIFF-wrapped files (RMID) are unwrapped. Formats 0, 1 and 2 are read alike (tracks kept apart).
  * Malformed input raises MIDIError (a ValueError) naming the problem and its byte offset.
    Default is strict (lenient=False). With lenient=True, a track that breaks off keeps the events
    read before the damage, missing tracks are dropped, and one warning line says what was lost.
  * Every public reading or writing function pauses Python's cyclic garbage collector while it runs
    and restores it afterwards (see _gc_paused): a quarter or more of the time otherwise.
"""

import functools
import gc
import os
import warnings
from bisect import bisect_right
from collections import deque
from operator import itemgetter


class MIDIError(ValueError):
    """A malformed MIDI file (or an event that cannot be written); offset is the byte position."""

    def __init__(self, message, offset=None):
        super().__init__(message if offset is None else f'{message} (at byte {offset})')
        self.offset = offset


DEFAULT_TEMPO = 500000  # microseconds per quarter before any set_tempo (MIDI spec)

# Meta event types whose payload is text; stored as bytes in the opus (no guessing of encodings).
_TEXT_META_NAMES = {0x01: 'text_event', 0x02: 'copyright_text_event', 0x03: 'track_name',
                    0x04: 'instrument_name', 0x05: 'lyric', 0x06: 'marker', 0x07: 'cue_point'}
_TEXT_META_TYPES = {name: kind for kind, name in _TEXT_META_NAMES.items()}

_time = itemgetter(1)
_first = itemgetter(0)
_start_then_pitch = itemgetter(1, 4)


def _gc_paused(function):
    """Run function with the cyclic garbage collector paused (and restored after).

    Reading or writing a file makes hundreds of thousands of small lists and tuples, none of them in
    a reference cycle, so the collector finds nothing to free; yet it is triggered every 700 of
    them and walks them again and again: a quarter to a third of the time. Plain reference counting
    still frees everything. Pausing is process-wide, so another thread's garbage waits for the
    call to end; calls made while the collector is already off leave it off."""
    @functools.wraps(function)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()
    return paused


def _load(midi):
    """Bytes from bytes-like input or from a path."""
    if isinstance(midi, (bytes, bytearray, memoryview)):
        return bytes(midi)
    if isinstance(midi, (str, os.PathLike)):
        with open(midi, 'rb') as f:
            return f.read()
    raise TypeError(f'expected MIDI bytes or a path, got {type(midi).__name__}')


# ---------------------------------------------------------------------------------------------
# 1. bytes <-> events
# ---------------------------------------------------------------------------------------------

def _read_vlq(data, pos, base):
    """Variable-length quantity at data[pos] -> (value, next pos); at most 4 bytes (SMF limit)."""
    value = 0
    for i in range(4):
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    raise MIDIError('variable-length quantity longer than 4 bytes', base + pos)


def _vlq_bytes(value):
    if not 0 <= value <= 0x0FFFFFFF:
        raise MIDIError(f'time {value} cannot be written as a variable-length quantity')
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def _unwrap_riff(data):
    """RMID files wrap a Standard MIDI File in a RIFF 'data' chunk."""
    if len(data) < 12 or data[8:12] != b'RMID':
        raise MIDIError('RIFF file is not RMID', 8)
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], 'little')
        if data[pos:pos + 4] == b'data':
            return data[pos + 8:pos + 8 + size], pos + 8
        pos += 8 + size + (size & 1)  # RIFF chunks are padded to even length
    raise MIDIError('RMID file has no data chunk', pos)


def _read_chunks(data, lenient):
    """-> (format, division, [(offset of track body in the file, track body bytes), ...])."""
    base = 0
    if data[:4] == b'RIFF':
        data, base = _unwrap_riff(data)
    if len(data) < 14 or data[:4] != b'MThd':
        raise MIDIError('not a MIDI file: no MThd header of 14 bytes', base)
    header_length = int.from_bytes(data[4:8], 'big')
    if header_length < 6 or 8 + header_length > len(data):
        raise MIDIError(f'bad MThd length {header_length}', base + 4)
    file_format = int.from_bytes(data[8:10], 'big')
    n_tracks = int.from_bytes(data[10:12], 'big')
    division = int.from_bytes(data[12:14], 'big')
    if file_format > 2:
        raise MIDIError(f'unknown MIDI format {file_format}', base + 8)
    if division == 0 or (division & 0x8000 and (division >> 8) not in (0xE8, 0xE7, 0xE3, 0xE2)):
        raise MIDIError(f'bad division 0x{division:04X}', base + 12)
    tracks = []
    pos = 8 + header_length
    while len(tracks) < n_tracks:
        problem = None
        if pos + 8 > len(data):
            problem = f'header declares {n_tracks} tracks but the file ends after {len(tracks)}'
        else:
            length = int.from_bytes(data[pos + 4:pos + 8], 'big')
            end = pos + 8 + length
            if end > len(data):
                problem = f'chunk length {length} runs past the end of the file'
                if lenient and data[pos:pos + 4] == b'MTrk':
                    tracks.append((base + pos + 8, data[pos + 8:]))
            elif data[pos:pos + 4] == b'MTrk':
                tracks.append((base + pos + 8, data[pos + 8:end]))
            # any other chunk id is an alien chunk, which the specification says to skip
        if problem:
            if not lenient:
                raise MIDIError(problem, base + pos)
            warnings.warn(f'TMIDIX: {problem} (at byte {base + pos}); keeping {len(tracks)} tracks')
            break
        pos = end
    return file_format, division, tracks


def _channel_event(kind, delta, channel, d1, d2):
    if kind == 0xB0:
        return ['control_change', delta, channel, d1, d2]
    if kind == 0xC0:
        return ['patch_change', delta, channel, d1]
    if kind == 0xE0:
        return ['pitch_wheel_change', delta, channel, ((d2 << 7) | d1) - 0x2000]
    if kind == 0xA0:
        return ['key_after_touch', delta, channel, d1, d2]
    return ['channel_after_touch', delta, channel, d1]


def _meta_event(kind, delta, payload):
    """Metas other than set_tempo and end_track; a known type with a wrong length stays raw."""
    length = len(payload)
    if kind in _TEXT_META_NAMES:
        return [_TEXT_META_NAMES[kind], delta, payload]
    if kind == 0x58 and length == 4:
        return ['time_signature', delta, *payload]
    if kind == 0x59 and length == 2:
        return ['key_signature', delta, payload[0] - 256 if payload[0] > 127 else payload[0], payload[1]]
    if kind == 0x54 and length == 5:
        return ['smpte_offset', delta, *payload]
    if kind == 0x00 and length == 2:
        return ['sequence_number', delta, int.from_bytes(payload, 'big')]
    if kind == 0x20 and length == 1:
        return ['channel_prefix', delta, payload[0]]
    if kind == 0x7F:
        return ['sequencer_specific', delta, payload]
    return ['raw_meta_event', delta, kind, payload]


def _decode_track(track, base, full, lenient, absolute=False):
    """The one byte decoder: track chunk body -> (events, note events, tempos, end tick).

    full=True: events are opus events (delta times), every event materialised.
    full=True, absolute=True: the same with absolute ticks, except that note_on/note_off come as
    note events instead, ready for pairing (midi2score's path: no opus list per note).
    full=False: only note events, (tick, status, pitch, velocity) for note_on/note_off; other events
    are stepped over without building anything (the fast path midi2notes uses), except track_name
    metas, which come in events as ['track_name', tick, bytes] (midi2notes(with_track=True)), and
    program changes, as ['patch_change', tick, channel, program] (midi2notes(with_programs=True)).
    tempos is [(tick, usec_per_quarter), ...] in both modes. base is the body's offset in the file.
    The body is its own bytes object, so an IndexError means an event runs past the chunk's end.
    """
    events = []
    notes = []
    tempos = []
    append = events.append
    add_note = notes.append
    opus_notes = full and not absolute
    # a list of ints: CPython indexes lists faster than bytes (list indexing is specialised),
    # and slices of the bytes still give payloads
    byte = list(track)
    end = len(byte)
    tick = 0
    running = 0
    pos = 0
    start = 0
    try:
        while pos < end:
            start = pos
            delta = byte[pos]
            pos += 1
            if delta > 127:  # a longer delta: two bytes inline (common in millisecond files), else the full reader
                if byte[pos] < 128:
                    delta = (delta - 128) * 128 + byte[pos]
                    pos += 1
                else:
                    delta, pos = _read_vlq(byte, pos - 1, base)
            tick += delta
            status = byte[pos]
            if status > 127:
                pos += 1
                if status < 0xF0:
                    running = status
            elif running:
                status = running
            else:
                raise MIDIError(f'data byte 0x{status:02X} where a status byte is required', base + pos)
            if status < 0xA0:  # note_off / note_on: the hot path
                d1 = byte[pos]
                d2 = byte[pos + 1]
                pos += 2
                if d1 > 127 or d2 > 127:
                    raise MIDIError('note data byte above 127', base + pos - 2)
                if opus_notes:
                    append(['note_on' if status & 0x10 else 'note_off', delta, status & 0x0F, d1, d2])
                else:
                    add_note((tick, status, d1, d2))
            elif status < 0xF0:
                kind = status & 0xF0
                d1 = byte[pos]
                if kind == 0xC0 or kind == 0xD0:
                    d2 = 0
                    pos += 1
                else:
                    d2 = byte[pos + 1]
                    pos += 2
                if d1 > 127 or d2 > 127:
                    raise MIDIError('channel message data byte above 127', base + start)
                if full:
                    append(_channel_event(kind, tick if absolute else delta, status & 0x0F, d1, d2))
                elif kind == 0xC0:
                    append(['patch_change', tick, status & 0x0F, d1])
            elif status == 0xFF:
                kind = byte[pos]
                length, pos = _read_vlq(byte, pos + 1, base)
                stop = pos + length
                if stop > end:
                    raise MIDIError(f'meta event of length {length} runs past the end of its track', base + start)
                if kind == 0x51 and length == 3:
                    tempo = (byte[pos] << 16) | (byte[pos + 1] << 8) | byte[pos + 2]
                    tempos.append((tick, tempo))
                    if full:
                        append(['set_tempo', tick if absolute else delta, tempo])
                elif kind == 0x2F:
                    if full:
                        append(['end_track', tick if absolute else delta])
                    break  # end of track: anything after it is not part of the track
                elif full:
                    append(_meta_event(kind, tick if absolute else delta, track[pos:stop]))
                elif kind == 0x03:
                    append(['track_name', tick, track[pos:stop]])
                pos = stop
            elif status == 0xF0 or status == 0xF7:
                length, pos = _read_vlq(byte, pos, base)
                stop = pos + length
                if stop > end:
                    raise MIDIError(f'sysex of length {length} runs past the end of its track', base + start)
                if full:
                    append(['sysex_f0' if status == 0xF0 else 'sysex_f7', tick if absolute else delta,
                            track[pos:stop]])
                pos = stop
            else:
                raise MIDIError(f'status byte 0x{status:02X} is not allowed in a MIDI file', base + pos - 1)
    except IndexError:
        error = MIDIError('track chunk ends in the middle of an event', base + start)
    except MIDIError as e:
        error = e
    else:
        return events, notes, tempos, tick
    if not lenient:
        raise error
    warnings.warn(f'TMIDIX: {error}; keeping the {len(events) + len(notes)} events before it')
    return events, notes, tempos, tick


@_gc_paused
def midi2opus(midi, lenient=False):
    """MIDI bytes or path -> opus [division, track, ...]. Raises MIDIError on malformed input."""
    _, division, tracks = _read_chunks(_load(midi), lenient)
    return [division] + [_decode_track(body, base, True, lenient)[0] for base, body in tracks]


def _text_payload(value, text_encoding):
    return value.encode(text_encoding, errors='replace') if isinstance(value, str) else bytes(value)


def _encode_track(events, text_encoding):
    """Opus events -> track chunk body. Running status is used for channel messages only."""
    out = bytearray()
    extend = out.extend
    running = 0
    carry = 0  # delta time of an end_track found before the end: kept, the event itself dropped
    for ev in events:
        name = ev[0]
        delta = ev[1]
        if carry:
            delta += carry
            carry = 0
        if name == 'end_track':
            carry = delta
            continue
        if name == 'note_on' or name == 'note_off':
            channel, d1, d2 = ev[2], ev[3], ev[4]
            status = (0x90 if name == 'note_on' else 0x80) | channel
        elif name == 'control_change' or name == 'key_after_touch':
            channel, d1, d2 = ev[2], ev[3], ev[4]
            status = (0xB0 if name == 'control_change' else 0xA0) | channel
        elif name == 'patch_change' or name == 'channel_after_touch':
            channel, d1, d2 = ev[2], ev[3], 0
            status = (0xC0 if name == 'patch_change' else 0xD0) | channel
        elif name == 'pitch_wheel_change':
            channel = ev[2]
            value = ev[3] + 0x2000
            if not 0 <= value < 0x4000:
                raise MIDIError(f'pitch wheel value {ev[3]} outside -8192..8191')
            status, d1, d2 = 0xE0 | channel, value & 0x7F, value >> 7
        else:
            extend(_vlq_bytes(delta))
            extend(_encode_meta_or_sysex(ev, text_encoding))
            running = 0
            continue
        if not 0 <= channel <= 15 or (d1 | d2) & ~0x7F:
            raise MIDIError(f'{name} has a channel or data value out of range: {ev}')
        if not 0 <= delta < 0x80:
            if 0x80 <= delta < 0x4000:  # two bytes, common in millisecond files: inline
                extend((0x80 | delta >> 7, delta & 0x7F))
            else:
                extend(_vlq_bytes(delta))
            delta = None
        if status < 0xC0 or status >= 0xE0:  # two data bytes
            if status != running:
                extend((delta, status, d1, d2) if delta is not None else (status, d1, d2))
                running = status
            else:
                extend((delta, d1, d2) if delta is not None else (d1, d2))
        elif status != running:
            extend((delta, status, d1) if delta is not None else (status, d1))
            running = status
        else:
            extend((delta, d1) if delta is not None else (d1,))
    extend(_vlq_bytes(max(carry, 0)))
    extend(b'\xff\x2f\x00')
    return out


def _encode_meta_or_sysex(ev, text_encoding):
    """Status byte onward for a meta or sysex opus event."""
    name = ev[0]
    if name == 'sysex_f0' or name == 'sysex_f7':
        payload = bytes(ev[2])
        return bytes([0xF0 if name == 'sysex_f0' else 0xF7]) + _vlq_bytes(len(payload)) + payload
    if name in _TEXT_META_TYPES:
        kind, payload = _TEXT_META_TYPES[name], _text_payload(ev[2], text_encoding)
    elif name == 'set_tempo':
        kind, payload = 0x51, int(ev[2]).to_bytes(3, 'big')
    elif name == 'time_signature':
        kind, payload = 0x58, bytes(ev[2:6])
    elif name == 'key_signature':
        kind, payload = 0x59, bytes([ev[2] & 0xFF, ev[3]])
    elif name == 'smpte_offset':
        kind, payload = 0x54, bytes(ev[2:7])
    elif name == 'sequence_number':
        kind, payload = 0x00, int(ev[2]).to_bytes(2, 'big')
    elif name == 'channel_prefix':
        kind, payload = 0x20, bytes([ev[2]])
    elif name == 'sequencer_specific':
        kind, payload = 0x7F, _text_payload(ev[2], text_encoding)
    elif name == 'raw_meta_event':
        kind, payload = ev[2], _text_payload(ev[3], text_encoding)
    else:
        raise MIDIError(f'unknown opus event {name!r}')
    return bytes([0xFF, kind]) + _vlq_bytes(len(payload)) + payload


@_gc_paused
def opus2midi(opus, text_encoding='ISO-8859-1'):
    """Opus -> MIDI file bytes (format 0 for one track, else 1). Raises MIDIError on bad events."""
    division = opus[0]
    if not (isinstance(division, int) and 0 < division <= 0xFFFF):
        raise MIDIError(f'ticks per quarter must be an int in 1..65535, got {division!r}')
    tracks = opus[1:]
    chunks = [b'MThd', (6).to_bytes(4, 'big'), (0 if len(tracks) == 1 else 1).to_bytes(2, 'big'),
              len(tracks).to_bytes(2, 'big'), division.to_bytes(2, 'big')]
    for number, track in enumerate(tracks):
        try:
            body = _encode_track(track, text_encoding)
        except (TypeError, ValueError, IndexError) as e:
            raise MIDIError(f'track {number}: cannot write event: {e}') from None
        chunks += [b'MTrk', len(body).to_bytes(4, 'big'), body]
    return b''.join(chunks)


# ---------------------------------------------------------------------------------------------
# 2. opus <-> score
# ---------------------------------------------------------------------------------------------

def _pair_notes(note_events, end_tick):
    """(tick, status, pitch, velocity) note_on/note_off events of one track -> score notes.

    The one pairing routine (rules in the module docstring). Notes come out in start order.
    """
    notes = []
    add = notes.append
    sounding = [None] * 2048  # channel * 128 + pitch -> deque of notes waiting for their note_off
    queues = []  # the deques made, so the end-of-track sweep does not walk all 2048 slots
    for tick, status, pitch, velocity in note_events:
        channel = status & 0x0F
        key = channel * 128 + pitch  # (CPython specialises int * and + and list indexing)
        if status >= 0x90 and velocity:
            note = ['note', tick, 0, channel, pitch, velocity]
            add(note)
            queue = sounding[key]
            if queue is None:
                queue = sounding[key] = deque()
                queues.append(queue)
            queue.append(note)
        else:
            queue = sounding[key]
            if queue:
                note = queue.popleft()
                note[2] = tick - note[1]
    for queue in queues:
        for note in queue:
            note[2] = end_tick - note[1]
    return notes


def opus2score(opus):
    """Opus (delta times) -> score (absolute times, paired notes). The input is not modified."""
    score = [opus[0]]
    for track in opus[1:]:
        tick = 0
        note_events = []
        others = []
        for ev in track:
            tick += ev[1]
            name = ev[0]
            if name == 'note_on' or name == 'note_off':
                channel, pitch = ev[2], ev[3]
                if not (0 <= channel <= 15 and 0 <= pitch <= 127):
                    raise MIDIError(f'{name} with a channel or pitch out of range: {ev}')
                note_events.append((tick, (0x90 if name == 'note_on' else 0x80) | channel, pitch, ev[4]))
            else:
                copy = list(ev)
                copy[1] = tick
                others.append(copy)
        score.append(_score_track(others, note_events, tick))
    return score


def _score_track(others, note_events, end_tick):
    """Non-note events (absolute times) + paired notes, sorted by time; stable, so at equal times
    non-note events stay before notes."""
    merged = others + _pair_notes(note_events, end_tick)
    merged.sort(key=_time)
    return merged


@_gc_paused
def score2opus(score):
    """Score -> opus. At one time: note_offs, then other events, then note_ons, then the note_offs
    of zero-length notes (so every note_off follows its own note_on). A note with velocity 0 is
    written with velocity 1, since a note_on of velocity 0 would read back as a note_off."""
    opus = [score[0]]
    for track in score[1:]:
        keys = []  # time * 4 + rank, sorted once (stable) to order the events
        events = []
        key = keys.append
        add = events.append
        end_time = 0
        for ev in track:
            name = ev[0]
            time = ev[1]
            if name == 'note':
                duration = ev[2]
                if duration < 0:
                    raise MIDIError(f'note with negative duration: {ev}')
                key(time * 4 + 2)
                add(['note_on', time, ev[3], ev[4], ev[5] or 1])
                key((time + duration) * 4 + (3 if duration == 0 else 0))
                add(['note_off', time + duration, ev[3], ev[4], 0])
            elif name == 'end_track':
                end_time = max(end_time, time)
            else:
                key(time * 4 + 1)
                add(list(ev))
        ordered = []
        previous = 0
        for i in sorted(range(len(keys)), key=keys.__getitem__):
            ev = events[i]
            time = ev[1]
            ev[1] = time - previous
            previous = time
            ordered.append(ev)
        ordered.append(['end_track', max(0, end_time - previous)])
        opus.append(ordered)
    return opus


@_gc_paused
def midi2score(midi, lenient=False):
    """MIDI bytes or path -> score (the same as opus2score(midi2opus(midi)), without the opus)."""
    _, division, tracks = _read_chunks(_load(midi), lenient)
    score = [division]
    for base, body in tracks:
        others, note_events, _, end_tick = _decode_track(body, base, True, lenient, absolute=True)
        score.append(_score_track(others, note_events, end_tick))
    return score


@_gc_paused
def score2midi(score, text_encoding='ISO-8859-1'):
    """Score -> MIDI bytes. Any ticks_per_quarter works; set_tempo events in the score are written
    as given, so a caller can write e.g. a beats grid at a chosen tempo:
    score2midi([480, [['set_tempo', 0, 400000], ['note', 0, 480, 0, 60, 90]]])."""
    return opus2midi(score2opus(score), text_encoding)


# ---------------------------------------------------------------------------------------------
# 3. ticks -> milliseconds
# ---------------------------------------------------------------------------------------------

def _tempo_map(division, tempos):
    """The one tempo routine. tempos: (tick, usec_per_quarter) from any tracks.

    -> (segment start ticks, ms at each start, ms per tick in each segment, tempo of each segment).
    """
    if division & 0x8000:  # SMPTE: a constant number of ticks per second, tempo plays no part
        frames = 256 - (division >> 8)
        fps = 29.97 if frames == 29 else frames
        return [0], [0.0], [1000.0 / (fps * (division & 0xFF))], [DEFAULT_TEMPO]
    ticks, millis, rates, usecs = [0], [0.0], [DEFAULT_TEMPO / (1000.0 * division)], [DEFAULT_TEMPO]
    for tick, usec in sorted(tempos, key=_first):
        if tick == ticks[-1]:  # replaces the tempo at the same tick
            rates[-1], usecs[-1] = usec / (1000.0 * division), usec
        else:
            millis.append(millis[-1] + (tick - ticks[-1]) * rates[-1])
            ticks.append(tick)
            rates.append(usec / (1000.0 * division))
            usecs.append(usec)
    return ticks, millis, rates, usecs


def _ticks_to_ms(ticks, tempo_map):
    """List of ticks (any order) -> list of float milliseconds under tempo_map."""
    starts, millis, rates, _ = tempo_map
    if len(starts) == 1:
        rate = rates[0]
        return [tick * rate for tick in ticks]
    ends = starts[1:] + [float('inf')]
    out = []
    add = out.append
    low = high = 0  # the segment of the previous tick: consecutive ticks mostly share one
    for tick in ticks:
        if tick >= high or tick < low:
            i = bisect_right(starts, tick) - 1
            low, high, rate = starts[i], ends[i], rates[i]
            offset = millis[i] - low * rate
        add(offset + tick * rate)
    return out


def _longest_tempo(tempo_map, end_tick):
    """The tempo (usec per quarter) in force for the most milliseconds up to end_tick."""
    starts, _, _, usecs = tempo_map
    stops = starts[1:] + [max(end_tick, starts[-1])]
    spans = _ticks_to_ms(stops, tempo_map)
    begins = _ticks_to_ms(starts, tempo_map)
    best = max(range(len(starts)), key=lambda i: (spans[i] - begins[i], -i))
    return usecs[best]


@_gc_paused
def to_millisecs(old_opus):
    """Opus -> opus in milliseconds ([1000, ...], set_tempo 1,000,000 so one tick is one ms).

    Absolute times are rounded, not deltas, so rounding never accumulates. The original set_tempo
    events are dropped; one set_tempo 1,000,000 starts the first track."""
    tempos = []
    absolute = []
    for track in old_opus[1:]:
        tick = 0
        ticks = []
        for ev in track:
            tick += ev[1]
            ticks.append(tick)
            if ev[0] == 'set_tempo':
                tempos.append((tick, ev[2]))
        absolute.append(ticks)
    tempo_map = _tempo_map(old_opus[0], tempos)
    new_opus = [1000]
    for number, (track, ticks) in enumerate(zip(old_opus[1:], absolute)):
        events = [['set_tempo', 0, 1000000]] if number == 0 else []
        previous = 0
        for ev, ms in zip(track, _ticks_to_ms(ticks, tempo_map)):
            if ev[0] == 'set_tempo':
                continue
            ms = round(ms)
            copy = list(ev)
            copy[1] = ms - previous
            previous = ms
            events.append(copy)
        new_opus.append(events)
    return new_opus


@_gc_paused
def midi2ms_score(midi, lenient=False):
    """MIDI bytes or path -> score in milliseconds (integers)."""
    return opus2score(to_millisecs(midi2opus(midi, lenient)))


# ---------------------------------------------------------------------------------------------
# 4. convenience
# ---------------------------------------------------------------------------------------------

@_gc_paused
def midi2notes(midi, unit='ms', with_tempo=False, lenient=False, with_track=False, with_programs=False):
    """MIDI bytes or path -> ['note', start, duration, channel, pitch, velocity] of all tracks,
    sorted by (start, pitch). unit: 'ms' (float, tempo map applied), 'beats' (float quarter
    notes, tempo ignored) or 'ticks' (int). with_tempo=True -> (notes, tempo_usec), the tempo in
    force for the most milliseconds (500000 if none). Uses the byte decoder's notes-only path.

    with_track=True appends each note's track number (0 = the file's first track chunk) as a 7th
    field and returns the track names last: (notes, names) or (notes, tempo_usec, names), names
    holding the bytes of each track's first track_name meta (b'' for none). The 7th field is not
    a patch, as it is in ms songs: drop it before handing the notes to the song writer or plot.

    with_programs=True (with with_track) also returns, after the names, {(track, channel): program}
    holding the first program change of each track and channel that has one."""
    if unit not in ('ms', 'beats', 'ticks'):
        raise ValueError(f"unit must be 'ms', 'beats' or 'ticks', not {unit!r}")
    if with_programs and not with_track:
        raise ValueError('with_programs=True needs with_track=True: programs are keyed by track')
    _, division, tracks = _read_chunks(_load(midi), lenient)
    notes = []
    tempos = []
    names = []
    programs = {}
    end_tick = 0
    for number, (base, body) in enumerate(tracks):
        metas, note_events, track_tempos, track_end = _decode_track(body, base, False, lenient)
        track_notes = _pair_notes(note_events, track_end)
        if with_track:
            for note in track_notes:
                note.append(number)
            names.append(next((ev[2] for ev in metas if ev[0] == 'track_name'), b''))
            for ev in metas:
                if ev[0] == 'patch_change':
                    programs.setdefault((number, ev[2]), ev[3])
        notes += track_notes
        tempos += track_tempos
        end_tick = max(end_tick, track_end)
    tempo_map = _tempo_map(division, tempos)
    # sorted while times are still ticks: tempo only stretches time, so the order holds, and the
    # conversion below then meets the ticks in order, one tempo segment after another
    notes.sort(key=_start_then_pitch)
    smpte = division & 0x8000
    if unit == 'ms' or (unit == 'beats' and smpte):
        starts = _ticks_to_ms([note[1] for note in notes], tempo_map)
        ends = _ticks_to_ms([note[1] + note[2] for note in notes], tempo_map)
        for note, start, end in zip(notes, starts, ends):
            note[1] = start
            note[2] = end - start
    if unit == 'beats':
        per_beat = 500 if smpte else division  # SMPTE: beats are milliseconds at the default tempo
        for note in notes:
            note[1] /= per_beat
            note[2] /= per_beat
    extra = ((names, programs) if with_programs else (names,)) if with_track else ()
    if with_tempo:
        return (notes, _longest_tempo(tempo_map, end_tick)) + extra
    return (notes,) + extra if extra else notes


def first_signatures(midi, lenient=False):
    """MIDI bytes or path -> (time_signature, key_signature): the earliest event of each kind in the
    file, ['time_signature', tick, numerator, log2 of the denominator, clocks per click, 32nds per
    quarter] and ['key_signature', tick, sharps (negative: flats), 1 for minor else 0], or None where
    the file has none. At one tick the event of the earlier track is first."""
    found = {'time_signature': None, 'key_signature': None}
    for track in midi2score(midi, lenient)[1:]:
        for event in track:
            if event[0] in found and (found[event[0]] is None or event[1] < found[event[0]][1]):
                found[event[0]] = event
    return found['time_signature'], found['key_signature']


_CHANNEL_FIELD = {'note': 3, 'control_change': 2, 'patch_change': 2, 'pitch_wheel_change': 2,
                  'channel_after_touch': 2, 'key_after_touch': 2}


def _recalculate_channels(tracks):
    """Give each (track, channel) that has channel events a channel of its own, in order of first
    use; drums (channel 9) stay on 9; when the 15 melodic channels run out they are reused."""
    free = [c for c in range(16) if c != 9]
    assigned = {}
    melodic = 0  # melodic (track, channel) pairs seen so far
    for number, track in enumerate(tracks):
        for ev in track:
            field = _CHANNEL_FIELD.get(ev[0])
            if field is None:
                continue
            key = (number, ev[field])
            if key not in assigned:
                if ev[field] == 9:
                    assigned[key] = 9
                else:
                    assigned[key] = free[melodic % 15]
                    melodic += 1
            ev[field] = assigned[key]


@_gc_paused
def midi2single_track_ms_score(midi_path_or_bytes, recalculate_channels=False,
                               pass_old_timings_events=False, verbose=False, lenient=False):
    """MIDI bytes or path -> [1000, events]: every event of every track, times in integer
    milliseconds, sorted by time (stable: track order at equal times). end_track events are
    dropped, and set_tempo ones too unless pass_old_timings_events (their times are already
    applied). recalculate_channels: see _recalculate_channels."""
    score = midi2score(midi_path_or_bytes, lenient)
    tempos = [(ev[1], ev[2]) for track in score[1:] for ev in track if ev[0] == 'set_tempo']
    tempo_map = _tempo_map(score[0], tempos)
    if recalculate_channels:
        _recalculate_channels(score[1:])
    dropped = ('end_track',) if pass_old_timings_events else ('end_track', 'set_tempo')
    events = [ev for track in score[1:] for ev in track if ev[0] not in dropped]
    notes = [ev for ev in events if ev[0] == 'note']
    starts = _ticks_to_ms([ev[1] for ev in events], tempo_map)
    ends = _ticks_to_ms([ev[1] + ev[2] for ev in notes], tempo_map)
    for ev, start in zip(events, starts):
        ev[1] = round(start)
    for ev, end in zip(notes, ends):
        ev[2] = round(end) - ev[1]
    events.sort(key=_time)
    if verbose:
        print(f'TMIDIX: {len(notes)} notes, {len(events)} events, {len(score) - 1} tracks')
    return [1000, events]


@_gc_paused
def Tegridy_ms_SONG_to_MIDI_Converter(ms_SONG, output_signature='Basic MIDI Transformer',
                                     track_name='Composition Track',
                                     list_of_MIDI_patches=(0,) * 16,
                                     output_file_name='TMIDIX-Composition',
                                     text_encoding='ISO-8859-1', timings_multiplier=1, verbose=True):
    """Write a millisecond song to output_file_name + '.mid' and return that path.

    ms_SONG: ['note', start_ms, duration_ms, channel, pitch, velocity(, patch)] events, and any
    other score events ([name, time_ms, ...]). Times are multiplied by timings_multiplier and
    rounded to whole milliseconds: the file has 1000 ticks per quarter at 1,000,000 usec per
    quarter, so one tick is one millisecond. A note's patch (7th field) becomes a patch_change on
    its channel when it differs from the channel's current patch; list_of_MIDI_patches gives the
    16 channels' patches at time 0."""
    patches = list(list_of_MIDI_patches)[:16]
    patches += [0] * (16 - len(patches))
    header_track = [['track_name', 0, output_signature], ['set_tempo', 0, 1000000],
                    ['time_signature', 0, 4, 2, 24, 8]]
    track = [['track_name', 0, track_name]]
    track += [['patch_change', 0, channel, patch] for channel, patch in enumerate(patches)]
    add = track.append
    notes = 0
    for ev in ms_SONG:
        if ev[0] == 'note':
            start = round(ev[1] * timings_multiplier)
            channel = ev[3]
            if len(ev) > 6 and ev[6] != patches[channel]:
                patches[channel] = ev[6]
                add(['patch_change', start, channel, ev[6]])
            add(['note', start, round(ev[2] * timings_multiplier), channel, ev[4], ev[5]])
            notes += 1
        else:
            copy = list(ev)
            copy[1] = round(ev[1] * timings_multiplier)
            add(copy)
    data = score2midi([1000, header_track, track], text_encoding)
    path = os.fspath(output_file_name)
    if not path.lower().endswith(('.mid', '.midi')):
        path += '.mid'
    with open(path, 'wb') as f:
        f.write(data)
    if verbose:
        print(f'TMIDIX: wrote {notes} notes ({len(data)} bytes) to {path}')
    return path


_NOTE_NAMES = ('C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#', 'B')


def _note_name(pitch):
    return f'{_NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}'  # MIDI 60 is C4


def plot_ms_SONG(ms_song, preview_length_in_notes=0, block_lines_times_list=None,
                 plot_title='ms Song', max_num_colors=129, drums_color_num=128,
                 plot_size=(11, 4), note_height=0.75, show_grid_lines=False, return_plt=False,
                 timings_multiplier=1, save_path=None, channel_names=None):
    """Piano roll of a millisecond song: x in seconds, y pitch with note names, colour by channel
    (or by patch for 7-field notes; drums on channel 9 get drums_color_num); channel_names
    ({channel: label}) names channels in the legend instead of 'ch N'. Dashed lines at
    block_lines_times_list (ms, e.g. where a prompt ends) and after the first
    preview_length_in_notes notes. save_path: write a PNG without any display (headless);
    otherwise pyplot shows it. The figure is closed unless return_plt, which returns it."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    notes = [ev for ev in ms_song if ev[0] == 'note']
    if save_path is not None:
        figure = Figure(figsize=plot_size)  # not registered with pyplot: no display, no global state
    else:
        import matplotlib.pyplot as plt
        figure = plt.figure(figsize=plot_size)
    ax = figure.add_subplot()
    palette = colormaps['hsv']
    scale = timings_multiplier / 1000.0

    def colour_index(note):
        if note[3] == 9:
            return drums_color_num
        return note[6] if len(note) > 6 else note[3]

    keys = [colour_index(note) for note in notes]
    colours = [palette((k % max_num_colors) / max_num_colors) if k != drums_color_num else 'black' for k in keys]
    if notes:
        ax.barh([n[4] for n in notes], [n[2] * scale for n in notes], left=[n[1] * scale for n in notes],
                height=note_height, color=colours)
        low, high = min(n[4] for n in notes), max(n[4] for n in notes)
        # a melody's narrow range gets every natural note named; a wide one only its Cs
        named = (lambda p: '#' not in _NOTE_NAMES[p % 12]) if high - low <= 24 else (lambda p: p % 12 == 0)
        ticks = [p for p in range(low - 1, high + 2) if named(p)] or [low]
        ax.set_yticks(ticks, [_note_name(p) for p in ticks])
        ax.set_ylim(low - 1, high + 1)
    lines = [t * scale for t in (block_lines_times_list or [])]
    if 0 < preview_length_in_notes < len(notes):
        lines.append(notes[preview_length_in_notes][1] * scale)
    for x in lines:
        ax.axvline(x, color='black', linestyle='--', linewidth=1)
    legend = {key: colour for key, colour in zip(keys, colours)}
    what = 'patch' if any(len(n) > 6 for n in notes) else 'ch'
    names = channel_names if what == 'ch' and channel_names else {}
    ax.legend(handles=[Patch(color=c, label='drums' if k == drums_color_num else names.get(k, f'{what} {k}'))
                       for k, c in sorted(legend.items())][:16], fontsize='x-small', loc='upper right')
    ax.set_title(plot_title)
    ax.set_xlabel('time (s)')
    ax.set_ylabel('pitch')
    ax.grid(show_grid_lines)
    if save_path is not None:
        figure.savefig(save_path, dpi=100)
    else:
        import matplotlib.pyplot as plt
        plt.show()
        if not return_plt:
            plt.close(figure)
    return figure if return_plt else None
