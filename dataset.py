"""MIDI files -> token sequences -> training batches, and tokens -> MIDI.

Token system (the seed's, defined here once and imported everywhere else):
    0-127    time delta since the previous note's start, in TIMING_FACTOR steps
    128-255  note duration, in TIMING_FACTOR steps
    256-833  pitch (256 + MIDI pitch; only 256-383 are produced by MIDI pitches 0-127)
    834      start of sequence
    835      padding
"""

TIMING_FACTOR = 32          # milliseconds per time/duration step (seed)
TIME_OFFSET = 0             # first time-delta token
DUR_OFFSET = 128            # first duration token
PITCH_OFFSET = 256          # first pitch token
MAX_STEP = 127              # largest time delta / duration step a token can hold
START_IDX = 834             # start-of-sequence token
PAD_IDX = 835               # padding token, ignored by loss and accuracy
NUM_TOKENS = 836            # vocabulary size
