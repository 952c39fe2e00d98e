"""Generate melodies from a trained checkpoint, or continue a given one.

    python generate.py --checkpoint content/checkpoints/best.pt --num_samples 4 --length 512
    python generate.py --prompt melody.mid --prompt_notes 16
    python generate.py --prompt melody.mid --accompany --parts bass,drums

Each sample is written as MIDI, a piano-roll PNG and (when FluidSynth and a General MIDI SoundFont are installed)
a WAV rendering, and listed on the folder's index.html (docs/samples-page.md). A continuation holds the prompt
notes followed by the generated ones; the piano roll marks where the prompt ends. A tracks='parts' model's samples
get a track per role (melody, bass, harmony, drums on channel 10), each playing the training data's most common
program for that role; --programs melody=73,bass=33 picks others. Samples are numbered on after the highest one
already in --output_dir, so a second run never writes over the first one's. --parts melody,bass samples only
those roles; --accompany keeps --prompt's melody whole and lets the model write the other roles around it
(docs/parts.md).

A sample ends where the model ends its tune (it draws the next tune's start token), after at most --length new
tokens (512, or the model's window where that is longer); --no_stop writes --length (512) tokens whatever comes.
A model trained with condition on takes --key "D major", --meter 6/8 and --style NAME (one of the styles it lists;
docs/conditioning.md): the samples' MIDI files carry the asked key and time signatures (for a --prompt, the prompt
file's own where none is asked).

Without --checkpoint: content/checkpoints/best.pt of the working directory, else of this repository's folder
(where a run started there saves), else the shipped model.
"""

import re
import sys
from pathlib import Path

import numpy as np
import torch

from accompany import Accompanist, melody_notes
from condition import drawn_lengths, header, parse_key, parse_meter, without_header
from options import (
    MAX_GENERATE_LENGTH,
    RULES,
    ArgumentParser,
    add_switch,
    exit_on_bad_args,
    file_path,
    number,
    optional,
)
from parts import ROLES, parse_programs
from runtime import (
    SHIPPED_MODEL,
    CheckpointError,
    DeviceError,
    load_model,
    seed_everything,
    sigterm_as_ctrl_c,
    start_machine,
    stopped_by,
    undecodable_names_on_stdout,
)
from sampling import (
    GenerationProgress,
    PromptError,
    add_sampling_arguments,
    checkpoint_sampling,
    generation_model,
    graphed_decoding,
    guidance_asked,
    prompt_from_midi,
    prompt_labels,
    save_sample,
    until_tune_end,
)
from token_cache import printable
from tokens import PAD_IDX, START_IDX, grammar_table, parts_table, seconds_per_step
from voice_leading import VoiceLeading

DEFAULT_CHECKPOINT = './content/checkpoints/best.pt'
ROOT = Path(__file__).resolve().parent


def find_checkpoint(path, log=print):
    """The checkpoint asked for; for a missing best.pt its run's latest.pt (a run without validation writes no
    best.pt). The default path is looked for in the working directory, then in this repository's folder; with
    nothing trained in either, the shipped model, so a fresh clone makes music."""
    path = Path(path)
    if str(path) != str(Path(DEFAULT_CHECKPOINT)):
        return run_checkpoint(path, log) or path
    looked = [Path.cwd() / DEFAULT_CHECKPOINT, ROOT / DEFAULT_CHECKPOINT]
    for place in dict.fromkeys(p.resolve() for p in looked):
        found = run_checkpoint(place, log)
        if found:
            return found
    if SHIPPED_MODEL.exists():
        log(f'no model trained yet (none at {" or ".join(str(p) for p in dict.fromkeys(looked))}): using the '
            f'shipped model {SHIPPED_MODEL}')
        return SHIPPED_MODEL
    raise CheckpointError(f'checkpoint {path} not found: train first (python custom_training.py) or give '
                          f'--checkpoint')


def run_checkpoint(path, log):
    """path when it exists; for a missing best.pt, its run's latest.pt when that exists; else None."""
    if path.exists():
        return path
    if path.name == 'best.pt' and (path.parent / 'latest.pt').exists():
        log(f'{path} does not exist (a run without validation writes none): using {path.parent / "latest.pt"}')
        return path.parent / 'latest.pt'
    return None


def first_free_number(folder, name):
    """One past the highest N of the files name_N.mid / .png / .wav in folder (0 for none)."""
    pattern = re.compile(re.escape(name) + r'_(\d+)\.(mid|png|wav)')
    folder = Path(folder)
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    numbers = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n)) and (folder / n).is_file()]
    return max(numbers, default=-1) + 1


DEFAULT_LENGTH = 512  # the original's --length


def default_length(stop, window):
    """--length where none is given: the original's 512 new tokens, or the model's window (seq_len) where that is
    longer and the sample ends with its tune. A model taught on windows of 1,024 tokens writes tunes as long as its
    data's (a Ryan's reel takes about 680 tokens): cut at 512, every one would end mid-phrase."""
    return min(max(DEFAULT_LENGTH, window), MAX_GENERATE_LENGTH) if stop and isinstance(window, int) else DEFAULT_LENGTH


def asked_of(args, checkpoint, step, labels, drawn_seconds=None):
    """What a sample was asked, as its folder's index.html lists it: the options that shape it, unset ones left out,
    and the key, meter and style of its header (asked, or a prompt file's own). drawn_seconds: the length a
    tune_length model's tune was asked where --seconds asks none."""
    asked = {'checkpoint': f'{checkpoint} (step {step})', 'seed': args.seed, 'temperature': args.temperature,
             'top_p': args.top_p, 'top_k': args.top_k, 'repeat_memory': args.repeat_memory or None,
             'unconstrained': args.unconstrained or None, 'voice_leading': args.voice_leading or None,
             'guidance': args.guidance if args.guidance != 1 else None, 'end_guidance': args.end_guidance,
             'prompt': args.prompt,
             'prompt_notes': args.prompt_notes if args.prompt and not args.accompany else None, 'length': args.length,
             'parts': args.parts, 'accompany': args.accompany or None, 'no_stop': args.no_stop or None,
             'seconds': args.seconds if drawn_seconds is None else f'{drawn_seconds:.1f} (a training tune\'s)',
             **labels}
    return {key: value for key, value in asked.items() if value is not None}


def asked_labels(args, checkpoint, ckpt):
    """The labels asked with --key, --meter and --style, in their names here. Raises CheckpointError for a model
    without conditioning or a style it does not know, ValueError (one line, what is allowed) for an unknown key
    or meter."""
    given = {'key': args.key, 'meter': args.meter, 'style': args.style}
    given = {label: value for label, value in given.items() if value is not None}
    if given and not ckpt['tokenization'].get('condition'):
        raise CheckpointError(f"{', '.join('--' + label for label in given)} need{'s' if len(given) == 1 else ''} "
                              f"a model trained with condition on; {checkpoint} was trained without it")
    styles = ckpt.get('styles') or []
    if 'style' in given and given['style'] not in styles:
        known = f"the styles {', '.join(map(printable, styles))}" if styles else 'no styles (its data had no folders)'
        raise CheckpointError(f"--style {given['style']!r}: {checkpoint} knows {known}")
    labels = {}
    if 'key' in given:
        labels['key'] = parse_key(given['key'])
    if 'meter' in given:
        labels['meter'] = parse_meter(given['meter'])
    return {**labels, **({'style': given['style']} if 'style' in given else {})}


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default=DEFAULT_CHECKPOINT, help='checkpoint to sample from')
    parser.add_argument('--output_dir', default='./content/samples', help='where samples are written')
    parser.add_argument('--num_samples', type=int, default=4, help='how many samples')
    parser.add_argument('--length', type=int, default=None,
                        help="new tokens per sample at most (a sample ends with its tune; see --no_stop); default "
                             f"{DEFAULT_LENGTH}, or the model's window where that is longer and the sample ends "
                             "with its tune")
    add_switch(parser, 'no_stop',
               help='write --length new tokens, not stopping where the model ends its tune')
    parser.add_argument('--key', default=None, help='conditioned models: the key asked, e.g. "D major", "G minor"')
    parser.add_argument('--meter', default=None, help='conditioned models: the meter asked, e.g. 6/8')
    parser.add_argument('--style', default=None, help="conditioned models: a style the checkpoint lists (its "
                                                      "training data's top folders)")
    add_sampling_arguments(parser)
    parser.add_argument('--seconds', type=float, default=None,
                        help='models trained with tune_length: how long each tune lasts, to its last note')
    parser.add_argument('--prompt', default=None, help='MIDI file whose first notes the samples continue')
    parser.add_argument('--prompt_notes', type=int, default=16, help='notes of --prompt used as the prompt')
    parser.add_argument('--tempo', type=float, default=None,
                        help="bpm of 'beats' models' output (default: training median)")
    parser.add_argument('--programs', default=None,
                        help="tracks='parts' checkpoints: GM programs (0-127) of some roles, e.g. melody=73,bass=33 "
                             "(the others: the training data's most common)")
    parser.add_argument('--parts', default=None,
                        help="tracks='parts' checkpoints: sample only these roles, e.g. melody,bass,drums")
    add_switch(parser, 'accompany',
               help="tracks='parts' checkpoints: keep --prompt's whole melody, the model writes the rest")
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    add_switch(parser, 'no_audio', help='do not render WAV files')
    add_switch(parser, 'int8', default=None,
               help='int8 weight copy (CPU); default: used for a single sample on the CPU from a model '
                    'of dim >= 256, where it is fastest (outputs differ slightly from float32)')
    args = parser.parse_args(argv)
    exit_on_bad_args(args, rules={**RULES, 'checkpoint': file_path(),
                                  # a day: longer is a typo, and would overflow the model's length input
                                  'seconds': optional(number(min=0, max=86400, min_open=True), 'not asked'),
                                  # left out, default_length sets it once the checkpoint's window is known
                                  'length': lambda value: None if value is None else RULES['length'](value)})
    if args.accompany and not args.prompt:
        parser.error('--accompany needs --prompt FILE, the MIDI file whose melody is accompanied')

    try:
        checkpoint = find_checkpoint(args.checkpoint)
        machine = start_machine(args.device)
        model, ckpt = load_model(checkpoint, machine.device)
        settings = ckpt['tokenization']
        given = checkpoint_sampling(args, ckpt)
        if args.voice_leading and settings.get('tracks', 'all') != 'parts':
            raise CheckpointError(f"--voice_leading needs a model trained with tracks='parts'; {checkpoint} was "
                                  f"trained with tracks={settings.get('tracks', 'all')!r}, which has no melody and "
                                  f"bass roles")
        guided = guidance_asked(args.guidance, args.end_guidance)
        if guided and not settings.get('condition'):
            raise CheckpointError(f'--{guided[0]} needs a model trained with condition on; {checkpoint} was trained '
                                  f'without it')
        if args.programs and settings.get('tracks', 'all') != 'parts':
            raise CheckpointError(f"--programs needs a model trained with tracks='parts'; {checkpoint} was trained "
                                  f"with tracks={settings.get('tracks', 'all')!r}, whose samples are one track")
        labels = asked_labels(args, checkpoint, ckpt)
        if args.seconds is not None and not ckpt['args'].get('tune_length'):
            raise CheckpointError(f'--seconds needs a model trained with tune_length on; {checkpoint} was trained '
                                  f'without it')
        stop = not (args.no_stop or args.accompany)  # an accompaniment ends with its melody
        if args.length is None:
            args.length = default_length(stop, ckpt['args'].get('seq_len'))
        table, melody = None, None
        if args.parts is not None or args.accompany:
            if settings.get('tracks', 'all') != 'parts':
                raise CheckpointError(f"--{'parts' if args.parts is not None else 'accompany'} needs a model "
                                      f"trained with tracks='parts'; {checkpoint} was trained with "
                                      f"tracks={settings.get('tracks', 'all')!r}")
            roles = list(ROLES) if args.parts is None else [role.strip() for role in args.parts.split(',')]
            roles = [] if roles == [''] else roles  # --parts '' names no role: said so, not taken for all of them
            try:
                table = parts_table(roles, stop, without=('melody',) if args.accompany else ())
            except ValueError as e:
                raise ValueError(f"--parts {args.parts!r}: {e}"
                                 f"{' (--accompany: one besides melody)' if args.accompany else ''}") from None
        programs = {**parse_programs(ckpt['args'].get('programs') or ''), **parse_programs(args.programs or '')}
        prompt = (prompt_from_midi(args.prompt, args.prompt_notes, settings) if args.prompt and not args.accompany
                  else torch.tensor([START_IDX]))
        if args.accompany:
            melody = melody_notes(prompt_from_midi(args.prompt, sys.maxsize, settings))
            if not melody:
                raise PromptError(f'prompt {args.prompt} has no melody to accompany (no pitched notes)')
        if args.prompt:  # a continuation keeps the prompt's key and meter unless others are asked
            labels = {**prompt_labels(args.prompt), **labels}
        if settings.get('condition'):
            prompt = torch.cat([prompt[:1], torch.tensor(header(labels, ckpt.get('styles') or []),
                                                         dtype=prompt.dtype), prompt[1:]])
        seed_everything(args.seed)
        model, autocast = generation_model(model, machine, args.num_samples, args.int8)
    except (CheckpointError, DeviceError, PromptError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # an unknown --key or --meter
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # while the model loads: nothing to keep
        how, code = stopped_by(e)
        print(f'stopped by {how}: 0 of {args.num_samples} samples written', file=sys.stderr)
        sys.exit(code)
    tempo = args.tempo or ckpt['args'].get('output_tempo') or 120.0
    # the time steps of the asked length ('beats' steps last as long as the tempo the samples are written at)
    tune_steps = None if args.seconds is None else round(args.seconds / seconds_per_step(settings, tempo))
    drawn = None  # asked no length, a new tune of a tune_length model lasts as a training tune of its style does
    if tune_steps is None and ckpt.get('tune_lengths') and ckpt['args'].get('tune_length') and stop and not args.prompt:
        drawn = drawn_lengths(ckpt['tune_lengths'], [labels.get('style')] * args.num_samples,
                              np.random.default_rng(args.seed))
        tune_steps = torch.tensor(drawn, device=machine.device)
        kind = f"style {labels['style']}" if labels.get('style') in ckpt['tune_lengths'] else 'the training data'
        print(f'each tune asked the length of a tune of {kind} drawn at random (--seconds asks one)')
    name = f"{'accompaniment' if melody else 'continuation'}_{Path(args.prompt).stem}" if args.prompt else 'sample'
    force = Accompanist(melody, args.num_samples) if melody else None
    length = args.length + 3 * len(melody) if melody else args.length  # the melody's tokens come on top
    prompts = prompt.to(machine.device).unsqueeze(0).repeat(args.num_samples, 1)
    interrupted, how_far = None, ''
    progress = GenerationProgress(prompts, length)
    print(f"checkpoint {checkpoint} (step {ckpt['step']}, {settings['timing']} timing); "
          + (f'accompanying the {len(melody)} melody notes of {args.prompt}' if melody else
             f'prompt of {len(prompt)} tokens'))
    unconditioned = without_header(prompts)
    steering = [f'--{name}' for name in guidance_asked(args.guidance, args.end_guidance) if name in given]
    if steering and unconditioned is None:
        print('note: nothing is asked (no --key, --meter, --style, nor a prompt file with a key or time signature), '
              f"so {' and '.join(steering)} change{'s' if len(steering) == 1 else ''} nothing", file=sys.stderr)
    elif '--end_guidance' in steering and not stop:
        print(f"note: --{'accompany' if args.accompany else 'no_stop'} draws no tune end, so --end_guidance changes "
              f"nothing", file=sys.stderr)
    elif args.guidance == 0 and unconditioned is not None:  # the files say what was asked: say that it was not heard
        print('note: --guidance 0 draws every token as the model asked nothing would: what is asked is written into '
              'the files but does not steer the notes', file=sys.stderr)
    try:
        with progress, autocast:
            out = model.generate(prompts, length, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, return_prime=True, allowed_next=table if table is not None else
                                 None if args.unconstrained else grammar_table(stop), repeat_memory=args.repeat_memory,
                                 on_token=progress, force=force,
                                 constrain=VoiceLeading(args.num_samples) if args.voice_leading else None,
                                 eos_token=PAD_IDX if force else START_IDX if stop else None,
                                 static_cache=graphed_decoding(machine), guidance=args.guidance,
                                 end_guidance=args.end_guidance, unconditioned=unconditioned, length=tune_steps)
        if force and force.unplaced():
            print(f'warning: the last {force.unplaced()} melody notes did not fit in --length {args.length} tokens '
                  f'of accompaniment; raise --length', file=sys.stderr)
    except (MemoryError, RuntimeError) as e:  # all samples are one batch; torch's out-of-memory is a RuntimeError
        if not isinstance(e, MemoryError) and 'memory' not in str(e).lower():
            raise
        print(f'error: not enough memory to generate {args.num_samples} samples of {args.length} tokens at once '
              f'on {machine.device}; lower --num_samples or --length', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the samples so far are written, a long generation is not lost
        out, interrupted = progress.out, e
        how, code = stopped_by(e)
        how_far = f', {out.shape[1] - len(prompt):,} of {args.length:,} new tokens each'
        if out.shape[1] == len(prompt):
            print(f'stopped by {how}: 0 of {args.num_samples} samples written', file=sys.stderr)
            sys.exit(code)
        print(f'stopped by {how}: writing the samples so far{how_far}', file=sys.stderr)
    written, first = 0, first_free_number(args.output_dir, name)

    def midi_written():  # a sample counts once its MIDI file is on disk, whatever stops its picture or audio
        nonlocal written
        written += 1
    try:
        for i, tokens in enumerate(out.cpu().tolist(), start=first):
            try:
                save_sample(until_tune_end(tokens, len(prompt)) if stop else tokens,
                            Path(args.output_dir) / f'{name}_{i}', settings, tempo_bpm=tempo,
                            prompt_length=len(prompt), audio=not args.no_audio,
                            asked=asked_of(args, checkpoint, ckpt['step'], labels,
                                           drawn and drawn[i - first] * seconds_per_step(settings, tempo)),
                            programs=programs,
                            on_midi=midi_written, labels=labels)
            except OSError as e:  # a full disk, or a folder where a sample file should go
                print(f"error: cannot write {e.filename or Path(args.output_dir) / f'{name}_{i}'}: "
                      f"{e.strerror or e}", file=sys.stderr)
                sys.exit(1)
    except KeyboardInterrupt as e:
        interrupted = interrupted or e
    if interrupted:
        how, code = stopped_by(interrupted)
        print(f'stopped by {how}: {written} of {args.num_samples} samples written{how_far}', file=sys.stderr)
        sys.exit(code)
    last = f' to {name}_{first + written - 1}' if written > 1 else ''
    print(f'wrote {name}_{first}{last} in {Path(args.output_dir).resolve()}')


if __name__ == '__main__':
    undecodable_names_on_stdout()
    with sigterm_as_ctrl_c():
        main()
