"""What a corpus of N files costs: first tokenization, cached start-up, memory, cache size, the data a training step
waits for, the validation share of a default run, and the window sampler's speed, for several N; Lakh's count
(170,000 files) is extrapolated from the largest N measured.

    python benchmarks/bench_scale.py [--sizes 100,1000,3000] [--workers N]
    python benchmarks/bench_scale.py --ab REV [--ab_files 400] [--ab_rounds 3]

--ab times the first tokenization of the working tree against that of a git revision (its token_cache.py,
tokens.py, TMIDIX.py, ...), alternating in one run on the same made files: wall files a second and the CPU
seconds a file of every process, which give the time on idle cores when the machine is shared.

The corpus is made from the bundled Essen folk songs, nothing downloaded: each file is a real-size multi-track
piece (three tracks of tunes laid end to end, each tune transposed, the file at its own tempo), so every file is
unique. Each N gets its own folder and token cache in a temporary folder, removed at the end. Cached start-up,
memory and training are measured in a fresh process per N, as a training run starts.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from options import ArgumentParser  # noqa: E402

LAKH_FILES = 170_000
# the default Args a run trains with (custom_training.py), and the eval batch its validation uses
DEFAULTS = {'seq_len': 100, 'dim': 512, 'depth': 6, 'heads': 8, 'dim_head': 64, 'dropout': 0.1, 'batch_size': 2,
            'grad_accum': 2, 'lr': 3e-4, 'min_notes': 16, 'val_fraction': 0.05, 'aug_range': 2, 'seed': 42,
            'validate_every': 200, 'val_tokens': 25_000}
NOTES_PER_TRACK = 900   # three tracks: about 2,700 notes and 8,000 tokens a file, a Lakh file's order of size
DIVISION = 480


# -----------------------------------------------------------------------------
# the corpus

def essen_tunes():
    """(onset, duration, pitch) int arrays in ticks of DIVISION per quarter, one per bundled tune."""
    import TMIDIX
    from runtime import BUNDLED_DATASET
    tunes = []
    with zipfile.ZipFile(next(Path(BUNDLED_DATASET).glob('*.zip'))) as zf:
        for name in zf.namelist():
            if not name.lower().endswith('.mid'):
                continue
            data = zf.read(name)
            division = int.from_bytes(data[12:14], 'big')  # the header's ticks per quarter (none is SMPTE)
            notes = np.array([n[1:3] + n[4:5] for n in TMIDIX.midi2notes(data, unit='ticks')], dtype=np.int64)
            if len(notes) >= 8:
                notes[:, :2] = notes[:, :2] * DIVISION // division
                tunes.append(notes)
    return tunes


def vlq_events(deltas, messages):
    """Track bytes: each delta time as a MIDI variable-length quantity followed by its 3-byte channel message."""
    sizes = 1 + (deltas >= 1 << 7) + (deltas >= 1 << 14) + (deltas >= 1 << 21)
    starts = np.cumsum(sizes + 3) - (sizes + 3)
    out = np.zeros(int((sizes + 3).sum()), dtype=np.uint8)
    for k in range(4):
        has = sizes > k
        shift = 7 * (sizes[has] - 1 - k)
        out[starts[has] + k] = ((deltas[has] >> shift) & 0x7F) | np.where(k < sizes[has] - 1, 0x80, 0)
    for k in range(3):
        out[starts + sizes + k] = messages[:, k]
    return out.tobytes()


def track_chunk(body):
    body += b'\x00\xff\x2f\x00'  # end of track
    return b'MTrk' + len(body).to_bytes(4, 'big') + body


def piece_bytes(rng, tunes):
    """One multi-track MIDI file: a tempo track and three instrument tracks of transposed tunes end to end."""
    tempo = int(60_000_000 / rng.uniform(60, 180))
    tracks = [track_chunk(b'\x00\xff\x51\x03' + tempo.to_bytes(3, 'big'))]
    for channel, octave in ((0, 0), (1, -12), (2, 12)):
        parts, at, count = [], 0, 0
        while count < NOTES_PER_TRACK:
            tune = tunes[rng.integers(len(tunes))]
            shift = octave + int(rng.integers(-5, 6))
            parts.append(np.column_stack([tune[:, 0] + at, tune[:, 1], np.clip(tune[:, 2] + shift, 0, 127)]))
            at += int(tune[:, 0].max() + tune[:, 1].max()) + DIVISION
            count += len(tune)
        notes = np.concatenate(parts)
        times = np.concatenate([notes[:, 0], notes[:, 0] + notes[:, 1]])
        on = np.concatenate([np.ones(len(notes), bool), np.zeros(len(notes), bool)])
        pitch = np.concatenate([notes[:, 2], notes[:, 2]])
        order = np.lexsort((on, times))  # a note-off before a note-on at the same tick
        times, on, pitch = times[order], on[order], pitch[order]
        messages = np.column_stack([np.where(on, 0x90, 0x80) + channel, pitch, np.where(on, 80, 0)])
        tracks.append(track_chunk(vlq_events(np.diff(times, prepend=0), messages)))
    header = b'MThd' + (6).to_bytes(4, 'big') + (1).to_bytes(2, 'big') + len(tracks).to_bytes(2, 'big')
    return header + DIVISION.to_bytes(2, 'big') + b''.join(tracks)


def write_corpus(folder, n, tunes):
    """n unique files, 1,000 to a subfolder as large collections are laid out."""
    for i in range(n):
        path = folder / f'{i // 1000:03d}' / f'piece_{i:06d}.mid'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(piece_bytes(np.random.default_rng(i), tunes))


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob('*') if p.is_file())


# -----------------------------------------------------------------------------
# a cached start-up, in a process of its own

def memory_status():
    """Peak and current resident memory, and the part of it that is not file-backed (MB)."""
    fields = {}
    for line in Path('/proc/self/status').read_text().splitlines():
        key, _, value = line.partition(':')
        if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def startup(folder, cache, mode='full'):
    """Start as a default training run does, from a filled cache: a dict of figures; the *_at times are clock
    times, which the parent counts from the moment it started this process (interpreter and imports included)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from dataset import MIDI_Dataset, PackedDataset, collate_fn, load_corpus, validation_sample
    from runtime import build_model, evaluate_split, start_machine
    from tokens import tokenization_settings
    a = DEFAULTS
    out = {'imports_at': time.time()}
    t0 = time.time()
    train, val, summary = load_corpus(folder, tokenization_settings(), cache, a['min_notes'], a['val_fraction'],
                                      verbose=False)
    out['load_corpus_s'] = time.time() - t0
    t0 = time.time()
    train_ds = PackedDataset(train, a['seq_len'], aug=True, aug_range=a['aug_range'], seed=a['seed'])
    val_full = MIDI_Dataset(val, a['seq_len'], rand_start=False)
    val_ds = Subset(val_full, validation_sample(val_full, a['val_tokens']))
    out['windows_s'] = time.time() - t0
    out['data_memory_mb'] = memory_status()  # the corpus and its windows, before the model
    machine = start_machine('cpu', 'auto')
    torch.manual_seed(0)
    model = build_model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a['lr'], fused=True)
    t0 = time.time()
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0)).numpy()
    batches = (order[i:i + a['batch_size']].tolist() for i in range(0, len(order), a['batch_size']))
    out['epoch_order_s'] = time.time() - t0  # what training pays at each epoch's start
    loader = iter(DataLoader(train_ds, batch_sampler=batches, collate_fn=collate_fn, generator=torch.Generator()))
    wait = []

    def step():
        for _ in range(a['grad_accum']):
            t = time.perf_counter()
            x = next(loader)
            wait.append(time.perf_counter() - t)
            with machine.autocast():
                loss, _ = model(x)
            (loss / a['grad_accum']).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    out['first_step_at'] = time.time()
    out['memory_mb'] = memory_status()
    out.update(summary=summary, train_windows=len(train_ds), val_windows=len(val_full), val_sample=len(val_ds),
               dtype=machine.dtype_name)
    step()
    t0 = time.perf_counter()
    steps = 6
    for _ in range(steps):
        step()
    out['step_s'] = (time.perf_counter() - t0) / steps
    out['data_wait_s'] = sum(wait[-steps * a['grad_accum']:]) / steps
    out['sampler_tokens_s'] = sampler_speed(train, PackedDataset, collate_fn, torch)
    if mode != 'full':  # a validation of the sample costs the same at every size past val_tokens
        return out
    t0 = time.perf_counter()
    out['val_loss'] = evaluate_split(model, val_ds, max(32, 4 * a['batch_size']), machine)[0]  # as training's
    out['validation_s'] = time.perf_counter() - t0
    interval = a['validate_every'] * out['step_s']
    out['validation_share'] = out['validation_s'] / (interval + out['validation_s'])
    return out


def sampler_speed(train, PackedDataset, collate_fn, torch, seq_len=1024, batch=64, batches=20):
    """Tokens a second of packed, transposed windows of seq_len at this batch, on one core, with the collate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = PackedDataset(train, seq_len, aug=True, aug_range=2, seed=1)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    n = min(batches, len(order) // batch)
    t0 = time.perf_counter()
    # __getitems__: how the DataLoader asks a dataset for a batch
    tokens = sum(collate_fn(ds.__getitems__(order[b * batch:(b + 1) * batch])).numel() for b in range(n))
    speed = tokens / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return speed


def lakh_windows(tokens_per_file):
    """The in-memory part of a start-up at Lakh's count, measured: training windows over LAKH_FILES token arrays of
    this length, laid out as the token cache's consolidated file is (one file, memory-mapped, each tune a slice of
    it; made, not tokenized: copies of one pattern), every 20th held out, the validation sample and an epoch's
    order."""
    import torch

    from dataset import MIDI_Dataset, PackedDataset, validation_sample
    from tokens import PITCH_OFFSET, START_IDX
    a = DEFAULTS
    pattern = np.tile(np.array([1, 200, PITCH_OFFSET + 60], dtype=np.uint16), tokens_per_file // 3 + 1)
    pattern[0] = START_IDX
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'tokens.bin'
        with open(path, 'wb') as f:
            for _ in range(LAKH_FILES):
                f.write(pattern[:tokens_per_file].tobytes())
        stream = np.memmap(path, dtype=np.uint16, mode='r')
        sequences = [stream[i * tokens_per_file:(i + 1) * tokens_per_file] for i in range(LAKH_FILES)]
        val, train = sequences[::20], [s for i, s in enumerate(sequences) if i % 20]
        out = {'tokens': LAKH_FILES * tokens_per_file, 'file_mb': path.stat().st_size / 1e6,
               'arrays_mb': memory_status()}
        t0 = time.time()
        train_ds = PackedDataset(train, a['seq_len'], aug=True, aug_range=a['aug_range'], seed=a['seed'])
        out['packed_s'] = time.time() - t0
        t0 = time.time()
        val_full = MIDI_Dataset(val, a['seq_len'], rand_start=False)
        out['val_sample'] = len(validation_sample(val_full, a['val_tokens']))
        out['val_s'] = time.time() - t0
        t0 = time.time()
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0)).numpy()
        out['epoch_order_s'] = time.time() - t0
        out['train_windows'], out['order_mb'] = len(train_ds), order.nbytes / 1e6
        t0 = time.time()
        for b in range(20):
            train_ds.__getitems__(order[b * 64:(b + 1) * 64].tolist())
        out['batch_of_64_s'] = (time.time() - t0) / 20
        out['peak_mb'] = memory_status()
        del train_ds, val_full, sequences, val, train, stream
    return out


# -----------------------------------------------------------------------------
# the report

def cpu_seconds():
    """CPU seconds (user and system) of this process and of its children that have ended (the tokenizing pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def first_tokenization(folder, cache, workers):
    from dataset import load_corpus
    from tokens import tokenization_settings
    t0, cpu = time.time(), cpu_seconds()
    _, _, summary = load_corpus(folder, tokenization_settings(), cache, DEFAULTS['min_notes'],
                                DEFAULTS['val_fraction'], num_workers=workers, verbose=False)
    return time.time() - t0, cpu_seconds() - cpu, summary


AB_CHILD = '''
import json, resource, sys, time
import token_cache, tokens
def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
t0, c0 = time.time(), cpu()
token_cache.load_token_cache(sys.argv[1], tokens.tokenization_settings(), sys.argv[2], num_workers=int(sys.argv[3]),
                             verbose=False)
print(json.dumps([time.time() - t0, cpu() - c0]))
'''


def tokenize_ab(rev, n, rounds, workers, root, tunes):
    """First tokenization of n made files by the working tree and by rev, alternating, each in a fresh process
    with an empty cache: {'tree' or rev: [(wall s, CPU s), ...]}."""
    here = Path(__file__).resolve().parents[1]
    other = root / 'rev'
    other.mkdir()
    archive = subprocess.run(['git', '-C', str(here), 'archive', rev], capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', str(other)], input=archive, check=True)
    write_corpus(root / 'ab', n, tunes)
    times = {'tree': [], rev: []}
    for r in range(rounds):
        for name, tree in (('tree', here), (rev, other)) if r % 2 == 0 else ((rev, other), ('tree', here)):
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS='1')
            out = subprocess.run([sys.executable, '-c', AB_CHILD, str(root / 'ab'), str(root / f'cache_{r}_{name}'),
                                  str(workers)], env=env, cwd=tree, capture_output=True, text=True, check=True)
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {n / times[name][-1][0]:.1f} files/s, "
                  f"{1e3 * times[name][-1][1] / n:.2f} CPU ms a file; load average {os.getloadavg()[0]:.1f}", flush=True)
    return times


def measure(n, root, tunes, workers, mode):
    """The figures of n made files, or of the bundled folk songs for n = None."""
    from runtime import BUNDLED_DATASET
    from token_cache import find_midi_sources
    folder, cache = root / f'corpus_{n}', root / f'cache_{n}'
    if n is None:
        folder, n = Path(BUNDLED_DATASET), len(find_midi_sources(BUNDLED_DATASET))
    else:
        write_corpus(folder, n, tunes)
    row = {'n': n, 'midi_mb': folder_bytes(folder) / 1e6}
    row['tokenize_s'], row['tokenize_cpu_s'], summary = first_tokenization(folder, cache, workers)
    row['tokens'] = summary['train_tokens'] + summary['val_tokens']
    row['cache_mb'] = folder_bytes(cache) / 1e6
    started = time.time()
    child = subprocess.run([sys.executable, __file__, '--startup', str(folder), str(cache), mode],
                           capture_output=True, text=True, check=True)
    row.update(json.loads(child.stdout.strip().splitlines()[-1]))
    row['imports_s'], row['first_step_at_s'] = row.pop('imports_at') - started, row.pop('first_step_at') - started
    row['load'] = os.getloadavg()
    return row


def share(row):
    return f"{100 * row['validation_share']:.1f}%" if 'validation_share' in row else 'not run'


def show(rows, workers):
    print('\n| files | tokens | MIDI MB | cache MB | tokenize s | files/s | tokens/s | CPU ms a file | first step at s '
          '(cached load_corpus s + windows s) | RSS MB: data (anon) / at first step | step s | data wait % | '
          'val windows | validation s | val share | sampler M tok/s | load |')
    print('| ' + ' | '.join(['---'] * 17) + ' |')
    for r in rows:
        m, d = r['memory_mb'], r['data_memory_mb']
        print(f"| {r['n']:,}{' (bundled)' if r is rows[0] else ''} | {r['tokens']:,} | {r['midi_mb']:.1f} | "
              f"{r['cache_mb']:.1f} | {r['tokenize_s']:.1f} | "
              f"{r['n'] / r['tokenize_s']:.1f} | {r['tokens'] / r['tokenize_s']:,.0f} | "
              f"{1e3 * r['tokenize_cpu_s'] / r['n']:.2f} | "
              f"{r['first_step_at_s']:.1f} ({r['load_corpus_s']:.2f} + {r['windows_s']:.2f}) | "
              f"{d['VmRSS']:.0f} ({d['RssAnon']:.0f}) / "
              f"{m['VmRSS']:.0f} | "
              f"{r['step_s']:.3f} | {100 * r['data_wait_s'] / r['step_s']:.2f} | {r['val_sample']:,} of "
              f"{r['val_windows']:,} | {r.get('validation_s', float('nan')):.1f} | {share(r)} | "
              f"{r['sampler_tokens_s'] / 1e6:.1f} | {r['load'][0]:.1f} |")
    big = rows[-1]
    scale = LAKH_FILES / big['n']
    # growth between the smallest and the largest made corpus; with one made corpus, its figures per file and token
    # (which counts the fixed part too, so it errs high)
    base = rows[1] if len(rows) > 2 else {'n': 0, 'tokens': 0, 'load_corpus_s': 0, 'windows_s': 0,
                                          'data_memory_mb': {'RssAnon': 0}}
    per_file_load = (big['load_corpus_s'] + big['windows_s'] - base['load_corpus_s'] - base.get('windows_s', 0)) / (
        big['n'] - base['n'])
    per_token_anon = (big['data_memory_mb']['RssAnon'] - base['data_memory_mb']['RssAnon']) / (big['tokens'] - base['tokens'])
    tokens = big['tokens'] * scale
    print(f'\nextrapolated to {LAKH_FILES:,} files from the {big["n"]:,}-file row (linear in files; not measured):')
    cpu = big['tokenize_cpu_s'] / big['n']
    print(f"  tokens {tokens / 1e9:.2f} G; first tokenization {big['tokenize_s'] * scale / 60:.0f} min on {workers} "
          f"workers at this load, {LAKH_FILES * cpu / os.cpu_count() / 60:.1f} min from its CPU seconds on "
          f"{os.cpu_count()} idle cores; cache {big['cache_mb'] * scale / 1e3:.1f} GB; MIDI "
          f"{big['midi_mb'] * scale / 1e3:.1f} GB")
    print(f"  cached load_corpus and windows "
          f"{base['load_corpus_s'] + base.get('windows_s', 0) + per_file_load * (LAKH_FILES - base['n']):.0f} s "
          f"({per_file_load * 1e6:.0f} us a file); start-up to the first step "
          f"{big['first_step_at_s'] + per_file_load * (LAKH_FILES - big['n']):.0f} s")
    print(f"  resident memory of the data, not file-backed: {base['data_memory_mb']['RssAnon'] + per_token_anon * (tokens - base['tokens']):,.0f} MB "
          f"({per_token_anon * 1e6:.2f} MB a million tokens), plus the model's and optimizer's at the first step "
          f"({big['memory_mb']['VmRSS'] - big['data_memory_mb']['VmRSS']:,.0f} MB here)")
    print(f"  an epoch's shuffled order (at each epoch's start): {big['epoch_order_s'] * scale:.1f} s")


def file_counts(text):
    """--sizes: '100,1000,3000' -> [100, 1000, 3000], sorted; anything but whole numbers >= 1 is refused in one line
    before minutes of measuring start."""
    try:
        sizes = sorted(int(s) for s in text.split(','))
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected numbers of files >= 1, comma-separated, e.g. 100,1000')
    return sizes


def at_least_one(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected a whole number >= 1')
    return value


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=file_counts, default='100,1000,3000', help='numbers of files, comma-separated')
    parser.add_argument('--workers', type=at_least_one, default=os.cpu_count(),
                        help='tokenizing processes (all cores)')
    parser.add_argument('--startup', nargs='+', help=argparse.SUPPRESS)  # the child process: FOLDER CACHE [MODE]
    parser.add_argument('--ab', metavar='REV', help='only time the first tokenization against this git revision')
    parser.add_argument('--ab_files', type=at_least_one, default=400, help='made files of the --ab comparison')
    parser.add_argument('--ab_rounds', type=at_least_one, default=3, help='runs of each side, alternating')
    parser.add_argument('--lakh_windows', type=at_least_one, metavar='TOKENS_PER_FILE',
                        help=f'only measure the windows of {LAKH_FILES:,} files of this many tokens in a mapped '
                             f'file (2 bytes a token of disk in a temporary folder)')
    args = parser.parse_args()
    if args.startup:
        print(json.dumps(startup(*args.startup)))
        return
    if args.lakh_windows:
        print(json.dumps(lakh_windows(args.lakh_windows)))
        return
    if args.ab:
        with tempfile.TemporaryDirectory() as tmp:
            times = tokenize_ab(args.ab, args.ab_files, args.ab_rounds, args.workers, Path(tmp), essen_tunes())
        for name, runs in times.items():
            cpu = min(c for _, c in runs) / args.ab_files
            print(f'{name}: best {args.ab_files / min(w for w, _ in runs):.1f} files/s on {args.workers} workers; '
                  f'{1e3 * cpu:.2f} CPU ms a file (all processes), so {os.cpu_count() / cpu:.0f} files/s and '
                  f'{LAKH_FILES * cpu / os.cpu_count() / 60:.1f} min for {LAKH_FILES:,} files on '
                  f'{os.cpu_count()} idle cores')
        return
    started = time.time()
    sizes = args.sizes
    import torch
    print(f'{os.cpu_count()} CPU cores, {args.workers} tokenizing workers, torch {torch.__version__}; '
          f'load average {os.getloadavg()[0]:.1f} at the start')
    t0 = time.time()
    tunes = essen_tunes()
    print(f'{len(tunes)} Essen tunes read in {time.time() - t0:.1f} s')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [None] + sizes:
            rows.append(measure(n, Path(tmp), tunes, args.workers, 'full' if n in (None, sizes[-1]) else 'quick'))
            r = rows[-1]
            print(f"{'bundled' if n is None else 'made'} {r['n']:,} files: {r['tokens']:,} tokens; tokenized in "
                  f"{r['tokenize_s']:.1f} s; first step {r['first_step_at_s']:.1f} s after start; validation share "
                  f"{share(r)}; load average {r['load'][0]:.1f}", flush=True)
            print(json.dumps(r), flush=True)  # the row whole, kept if a later size fails
    show(rows, args.workers)
    print(f'peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; '
          f'total {time.time() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
