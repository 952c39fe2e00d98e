"""Turning a model into music: prompts from MIDI files, the int8 copy for fast CPU decoding, and writing a sample
as MIDI, a piano roll and (when FluidSynth is installed) audio. Used by training's samples, generate.py and
evaluate.py alike.
"""

import argparse
import copy
import functools
import os
import shutil
import subprocess
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sample_page
import TMIDIX
from condition import midi_labels, write_labels
from options import add_switch
from token_cache import MAX_MIDI_BYTES, NotMidiFile, printable, read_midi_file, write_atomically
from tokens import ROLE_CHANNEL, ROLES, START_IDX, detokenize, drum_notes_left_out, is_pitch, tokenize_midi

# generate.py's and evaluate.py's repeat memory, as training's Args: off, because the shipped model repeats as often as
# the data and is told from them less often without it; models that repeat too little gain from 0.2 (README, C2ST)
REPEAT_MEMORY = 0.0
SOUNDFONT_PATHS = ('/usr/share/sounds/sf2/FluidR3_GM.sf2', '/usr/share/sounds/sf2/default-GM.sf2',
                   '/usr/share/soundfonts/default.sf2', '/usr/share/soundfonts/FluidR3_GM.sf2',
                   '/opt/homebrew/share/soundfonts/default.sf2')


# ----------------------------------------------------------------------------------------------------------
# Sampling options, the same in generate.py and evaluate.py

# the options a run's Args also hold for its training samples, with Args' defaults: where generate.py or evaluate.py
# is not given one, it samples a checkpoint as its run sampled (a recipe's voice_leading or guidance goes with its
# model), and with these defaults a checkpoint whose run had no such option
CHECKPOINT_SAMPLING = {'temperature': 1.0, 'top_p': None, 'top_k': None, 'repeat_memory': REPEAT_MEMORY,
                       'voice_leading': False, 'guidance': 1.0, 'end_guidance': None}


def guidance_asked(guidance, end_guidance):
    """The names of the guidance options set to steer a draw: those neither 1 (off) nor None (end_guidance as
    guidance). A model trained without conditioning has no header to lean towards, so these are refused for it."""
    return [name for name, value in (('guidance', guidance), ('end_guidance', end_guidance)) if value not in (None, 1)]


def optional_float(text):
    return None if text.lower() in ('none', 'off') else float(text)


def optional_int(text):
    return None if text.lower() in ('none', 'off') else int(text)


def add_sampling_arguments(parser):
    """The sampling options; those of CHECKPOINT_SAMPLING are left out of the parsed namespace when not given
    (checkpoint_sampling fills them in)."""
    run = argparse.SUPPRESS
    parser.add_argument('--temperature', type=float, default=run,
                        help="sampling temperature (0 = greedy; default for this and the next five: the checkpoint's "
                             "run's, as its training samples, else the value named)")
    parser.add_argument('--top_k', type=optional_int, default=run,
                        help='sample among the k most likely tokens (none: off)')
    parser.add_argument('--top_p', type=optional_float, default=run, help='nucleus sampling threshold (none: off)')
    add_switch(parser, 'unconstrained',
               help='also sample tokens the token grammar does not allow after the one before (as the '
                    'original did: a broken note is then possible)')
    parser.add_argument('--repeat_memory', type=float, default=run,
                        help='lean on what followed earlier spots of the piece that its last notes repeat, '
                             'this strong (0-0.5; 0 = off)')
    parser.add_argument('--guidance', type=float, default=run,
                        help='conditioned models: classifier-free guidance, how far each draw leans towards what '
                             'the header asks against the same model asked nothing (1 = off, the plain model; '
                             'above 1 each token costs two forward passes)')
    parser.add_argument('--end_guidance', type=optional_float, default=run,
                        help="conditioned models: the guidance of the draw that ends a tune, apart from the notes' "
                             "(none: as --guidance); the end leans towards the asked key's tonic")
    add_switch(parser, 'voice_leading', default=run,
               help="tracks='parts' checkpoints: draw no melody or bass pitch that moves the two in parallel "
                    "fifths or octaves or puts the melody below the bass "
                    "(--voice_leading false or --no_voice_leading: the model alone)")


def checkpoint_sampling(args, ckpt):
    """args with every CHECKPOINT_SAMPLING option it was not given set to the checkpoint's run's value; returns the
    names of those given (a given value is the user's to answer for: generate.py refuses one the model cannot take)."""
    given = [name for name in CHECKPOINT_SAMPLING if hasattr(args, name)]
    for name, default in CHECKPOINT_SAMPLING.items():
        if name not in given:
            setattr(args, name, ckpt['args'].get(name, default))
    return given


# ----------------------------------------------------------------------------------------------------------
# Prompts

class PromptError(ValueError):
    """A prompt file cannot be used."""


def prompt_from_midi(path, prompt_notes, settings):
    """The start token and the first prompt_notes notes of a MIDI file, tokenized the way the model was trained."""
    path = Path(path)
    try:
        data = read_midi_file(path, MAX_MIDI_BYTES)
        tokens, n_notes, _ = tokenize_midi(data, settings)
    except NotMidiFile as e:
        raise PromptError(f'prompt {path}: {e} (a MIDI file is expected)') from None
    except (OSError, TMIDIX.MIDIError) as e:
        raise PromptError(f'cannot read prompt {path}: {e}') from None
    if n_notes == 0:
        drums = drum_notes_left_out(data, settings)
        raise PromptError(f'prompt {path} holds no usable notes' + (
            f': only drum notes ({drums} on channel 10), which this model leaves out (it was trained with '
            f'include_drums off)' if drums else ''))
    pitch_positions = np.flatnonzero(is_pitch(tokens))
    end = pitch_positions[min(prompt_notes, n_notes) - 1] + 1
    return torch.from_numpy(tokens[:end].astype(np.int64))


def prompt_labels(path):
    """The key and meter of a prompt file (condition.midi_labels; {} where it cannot be read: prompt_from_midi
    says why)."""
    try:
        return midi_labels(read_midi_file(path, MAX_MIDI_BYTES))
    except (OSError, NotMidiFile, TMIDIX.MIDIError):
        return {}


# ----------------------------------------------------------------------------------------------------------
# int8 weights for generation (CPU)

class Int8Linear(nn.Module):
    """Inference-only stand-in for nn.Linear: int8 weights with one scale per output row.

    Batch-1 decoding reads every weight once per token, so it is bound by memory traffic: torch's CPU int8
    kernel (_weight_int8pack_mm) reads a quarter of the bytes, for a single row of bf16 activations. Every
    other case goes through a float32 matmul of the dequantized weight. Outputs are float32 either way.
    """

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale)
        self.register_buffer('scale_bf16', scale.bfloat16())  # converted once, not once per token
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1 and flat.device.type == 'cpu':
            out = torch._weight_int8pack_mm(flat.bfloat16(), self.weight, self.scale_bf16).float()
        else:
            out = F.linear(flat.float(), self.weight.float()) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], -1)


def quantize_for_generation(model):
    """A copy of model (wrapper or net) with every Linear replaced by Int8Linear, in eval mode.

    Only for generation on the CPU: the copy cannot be trained. Its outputs differ from the float model by the
    int8 rounding of the weights (up to 0.4% of each row's largest weight) and, for batch-1 decoding, the bf16
    rounding of activations; so its batch-1 cached and uncached outputs agree only approximately.
    """
    model = copy.deepcopy(model).float().eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


# one row of a narrower model decodes faster in float32: the int8 kernel's per-token overhead outweighs the smaller
# weights it reads (benchmarks/README.md has the ratios, from bench_model.py and bench_sampling.py)
INT8_MIN_DIM = 256


def generation_model(model, machine, batch=1, int8=None, log=print):
    """(model, autocast context) to generate `batch` rows with on this machine (a runtime.Machine).

    int8=None chooses: on the CPU a single row of a model at least INT8_MIN_DIM wide decodes fastest with the
    int8 copy (benchmarks/bench_sampling.py: its validation NLL is within 0.5% of float32's); several rows,
    narrower models and other devices run the model in the machine's precision. int8=True asks for the copy,
    False declines it. The copy is a CPU path: torch's int8 matrix-vector kernel is a CPU one, and elsewhere the
    copy would dequantize whole weights per call (slower than the plain model), so there it is declined with a
    note. It runs without autocast: its kernel takes bf16 rows itself.
    """
    if int8 and machine.device.type != 'cpu':
        log(f'--int8 is for CPU generation; on {machine.device} the model runs in {machine.dtype_name}')
    elif int8 or (int8 is None and machine.device.type == 'cpu' and batch == 1
                  and model.net.token_emb.embedding_dim >= INT8_MIN_DIM):
        return quantize_for_generation(model), nullcontext()
    return model, machine.autocast()


def graphed_decoding(machine):
    """Whether generate() should decode with a static KV cache replayed from a CUDA graph: on a GPU one row of the
    plain cached step is bound by kernel launches (benchmarks/README.md, "On a GPU"), and the graph removes them.
    Only for a model loaded as it is: a torch.compile'd training model is not captured."""
    return machine.device.type == 'cuda'


# from this many tokens a piece, generating shows a progress bar: on a small CPU that is several seconds a piece
LONG_GENERATION = 2000


class GenerationProgress:
    """on_token for AutoregressiveWrapper.generate: keeps the output so far in .out (what a Ctrl-C leaves to write)
    and, for pieces of LONG_GENERATION tokens or more, advances a progress bar over `batches` batches of `length`
    tokens. A context manager: the bar is closed on the way out."""

    def __init__(self, prompts, length, batches=1):
        self.out = prompts
        self.bar = tqdm(total=length * batches, desc='generating', unit='token', disable=length < LONG_GENERATION,
                        dynamic_ncols=True)

    def __call__(self, out):
        self.out = out
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# Writing a sample

@functools.lru_cache(maxsize=None)
def find_synth():
    """(fluidsynth binary, SoundFont) or None, with a one-line hint the first time they are missing."""
    binary = shutil.which('fluidsynth')
    candidates = [os.environ.get('SOUNDFONT', '')] + list(SOUNDFONT_PATHS)
    soundfont = next((p for p in candidates if p and os.path.isfile(p)), None)
    if binary and soundfont:
        return binary, soundfont
    print('audio: samples are not rendered to WAV; install FluidSynth and a GM SoundFont to get them '
          '(Debian/Ubuntu: apt install fluidsynth fluid-soundfont-gm; or set SOUNDFONT=/path/to/file.sf2)')
    return None


def render_audio(midi_path, wav_path):
    """Render a MIDI file to WAV with FluidSynth; returns the path, or None where that is not possible.
    22.05 kHz: a melody needs no more, and a long run writes many samples."""
    synth = find_synth()
    if synth is None:
        return None
    binary, soundfont = synth
    # into a temporary file renamed when complete: a fluidsynth stopped part-way (Ctrl-C reaches it too, a
    # timeout, a full disk) leaves no headerless .wav beside a good .mid
    render = lambda tmp: subprocess.run([binary, '-ni', '-q', '-g', '0.7', '-r', '22050', '-T', 'wav', '-F', tmp,
                                         soundfont, str(midi_path)], check=True, timeout=300, capture_output=True)
    try:
        write_atomically(wav_path, render)
    except (subprocess.SubprocessError, OSError) as e:
        reason = (f'exit code {e.returncode}' if isinstance(e, subprocess.CalledProcessError) else
                  'over 300 s' if isinstance(e, subprocess.TimeoutExpired) else e.strerror or e)
        print(f'audio: fluidsynth failed on {midi_path} ({reason}); no .wav written')
        return None
    return wav_path


def until_tune_end(tokens, prompt_length):
    """tokens up to the end of the tune they hold: cut before the first start token after the prompt (the next
    tune's start is where a tune ends; a sample stopped there holds it last)."""
    tokens = list(tokens)
    ends = [i for i in range(max(prompt_length, 1), len(tokens)) if tokens[i] == START_IDX]
    return tokens[:ends[0]] if ends else tokens


def save_sample(tokens, stem, settings, tempo_bpm=120.0, prompt_length=0, log=print, audio=True, asked=None,
                programs=None, on_midi=None, labels=None):
    """tokens -> stem.mid, stem.png (piano roll, prompt end marked) and stem.wav when a synth is installed.

    stem is a path without suffix; a dot in its name (bwv103.6) stays part of the name. asked: what the sample was
    asked ({'step': 500}, {'seed': 0, 'temperature': 1.0, ...}); given, the sample is listed on its folder's
    index.html (sample_page.py). programs: {role: GM program} of the tracks a tracks='parts' sample gets
    (detokenize); the piano roll then colours each role. labels: the key and meter asked ({'key': 'D major',
    'meter': '6/8'}, either may be missing; other entries are ignored), written into the MIDI file as its key and
    time signatures and named, with the style, in the piano roll's title.
    on_midi(), when given, is called once stem.mid is written, so a Ctrl-C while
    plotting or rendering still counts the sample as written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    midi, png, wav = (stem.parent / f'{stem.name}{suffix}' for suffix in ('.mid', '.png', '.wav'))
    songs = []

    def write_midi(tmp):  # notes, then the asked key and meter: a stop in between leaves no file, not half of one
        songs.append(detokenize(tokens, tmp, settings, tempo_bpm=tempo_bpm, programs=programs))
        write_labels(tmp, labels or {})
    write_atomically(midi, write_midi, suffix='.mid')
    song = songs[0]
    if on_midi is not None:
        on_midi()
    prompt_notes = int(is_pitch(np.asarray(tokens[:prompt_length])).sum())
    marks = [song[prompt_notes][1]] if 0 < prompt_notes < len(song) else None
    # a parts song has its roles on ROLE_CHANNEL: four colours far apart on the wheel, named in the legend
    roles = {'channel_names': {ROLE_CHANNEL[role]: role for role in ROLES}, 'max_num_colors': len(ROLES)} \
        if settings.get('tracks', 'all') == 'parts' else {}
    if song:
        named = [str(labels[label]) for label in ('key', 'meter', 'style') if (labels or {}).get(label)]
        title = f'{printable(stem.name)} ({len(song)} notes)' + (f": {', '.join(named)}" if named else '')
        TMIDIX.plot_ms_SONG(song, plot_title=title, block_lines_times_list=marks,
                            save_path=str(png), **roles)
    rendered = render_audio(midi, wav) if audio and song else None
    log(f'sample: {midi} ({len(song)} notes{", audio " + str(rendered) if rendered else ""})')
    if asked is not None:
        sample_page.add_sample(midi, len(song), asked, image=png if song else None, audio=rendered, log=log)
    return song
