"""A model's own whole tunes, kept where they keep a rule, as a zip of MIDI files a training run can read beside the
real ones: training on its own tunes.

Two rules, by the checkpoint (--rule says otherwise):
- tonic, for a conditioned model: each tune is asked the header (key, meter, style) of a training tune drawn at
  random and kept when the model ended it by itself on the asked key's tonic. The files carry the asked key and
  time signature and lie in the asked style's folder, so the labels read back as any user's file's do.
- voice_leading, for a tracks='parts' model: each piece is sampled with the voice-leading mask (generate.py
  --voice_leading) and kept when the model ended it and it holds no parallel fifth or octave and no voice crossing
  between melody and bass, by evaluate.py's own measures. With --accompany the pieces are accompaniments of the
  training pieces' melodies instead, sampled as generate.py --accompany --voice_leading samples them, and kept when
  every melody note was placed and the same holds.

Tunes are sampled as evaluate.py samples whole tunes (temperature 1, the token grammar, at most MAX_TOKENS):

    python tools/own_tunes.py --checkpoint models/conditioned_cpu.pt --tunes 10000 --out content/own/own_tunes.zip

docs/conditioning.md and docs/parts.md say what training on them did.
"""

import io
import sys
import tempfile
import time
import zipfile
from argparse import ArgumentParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import condition  # noqa: E402
import parts_measures as measures  # noqa: E402
from accompany import accompaniable, accompany_piece  # noqa: E402
from evaluate import ends_on_tonic, generate_tunes, held_out_corpus, start_model  # noqa: E402
from parts import parse_programs  # noqa: E402
from runtime import CheckpointError, DeviceError, sigterm_as_ctrl_c, stopped_by  # noqa: E402
from sampling import REPEAT_MEMORY, generation_model  # noqa: E402
from token_cache import DatasetError, write_atomically  # noqa: E402
from tokens import PAD_IDX, START_IDX, detokenize, is_pitch, tokens_to_notes  # noqa: E402

MAX_TOKENS = {'tonic': 1024, 'voice_leading': 4096}  # a tune not ended by then is not kept
RULES = tuple(MAX_TOKENS)


def training_headers(train_seqs, count, seed):
    """count headers (token lists) of training tunes with a key, drawn at random."""
    headers = [condition.tune_header(s) for s in train_seqs]
    keyed = [h for h in headers if any(condition.KEY_FIRST <= t <= condition.KEY_LAST for t in h)]
    if not keyed:
        raise ValueError('no training tune has a key signature: nothing to ask')
    rng = np.random.default_rng(seed)
    return [keyed[i] for i in rng.integers(0, len(keyed), count)]


def accompaniments(model, machine, train_seqs, count, log=print):
    """About count accompaniments of the training pieces' melodies (the pieces of at most MAX_TOKENS['voice_leading']
    tokens with a melody and a lower part; the same number of rows for each), sampled as evaluate.py accompanies
    held-out ones, with the voice-leading mask: (tokens, ended) per row, ended where the row placed every melody
    note and stopped after the last."""
    pieces = [s for s in train_seqs if len(s) <= MAX_TOKENS['voice_leading'] and accompaniable(s)]
    if not pieces:
        raise ValueError('no training piece has a melody and a bass or harmony part: nothing to accompany')
    rows = max(1, round(count / len(pieces)))
    sampling = {'temperature': 1.0, 'top_p': None, 'top_k': None, 'repeat_memory': REPEAT_MEMORY}
    net, autocast = generation_model(model, machine, batch=rows)
    tunes, ended = [], []
    with autocast:
        for i, tokens in enumerate(pieces):
            out, _ = accompany_piece(net, tokens, rows, sampling, machine.device, voice_leading=True)
            for row in out.tolist():  # the rows as generated, after their start token
                tunes.append([START_IDX] + [t for t in row if t != PAD_IDX])
                ended.append(PAD_IDX in row)
            if (i + 1) % 50 == 0:
                log(f'{i + 1} of {len(pieces)} melodies accompanied')
    return tunes, ended


def kept_tunes(tunes, ended, headers, styles, rule='tonic'):
    """(tokens after the header, labels) of the tunes that ended by themselves and keep the rule."""
    kept = []
    for tokens, end, header in zip(tunes, ended, headers):
        labels = condition.header_labels(header, styles)
        notes = tokens[1 + len(header):]
        if end and is_pitch(np.asarray(notes)).any() and keeps(rule, notes, labels):
            kept.append((notes, labels))
    return kept


def keeps(rule, notes, labels):
    """tonic: the tune ends on its asked key's tonic; voice_leading: melody and bass both sound, and never in
    parallel fifths or octaves or crossed."""
    if rule == 'tonic':
        return bool(ends_on_tonic(notes, labels['key']))
    with_roles = tokens_to_notes(notes, roles=True)
    moves = measures.parallels(with_roles)
    crossing = measures.voice_crossing(with_roles)
    return crossing == 0 and sum(moves) == 0  # crossing is NaN where the two never sound together


def midi_bytes(notes, labels, settings, tempo, folder, programs=None):
    """One kept tune as the bytes of a MIDI file with its labels' key and time signature."""
    stem = Path(folder) / 'tune'
    detokenize(notes, stem, settings, tempo_bpm=tempo, programs=programs)
    condition.write_labels(stem.with_suffix('.mid'), labels)
    return stem.with_suffix('.mid').read_bytes()


def sample_and_keep(args, parser):
    """Sample args.tunes tunes of the checkpoint and keep those that keep the rule: (kept, tokenization settings,
    tempo, the run's args, whether it is a parts model)."""
    model, ckpt, machine = start_model(args.checkpoint, args.device, None)
    settings = ckpt['tokenization']
    parts = settings.get('tracks', 'all') == 'parts'
    rule = args.rule or ('voice_leading' if parts else 'tonic')
    if rule == 'tonic' and not settings.get('condition'):
        parser.error(f'--rule tonic: {args.checkpoint} was trained without condition, so its tunes have no key to end '
                     f'on')
    if rule == 'voice_leading' and not parts:
        parser.error(f"--rule voice_leading: {args.checkpoint} was trained with tracks="
                     f"{settings.get('tracks', 'all')!r}, which has no melody and bass roles")
    if args.accompany and rule != 'voice_leading':
        parser.error('--accompany: only with --rule voice_leading (a parts model accompanies melodies)')
    run = SimpleNamespace(**ckpt['args'])
    styles = ckpt.get('styles') or []
    _, train_seqs, _, summary, _ = held_out_corpus(run, settings, args.data_path, None, print, styles)
    tempo = run.output_tempo or summary['median_tempo_bpm']
    headers = training_headers(train_seqs, args.tunes, args.seed) if rule == 'tonic' else [[]] * args.tunes
    torch.manual_seed(args.seed)
    clock = time.time()
    model.eval()
    if args.accompany:
        tunes, ended = accompaniments(model, machine, train_seqs, args.tunes)
        headers = [[]] * len(tunes)
    else:
        tunes, ended = generate_tunes(model, machine, [[START_IDX] + h for h in headers], MAX_TOKENS[rule],
                                      temperature=1.0, top_p=None, top_k=None, repeat_memory=REPEAT_MEMORY,
                                      voice_leading=rule == 'voice_leading')
    kept = kept_tunes(tunes, ended, headers, styles, rule)
    print(f'{len(tunes)} tunes sampled in {time.time() - clock:.0f} s: {sum(ended)} ended by themselves, '
          f'{len(kept)} of them keep the {rule} rule ({len(kept) / len(tunes):.1%}) and are kept')
    notes = lambda seqs: np.median([is_pitch(np.asarray(s)).sum() for s in seqs]) if seqs else 0
    print(f'median notes: {notes([t for t, e in zip(tunes, ended) if e]):.0f} of the tunes ended, '
          f'{notes([k[0] for k in kept]):.0f} of the tunes kept')
    return kept, settings, tempo, run, parts


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help="a conditioned or a tracks='parts' checkpoint")
    parser.add_argument('--tunes', type=int, default=4000, help='tunes sampled (a third or fewer are kept)')
    parser.add_argument('--out', required=True, help='the zip written')
    parser.add_argument('--rule', choices=RULES, default=None,
                        help="what a kept tune keeps (default: voice_leading for a tracks='parts' model, else tonic)")
    parser.add_argument('--accompany', action='store_true',
                        help="a parts model's accompaniments of the training melodies, about --tunes in all")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--data_path', default=None, help="the training data (default: the checkpoint's)")
    parser.add_argument('--device', default='auto')
    args = parser.parse_args(argv)
    if args.tunes < 1:
        parser.error(f'--tunes {args.tunes}: expected at least 1')
    if not str(args.out).endswith('.zip'):
        parser.error(f'--out {args.out}: expected a path ending in .zip')
    with sigterm_as_ctrl_c():  # a stop, by Ctrl-C or SIGTERM, writes nothing
        try:  # the zip is written whole or not at all
            kept, settings, tempo, run, parts = sample_and_keep(args, parser)
            programs = parse_programs(run.programs or '') if parts else None
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as z, tempfile.TemporaryDirectory() as folder:
                for i, (notes, labels) in enumerate(kept):
                    name = f"{labels['style']}/own_{i:05d}.mid" if labels.get('style') else f'own_{i:05d}.mid'
                    z.writestr(name, midi_bytes(notes, labels, settings, tempo, folder, programs))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_atomically(Path(args.out), lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
        except (CheckpointError, DeviceError, DatasetError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # a full disk, a folder that cannot be written
            print(f'error: {args.out}: {e.strerror or e}', file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt as e:
            how, code = stopped_by(e)
            print(f'stopped by {how}: nothing written', file=sys.stderr)
            sys.exit(code)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
