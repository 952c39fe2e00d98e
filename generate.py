"""Generate melodies from a trained checkpoint, or continue a given one.

    python generate.py --checkpoint content/checkpoints/best.pt --num_samples 4 --length 512
    python generate.py --prompt melody.mid --prompt_notes 16

Each sample is written as MIDI, a piano-roll PNG and (when FluidSynth and a General MIDI SoundFont are installed)
a WAV rendering. A continuation holds the prompt notes followed by the generated ones; the piano roll marks where
the prompt ends.
"""

import argparse
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import TMIDIX
from custom_basic_transformer import quantize_for_generation
from custom_training import build_model, setup_device
from dataset import START_IDX, detokenize, is_pitch, tokenize_midi

SOUNDFONT_PATHS = ('/usr/share/sounds/sf2/FluidR3_GM.sf2', '/usr/share/sounds/sf2/default-GM.sf2',
                   '/usr/share/soundfonts/default.sf2', '/usr/share/soundfonts/FluidR3_GM.sf2',
                   '/opt/homebrew/share/soundfonts/default.sf2')


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
    try:
        subprocess.run([binary, '-ni', '-q', '-g', '0.7', '-r', '22050', '-F', str(wav_path), soundfont,
                        str(midi_path)], check=True, timeout=300, capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f'audio: fluidsynth failed on {midi_path}: {e}')
        return None
    return wav_path


def save_sample(tokens, stem, settings, tempo_bpm=120.0, prompt_length=0, log=print, audio=True):
    """tokens -> stem.mid, stem.png (piano roll, prompt end marked) and stem.wav when a synth is installed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    song = detokenize(tokens, stem.with_suffix('.mid'), settings, tempo_bpm=tempo_bpm)
    prompt_notes = int(is_pitch(np.asarray(tokens[:prompt_length])).sum())
    marks = [song[prompt_notes][1]] if 0 < prompt_notes < len(song) else None
    if song:
        TMIDIX.plot_ms_SONG(song, plot_title=f'{stem.name} ({len(song)} notes)', block_lines_times_list=marks,
                            save_path=str(stem.with_suffix('.png')))
    wav = render_audio(stem.with_suffix('.mid'), stem.with_suffix('.wav')) if audio and song else None
    log(f'sample: {stem.with_suffix(".mid")} ({len(song)} notes{", audio " + str(wav) if wav else ""})')
    return song


def prompt_from_midi(path, prompt_notes, settings):
    """The start token and the first prompt_notes notes of a MIDI file, tokenized the way the model was trained."""
    try:
        tokens, n_notes, _ = tokenize_midi(Path(path).read_bytes(), settings)
    except (OSError, TMIDIX.MIDIError) as e:
        sys.exit(f'error: cannot read prompt {path}: {e}')
    if n_notes == 0:
        sys.exit(f'error: prompt {path} holds no usable notes')
    pitch_positions = np.flatnonzero(is_pitch(tokens))
    end = pitch_positions[min(prompt_notes, n_notes) - 1] + 1
    return torch.from_numpy(tokens[:end].astype(np.int64))


def load_model(checkpoint, device):
    """A checkpoint's model rebuilt from its saved Args, plus the checkpoint dict."""
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    model = build_model(ckpt['args'])
    model.load_state_dict(ckpt['model_state_dict'])
    return model.to(device).eval(), ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default='./content/checkpoints/best.pt', help='checkpoint to sample from')
    parser.add_argument('--output_dir', default='./content/samples', help='where samples are written')
    parser.add_argument('--num_samples', type=int, default=4, help='how many samples')
    parser.add_argument('--length', type=int, default=512, help='new tokens per sample')
    parser.add_argument('--temperature', type=float, default=1.0, help='sampling temperature (0 = greedy)')
    parser.add_argument('--top_k', type=int, default=None, help='sample among the k most likely tokens')
    parser.add_argument('--top_p', type=float, default=0.95, help='nucleus sampling threshold')
    parser.add_argument('--prompt', default=None, help='MIDI file whose first notes the samples continue')
    parser.add_argument('--prompt_notes', type=int, default=16, help='notes of --prompt used as the prompt')
    parser.add_argument('--tempo', type=float, default=None, help="bpm of 'beats' models' output (default: training median)")
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'mps'")
    parser.add_argument('--no_audio', action='store_true', help='do not render WAV files')
    parser.add_argument('--int8', action='store_true',
                        help='int8 weight copy: about 3x faster single-sample generation on CPU (outputs differ slightly)')
    args = parser.parse_args(argv)

    if not Path(args.checkpoint).exists():
        sys.exit(f'error: checkpoint {args.checkpoint} not found (train first: python custom_training.py)')
    # the training script's device and precision rule, decided once
    device, _, autocast, _, _ = setup_device(SimpleNamespace(device=args.device, dtype='auto'))
    torch.manual_seed(args.seed)
    model, ckpt = load_model(args.checkpoint, device)
    if args.int8:
        model = quantize_for_generation(model)
    settings = ckpt['tokenization']
    tempo = args.tempo or ckpt['args'].get('output_tempo') or 120.0
    prompt = prompt_from_midi(args.prompt, args.prompt_notes, settings) if args.prompt else torch.tensor([START_IDX])
    name = f'continuation_{Path(args.prompt).stem}' if args.prompt else 'sample'
    print(f"checkpoint {args.checkpoint} (step {ckpt['step']}, {settings['timing']} timing); "
          f'prompt of {len(prompt)} tokens')
    prompts = prompt.to(device).unsqueeze(0).repeat(args.num_samples, 1)
    with autocast:
        out = model.generate(prompts, args.length, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, return_prime=True)
    for i, tokens in enumerate(out.cpu().tolist()):
        save_sample(tokens, Path(args.output_dir) / f'{name}_{i}', settings, tempo_bpm=tempo,
                    prompt_length=len(prompt), audio=not args.no_audio)


if __name__ == '__main__':
    main()
