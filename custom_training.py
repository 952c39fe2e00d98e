"""Train the MIDI transformer: edit Args below (or pass --field value), then run `python custom_training.py`.

Multi-GPU / multi-process: `torchrun --nproc_per_node=N custom_training.py` (NCCL on GPUs, gloo on CPU).
"""

import argparse
import csv
import inspect
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer, compile_model, printModelParameters
from dataset import (NUM_TOKENS, PAD_IDX, START_IDX, DatasetError, MIDI_Dataset, collate_fn, find_midi_sources,
                     load_corpus, tokenization_settings)

BUNDLED_DATASET = Path(__file__).resolve().parent / 'content' / 'default_dataset'
MODEL_FIELDS = ('seq_len', 'dim', 'depth', 'heads', 'dim_head', 'dropout', 'attn_dropout')
TOKENIZATION_FIELDS = ('timing', 'beat_division', 'include_drums')


class Args:
    def __init__(self):
        # model (the seed's defaults)
        self.seq_len = 100                      # sequence length for training (tokens per window)
        self.dim = 512                          # model dimension
        self.depth = 6                          # number of transformer layers
        self.heads = 8                          # number of attention heads
        self.dim_head = 64                      # dimension per head
        self.dropout = 0.1                      # dropout rate
        self.attn_dropout = 0.0                 # dropout on attention weights (seed: = dropout; > 0 slows CPU attention)
        # optimisation
        self.batch_size = 2                     # windows per micro-batch (per process)
        self.grad_accum = 2                     # micro-batches per optimizer step
        self.lr = 3e-4                          # peak learning rate
        self.weight_decay = 0.01                # AdamW weight decay (not applied to biases and norms)
        self.grad_clip = 1.0                    # clip gradient norm to this (0 = off)
        self.num_epochs = 60                    # epochs to train when max_steps is None
        self.max_steps = None                   # total optimizer steps (overrides num_epochs; counts resumed steps)
        self.lr_schedule = 'constant'           # 'constant' (seed) or 'cosine' (warmup then cosine decay)
        self.warmup_steps = 0                   # linear warmup steps (cosine schedule only)
        self.min_lr = 3e-5                      # final learning rate of the cosine schedule
        # data
        self.data_path = './content/dataset'    # folder of MIDI files / zips (empty: the bundled Essen folk songs)
        self.cache_dir = './content/cache'      # token cache, keyed by file content and tokenization settings
        self.val_fraction = 0.05                # share of files held out for validation (split by file, stable)
        self.min_notes = 16                     # skip files with fewer notes (seed: 40 drops a third of the bundled tunes)
        self.aug = True                         # random transposition of training windows
        self.aug_range = 2                      # transpose by up to this many semitones either way
        self.timing = 'ms'                      # 'ms' (seed: 32 ms steps) or 'beats' (steps of a beat, on-grid)
        self.beat_division = 12                 # steps per quarter note in 'beats' timing (holds 16ths and triplets)
        self.include_drums = False              # keep channel-10 drum notes (off: melodic single-track model)
        self.num_workers = 0                    # DataLoader worker processes (windows are cheap: 0 is fastest here)
        # logging, validation, samples, checkpoints
        self.print_stats_every = 10             # steps between progress-bar / metrics.csv updates
        self.validate_every = 200               # steps between validations over the whole validation split
        self.generate_every = 200               # steps between generated samples
        self.save_every = 1000                  # steps between checkpoints (also saved at the end and on Ctrl-C)
        self.generate_length = 256              # tokens per generated sample
        self.prompt_length = 16                 # tokens of a validation file used as the sample prompt (0 = start token)
        self.temperature = 1.0                  # sampling temperature (0 = greedy)
        self.top_p = 0.95                       # nucleus sampling threshold (None = off)
        self.top_k = None                       # top-k sampling (None = off)
        self.output_tempo = None                # bpm of 'beats' samples (None = training set median)
        self.audio = True                       # also render samples to WAV when FluidSynth is installed
        self.save_dir = './content/checkpoints'  # checkpoints, training_progress.png, metrics.csv
        self.samples_dir = './content/samples'  # sample_step_{step}.mid / .png / .wav
        self.checkpoint = None                  # resume from this checkpoint path, or 'latest'
        # machine
        self.device = 'auto'                    # 'auto' (cuda, then mps, then cpu), or e.g. 'cpu', 'cuda:1'
        self.dtype = 'auto'                     # 'auto', 'bfloat16', 'float16' or 'float32'
        self.compile = False                    # torch.compile the training forward (see benchmarks/bench_model.py)
        self.seed = 42                          # seed for weights, data order, crops and sampling
        self.max_bad_steps = 10                 # stop after this many consecutive non-finite losses


def parse_args(argv=None):
    """--field value for every Args field; help text is the field's comment in Args."""
    args = Args()
    comments = dict(re.findall(r'self\.(\w+)\s*=.*?#\s*(.*)', inspect.getsource(Args)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in vars(args).items():
        parser.add_argument(f'--{name}', type=_value_parser(default), default=default, metavar='V',
                            help=f'{comments.get(name, "")} (default: {default})'.replace('%', '%%'))
    for name, value in vars(parser.parse_args(argv)).items():
        setattr(args, name, value)
    return args


def _value_parser(default):
    def parse(text):
        if text.lower() in ('none', 'null'):
            return None
        if isinstance(default, bool):
            if text.lower() in ('1', 'true', 'yes', 'on'):
                return True
            if text.lower() in ('0', 'false', 'no', 'off'):
                return False
            raise argparse.ArgumentTypeError(f'expected true/false, got {text!r}')
        if isinstance(default, (int, float)):
            return type(default)(float(text)) if isinstance(default, int) and float(text).is_integer() else float(text)
        if default is None:  # an optional number or string: take the most specific reading
            for kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    pass
        return text
    return parse


def setup_device(args):
    """Device, autocast dtype and distributed rank, decided once; everything below uses them."""
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if args.device == 'auto':
        if torch.cuda.is_available():
            args.device = f'cuda:{local_rank}' if ddp else 'cuda'
        elif getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            args.device = 'mps'
        else:
            args.device = 'cpu'
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    if args.dtype == 'auto':
        if device.type == 'cuda':
            args.dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        else:  # CPUs with AVX-512 BF16 / AMX run bf16 autocast fast; MPS autocast support is patchy
            args.dtype = 'bfloat16' if device.type == 'cpu' else 'float32'
    dtype = getattr(torch, args.dtype)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    return device, dtype, autocast, rank, world


def build_model(config):
    """The wrapped model an Args dict describes (training, a checkpoint's saved 'args', benchmarks)."""
    net = MusicTransformer(num_tokens=NUM_TOKENS, dim=config['dim'], depth=config['depth'], heads=config['heads'],
                           dim_head=config['dim_head'], max_seq_len=config['seq_len'], dropout=config['dropout'],
                           attn_dropout=config.get('attn_dropout', 0.0))  # older checkpoints lack it
    return AutoregressiveWrapper(net)


def resolve_data_path(args, log):
    """The user's folder when it holds MIDI; the bundled dataset when the default folder is empty."""
    if find_midi_sources(args.data_path):
        return args.data_path
    if os.path.normpath(args.data_path) == os.path.normpath(Args().data_path) and find_midi_sources(BUNDLED_DATASET):
        log(f'{args.data_path} holds no MIDI files: training on the bundled Essen folk songs ({BUNDLED_DATASET})')
        return str(BUNDLED_DATASET)
    return args.data_path  # load_corpus raises a clear DatasetError naming the folder


def get_lr(args, step, max_steps):
    if args.lr_schedule == 'constant':
        return args.lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def epoch_batches(args, n_windows, epoch, rank, world):
    """This rank's micro-batches of window indices for one epoch: a seeded shuffle, cut to a multiple of the
    number of processes so every rank takes the same number of steps."""
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
    order = order[:len(order) // world * world][rank::world].tolist()
    return [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]


def save_checkpoint(path, state):
    """Write to a temporary file and rename, so a crash mid-save never destroys the last good checkpoint."""
    tmp = f'{path}.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_progress(history, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    train = [r for r in history if r.get('train_loss') not in (None, '')]
    val = [r for r in history if r.get('val_loss') not in (None, '')]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((ax_loss, 'loss', 'cross-entropy loss (nats/token)'),
                           (ax_acc, 'acc', 'next-token accuracy (padding excluded)')):
        ax.plot([float(r['step']) for r in train], [float(r[f'train_{key}']) for r in train],
                label='train', color='tab:blue', alpha=0.8, linewidth=1)
        ax.plot([float(r['step']) for r in val], [float(r[f'val_{key}']) for r in val],
                'o-', label='validation', color='tab:orange', markersize=4)
        ax.set_xlabel('optimizer step')
        ax.set_title(label)
        ax.grid(alpha=0.3, which='both')
        ax.legend()
    # the first steps' loss (ln 836 = 6.7) would flatten everything after them on a linear axis
    ax_loss.set_yscale('log')
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRIC_COLUMNS = ['step', 'epoch', 'lr', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'tokens_per_sec',
                  'elapsed_sec']


def write_metrics(history, path):
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_split(model, dataset, args, device, autocast, rank, world):
    """Loss and accuracy over every window of a split, weighted by non-pad targets, summed over processes."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    indices = list(range(len(dataset)))[rank::world]
    loader = DataLoader(dataset, batch_size=max(8, 4 * args.batch_size), sampler=indices, collate_fn=collate_fn,
                        generator=torch.Generator())  # own generator: creating a loader must not draw from the global RNG
    for x in loader:
        x = x.to(device)
        count = (x[:, 1:] != PAD_IDX).sum()
        if count == 0:
            continue
        with autocast:
            loss, acc = model(x)
        totals += torch.stack([loss.double() * count, acc.double() * count, count.double()])
    if world > 1:
        dist.all_reduce(totals)
    model.train()
    loss_sum, correct, count = totals.tolist()
    return (loss_sum / count, correct / count) if count else (float('nan'), float('nan'))


def main(args):
    device, dtype, autocast, rank, world = setup_device(args)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)

    resume = None
    if args.checkpoint:
        path = Path(args.save_dir) / 'latest.pt' if args.checkpoint == 'latest' else Path(args.checkpoint)
        if not path.exists():
            sys.exit(f'checkpoint {path} not found')
        resume = torch.load(path, map_location='cpu', weights_only=True)
        for name in MODEL_FIELDS + TOKENIZATION_FIELDS:  # the saved run decides what the weights mean
            saved = resume['args'].get(name, getattr(args, name))
            if getattr(args, name) != saved:
                log(f'resuming: {name} = {saved!r} from the checkpoint (not {getattr(args, name)!r})')
                setattr(args, name, saved)
        log(f'resuming from {path} at step {resume["step"]}')

    # data
    settings = tokenization_settings(args.timing, args.beat_division, args.include_drums)
    data_path = resolve_data_path(args, log)
    try:
        if master:  # rank 0 fills the cache; the others then read it
            train_seqs, val_seqs, summary = load_corpus(data_path, settings, args.cache_dir, args.min_notes,
                                                        args.val_fraction)
        if world > 1:
            dist.barrier()
        if not master:
            train_seqs, val_seqs, summary = load_corpus(data_path, settings, args.cache_dir, args.min_notes,
                                                        args.val_fraction, verbose=False)
    except DatasetError as e:
        sys.exit(f'error: {e}')
    if args.output_tempo is None:
        args.output_tempo = summary['median_tempo_bpm']
    log(f"data: {data_path}: {summary['files']} files, {summary['skipped']} skipped "
        f"({summary['skipped_short']} shorter than min_notes={args.min_notes}), "
        f"train {summary['train_files']} files / {summary['train_tokens']:,} tokens, "
        f"validation {summary['val_files']} files / {summary['val_tokens']:,} tokens")
    train_ds = MIDI_Dataset(train_seqs, args.seq_len, rand_start=True, aug=args.aug, aug_range=args.aug_range,
                            seed=args.seed)
    val_ds = MIDI_Dataset(val_seqs, args.seq_len, rand_start=False)
    micro_per_epoch = len(epoch_batches(args, len(train_ds), 0, rank, world))
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    max_steps = args.max_steps if args.max_steps is not None else args.num_epochs * steps_per_epoch

    # model and optimizer
    model = build_model(vars(args)).to(device)
    raw_model = model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': args.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    # fused: one kernel per step on CUDA; on CPU the bench_model.py training step was 0.5-4% faster than with
    # the per-tensor loop (five runs)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, data_epoch, data_position, best_val = 0, 0, 0, float('inf')
    if resume:
        raw_model.load_state_dict(resume['model_state_dict'])
        optimizer.load_state_dict(resume['optimizer_state_dict'])
        scaler.load_state_dict(resume['scaler_state_dict'])
        step, data_epoch, data_position = resume['step'], resume['epoch'], resume['data_position']
        best_val = resume['best_val_loss']
        torch.set_rng_state(resume['rng_state'][rank % len(resume['rng_state'])])
    if args.compile:
        model = compile_model(model)  # compiles the training forward in place: same state_dict keys
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    if master:
        printModelParameters(raw_model)
        log(f'device {device} ({world} process{"es" if world > 1 else ""}), precision {args.dtype}, '
            f'{steps_per_epoch} steps per epoch, {max_steps} steps in all')
        for folder in (args.save_dir, args.samples_dir):
            os.makedirs(folder, exist_ok=True)
    metrics_path = Path(args.save_dir) / 'metrics.csv'
    history = []
    if resume and metrics_path.exists():  # keep the logged past, drop rows written after the checkpoint
        with open(metrics_path) as f:
            history = [r for r in csv.DictReader(f) if int(r['step']) <= step]
    sample_prompt = torch.tensor([START_IDX])
    if args.prompt_length > 0 and val_seqs:
        sample_prompt = torch.from_numpy(val_seqs[0][:args.prompt_length].astype('int64'))

    def checkpoint_state(loss, gather=True):
        rng = [torch.get_rng_state()]
        if world > 1 and gather:  # each rank's dropout stream, so a resumed run continues every one of them
            gathered = [torch.zeros_like(rng[0]) for _ in range(world)]
            dist.all_gather(gathered, rng[0].to(device) if device.type == 'cuda' else rng[0])
            rng = [g.cpu() for g in gathered]
        return {'step': step, 'epoch': data_epoch, 'data_position': data_position,
                'model_state_dict': raw_model.state_dict(), 'optimizer_state_dict': optimizer.state_dict(),
                'scaler_state_dict': scaler.state_dict(), 'loss': loss, 'best_val_loss': best_val,
                'args': dict(vars(args)), 'tokenization': settings, 'rng_state': rng}

    def micro_batches():
        nonlocal data_epoch, data_position
        while True:
            train_ds.set_epoch(data_epoch)
            batches = epoch_batches(args, len(train_ds), data_epoch, rank, world)[data_position:]
            # windows are seeded by (seed, epoch, index); the loader's own generator keeps the global RNG (dropout)
            # untouched, so a resumed run continues the same random stream
            loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers,
                                pin_memory=device.type == 'cuda', generator=torch.Generator())
            for x in loader:
                data_position += 1
                yield x.to(device, non_blocking=True)
            data_epoch, data_position = data_epoch + 1, 0

    from tqdm import tqdm
    from generate import save_sample
    batches = micro_batches()
    bar = tqdm(total=max_steps, initial=step, desc='training', unit='step', disable=not master, dynamic_ncols=True)
    window = {'loss': 0.0, 'acc': 0.0, 'n': 0, 'tokens': 0, 't0': time.time()}
    start_time, bad_steps, last_loss = time.time(), 0, float('nan')
    interrupted = False
    model.train()
    try:
        while step < max_steps:
            lr = get_lr(args, step, max_steps)
            for group in optimizer.param_groups:
                group['lr'] = lr
            step_loss = step_acc = 0.0
            for micro in range(args.grad_accum):
                x = next(batches)
                sync = micro == args.grad_accum - 1 or world == 1
                with nullcontext() if sync else model.no_sync():
                    with autocast:  # the forward only: backward runs in the dtypes the forward chose
                        loss, acc = model(x)
                    scaler.scale(loss / args.grad_accum).backward()
                step_loss += loss.detach().float() / args.grad_accum
                step_acc += acc.detach().float() / args.grad_accum
                window['tokens'] += x[:, 1:].numel()
            finite = torch.isfinite(step_loss).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                log(f'\nstep {step}: non-finite loss, step skipped ({bad_steps} in a row)')
                if bad_steps >= args.max_bad_steps:
                    sys.exit(f'stopping: {bad_steps} non-finite losses in a row (try a lower lr or dtype float32); '
                             f'the last good checkpoint in {args.save_dir} is kept')
                continue
            bad_steps = 0
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            window['loss'] += step_loss.item()
            window['acc'] += step_acc.item()
            window['n'] += 1
            last_loss = step_loss.item()

            row = None
            if step % args.print_stats_every == 0 or step == max_steps:
                now = time.time()
                tokens_per_sec = window['tokens'] * world / max(now - window['t0'], 1e-9)
                row = {'step': step, 'epoch': f'{step / steps_per_epoch:.3f}', 'lr': f'{lr:.3g}',
                       'train_loss': f"{window['loss'] / window['n']:.4f}",
                       'train_acc': f"{window['acc'] / window['n']:.4f}",
                       'tokens_per_sec': f'{tokens_per_sec:.0f}', 'elapsed_sec': f'{now - start_time:.1f}'}
                bar.set_postfix(loss=row['train_loss'], acc=row['train_acc'], lr=row['lr'],
                                tok_s=row['tokens_per_sec'])
                window = {'loss': 0.0, 'acc': 0.0, 'n': 0, 'tokens': 0, 't0': now}
            if len(val_ds) and (step % args.validate_every == 0 or step == max_steps):
                val_loss, val_acc = evaluate_split(model, val_ds, args, device, autocast, rank, world)
                row = row or {'step': step, 'epoch': f'{step / steps_per_epoch:.3f}', 'lr': f'{lr:.3g}'}
                row.update(val_loss=f'{val_loss:.4f}', val_acc=f'{val_acc:.4f}')
                bar.write(f'step {step}: validation loss {val_loss:.4f}, accuracy {val_acc:.4f}') if master else None
                if val_loss < best_val:  # every rank sees the same reduced val_loss, so all take this branch
                    best_val = val_loss
                    state = checkpoint_state(last_loss)
                    if master:
                        save_checkpoint(Path(args.save_dir) / 'best.pt', state)
            if row and master:
                history.append(row)
                write_metrics(history, metrics_path)
                if 'val_loss' in row:
                    plot_progress(history, Path(args.save_dir) / 'training_progress.png')
            if master and (step % args.generate_every == 0 or step == max_steps):
                # sampling draws random numbers: fork the RNG so that a run with samples at other steps (or a
                # resumed one) keeps the same dropout stream
                with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), autocast:
                    out = raw_model.generate(sample_prompt.to(device), args.generate_length,
                                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                             return_prime=True)
                save_sample(out.cpu().tolist(), Path(args.samples_dir) / f'sample_step_{step}', settings,
                            tempo_bpm=args.output_tempo, prompt_length=len(sample_prompt), log=bar.write,
                            audio=args.audio)
            if step % args.save_every == 0 or step == max_steps:
                state = checkpoint_state(last_loss)  # collective under DDP: every rank takes part
                if master:
                    save_checkpoint(Path(args.save_dir) / 'latest.pt', state)
    except KeyboardInterrupt:
        interrupted = True
        if master:
            save_checkpoint(Path(args.save_dir) / 'latest.pt', checkpoint_state(last_loss, gather=False))
            log(f'\ninterrupted: saved {Path(args.save_dir) / "latest.pt"} at step {step}; '
                f'resume with --checkpoint latest')
    bar.close()
    if world > 1:  # DDP keeps replicas identical by construction; check it, since a silent drift ruins a run
        checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).to(device)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        log(f'ranks in sync: {all(torch.equal(g, gathered[0]) for g in gathered)}')
    if master and not interrupted:
        log(f'done: {step} steps in {time.time() - start_time:.0f} s; checkpoints in {args.save_dir}, '
            f'samples in {args.samples_dir}')
    if world > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main(parse_args())
