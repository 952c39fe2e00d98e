"""README example for Args.tracks: a 4-track pop-like file, and piano rolls of what 'all' and 'melody' keep.

    python tools/melody_example.py [OUT_FOLDER]   (default /tmp/melody_example)

Writes pop_4_tracks.mid (mido: 8 bars at 100 bpm, tracks 'Vocal', 'Bass', 'Piano', 'Drums' on channels 0, 1, 2, 9),
all.png (the notes tracks='all' tokenizes: every non-drum note, coloured by channel) and melody.png (the notes of
tracks='melody', read back from its tokens).
"""
import sys
from pathlib import Path

import mido

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import TMIDIX  # noqa: E402
from tokens import detokenize, tokenization_settings, tokenize_midi  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else '/tmp/melody_example')
out.mkdir(parents=True, exist_ok=True)
Q = 480  # ticks per quarter note

# a tune in G major, (start in quarters, length in quarters, pitch), 8 bars of 4/4
phrase = [(0, 1, 67), (1, 0.5, 69), (1.5, 0.5, 71), (2, 1.5, 74), (3.5, 0.5, 72), (4, 1, 71), (5, 1, 69),
          (6, 2, 67), (8, 0.5, 71), (8.5, 0.5, 72), (9, 1, 74), (10, 1, 76), (11, 1, 74), (12, 1.5, 79),
          (13.5, 0.5, 78), (14, 2, 76)]
tune = phrase + [(s + 16, d, p + (2 if i >= 8 else 0)) for i, (s, d, p) in enumerate(phrase)]
chords = [(55, 59, 62), (52, 55, 60), (48, 52, 55), (50, 54, 57)] * 2   # G, Em/G, C, D: a bar each
bass_roots = [43, 40, 36, 38] * 2
parts = {
    # legato singing: each note held a little into the next (the skyline cuts it where the next one starts)
    ('Vocal', 0): [(int(s * Q), int(d * Q) + 40, p) for s, d, p in tune],
    ('Bass', 1): [(bar * 4 * Q + beat * Q, Q - 20, bass_roots[bar] + (7 if beat % 2 else 0))
                  for bar in range(8) for beat in range(4)],
    ('Piano', 2): [(bar * 4 * Q + half * 2 * Q, 2 * Q - 20, p + 12) for bar in range(8) for half in range(2)
                   for p in chords[bar]],
    ('Drums', 9): [(i * Q // 2, 60, (36 if i % 4 == 0 else 38 if i % 4 == 2 else 42)) for i in range(64)],
}

song = mido.MidiFile(type=1, ticks_per_beat=Q)
conductor = mido.MidiTrack([mido.MetaMessage('track_name', name='Pop example'),
                            mido.MetaMessage('set_tempo', tempo=mido.bpm2tempo(100))])
song.tracks.append(conductor)
for (name, channel), notes in parts.items():
    events = [(0, 0, mido.MetaMessage('track_name', name=name))]
    if channel != 9:
        events.append((0, 0, mido.Message('program_change', channel=channel, program={0: 52, 1: 33, 2: 0}[channel])))
    for start, duration, pitch in notes:
        events.append((start, 2, mido.Message('note_on', channel=channel, note=pitch, velocity=90)))
        events.append((start + duration, 1, mido.Message('note_off', channel=channel, note=pitch, velocity=0)))
    track, previous = mido.MidiTrack(), 0
    for tick, _, message in sorted(events, key=lambda e: e[:2]):
        track.append(message.copy(time=tick - previous))
        previous = tick
    song.tracks.append(track)
midi_path = out / 'pop_4_tracks.mid'
song.save(str(midi_path))
data = midi_path.read_bytes()

every = [n for n in TMIDIX.midi2notes(data) if n[3] != 9]  # what tracks='all' keeps (drums are left out)
tokens_all, n_all, _ = tokenize_midi(data, tokenization_settings())
assert n_all == len(every)
# max_num_colors=4: three channels spread over the colour wheel (the default 129 gives three shades of red)
TMIDIX.plot_ms_SONG(every, plot_title=f"tracks='all': {n_all} notes merged (ch 0 vocal, ch 1 bass, ch 2 piano; "
                    "drums left out)", max_num_colors=4, save_path=out / 'all.png')

settings = tokenization_settings(tracks='melody')
tokens, n_melody, tempo = tokenize_midi(data, settings)
line = detokenize(tokens, out / 'melody_tokens.mid', settings)  # the ms song the tokens give back
TMIDIX.plot_ms_SONG(line, plot_title=f"tracks='melody': {n_melody} notes (the vocal line, one note at a time)",
                    max_num_colors=4, save_path=out / 'melody.png')
print(f'{midi_path}: {sum(map(len, parts.values()))} notes in 4 tracks; all: {n_all} notes, melody: {n_melody} '
      f'notes; wrote {out / "all.png"} and {out / "melody.png"}')
