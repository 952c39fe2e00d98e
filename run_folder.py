"""One training run per save folder, and nothing a run is given ever lost: the folder's lock, earlier runs kept in
numbered folders, and the checks of the paths a run is given.

    lock = RunLock.take(save_dir, log)      # RunFolderBusy names the process that holds the folder
    keep_earlier_run(save_dir, log, samples_dir)  # save_dir/runs/N/ for the checkpoints and samples found
    lock.release()

The lock is an exclusive flock on save_dir/run.lock, which holds the pid, host, start time and command of its run.
The kernel drops a flock when its process ends however it ends (SIGKILL included), so a lock file left by a dead
run never blocks the next one. Standard library only.
"""

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from token_cache import printable

try:
    import fcntl  # POSIX
except ImportError:
    fcntl = None
try:
    import msvcrt  # Windows: byte-range locks, also dropped by the system when their process ends
except ImportError:
    msvcrt = None

LOCK_NAME = 'run.lock'
RUN_FILES = ('latest.pt', 'best.pt', 'metrics.csv', 'training_progress.png')
KEPT_RUNS = 'runs'  # save_dir/runs/1, runs/2, ...: each earlier run found in the folder, never replaced
SAMPLE_SUFFIXES = ('.mid', '.png', '.wav')  # the files of a training sample (sampling.save_sample)
PATH_FIELDS = ('data_path', 'cache_dir', 'save_dir', 'samples_dir')
WINDOWS_LOCK_OFFSET = 1 << 20  # Windows locks bytes against reading too: lock one far past the holder's record


class RunFolderBusy(RuntimeError):
    """Another live process holds the save folder; the message is one line naming it."""


class RunFolderError(ValueError):
    """A path a run is given would lose or mix up files; the message is one line saying which and why."""


def _printable(text, limit=200):
    """A command line as one line, escaped the way skipped file names are, and cut to limit characters."""
    text = printable(text)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _try_lock(fd):
    """True when this process now holds fd's lock, False when another process does, None where the file system
    has no locks (a network mount without lock support) or this system offers none."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            return None
    except BlockingIOError:
        return False
    except OSError as e:
        if msvcrt is not None and fcntl is None and e.errno in (errno.EACCES, errno.EDEADLK):
            return False
        return None
    return True


def _read_record(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536).decode('utf-8') or 'null')
    except (ValueError, OSError):
        return {}


def _describe(record):
    if not isinstance(record, dict) or 'pid' not in record:
        return 'a process whose record is not written yet (starting up)'
    try:  # the record is a file anyone can edit: a damaged one must not stop every later run with a traceback
        started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(record.get('started', 0))))
    except (TypeError, ValueError, OverflowError, OSError):
        started = 'at an unreadable time'
    return (f"pid {_printable(str(record['pid']))} on {_printable(str(record.get('host', '?')))}, started {started}: "
            f"{_printable(str(record.get('command', '?')))}")


class RunLock:
    """The save folder's lock, held from take() until release() or the end of the process."""

    def __init__(self, path, fd, made_folder):
        self.path, self.fd, self.made_folder = path, fd, made_folder

    @classmethod
    def take(cls, save_dir, log=print):
        """Hold save_dir for this run, or raise RunFolderBusy naming the live process that holds it."""
        save_dir = Path(save_dir)
        made_folder = not save_dir.exists()
        save_dir.mkdir(parents=True, exist_ok=True)
        path = save_dir / LOCK_NAME
        while True:
            # never through a link: the record would be written into whatever file the link names
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o644)
            held = _try_lock(fd)
            if held is False:
                holder = _describe(_read_record(fd))
                os.close(fd)
                raise RunFolderBusy(f'{save_dir} is in use by another training run ({holder}); wait for it to '
                                    f'end, or give this run another --save_dir')
            if held is None:
                log(f'warning: {path} cannot be locked on this file system: nothing keeps a second run out of '
                    f'{save_dir}')
                break
            # the holder removes the file as it lets go: a lock won on a removed file is no lock; open anew
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)
        left = _read_record(fd)
        if left:
            log(f'{path}: the run that held it ({_describe(left)}) is no longer running; this run takes it over')
        record = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time(),
                  'command': shlex.join([sys.executable] + sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode('utf-8'))
        return cls(path, fd, made_folder)

    def release(self):
        """Let go: the file is removed while still held (so no one can win a lock on a file about to vanish); a
        folder this lock made for a run that wrote nothing goes with it."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if fcntl is not None:
                self.path.unlink()
            else:
                os.ftruncate(self.fd, 0)  # Windows cannot remove an open file; an empty record reads as no holder
        os.close(self.fd)
        self.fd = None
        if self.made_folder:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when empty


def keep_earlier_run(save_dir, log=print, samples_dir=None):
    """Move the checkpoints of another run found in save_dir into the next free save_dir/runs/N/ (a rename: no
    copy, no disk space needed), and that run's training samples (sample_step_*) in samples_dir into
    runs/N/samples/, so starting a run again instead of resuming it loses nothing: the new run's samples would
    otherwise write over them. A move that fails part-way is undone, so the earlier run stays whole where it was.
    Nothing under runs/ is ever moved or removed. Returns the folder the run went to, or None when there was none."""
    found = [save_dir / name for name in RUN_FILES if (save_dir / name).is_file()]
    if not any(path.suffix == '.pt' for path in found):
        return None
    runs = save_dir / KEPT_RUNS
    numbers = [int(p.name) for p in runs.iterdir() if p.name.isdigit()] if runs.is_dir() else []
    keep = runs / str(max(numbers, default=0) + 1)
    samples = sorted(p for p in Path(samples_dir).glob('sample_step_*') if p.is_file() and
                     p.suffix in SAMPLE_SUFFIXES) if samples_dir and Path(samples_dir).is_dir() else []
    moves = [(path, keep / path.name) for path in found] + [(path, keep / 'samples' / path.name) for path in samples]
    done = []
    try:
        for source, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.replace(target)
            done.append((source, target))
    except OSError as e:
        for source, target in reversed(done):  # put back what moved: the run is whole in one place or the other
            with contextlib.suppress(OSError):
                target.replace(source)
        raise RunFolderError(f'{save_dir} holds an earlier run, and moving it to {keep} failed '
                             f'({e.strerror or e}); it is left where it was: resume it with --checkpoint latest, '
                             f'or start the new run elsewhere with --save_dir') from None
    kept_samples = f' and its {len(samples)} sample files in {keep / "samples"}' if samples else ''
    log(f'{save_dir} held an earlier run: its checkpoints are now in {keep}{kept_samples} (to resume that run: '
        f'--checkpoint {keep / "latest.pt"})')
    return keep


def absolute_paths(args):
    """Every folder field of args as an absolute path, so a checkpoint's saved Args mean the same from any working
    directory; a relative path means relative to where the run is started."""
    for name in PATH_FIELDS:
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.abspath(getattr(args, name)))


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_outputs_outside_data(args, data_paths):
    """The run's outputs and cache must not lie inside the folder it trains on: the next run would train on them."""
    for name in ('samples_dir', 'save_dir', 'cache_dir'):
        for data_path in data_paths:
            if _inside(getattr(args, name), data_path):
                raise RunFolderError(f'--{name} {getattr(args, name)} lies inside --data_path {data_path}: the '
                                     f'next run would train on its own {name.removesuffix("_dir")} files; give a '
                                     f'folder outside it')


def check_named_files(args, continuing):
    """A checkpoint the user names is never written over or moved: refuse a run that would save over it.
    `continuing` is the resumed run's own latest.pt, which it is meant to replace."""
    own = [Path(args.save_dir) / name for name in RUN_FILES if name.endswith('.pt')]
    for flag, named in (('--init_from', args.init_from), ('--checkpoint', args.checkpoint)):
        if named in (None, 'latest', 'shipped') or (continuing and flag == '--checkpoint'):
            continue
        if any(Path(named).resolve() == path.resolve() for path in own):
            raise RunFolderError(f'{flag} {named} is a checkpoint of --save_dir {args.save_dir}, which this run '
                                 f'writes over; copy it elsewhere first, or give another --save_dir')
