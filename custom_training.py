"""Train the MIDI transformer: edit Args below (or pass --field value, or a config file), then run

    python custom_training.py [config/some_config.py] [--field value ...]

Multi-GPU / multi-process: `torchrun --nproc_per_node=N custom_training.py` (NCCL on GPUs, gloo on CPU).
main() reads top to bottom as the run goes: settings and device, resume, data, model and optimizer, the loop
with its every-N-steps actions (log, validate, save, sample), finish.
"""

import csv
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from condition import header, off_tonic_endings, tune_lengths, without_header
from custom_basic_transformer import printModelParameters
from dataset import MIDI_Dataset, PackedDataset, collate_fn, load_corpus, split_head, validation_sample
from options import exit_on_bad_args, parse_args_and_given
from parts import format_programs, parse_programs
from run_folder import (
    RunFolderBusy,
    RunFolderError,
    RunLock,
    absolute_paths,
    check_named_files,
    check_outputs_outside_data,
    keep_earlier_run,
)
from runtime import (
    FIELD_DEFAULTS,
    MODEL_FIELDS,
    SHAPE_FIELDS,
    SHIPPED_MODEL,
    TOKENIZATION_FIELDS,
    CheckpointError,
    DeviceError,
    all_gather,
    all_reduce,
    barrier,
    build_model,
    build_optimizer,
    error_line,
    evaluate_split,
    keep_freed_memory,
    load_checkpoint,
    resolve_data_path,
    save_checkpoint,
    seed_everything,
    set_cpu_threads,
    start_machine,
    torchrun_ranks,
    undecodable_names_on_stdout,
)
from sampling import generation_model, save_sample, until_tune_end
from token_cache import DatasetError, printable, write_atomically
from tokens import PAD_IDX, START_IDX, grammar_table, tokenization_settings
from voice_leading import VoiceLeading, avoided_targets

LAUNCHED = time.time()  # when the script started (after its imports): minutes-to-quality are on this clock


class Args:
    def __init__(self):
        # model (the original's defaults)
        self.seq_len = 100                      # sequence length for training (tokens per window)
        self.dim = 512                          # model dimension
        self.depth = 6                          # number of transformer layers
        self.heads = 8                          # number of attention heads
        self.dim_head = 64                      # dimension per head
        self.dropout = 0.1                      # dropout rate
        self.attn_dropout = 0.0                 # dropout on attention weights (original: = dropout; slows CPU)
        self.prev_tokens = 0                    # add the embeddings of this many previous tokens (helps copying)
        self.tune_clock = False                 # add an embedding of the time since the tune's start token
        self.tune_length = False                # add an embedding of the time left to the tune's last note
        self.tune_key = False                   # conditioned: add an embedding of each pitch's degree in the tune's key
        self.tune_labels = False                # conditioned: add embeddings of the tune's header, past the window too
        # optimisation
        self.batch_size = 2                     # windows per micro-batch (per process)
        self.grad_accum = 2                     # micro-batches per optimizer step
        self.lr = 3e-4                          # peak learning rate
        self.weight_decay = 0.01                # AdamW weight decay (not applied to biases and norms)
        self.grad_clip = 1.0                    # clip gradient norm to this (0 = off)
        self.num_epochs = 60                    # epochs to train when max_steps is None
        self.max_steps = None                   # total optimizer steps (overrides num_epochs; counts resumed steps)
        self.lr_schedule = 'constant'           # 'constant' (original) or 'cosine' (warmup, cosine decay)
        self.warmup_steps = 0                   # linear warmup steps (cosine schedule only)
        self.min_lr = 3e-5                      # final learning rate of the cosine schedule
        # data
        self.data_path = './content/dataset'    # folder of MIDI files / zips (empty: the bundled Essen folk songs)
        self.cache_dir = './content/cache'      # token cache, keyed by file content and tokenization settings
        self.val_fraction = 0.05                # share of files held out for validation (split by file, stable)
        self.min_notes = 16                     # skip shorter files (the original's 40 drops 1/3 of the bundled set)
        self.aug = True                         # random transposition of training windows
        self.pack = True                        # windows cut from tunes laid end to end (False: one tune a window)
        self.tune_mask = True                   # packed windows: attend only within each tune (block-diagonal mask)
        self.align_windows = False              # packed windows begin at a tune's start: its header and ending in view
        self.aug_range = 2                      # transpose by up to this many semitones either way
        self.timing = 'ms'                      # 'ms' (original: 32 ms steps) or 'beats' (on the beat grid)
        self.beat_division = 12                 # steps per quarter note in 'beats' timing (holds 16ths and triplets)
        self.include_drums = False              # keep channel-10 drum notes (off: melodic; tracks='parts' keeps them)
        self.tracks = 'all'                     # 'all' (non-drum notes merged), 'melody' (one line) or 'parts' (roles)
        self.num_workers = 0                    # DataLoader worker processes (windows are cheap: 0 is fastest here)
        self.voice_leading_loss = 0.0           # 'parts': loss weight against melody-bass parallels (docs/parts.md)
        self.voice_leading_floor = None         # None: -log(1 - p) of them; a probability: log p down to it
        self.condition = False                  # key, meter, style tokens after each start token (docs/conditioning.md)
        self.condition_dropout = 0.3            # share of header tokens left out in training: asking stays optional
        self.tonic_ending_loss = 0.0            # conditioned: loss weight against ending off the key's tonic
        # logging, validation, samples, checkpoints
        self.print_stats_every = 10             # steps between progress-bar / metrics.csv updates
        self.validate_every = 200               # steps between validations (best.pt: the lowest validation loss)
        self.val_tokens = 25_000                # tokens per validation, a fixed sample of held-out windows (None: all)
        self.generate_every = 200               # steps between generated samples
        self.save_every = 1000                  # steps between checkpoints (also saved at the end and on Ctrl-C)
        self.generate_length = 256              # tokens per generated sample
        self.prompt_length = 16                 # tokens of a validation file that prompt each sample (0 = start token)
        self.temperature = 1.0                  # sampling temperature (0 = greedy)
        self.top_p = None                       # nucleus sampling threshold (None = off)
        self.top_k = None                       # top-k sampling (None = off)
        self.grammar_constrained = True         # samples hold only tokens the token grammar allows after the one before
        self.repeat_memory = 0.0                # 0-0.5: follow where the last notes went before (0 = off)
        self.voice_leading = False              # 'parts' samples: no melody-bass parallel 5ths/8ves, melody over bass
        self.guidance = 1.0                     # conditioned samples: classifier-free guidance (1 = off)
        self.end_guidance = None                # conditioned samples: the guidance of a tune's end (None: as guidance)
        self.output_tempo = None                # bpm of 'beats' samples (None = training set median)
        self.programs = None                    # 'parts' samples' role programs, 'melody=73,bass=33' (None = data's)
        self.audio = True                       # also render samples to WAV when FluidSynth is installed
        self.save_dir = './content/checkpoints'  # checkpoints, training_progress.png, metrics.csv
        self.samples_dir = './content/samples'  # sample_step_{step}.mid / .png / .wav, listed on index.html
        self.checkpoint = None                  # resume from this checkpoint path, or 'latest'
        self.init_from = None                   # fine-tune: start from these weights ('shipped', or a .pt path)
        # machine
        self.device = 'auto'                    # 'auto' (cuda, then mps, then cpu), or e.g. 'cpu', 'cuda:1'
        self.dtype = 'auto'                     # 'auto', 'bfloat16', 'float16' or 'float32'
        self.compile = False                    # torch.compile the training forward (see benchmarks/bench_model.py)
        self.threads = 0                        # CPU threads (0: one a core); N runs side by side: cores / N each
        self.seed = 42                          # random seed for weights, data order, crops and sampling
        self.max_bad_steps = 10                 # stop after this many consecutive non-finite losses


# ----------------------------------------------------------------------------------------------------------
# Pieces of the run

@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, so a resumed run continues exactly."""
    step: int = 0             # optimizer steps done
    epoch: int = 0            # data epoch being read
    position: int = 0         # micro-batches of that epoch already read (by this process)
    best_val: float = float('inf')
    last_loss: float = float('nan')
    started: float = LAUNCHED  # the user's clock (not saved): elapsed_sec in metrics.csv counts from here


class StopSignals:
    """Ctrl-C, SIGTERM (SLURM, Kubernetes, cloud preemption) and SIGHUP ask the run to stop after the current step.

    The handler only records the signal, so no exception can land inside an optimizer step or a checkpoint
    write: the loop checks `requested` at step boundaries (and validation between batches), saves latest.pt and
    exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), as a killed process would.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ('SIGINT', 'SIGTERM', 'SIGHUP') if hasattr(signal, name))

    def __init__(self, log):
        self.log = log
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose: `nohup` ignores SIGHUP so the run outlives its terminal
            self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _record(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            self.log(f'\n{signal.Signals(signum).name}: stopping after this step, then saving latest.pt')
        else:
            self.log(f'\n{signal.Signals(signum).name}: already stopping; please wait for the save')

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + self.signum


def get_lr(args, step, max_steps):
    if args.lr_schedule == 'constant':
        return args.lr
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def step_seed(args, machine, step):
    """Every step's random stream (dropout) is seeded from (seed, rank, step) on every device: a resumed run draws
    what an unbroken one would, on CPU, CUDA or MPS, with no generator state to save or gather."""
    return (args.seed * 1_000_003 + step) * 1_009 + machine.rank


def epoch_batches(args, n_windows, epoch, machine, start=0):
    """This rank's micro-batches of window indices for one epoch, from micro-batch `start` on: a seeded shuffle, cut
    to a multiple of the number of processes so every rank takes the same number of steps. Made as they are read:
    an epoch of a Lakh-size corpus holds millions of windows, which as lists cost a gigabyte and many seconds."""
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
    order = order[:len(order) // machine.world * machine.world][machine.rank::machine.world].numpy()
    return (order[i:i + args.batch_size].tolist() for i in range(start * args.batch_size, len(order), args.batch_size))


def batches_per_epoch(args, n_windows, machine):
    """How many micro-batches epoch_batches gives each rank in a whole epoch."""
    return math.ceil(n_windows // machine.world / args.batch_size)


def train_batches(args, dataset, state, machine):
    """Micro-batches forever from state.epoch / state.position on; advances both as it yields."""
    while True:
        dataset.set_epoch(state.epoch)
        batches = epoch_batches(args, len(dataset), state.epoch, machine, state.position)
        # windows are seeded by (seed, epoch, index); the loader's own generator keeps the global RNG untouched
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers,
                            pin_memory=machine.device.type == 'cuda', generator=torch.Generator())
        for x in loader:
            state.position += 1
            yield x.to(machine.device, non_blocking=True)
        state.epoch, state.position = state.epoch + 1, 0


def resume_path(args):
    return Path(os.path.abspath(Path(args.save_dir) / 'latest.pt' if args.checkpoint == 'latest' else args.checkpoint))


# what the resuming command decides itself: which file it resumes, and the machine it runs on
RESUME_OWN_FIELDS = ('checkpoint', 'init_from', 'device')


def load_resume(args, given, log):
    """The checkpoint to resume from (None for a new run). The saved run decides what the weights mean, and every
    other setting it was trained with holds unless `given` (set by the command line or a config file) names it;
    given=None keeps every setting of args but the weights' own."""
    if not args.checkpoint:
        return None
    path = resume_path(args)
    resume = load_checkpoint(path)
    for name in MODEL_FIELDS + TOKENIZATION_FIELDS:
        saved = resume['args'].get(name, FIELD_DEFAULTS.get(name, getattr(args, name)))
        if getattr(args, name) != saved:
            if given is None or name in given:  # asked for, and not what the weights are
                log(f'resuming: {name} = {saved!r} from the checkpoint (not {getattr(args, name)!r})')
            setattr(args, name, saved)
    if given is None:
        log(f'resuming from {path} at step {resume["step"]}')
        return resume
    # --checkpoint latest found the run in --save_dir: it stays there, wherever the folder was when it was saved
    own = set(given) | set(RESUME_OWN_FIELDS) | ({'save_dir'} if args.checkpoint == 'latest' else set())
    for name, value in resume['args'].items():
        if hasattr(args, name) and name not in own and name not in MODEL_FIELDS + TOKENIZATION_FIELDS:
            setattr(args, name, value)
    told = [f'--{name}' for name in given if name not in RESUME_OWN_FIELDS + MODEL_FIELDS + TOKENIZATION_FIELDS]
    log(f'resuming from {path} at step {resume["step"]} with the settings it was trained with'
        + (f', except {", ".join(told)} from the command line or config file' if told else ''))
    return resume


def continues_in_place(args):
    """Whether the run resumes its save folder's own latest.pt, which it is meant to replace; any other run in a
    folder holding checkpoints keeps them aside first."""
    return bool(args.checkpoint) and resume_path(args).resolve() == (Path(args.save_dir) / 'latest.pt').resolve()


def settle_paths(args, log):
    """Absolute paths for every folder, the bundled dataset for an empty default data folder (decided here, at
    training time, and saved), and outputs kept out of the data."""
    data_path = resolve_data_path(args.data_path, log)  # before absolute_paths: the fallback is for the default
    absolute_paths(args)
    check_outputs_outside_data(args, {args.data_path, os.path.abspath(data_path)})
    args.data_path = os.path.abspath(data_path)


def hold_save_dir(args, machine, log):
    """Rank 0 holds the save folder for the whole run; a folder in use stops every process before anything is
    written, with one line from rank 0 naming the process that holds it."""
    lock = refusal = None
    if machine.master:
        try:
            lock = RunLock.take(args.save_dir, log)
        except RunFolderBusy as e:
            refusal = str(e)
        except OSError as e:
            refusal = f'cannot lock {args.save_dir} for this run: {e.strerror or e}'
    busy = all_reduce(torch.tensor(float(refusal is not None), device=machine.device), machine,
                      op=torch.distributed.ReduceOp.MAX)
    if busy.item():
        if refusal:
            print(f'error: {refusal}', file=sys.stderr)
        leave(1, machine)
    return lock


def load_data(args, machine, log, styles=None, add_styles=False):
    """Training and validation windows, the prompts of training samples (a list of (tokens, labels asked)), the
    model's styles and, for a tune_length model, its training tunes' lengths (condition.tune_lengths); one process
    per node fills the token cache, the others then read it. styles: the list a resumed conditioned run keeps, or
    with add_styles the one a fine-tuned model starts from (the dataset's other top folders go after it)."""
    settings = tokenization_settings(args.timing, args.beat_division, args.include_drums, args.tracks,
                                     args.condition)
    data_path = args.data_path
    corpus = lambda verbose: load_corpus(data_path, settings, args.cache_dir, args.min_notes,  # noqa: E731
                                         args.val_fraction, verbose=verbose, styles=styles, add_styles=add_styles)
    if machine.local_rank == 0:
        train_seqs, val_seqs, summary = corpus(machine.master)
    barrier(machine)
    if machine.local_rank != 0:
        train_seqs, val_seqs, summary = corpus(False)
    log(f"data: {data_path}: {summary['files']} files, {summary['skipped']} skipped "
        f"({summary['skipped_short']} shorter than min_notes={args.min_notes}), "
        f"train {summary['train_files']} files / {summary['train_tokens']:,} tokens, "
        f"validation {summary['val_files']} files / {summary['val_tokens']:,} tokens")
    if args.output_tempo is None:
        args.output_tempo = summary['median_tempo_bpm']
    if args.programs is None and args.tracks == 'parts':  # saved in the checkpoint's args, as output_tempo is
        args.programs = format_programs(summary['role_programs'])
    dropout = args.condition_dropout if args.condition else 0.0
    if args.pack:  # no padding: every position of a batch is a real next token to learn
        train_ds = PackedDataset(train_seqs, args.seq_len, aug=args.aug, aug_range=args.aug_range, seed=args.seed,
                                 header_dropout=dropout, aligned=args.align_windows, heads=args.tune_labels)
    else:  # each tune followed by a start token, as in packed windows: where a tune ends is learnt either way
        train_ds = MIDI_Dataset(train_seqs, args.seq_len, rand_start=True, aug=args.aug, aug_range=args.aug_range,
                                seed=args.seed, end_token=START_IDX, header_dropout=dropout, heads=args.tune_labels)
    val_ds = MIDI_Dataset(val_seqs, args.seq_len, rand_start=False, heads=args.tune_labels)
    # a fixed share of each validation interval at any corpus size; evaluate.py scores the whole split
    sample = validation_sample(val_ds, args.val_tokens)
    if len(sample) < len(val_ds):
        log(f'validation: {len(sample):,} of the {len(val_ds):,} held-out windows (val_tokens={args.val_tokens:,}), '
            f'the same ones every time; evaluate.py scores them all')
    val_ds = Subset(val_ds, sample)
    # the lengths generate.py and evaluate.py ask of the model's tunes where no length is asked
    lengths = tune_lengths(train_seqs, summary.get('styles') or ()) if args.tune_length else None
    if args.condition:  # the commonest labels in turn, from no notes: a file's notes come with labels of their own
        styles = summary['styles']
        log(f"conditioning: {len(styles)} styles{': ' + ', '.join(map(printable, styles)) if styles else ''}")
        prompts = [(torch.tensor([START_IDX] + header(labels, styles)), labels)
                   for labels in summary['common_labels']] or [(torch.tensor([START_IDX]), {})]
        return settings, train_ds, val_ds, prompts, styles, lengths
    prompt = torch.tensor([START_IDX])
    if args.prompt_length > 0 and val_seqs:
        prompt = torch.from_numpy(val_seqs[0][:args.prompt_length].astype('int64'))
    return settings, train_ds, val_ds, [(prompt, {})], None, lengths


def load_init_weights(args, model, log):
    """Fine-tuning: the weights of another run (or the shipped model), nothing else: a new run at step 0 with a
    fresh optimizer, so the learning-rate schedule and warmup apply. The model shape and the tokenization must
    be the same, or the weights would mean something else; resuming a run is --checkpoint's job. Returns the styles
    of a conditioned source when this run is conditioned too (their ids keep their meaning), else None."""
    path = SHIPPED_MODEL if args.init_from == 'shipped' else Path(args.init_from)
    ckpt = load_checkpoint(path)
    saved = {name: ckpt['args'].get(name, FIELD_DEFAULTS.get(name)) for name in SHAPE_FIELDS + TOKENIZATION_FIELDS}
    same = {name: value == getattr(args, name) for name, value in saved.items()}
    # 'all' and 'melody' differ in which notes a file gives; 'parts' in what a pitch id means
    same['tracks'] = (saved['tracks'] == 'parts') == (args.tracks == 'parts')
    same['condition'] = True  # condition adds a header whose ids nothing else uses
    # a tune clock, length, key or labels can be added (its embedding starts at zero, so the model starts as the one
    # it loads), not dropped
    added = {'tune_clock': 'clock_emb', 'tune_length': 'length_emb', 'tune_key': 'key_emb', 'tune_labels': 'labels_emb'}
    for name in added:
        saved[name] = ckpt['args'].get(name, FIELD_DEFAULTS[name])
        same[name] = getattr(args, name) or not saved[name]
    differ = [f'--{name} {saved[name]!r} (not {getattr(args, name)!r})' for name in saved if not same[name]]
    if differ:
        raise CheckpointError(f'cannot fine-tune from {path}: its weights need {", ".join(differ)}')
    weights = dict(ckpt['model_state_dict'])
    for name, table in added.items():
        if getattr(args, name) and not saved[name]:
            weights[f'net.{table}.weight'] = torch.zeros_like(getattr(model.net, table).weight)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f'cannot fine-tune from {path}: {error_line(e)}') from None
    log(f'fine-tuning from {path} (trained {ckpt.get("step", "?")} steps); a new run starts at step 0')
    styles = ckpt.get('styles') if args.condition else None  # load_checkpoint has checked them
    return None if styles is None else list(styles)


def restore(resume, model, optimizer, scaler, state):
    model.load_state_dict(resume['model_state_dict'])
    optimizer.load_state_dict(resume['optimizer_state_dict'])
    # a run without fp16 saved a disabled scaler's empty state, which an enabled scaler refuses: start it afresh
    if scaler.is_enabled() and resume.get('scaler_state_dict'):
        scaler.load_state_dict(resume['scaler_state_dict'])
    state.step, state.epoch, state.position = resume['step'], resume['epoch'], resume['data_position']
    state.best_val = resume['best_val_loss']


def build_training(args, machine, resume, log):
    """Model, optimizer, gradient scaler, run state (new, resumed from a checkpoint, or fine-tuned from weights) and
    the styles of a conditioned model fine-tuned from (None otherwise)."""
    seed_everything(args.seed)  # the same initial weights in every process
    model = build_model(vars(args)).to(machine.device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, machine.device)
    scaler = machine.grad_scaler()
    state = TrainState()
    styles = None
    if resume:
        try:
            restore(resume, model, optimizer, scaler, state)
        except (KeyError, ValueError, RuntimeError) as e:  # weights of another model version, or a hand-made file
            fail(f'cannot resume from {resume_path(args)}: {error_line(e)}')
    elif args.init_from:
        try:
            styles = load_init_weights(args, model, log)
        except CheckpointError as e:
            fail(e)
    return model, optimizer, scaler, state, styles


def wrap_for_training(model, args, machine):
    """DDP across processes, then torch.compile of the whole (so the compiler sees DDP's bucket boundaries)."""
    if machine.distributed:
        # buffers are constant rotary tables: nothing to broadcast before each forward
        model = DistributedDataParallel(model, device_ids=[machine.device.index] if machine.device.type == 'cuda'
                                        else None, broadcast_buffers=False)
    return torch.compile(model) if args.compile else model


def train_step(model, batches, optimizer, scaler, args, machine, stop):
    """One optimizer step over grad_accum micro-batches: (loss, accuracy, real tokens), or None when skipped.

    The step is skipped on every process when any process saw a non-finite loss; the stop request is agreed
    on in the same reduction, so all processes stop after the same step.
    """
    loss_sum = acc_sum = tokens = 0
    for micro in range(args.grad_accum):
        head, x = split_head(next(batches), args.tune_labels)
        sync = micro == args.grad_accum - 1 or not machine.distributed
        with nullcontext() if sync else model.no_sync():
            with machine.autocast():  # the forward only: backward runs in the dtypes the forward chose
                avoid = []  # unlikelihood terms: (tokens to avoid, weight, floor)
                if args.voice_leading_loss:
                    avoid.append((avoided_targets(x), args.voice_leading_loss, args.voice_leading_floor))
                if args.tonic_ending_loss:
                    avoid.append((off_tonic_endings(x, head=head), args.tonic_ending_loss, None))
                loss, acc = model(x, tune_mask=args.pack and args.tune_mask, avoid=avoid, head=head)
            scaler.scale(loss / args.grad_accum).backward()
        loss_sum = loss_sum + loss.detach().float() / args.grad_accum
        acc_sum = acc_sum + acc.detach().float() / args.grad_accum
        tokens = tokens + (x[:, 1:] != PAD_IDX).sum()
    flags = torch.stack([(~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(stop.requested), device=machine.device)])
    bad, stop_now = all_reduce(flags, machine, op=torch.distributed.ReduceOp.MAX).tolist()
    if stop_now and not stop.requested:
        stop.signum = signal.SIGTERM  # another process was told to stop
    if bad:
        optimizer.zero_grad(set_to_none=True)
        return None
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, acc_sum, tokens


def checkpoint_state(state, model, optimizer, scaler, args, settings, styles=None, lengths=None):
    """What a checkpoint holds; a conditioned run's also its styles, the style ids' names in order, and a
    tune_length run's its training tunes' lengths (condition.tune_lengths)."""
    return {'step': state.step, 'epoch': state.epoch, 'data_position': state.position,
            'model_state_dict': model.state_dict(), 'optimizer_state_dict': optimizer.state_dict(),
            'scaler_state_dict': scaler.state_dict(), 'loss': state.last_loss, 'best_val_loss': state.best_val,
            'args': dict(vars(args)), 'tokenization': settings, **({'styles': styles} if args.condition else {}),
            **({'tune_lengths': lengths} if lengths is not None else {})}


METRIC_COLUMNS = ['step', 'epoch', 'lr', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'tokens_per_sec',
                  'elapsed_sec']


def read_metrics(path, step):
    """The logged past of a resumed run, without rows written after its checkpoint (or unreadable ones)."""
    if not path.exists():
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if (r.get('step') or '').isdigit() and int(r['step']) <= step]
    damaged = sum(not (r.get('step') or '').isdigit() for r in rows)
    if damaged:
        print(f'warning: {path}: {damaged} unreadable rows dropped')
    return kept


def write_metrics(history, path, plot, log=print):
    """metrics.csv (and the plot); a failed write (a full disk) is a one-line warning: the rows stay in history,
    so the next write puts them all in, and the run goes on to its next checkpoint."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS, extrasaction='ignore')
            writer.writeheader()
            writer.writerows(history)
    target = path
    try:
        write_atomically(path, write)
        if plot:
            target = path.parent / 'training_progress.png'
            plot_progress(history, target)
    except OSError as e:
        log(f'warning: cannot write {target}: {e.strerror or e}; training goes on')


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


# ----------------------------------------------------------------------------------------------------------
# The run

def fail(message, code=1):
    """One line on stderr and a non-zero exit: what went wrong, never a traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(code)


def main(args, given=None):
    """Train as args say. `given`: the fields the command line or a config file set (None: all of them); a resumed
    run takes every other setting from its checkpoint."""
    exit_on_bad_args(args)
    log = print if torchrun_ranks()[0] == 0 else (lambda *a, **k: None)
    # everything that can refuse the run reads only, before the save folder is locked and the data tokenized
    try:
        resume = load_resume(args, given, log)  # first: a resumed run's precision is the checkpoint's
    except CheckpointError as e:
        fail(e)
    exit_on_bad_args(args)  # the checkpoint's settings, checked as the command line's are
    try:
        machine = start_machine(args.device, args.dtype)
    except DeviceError as e:
        fail(e, 2)
    set_cpu_threads(args.threads)
    keep_freed_memory()
    try:
        settle_paths(args, log)
        continuing = continues_in_place(args)
        check_named_files(args, continuing)
        model, optimizer, scaler, state, source_styles = build_training(args, machine, resume, log)
    except (CheckpointError, RunFolderError) as e:
        fail(e)
    lock = hold_save_dir(args, machine, log)
    try:
        save_dir, samples_dir = Path(args.save_dir), Path(args.samples_dir)
        # a resumed run's logged past, read before its folder's files may move aside
        history = read_metrics(resume_path(args).parent / 'metrics.csv', state.step) if resume else []
        try:
            # a resumed run keeps its styles; a fine-tuned conditioned model keeps its styles' ids and adds the
            # data's other folders after them
            settings, train_ds, val_ds, prompts, styles, lengths = load_data(
                args, machine, log, resume.get('styles') if resume else source_styles, add_styles=not resume)
        except DatasetError as e:
            fail(e)
        steps_per_epoch = max(1, batches_per_epoch(args, len(train_ds), machine) // args.grad_accum)
        max_steps = args.max_steps or args.num_epochs * steps_per_epoch

        train_model = wrap_for_training(model, args, machine)
        if machine.master:
            printModelParameters(model)
            log(f'device {machine.device} ({machine.world} process{"es" if machine.distributed else ""}), precision '
                f'{machine.dtype_name}, {steps_per_epoch} steps per epoch, {max_steps} steps in all')
            if state.step >= max_steps:
                log(f'the checkpoint is at step {state.step} already: nothing to train (raise --max_steps to go on)')
            samples_dir.mkdir(parents=True, exist_ok=True)
            if not continuing:
                try:
                    keep_earlier_run(save_dir, log, samples_dir)
                except RunFolderError as e:
                    fail(e)
        save = lambda name: machine.master and save_checkpoint(  # only rank 0 writes
            save_dir / name, checkpoint_state(state, model, optimizer, scaler, args, settings, styles, lengths))

        # smoothing=0: the ETA is the average over the whole run, validation and samples included, so it stays steady
        bar = tqdm(total=max_steps, initial=state.step, desc='training', unit='step', disable=not machine.master,
                   dynamic_ncols=True, smoothing=0)
        batches = train_batches(args, train_ds, state, machine)
        window, bad_steps = new_window(), 0
        model.train()
        try:
            with StopSignals(log) as stop:
                while state.step < max_steps and not stop.requested:
                    lr = set_lr(optimizer, get_lr(args, state.step, max_steps))
                    seed_everything(step_seed(args, machine, state.step))
                    result = train_step(train_model, batches, optimizer, scaler, args, machine, stop)
                    bad_steps = 0 if result else count_bad_step(bad_steps, state, args, bar)
                    if not result:
                        continue
                    state.step += 1
                    state.last_loss = add_to_window(window, result)
                    bar.update()
                    step, last = state.step, state.step == max_steps

                    row = None
                    if step % args.print_stats_every == 0 or last:
                        row = stats_row(window, state, lr, steps_per_epoch, machine)
                        bar.set_postfix(loss=row['train_loss'], acc=row['train_acc'], lr=row['lr'],
                                        tok_s=row['tokens_per_sec'])
                        window = new_window()
                    if len(val_ds) and (step % args.validate_every == 0 or last):
                        row = validate(train_model, val_ds, args, machine, state, row, lr, steps_per_epoch, save,
                                       bar.write)
                    if row and machine.master:
                        history.append(row)
                        write_metrics(history, save_dir / 'metrics.csv', plot='val_loss' in row or
                                      (last and not len(val_ds)),  # without validation: a plot of the training curves
                                      log=bar.write)
                    if step % args.save_every == 0 or last:
                        save('latest.pt')  # before the sample: a failing sample can never cost the checkpoint
                    if machine.master and (step % args.generate_every == 0 or last):
                        prompt, labels = prompts[step // args.generate_every % len(prompts)]
                        write_sample(model, prompt, args, settings, machine, samples_dir / f'sample_step_{step}',
                                     bar.write, asked={'step': step, **labels})
                if stop.requested:
                    save('latest.pt')
                    log(f'\nstopped by {signal.Signals(stop.signum).name}: saved {save_dir / "latest.pt"} at step '
                        f'{state.step}; resume with --checkpoint latest')
        except CheckpointError as e:
            bar.close()  # the error on a line of its own, not after the bar
            fail(e)
        bar.close()
        if lock:
            lock.release()  # here: a torchrun rank leaves by os._exit, past the finally below
        finish(model, machine, log)
        if stop.requested:
            leave(stop.exit_code, machine)
        log(f'done: {state.step} steps in {time.time() - state.started:.0f} s; checkpoints in {save_dir}, '
            f'samples in {samples_dir}')
        leave(0, machine)
    finally:
        if lock:
            lock.release()


# ----------------------------------------------------------------------------------------------------------
# What the loop does every N steps

def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr


def count_bad_step(bad_steps, state, args, bar):
    """A skipped step (non-finite loss): say so, and stop after max_bad_steps in a row, keeping the checkpoints."""
    bad_steps += 1
    if not bar.disable:  # rank 0 says it; every rank skips and stops on the same steps
        bar.write(f'step {state.step}: non-finite loss, step skipped ({bad_steps} in a row)')
    if bad_steps >= args.max_bad_steps:
        bar.close()  # the error on a line of its own, not after the bar
        fail(f'stopping: {bad_steps} non-finite losses in a row (try a lower lr or dtype float32); the last good '
             f'checkpoint in {args.save_dir} is kept')
    return bad_steps


def new_window():
    """Sums over the steps since the last metrics row."""
    return {'loss': 0.0, 'acc': 0.0, 'tokens': 0, 'n': 0, 't0': time.time()}


def add_to_window(window, result):
    for key, value in zip(('loss', 'acc', 'tokens'), result):
        window[key] += value
    window['n'] += 1
    return result[0].item()


def validate(model, val_ds, args, machine, state, row, lr, steps_per_epoch, save, log):
    """Validation loss and accuracy over the fixed sample of windows into the metrics row (made if there is none);
    best.pt when it improved, so best.pt is chosen on the same windows as the curve shows."""
    # batches of at least 32 windows: a CPU's forward pass costs much less a token there than at 8 (benchmarks/)
    val_loss, val_acc = evaluate_split(model, val_ds, max(32, 4 * args.batch_size), machine, heads=args.tune_labels)
    row = row or row_start(state, lr, steps_per_epoch)
    row.update(val_loss=f'{val_loss:.4f}', val_acc=f'{val_acc:.4f}', elapsed_sec=f'{time.time() - state.started:.1f}')
    if machine.master:
        log(f'step {state.step}: validation loss {val_loss:.4f}, accuracy {val_acc:.4f}')
    if val_loss < state.best_val:  # every process sees the same reduced loss
        state.best_val = val_loss
        save('best.pt')
    return row


def row_start(state, lr, steps_per_epoch):
    """The columns every metrics.csv row has: where the run is and its learning rate."""
    return {'step': state.step, 'epoch': f'{state.step / steps_per_epoch:.3f}', 'lr': f'{lr:.3g}',
            'elapsed_sec': f'{time.time() - state.started:.1f}'}


def stats_row(window, state, lr, steps_per_epoch, machine):
    """A metrics.csv row of the steps since the last one; tokens/s counts real (non-pad) tokens of all processes."""
    now = time.time()
    tokens = all_reduce(torch.as_tensor(window['tokens'], device=machine.device).float(), machine).item()
    return {**row_start(state, lr, steps_per_epoch),
            'train_loss': f"{float(window['loss']) / window['n']:.4f}",
            'train_acc': f"{float(window['acc']) / window['n']:.4f}",
            'tokens_per_sec': f'{tokens / max(now - window["t0"], 1e-9):.0f}'}


def write_sample(model, prompt, args, settings, machine, stem, log, asked):
    """A sample of the model as it is, up to its tune's end (at most generate_length new tokens); one that cannot
    be written (a full disk) is a one-line warning, never the end of the run. asked: the step, and the labels of
    a conditioned sample's prompt, written into its MIDI file too."""
    model, autocast = generation_model(model, machine, batch=1)  # the fastest path for one row
    with autocast:
        out = model.generate(prompt.to(machine.device), args.generate_length, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, return_prime=True,
                             allowed_next=grammar_table(ends=True) if args.grammar_constrained else None,
                             repeat_memory=args.repeat_memory, eos_token=START_IDX,
                             constrain=VoiceLeading(1) if args.voice_leading else None, guidance=args.guidance,
                             end_guidance=args.end_guidance, unconditioned=without_header(prompt.to(machine.device)))
    try:
        save_sample(until_tune_end(out.cpu().tolist(), len(prompt)), stem, settings, tempo_bpm=args.output_tempo,
                    prompt_length=len(prompt), log=log, audio=args.audio, asked=asked,
                    programs=parse_programs(args.programs or ''), labels=asked)
    except OSError as e:
        log(f'warning: cannot write sample {e.filename or stem}: {e.strerror or e}; training goes on')


def finish(model, machine, log):
    """Under torchrun: check that the replicas are identical (a silent drift would ruin a run), then leave."""
    if not machine.distributed:
        return
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()])
    gathered = all_gather(checksum, machine)
    log(f'ranks in sync: {all(torch.equal(g, gathered[0]) for g in gathered)}')
    barrier(machine)  # no rank tears its process group down while another still uses it (a rare abort at exit)
    torch.distributed.destroy_process_group()


def leave(code, machine):
    """End the run with this exit code. Under torchrun the process ends without the interpreter's teardown: there,
    a rank whose run has finished, saved and checked out in sync can abort in C++ destructors at exit
    ("terminate called without an active exception", SIGABRT), turning a good run into a failed one. Everything
    is written by then; only the standard streams need flushing."""
    if machine.distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == '__main__':
    undecodable_names_on_stdout()
    try:
        main(*parse_args_and_given(Args(), description=__doc__.splitlines()[0]))
    except KeyboardInterrupt:
        # only outside the training loop (there StopSignals turns Ctrl-C into a save): reading the data, building
        # the model, moving an earlier run aside, the final checks. Nothing is lost: a token cache keeps what it
        # tokenized, each moved file is in one of the two folders, and a finished run has saved already.
        print('stopped by Ctrl-C outside the training loop: no checkpoint to save (files tokenized so far stay in '
              'the cache)', file=sys.stderr)
        sys.exit(130)
