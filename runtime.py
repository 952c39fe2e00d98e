"""What the scripts share at run time: the device and precision, the processes of a torchrun, building, saving
and loading a model, and the validation loss over a split.

    machine = start_machine(args.device, args.dtype)   # device and precision decided once; used everywhere
    model = build_model(vars(args)).to(machine.device)
    with machine.autocast(): ...

Device choice is a pure function of what is asked for, what the machine has and LOCAL_RANK (choose_device), so
tests check it against a simulated CUDA machine. Every tensor handed to a collective is built on the process's
device (NCCL's rule; gloo would accept a CPU tensor and hide the bug), and all_reduce / all_gather below check it.
"""

import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from condition import MAX_STYLES
from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer
from dataset import collate_fn, split_head
from options import OptionError, check_args
from token_cache import holds_midi, write_atomically
from tokens import NUM_TOKENS, PAD_IDX, tokenization_settings

BUNDLED_DATASET = Path(__file__).resolve().parent / 'content' / 'default_dataset'
DEFAULT_DATA_PATH = './content/dataset'
SHIPPED_MODEL = Path(__file__).resolve().parent / 'models' / 'long_cpu.pt'
SHAPE_FIELDS = ('dim', 'depth', 'heads', 'dim_head', 'prev_tokens')  # what the weights' shapes depend on
MODEL_FIELDS = SHAPE_FIELDS + ('tune_clock', 'tune_length', 'tune_key', 'tune_labels', 'seq_len', 'dropout',
                               'attn_dropout')
TOKENIZATION_FIELDS = ('timing', 'beat_division', 'include_drums', 'tracks', 'condition')
# the value a field takes in a checkpoint whose Args lack it (saved by a version without the field)
FIELD_DEFAULTS = {'tracks': 'all', 'attn_dropout': 0.0, 'prev_tokens': 0, 'tune_clock': False, 'tune_length': False,
                  'tune_key': False, 'tune_labels': False, 'condition': False}


class DeviceError(ValueError):
    """The device or precision asked for does not exist on this machine."""


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot be used; the message names it and says what is wrong."""


# ----------------------------------------------------------------------------------------------------------
# Device and precision

@dataclass(frozen=True)
class Machine:
    """Where a process computes and in which precision; rank and world size of a torchrun (1 process: 0, 1)."""
    device: torch.device
    dtype: torch.dtype          # autocast dtype; float32 means no autocast
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1

    @property
    def dtype_name(self):
        return str(self.dtype).removeprefix('torch.')

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """fp16 gradients underflow without loss scaling; bf16 and fp32 have float32's exponent range."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def torchrun_ranks(environ=os.environ):
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    world = int(environ.get('WORLD_SIZE', 1))
    if world <= 1:
        return 0, 1, 0
    return int(environ['RANK']), world, int(environ.get('LOCAL_RANK', 0))


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU computes bf16 in hardware (x86 AVX-512 BF16 or AMX, Arm BF16), read from the CPU flags.

    Without them torch emulates bf16 matmuls, several times slower than float32. Where the flags cannot be read
    (macOS, Windows), False: float32 is never the slow choice.
    """
    try:
        with open(cpuinfo) as f:
            flags = set(' '.join(line.split(':', 1)[1] for line in f
                                 if line.startswith(('flags', 'Features')) and ':' in line).split())
    except OSError:
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def choose_device(requested='auto', dtype='auto', local_rank=0, rank=0, world=1):
    """The indexed device and autocast dtype for a request ('auto', 'cpu', 'cuda', 'cuda:1', 'mps').

    'auto' takes CUDA, then Apple MPS, then the CPU; under torchrun each process takes the GPU of its local rank.
    Precision 'auto': bf16 on GPUs that run it natively (Ampere and newer), fp16 with a gradient scaler on older
    GPUs (torch counts emulated bf16 as supported unless asked not to; emulated bf16 is slow and has no flash
    attention), bf16 on CPUs with bf16 instructions (AVX-512 BF16, AMX, Arm BF16) and float32 on other CPUs,
    where bf16 is emulated and several times slower than float32, float32 on MPS.
    Raises DeviceError, with a one-line message, for a device or precision this machine does not have.
    """
    has_mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if requested == 'auto':
        requested = 'cuda' if torch.cuda.is_available() else 'mps' if has_mps else 'cpu'
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested}: not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise DeviceError(f'--device {requested}: this machine has no CUDA GPU (torch {torch.__version__} '
                              f"sees none); use --device auto or cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f'--device {requested}: GPU {index} does not exist (this machine has '
                              f'{torch.cuda.device_count()})')
        device = torch.device('cuda', index)
    elif device.type == 'mps' and not has_mps:
        raise DeviceError(f'--device {requested}: Apple MPS is not available here; use --device auto or cpu')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise DeviceError(f"--device {requested}: unsupported device type; use 'cpu', 'cuda' or 'mps'")

    if dtype == 'auto':
        if device.type == 'cuda':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
        else:
            dtype = 'bfloat16' if device.type == 'cpu' and cpu_has_native_bf16() else 'float32'
    if dtype not in ('bfloat16', 'float16', 'float32'):
        raise DeviceError(f"--dtype {dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'")
    if device.type == 'mps' and dtype != 'float32':
        raise DeviceError(f'--dtype {dtype}: MPS runs float32 here (its autocast support is incomplete)')
    if device.type == 'cuda' and dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f'--dtype bfloat16: {torch.cuda.get_device_name(device)} has no native bf16; use '
                          f'--dtype float16 (with a gradient scaler) or float32')
    return Machine(device, getattr(torch, dtype), rank, world, local_rank)


def start_machine(requested='auto', dtype='auto'):
    """choose_device for this process, then its settings: the current GPU, TF32, and torchrun's process group."""
    rank, world, local_rank = torchrun_ranks()
    machine = choose_device(requested, dtype, local_rank, rank, world)
    if machine.device.type == 'cuda':
        torch.cuda.set_device(machine.device)
        # TF32 for float32 matmuls (Ampere+): 10 mantissa bits where autocast leaves float32 work (the output
        # layer's loss in float32, --dtype float32), as the original project enabled it; safe for training,
        # where bf16 autocast already rounds far more
        torch.set_float32_matmul_precision('high')
    if machine.distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if machine.device.type == 'cuda' else 'gloo',
                                device_id=machine.device if machine.device.type == 'cuda' else None)
    return machine


def set_cpu_threads(threads):
    """torch's CPU threads for this process; 0 leaves torch's default, one a core.

    Runs side by side on one machine each take every core by default. Their OpenMP threads then outnumber the
    cores, and a thread that reaches the end of a parallel region spins waiting for one whose core another run
    holds: each run slows many times more than its share (benchmarks/bench_parallel_runs.py). Cores / runs each
    avoids it.
    """
    if threads:
        torch.set_num_threads(threads)


# glibc's mallopt parameters and the largest mmap threshold it accepts on a 64-bit machine
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the OS.

    A training step frees and allocates the same tensors of several megabytes every step (logits, activations,
    their gradients). By default glibc maps a large block afresh and returns the top of its heap to the OS once
    it is free, so the next step's tensors fault their pages in and the kernel zeroes them again. With blocks up
    to 32 MB taken from the heap and the heap trimmed only past 1 GB free, a step reuses the last step's pages;
    the process's peak memory is the same. Linux with glibc only (elsewhere nothing happens); returns whether
    both settings took.
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def seed_everything(seed):
    """Seed torch's generators on every device (CPU, each CUDA GPU, MPS) from one integer."""
    torch.manual_seed(seed % (2 ** 63))


def undecodable_names_on_stdout():
    """File names need not be UTF-8: a strict UTF-8 stdout (a desktop locale's) raises on such a name, where this
    writes the name's own bytes back, as Python does under the C locale. For a script's __main__; a stream put in
    stdout's place (a StringIO) takes text as it is."""
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='surrogateescape')


# ----------------------------------------------------------------------------------------------------------
# Stopping: SIGTERM taken as Ctrl-C

@contextmanager
def sigterm_as_ctrl_c():
    """Inside, SIGTERM (`kill PID`, `timeout`, a scheduler's stop) raises KeyboardInterrupt(SIGTERM), so a script's
    Ctrl-C path (keep the work done, say so in one line, exit 128 + the signal) serves it too. Left as it is where
    SIGTERM is ignored or handled already (the parent or the caller decided) and off the main thread, where Python
    runs no handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def stopped_by(interrupt):
    """(what stopped the run, exit status) of a KeyboardInterrupt: ('Ctrl-C', 130), or ('SIGTERM', 143) for one
    that sigterm_as_ctrl_c raised, the status a process killed by the signal gets."""
    signum = interrupt.args[0] if interrupt.args and isinstance(interrupt.args[0], int) else signal.SIGINT
    return 'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name, 128 + signum


# ----------------------------------------------------------------------------------------------------------
# Collectives: every tensor on the process's device

def _on_device(tensors, machine):
    for t in tensors:
        if t.device != machine.device:
            raise RuntimeError(f'collective got a tensor on {t.device}; this process computes on {machine.device}')


def all_reduce(tensor, machine, op=dist.ReduceOp.SUM):
    """Reduce tensor across processes in place (nothing to do in a single process); returns it."""
    _on_device([tensor], machine)
    if machine.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather(tensor, machine):
    """[tensor of rank 0, tensor of rank 1, ...], each built on the process's device."""
    _on_device([tensor], machine)
    if not machine.distributed:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(machine.world)]
    _on_device(gathered, machine)
    dist.all_gather(gathered, tensor)
    return gathered


def barrier(machine):
    if machine.distributed:
        dist.barrier(device_ids=[machine.device.index] if machine.device.type == 'cuda' else None)


# ----------------------------------------------------------------------------------------------------------
# Models and checkpoints

def build_model(config):
    """The wrapped model an Args dict describes (training, a checkpoint's saved 'args', benchmarks)."""
    net = MusicTransformer(num_tokens=NUM_TOKENS, dim=config['dim'], depth=config['depth'], heads=config['heads'],
                           dim_head=config['dim_head'], max_seq_len=config['seq_len'], dropout=config['dropout'],
                           attn_dropout=config.get('attn_dropout', FIELD_DEFAULTS['attn_dropout']),
                           prev_tokens=config.get('prev_tokens', FIELD_DEFAULTS['prev_tokens']),
                           tune_clock=config.get('tune_clock', FIELD_DEFAULTS['tune_clock']),
                           tune_length=config.get('tune_length', FIELD_DEFAULTS['tune_length']),
                           tune_key=config.get('tune_key', FIELD_DEFAULTS['tune_key']),
                           tune_labels=config.get('tune_labels', FIELD_DEFAULTS['tune_labels']))
    return AutoregressiveWrapper(net)


def build_optimizer(model, lr, weight_decay, device):
    """AdamW without weight decay on biases and norms; fused (one kernel per step) on CUDA and CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.device(device).type in ('cuda', 'cpu'))


def compile_model(model, backend='inductor'):
    """torch.compile a module's forward in place: state_dict keys and eager generate stay as they are.

    benchmarks/bench_model.py times a model compiled this way against eager. Training's --compile (off by
    default) compiles differently: custom_training.wrap_for_training compiles the whole training module, the
    DDP wrapper included, so the compiler sees DDP's bucket boundaries.
    """
    model.forward = torch.compile(model.forward, backend=backend)
    return model


def save_checkpoint(path, state):
    """Write to a temporary file and rename: a crash or a full disk mid-save never destroys the last good one.

    A failed write raises CheckpointError saying so; the temporary file is removed.
    """
    try:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        reason = 'no space left on the device' if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f'cannot write {path}: {reason}; the previous checkpoint is kept') from None
    except RuntimeError as e:  # torch reports a short write from its zip writer as a RuntimeError
        free = shutil.disk_usage(Path(path).parent).free
        # its message ("unexpected pos ...") names no cause: a full disk is the usual one, so say so when it is
        reason = (f'no space left on the device ({free / 2**20:.0f} MiB free)' if free < LOW_DISK_BYTES else
                  str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(f'cannot write {path}: {reason}; the previous checkpoint is kept') from None


LOW_DISK_BYTES = 64 * 2**20  # less free than this after a failed checkpoint write: the disk is what is full


CHECKPOINT_KEYS = ('model_state_dict', 'args', 'tokenization')
# a tune length a checkpoint may store, in time steps: days of music at any timing, and a number every tensor holds
MAX_TUNE_STEPS = 2**31 - 1


def load_checkpoint(path):
    """A checkpoint dict, or CheckpointError naming the file and what is wrong with it."""
    path = Path(path)
    hint = '(a checkpoint is best.pt or latest.pt in the save_dir of a training run)'
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder, not a checkpoint file {hint}')
    if not path.exists():
        raise CheckpointError(f'checkpoint {path} not found {hint}')
    if not path.is_file():  # a FIFO would block for ever, a device never end
        raise CheckpointError(f'{path} is not a regular file {hint}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # a damaged or foreign file fails in many ways inside torch.load; all mean the same
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated, or not a torch file; '
                              f'{type(e).__name__}: {error_line(e, 120)}) '
                              f'{hint}') from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(f'{path} is not a checkpoint of this project (it lacks {", ".join(missing)}; a bare '
                              f'state_dict is not enough) {hint}')
    if not isinstance(ckpt['args'], dict):  # every script reads its settings with .get
        raise CheckpointError(f"{path}: its saved args do not describe a model (a {type(ckpt['args']).__name__}, not "
                              f"a dict of settings) {hint}")
    # every sample and every file the model reads goes through these settings: check them once, here
    tok = ckpt['tokenization']
    try:
        tokenization_settings(tok['timing'], tok['beat_division'], tok['include_drums'], tok.get('tracks', 'all'))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f'{path}: its tokenization settings are damaged ({str(tok)[:80]}); expected timing '
                              f"'ms' or 'beats', a positive beat_division and include_drums {hint}") from None
    # generate.py and evaluate.py read a header's style ids and draw tune lengths from these: a damaged one is named
    # here, not met as a TypeError inside a draw
    styles = ckpt.get('styles')
    if styles is not None and not (isinstance(styles, (list, tuple)) and len(styles) <= MAX_STYLES
                                   and all(isinstance(style, str) and style for style in styles)
                                   and len(set(styles)) == len(styles)):
        raise CheckpointError(f'{path}: its styles are damaged ({str(styles)[:80]}); expected a list of at most '
                              f'{MAX_STYLES} different style names {hint}')
    lengths = ckpt.get('tune_lengths')
    if lengths is not None and not (isinstance(lengths, dict) and '' in lengths and all(
            isinstance(style, str) and isinstance(steps, list) and steps
            and all(type(step) is int and 0 <= step <= MAX_TUNE_STEPS for step in steps)
            for style, steps in lengths.items())):
        raise CheckpointError(f'{path}: its tune_lengths are damaged ({str(lengths)[:80]}); expected a dict from style '
                              f"names ('' for all tunes) to non-empty lists of time steps (0-{MAX_TUNE_STEPS:,}) "
                              f'{hint}')
    return ckpt


def error_line(error, limit=160):
    """One line saying what went wrong: load_state_dict puts a header above its list of problems, so the first
    problem stands for them; a KeyError names what is missing."""
    if isinstance(error, KeyError):
        return f'it lacks {error}'
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(':'):
        lines = lines[1:]
    return (lines[0] if lines else type(error).__name__)[:limit]


def load_model(path, device='cpu', ckpt=None):
    """A checkpoint's model rebuilt from its saved Args, in eval mode, plus the checkpoint dict. ckpt: that dict,
    where the caller has read it already with load_checkpoint (a large checkpoint is then read once)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    try:
        # training's own rules, before building: a damaged dim (-4, 2.5) is named, not a torch error from inside
        check_args(SimpleNamespace(**ckpt['args']), names=MODEL_FIELDS)
        model = build_model(ckpt['args'])
    except OptionError as e:
        raise CheckpointError(f"{path}: its saved args do not describe a model ({str(e).removeprefix('--')})") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a model field missing, a size torch refuses
        raise CheckpointError(f'{path}: its saved args do not describe a model ({error_line(e)})') from None
    try:
        model.load_state_dict(ckpt['model_state_dict'])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f'{path}: the weights do not fit the model its Args describe '
                              f'({error_line(e)})') from None
    # NaN weights would pass every shape check and fail at the first sampled token, inside torch.multinomial
    weights = ckpt['model_state_dict'].values()
    if not all(torch.isfinite(weight).all() for weight in weights if weight.is_floating_point()):
        raise CheckpointError(f'{path}: its weights hold NaN or infinite values (a damaged file, or a run that '
                              f'diverged): no model to sample')
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------------
# Data and validation

def resolve_data_path(data_path, log=print):
    """The user's folder when it holds MIDI; the bundled dataset when the default folder is empty."""
    # only the default folder falls back; load_corpus walks the folder and prints its skip lines, so it is looked
    # into here only as far as its first MIDI file
    if os.path.normpath(data_path) != os.path.normpath(DEFAULT_DATA_PATH) or holds_midi(data_path):
        return data_path
    if holds_midi(BUNDLED_DATASET):
        log(f'{data_path} holds no MIDI files: training on the bundled Essen folk songs ({BUNDLED_DATASET})')
        return str(BUNDLED_DATASET)
    return data_path  # load_corpus raises a clear DatasetError naming the folder


@torch.no_grad()
def evaluate_split(model, dataset, batch_size, machine, heads=False):
    """Loss and accuracy over every window of a split, weighted by non-pad targets, summed over processes. heads:
    the dataset's windows come after their heads (dataset.split_head).

    Sums are float32 on the device (MPS has no float64); per batch they are at most a few thousand, so the
    rounding of the total stays far below the fourth decimal reported.
    """
    model.eval()
    totals = torch.zeros(3, device=machine.device)  # loss sum, correct, count
    # windows of about one length share a batch, so little of it is padding (a batch pads to its longest)
    indices = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))[machine.rank::machine.world]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate_fn,
                        generator=torch.Generator())  # own generator: a loader must not draw from the global RNG
    for x in loader:
        head, x = split_head(x.to(machine.device), heads)
        count = (x[:, 1:] != PAD_IDX).sum().float()
        with machine.autocast():
            loss, acc = model(x, head=head)
        totals += torch.stack([loss.float() * count, acc.float() * count, count])
    all_reduce(totals, machine)
    model.train()
    loss_sum, correct, count = totals.tolist()
    return (loss_sum / count, correct / count) if count else (float('nan'), float('nan'))
