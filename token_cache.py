"""The token cache: MIDI files found in folders and zips, tokenized once in worker processes, kept as uint16 arrays.

cache_dir/<settings key>/ holds, per dataset folder, one index-<key of the folder>.json and one consolidated
tokens-<key>-<id>.npy of every file's uint16 tokens end to end, which a run memory-maps whole; while a first
tokenization runs, each distinct file content gets a <sha1 of its bytes>.npy of its own, so a stopped run keeps
its work, and these are merged into the consolidated file at its end.
"""

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import stat
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

import TMIDIX
from condition import midi_labels
from tokens import NUM_TOKENS, START_IDX, drum_notes_left_out, tokenize_midi

try:
    import fcntl  # POSIX: one process updates the token cache while the others wait
except ImportError:  # Windows
    fcntl = None

MIDI_SUFFIXES = ('.mid', '.midi', '.kar', '.rmi')
# a file is read into memory whole before it is tokenized. Real MIDI files hold a few MB at most (a dense orchestral
# score); a larger one, or a zip member declaring more, is not music but a zip bomb or a misnamed file
MAX_MIDI_BYTES = 64 << 20
MAX_INNER_ZIP_BYTES = 1 << 30  # a zip inside a zip is read into memory whole as well


class DatasetError(RuntimeError):
    """The dataset folder cannot be used (empty, nothing readable, ...)."""



def write_atomically(path, write, suffix=''):
    """write(tmp_path), then rename over path: a reader sees the old file or the new one, never a part.

    The temporary name carries the process id, so processes writing the same file at once do not share one;
    it is removed when writing fails (a full disk, Ctrl-C), so no partial file is left behind. suffix ends the
    temporary name, for a writer that adds its own ending to a name without it (detokenize and '.mid').
    """
    tmp = f'{path}.{os.getpid()}.tmp{suffix}'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # the file asked for is the one to name, not a passing one
            e.filename, e.filename2 = os.fspath(path), None
        raise



# -----------------------------------------------------------------------------
# finding files



def _name_bytes(name):
    """The bytes of a file name. Linux names need not be UTF-8: Python keeps such bytes as lone surrogates, which
    'surrogateescape' turns back into the original bytes; a valid UTF-8 name gives the same bytes as .encode()."""
    return name.encode('utf-8', 'surrogateescape')


def printable(name):
    """A file name, or a line that holds one, that any terminal can print on one line: bytes that are not UTF-8 are
    shown as \\xe9 (printing a lone surrogate to a UTF-8 stream raises), and control characters as \\n, \\x1b, ...
    (a name holding a newline or a terminal escape could fake output lines or clear the screen)."""
    text = _name_bytes(name).decode('utf-8', 'backslashreplace')
    return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii') for c in text)


class NotMidiFile(ValueError):
    """A path that is no MIDI file to read; the message says why in a few words."""


class UnreadableZip:
    """find_midi_sources's member for a zip, or a zip in a zip, that cannot be opened (not a zip at all, cut short,
    a damaged central directory): reading it raises NotMidiFile with the reason, so the zip is counted and named
    among the skipped files, as a FIFO is."""

    def __init__(self, reason):
        self.reason = reason


# what reading a file or a zip member can raise: I/O errors, a damaged archive (BadZipFile, a bad CRC among them;
# zlib.error for a corrupt deflate stream, EOFError for a cut one), a member gone since it was listed (KeyError), an
# encrypted member or an unsupported compression method (RuntimeError, NotImplementedError), a path that is no
# regular file (NotMidiFile)
UNREADABLE = (OSError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error, NotMidiFile)


def _missing(path, error):
    """For a path that cannot be found: NotMidiFile naming the missing target of a dangling link, else error."""
    if os.path.islink(path):
        return NotMidiFile(f'a link to {printable(os.readlink(path))}, which does not exist')
    return error


def read_midi_file(path, limit=MAX_MIDI_BYTES):
    """The bytes of the MIDI file at path. A FIFO would block for ever and /dev/zero never end: only a regular file
    of at most limit bytes is read, anything else raises NotMidiFile, as does a dangling link. The file is opened
    without waiting for a writer and checked once open, so a FIFO put in its place after it was listed cannot block
    either. Another missing or unreadable file raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    except FileNotFoundError as e:
        raise _missing(path, e) from None
    except IsADirectoryError:  # where a folder cannot be opened at all (Windows)
        raise NotMidiFile('not a regular file') from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotMidiFile('not a regular file')
    with os.fdopen(fd, 'rb') as f:
        data = f.read(limit + 1)  # a file of /proc says 0 bytes and can hold more
        if max(st.st_size, len(data)) > limit:
            raise NotMidiFile(f'{max(st.st_size, len(data)):,} bytes, far more than a MIDI file holds (at most '
                              f'{limit:,})')
        return data


def find_midi_sources(path):
    """All MIDI files under path (recursive, any case, through links to folders), including members of .zip
    archives and of zips inside them; path may also be one MIDI file or one zip. Returns a sorted list of (name
    relative to path, file path, member): member is None for a plain file, the member name for a file in a zip,
    (inner zip, member) for a file in a zip inside a zip, an UnreadableZip for a zip that cannot be opened."""
    return list(_midi_sources(path, in_order=True))


def holds_midi(path):
    """Whether find_midi_sources(path) finds anything, found by walking path only up to its first MIDI file: a run
    checks the default data folder before load_corpus walks it, and a second walk of a Lakh-sized folder would
    cost a second pass over every file. Prints nothing: load_corpus's walk says what it skips, once."""
    with contextlib.redirect_stdout(io.StringIO()):
        return next(_midi_sources(path, in_order=False), None) is not None


def _midi_sources(path, in_order):
    root = Path(path)
    if root.is_file():  # a dataset of one file, or of one zip
        files, root = [root], root.parent
    elif root.is_dir():
        files = sorted(_files_under(root)) if in_order else _files_under(root)
    else:
        return
    for file in files:
        rel = file.relative_to(root).as_posix()
        suffix = file.suffix.lower()
        if suffix not in MIDI_SUFFIXES + ('.zip',):
            continue
        size = _regular_file_size(file)
        if size is None:  # a FIFO, a device, a dangling link: listed, so that reading refuses it with one line
            yield rel, file, None
        elif suffix == '.zip':
            yield from _zip_sources(rel, file)
        elif _small_enough(rel, size, MAX_MIDI_BYTES):
            yield rel, file, None


def _files_under(root):
    """Every file below root, following links to folders. A folder reached a second time (a link loop, or two
    links to one folder) is read once: the first path that reaches it names its files."""
    seen = {os.path.realpath(root)}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:
                rel = Path(folder, name).relative_to(root).as_posix()
                print(f'skipping {printable(rel)}: a link to a folder that is read already ({printable(real)})')
            else:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept  # os.walk descends only into these
        yield from (Path(folder, name) for name in files)


def _regular_file_size(file):
    """The size of a regular file (through links); None for anything else (a FIFO, a device, a dangling link) or a
    file gone since it was listed. One stat: a cached start-up of a Lakh-sized folder makes one per file."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _small_enough(name, size, limit):
    if size is not None and size > limit:
        print(f'skipping {printable(name)}: {size:,} bytes, far more than a MIDI file holds (at most {limit:,} '
              f'bytes are read)')
        return False
    return True


def _zip_sources(rel, file):
    try:
        with zipfile.ZipFile(file) as zf:
            sources = [(f'{rel}::{m}', file, m) for m in _members(zf, MIDI_SUFFIXES, rel, MAX_MIDI_BYTES)]
            # collections are often shipped as a zip of zips: read the inner ones too, one level deep
            for inner in _members(zf, ('.zip',), rel, MAX_INNER_ZIP_BYTES):
                sources += _inner_zip_sources(f'{rel}::{inner}', file, inner, zf)
    except UNREADABLE as e:
        return [(rel, file, UnreadableZip(f'not a readable zip archive ({e})'))]
    return sorted(sources, key=lambda source: source[0])


def _inner_zip_sources(name, file, inner, outer_zf):
    try:
        with zipfile.ZipFile(io.BytesIO(outer_zf.read(inner))) as zf:
            for deeper in _members(zf, ('.zip',), name, None):
                print(f'skipping {printable(f"{name}::{deeper}")}: zips inside a zip inside a zip are not read')
            return [(f'{name}::{m}', file, (inner, m)) for m in _members(zf, MIDI_SUFFIXES, name, MAX_MIDI_BYTES)]
    except UNREADABLE as e:
        return [(name, file, UnreadableZip(f'not a readable zip archive ({e})'))]


def _members(zf, suffixes, zip_name, limit):
    """Names of the members with these suffixes, folders (a folder named x.mid/) left out; members whose declared
    unpacked size passes limit are skipped with one line each (zipfile never unpacks more than the declared size)."""
    return sorted(info.filename for info in zf.infolist() if Path(info.filename).suffix.lower() in suffixes
                  and not info.is_dir()
                  and (limit is None or _small_enough(f'{zip_name}::{info.filename}', info.file_size, limit)))


def _read_source(file, member, open_zips):
    """The bytes of one source of find_midi_sources; open_zips keeps archives open between calls."""
    if member is None:
        return read_midi_file(file)
    if isinstance(member, UnreadableZip):
        raise NotMidiFile(member.reason)
    if isinstance(member, tuple):  # a file in a zip inside a zip
        inner, member = member
        if (file, inner) not in open_zips:
            open_zips[file, inner] = zipfile.ZipFile(io.BytesIO(_read_source(file, inner, open_zips)))
        return open_zips[file, inner].read(member)
    if file not in open_zips:
        open_zips[file] = zipfile.ZipFile(file)
    return open_zips[file].read(member)


def read_midi_sources(path, names):
    """(name, bytes) of each MIDI file under path (find_midi_sources's names) that is in names, in name order;
    bytes is None for a file that cannot be read now."""
    wanted, open_zips = set(names), {}
    try:
        for name, file, member in find_midi_sources(path):
            if name in wanted:
                try:
                    yield name, _read_source(file, member, open_zips)
                except UNREADABLE:
                    yield name, None
    finally:
        for zf in open_zips.values():
            zf.close()


def _stamp(file):
    try:
        st = os.stat(file)
    except FileNotFoundError as e:
        raise _missing(file, e) from None
    return [st.st_size, st.st_mtime_ns]


def _stamp_or_none(file):
    try:
        return _stamp(file)
    except (OSError, NotMidiFile):  # gone since it was listed, or a dangling link
        return None


# -----------------------------------------------------------------------------
# the token cache
#
# cache_dir/<settings key>/ holds one index-<key of the dataset folder>.json per dataset:
# {'root': folder, 'files': {name: {'stamp': [size, mtime_ns], 'hash': sha1}},
#  'meta': {sha1: {'n_notes', 'tempo', 'n_tokens'} (and 'labels' with settings' condition) or {'error'}},
#  'packed': {'file': 'tokens-<key>-<id>.npy', 'digests': [sha1, ...], 'lengths': [n_tokens, ...]}},
# where 'packed' names the dataset's consolidated token file: the tokens of those contents end to end, in that order.
# A run maps that one file (one file descriptor, pages shared by every process of a node and left to the OS), so
# the corpus costs no memory of its own and a cached start-up opens one file, not one per MIDI file.
# Tokenizing writes one <sha1>.npy per content first, so a stopped run keeps what it did; the end of the run merges
# them into a new consolidated file. A <sha1>.npy is deleted once every index that refers to it has it in its
# consolidated file, and a consolidated file once no index names it. Every file is written under a temporary name
# and renamed, so a reader never sees half a file; a lock file lets one process change the folder while the
# others wait. Contents that two datasets share are tokenized once and stored in both consolidated files.

INDEX_SAVE_SECONDS = 5      # while tokenizing, the index is saved this often, so a killed run keeps its work
# new files are read and tokenized this many (or this many bytes) at a time: memory holds one batch of file contents,
# whatever the number of new files
TOKENIZE_BATCH_FILES = 512
TOKENIZE_BATCH_BYTES = 128 << 20
MAX_DROP_LINES = 10         # damaged cache entries are listed one per line up to this many, then only counted


def _tokenize_job(job):
    """Worker process body: (content hash, bytes, settings) -> (hash, tokens or None, meta)."""
    digest, data, settings = job
    try:
        tokens, n_notes, tempo, programs = tokenize_midi(data, settings, with_programs=True)
        info = {'n_notes': n_notes, 'tempo': tempo, 'n_tokens': len(tokens)}
        if programs:  # tracks='parts': the GM program of each role, for the programs samples play
            info['programs'] = programs
        if settings.get('condition'):  # the key and meter of the header (condition.py); style comes from the name
            info['labels'] = midi_labels(data)
        if n_notes == 0:  # so that the skip message can tell a drum track from an empty file
            info['drum_notes'] = drum_notes_left_out(data, settings)
        return digest, tokens, info
    except TMIDIX.MIDIError as e:
        return digest, None, {'error': str(e)}
    except Exception as e:  # a reader bug must cost one file, not the whole dataset; say what it was
        return digest, None, {'error': f'{type(e).__name__}: {e}'}


DIGEST = re.compile('[0-9a-f]{40}')
PACKED_NAME = re.compile('tokens-[0-9a-f]{12}-[0-9a-f]{12}[.]npy')


def _settings_key(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _valid_file_entry(entry):
    return (isinstance(entry, dict) and isinstance(entry.get('stamp'), list) and isinstance(entry.get('hash'), str)
            and DIGEST.fullmatch(entry['hash']) is not None)


def _valid_meta(info):
    if not isinstance(info, dict):
        return False
    if 'error' in info:
        return isinstance(info['error'], str)
    return (isinstance(info.get('n_notes'), int) and isinstance(info.get('n_tokens'), int) and info['n_tokens'] >= 1
            and isinstance(info.get('tempo'), (int, float)))


def _parse_index(text):
    """(index, files, meta, names of malformed entries) of an index file's text, keeping the well-formed entries.
    Raises ValueError (not JSON: cut short, empty) or TypeError (JSON but not an index)."""
    index = json.loads(text)
    if not (isinstance(index, dict) and isinstance(index.get('files'), dict) and isinstance(index.get('meta'), dict)):
        raise TypeError('not a cache index')
    files = {name: f for name, f in index['files'].items() if _valid_file_entry(f)}
    meta = {digest: m for digest, m in index['meta'].items() if _valid_meta(m)}
    malformed = [n for n in index['files'] if n not in files] + [d for d in index['meta'] if d not in meta]
    return index, files, meta, malformed


def _packed_of(index):
    """(file name, digests, lengths) of an index's consolidated token file; None when it names none or is
    malformed (then the tokens are looked for in the per-content files)."""
    packed = index.get('packed')
    if not isinstance(packed, dict):
        return None
    name, digests, lengths = packed.get('file'), packed.get('digests'), packed.get('lengths')
    if not (isinstance(name, str) and PACKED_NAME.fullmatch(name) and isinstance(digests, list)
            and isinstance(lengths, list) and len(digests) == len(lengths) > 0
            and all(isinstance(d, str) and DIGEST.fullmatch(d) for d in digests)
            and all(type(n) is int and n >= 1 for n in lengths)):
        return None
    return name, digests, lengths


def _map_packed(path, lengths):
    """The tokens of a consolidated token file, memory-mapped, once its header and size are what the index says;
    raises _DamagedEntry."""
    total = sum(lengths)
    header = _npy_header(total)
    try:
        with open(path, 'rb') as f:
            head = f.read(len(header))
            size = os.fstat(f.fileno()).st_size
        if head != header or size != len(header) + 2 * total:
            raise _DamagedEntry(f'{size:,} bytes that are not the {total:,} uint16 tokens the index gives')
        return np.memmap(path, dtype='<u2', mode='r', offset=len(header), shape=(total,))
    except FileNotFoundError:
        raise _DamagedEntry('token file missing') from None
    except (OSError, ValueError) as e:
        raise _DamagedEntry(f'unreadable token file ({e})') from None


def _packed_entries(tokens, digests, lengths):
    """digest -> view of its tokens in a consolidated file, or the reason the entry is unusable: the checks that
    load() makes on one array, made for every entry at once (the largest id in one pass over the file, entry by
    entry only when it is out of range)."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    reasons = {}
    for i in np.flatnonzero(tokens[starts] != START_IDX):
        reasons[i] = f'first token {tokens[starts[i]]}, not the start token {START_IDX}'
    if tokens.max() >= NUM_TOKENS:
        highest = np.maximum.reduceat(tokens, starts)
        for i in np.flatnonzero(highest >= NUM_TOKENS):
            reasons.setdefault(i, f'token id {highest[i]} outside the vocabulary of {NUM_TOKENS}')
    return {digest: reasons.get(i) or tokens[start:end]
            for i, (digest, start, end) in enumerate(zip(digests, starts.tolist(), ends.tolist()))}


def _save_npy(tmp, tokens):
    # np.save's file writing (array.tofile) asks the file object for its descriptor in C and turns a Ctrl-C that
    # lands there into a TypeError, so a stopped run printed a traceback: numpy writes into memory, Python writes
    # the bytes. A file object, not a name: given a name, np.save would append '.npy' to the temporary one.
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    with open(tmp, 'wb') as f:
        f.write(buffer.getbuffer())


def _npy_header(n_tokens):
    """The header np.save writes before n_tokens uint16 values."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': '<u2', 'fortran_order': False, 'shape': (n_tokens,)})
    return header.getvalue()


def _read_saved_tokens(path, n_tokens):
    """The tokens of a token file as _save_npy wrote them, or None for any other file (np.load then reads it and
    says what is wrong). A cached start-up reads one small file per MIDI file, and np.load's parsing of the
    header's text is much of the cost of a small file: comparing the header's bytes skips it."""
    with open(path, 'rb') as f:
        data = f.read()
    header = _npy_header(n_tokens)
    if not data.startswith(header) or len(data) != len(header) + 2 * n_tokens:
        return None
    return np.frombuffer(data, dtype='<u2', offset=len(header))


def _mmap_mode(infos):
    # a cache larger than a quarter of RAM is memory-mapped: the OS pages tokens in and out as training samples them.
    # Each mapped file holds an open file descriptor, so a cache of more files than a quarter of the open-file limit
    # is read into memory instead: mapped, it ran out of descriptors ("Too many open files") and crashed
    infos = list(infos)
    total_bytes = 2 * sum(info.get('n_tokens', 0) for info in infos)
    return 'r' if total_bytes > _physical_memory() // 4 and len(infos) < _open_file_limit() // 4 else None


def _open_file_limit():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # Windows: the C runtime's default
        return 512


def _physical_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class _DamagedEntry(Exception):
    """A cache entry that cannot be used (missing, cut short, bit rot, a foreign file); the message says why."""


class _LostWithItsFile(_DamagedEntry):
    """An entry of a consolidated file found damaged as a whole: that file's one line said it already."""


class _CacheFolder:
    """One settings folder of the token cache as one dataset sees it: its index, the shared token files, the lock.

    Damaged entries are dropped with one line each and tokenized again. When the folder cannot be written (a
    read-only mount, a full disk), new tokens are kept in memory for this run instead.
    """

    def __init__(self, folder, root, verbose):
        self.folder = Path(folder)
        self.root = str(Path(root).resolve())
        self.key = hashlib.sha1(_name_bytes(self.root)).hexdigest()[:12]
        self.index_file = self.folder / f'index-{self.key}.json'
        self.legacy_index = self.folder / 'index.json'  # the legacy layout: one index for every dataset in the cache
        self.from_legacy = False    # whether read_index fell back to it
        self.legacy_adopted = False  # whether it is this dataset's: then our own index replaces it
        self.verbose = verbose
        self.writable = True
        self.saved_index = None     # the index as last read or written: an unchanged index is not written again
        self.index_written = False
        self.arrays = {}            # digest -> checked token array
        self.damaged = set()        # digests found damaged in this pass
        self.in_memory = {}         # digest -> tokens that could not be written
        self.other_meta = None      # meta of the other datasets' indexes, read when first needed
        self.packed = None          # (file, digests, lengths) of this dataset's consolidated token file
        self.packed_tokens = {}     # digest -> view of it in that file, a reason it is damaged, or None: file lost
        self.other_packed = None    # digest -> (file, start, end) in other datasets' consolidated files
        self.mapped = {}            # file -> memmap (None when damaged) of other datasets' consolidated files
        self.dropped = 0
        self.unreadable = {}        # name -> why a source found could not be read (a bad CRC, a FIFO, ...)

    def say(self, message):
        if self.verbose:  # on a line of its own above the tokenizing bar, where one is shown, not on the bar's line
            tqdm.write(message)

    def drop(self, what, reason):
        self.dropped += 1
        if self.dropped <= MAX_DROP_LINES:
            self.say(f'cache: dropping {printable(what)}: {reason}; tokenizing again')
        elif self.dropped == MAX_DROP_LINES + 1:
            self.say('cache: dropping more damaged entries; not listing them')

    def read_index(self, quiet=False):
        """(files, meta) of this dataset's index, well-formed entries only; empty when it is missing or damaged.
        A cache in the legacy layout starts from its single index.json."""
        path = self.index_file if self.index_file.exists() else self.legacy_index
        try:
            index, files, meta, malformed = _parse_index(path.read_bytes())
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, TypeError) as e:
            if not quiet:
                self.drop(path.name, f'unreadable index ({e})')
            return {}, {}
        for name in malformed if not quiet else ():
            self.drop(name, 'malformed index entry')
        self.from_legacy = path == self.legacy_index
        self.saved_index = None if self.from_legacy else index
        self.open_packed(_packed_of(index), quiet)
        return files, meta

    def open_packed(self, packed, quiet):
        """Map the consolidated token file an index names and check every entry of it. A file damaged as a whole
        (missing, cut short, a foreign header) is dropped with one line, and its entries with it."""
        self.packed, self.packed_tokens = None, {}
        if packed is None:
            return
        name, digests, lengths = packed
        try:
            tokens = _map_packed(os.path.join(self.folder, name), lengths)
        except _DamagedEntry as e:
            if not quiet:
                self.drop(name, str(e))
            self.packed_tokens = dict.fromkeys(digests)
            return
        self.packed = packed
        self.packed_tokens = _packed_entries(tokens, digests, lengths)

    def usable(self, digest, meta, mmap, quiet=False, keep=True):
        """Whether digest has a sound entry (in meta, or in another dataset's index, then copied into meta).
        Loads and checks its tokens, and keeps them in self.arrays unless keep is False; a damaged entry is
        dropped from meta."""
        if digest in self.arrays:
            return True
        if digest in self.damaged:
            return False
        info = meta.get(digest) or self.meta_of_other_datasets().get(digest)
        if info is None:
            return False
        if 'error' not in info:  # a file that failed to tokenize has no tokens to check
            try:
                tokens = self.load(digest, info, mmap)
            except _DamagedEntry as e:
                self.damaged.add(digest)
                meta.pop(digest, None)
                if not quiet and not isinstance(e, _LostWithItsFile):
                    self.drop(digest, str(e))
                return False
            if keep:
                self.arrays[digest] = tokens
        meta[digest] = info
        return True

    def load(self, digest, info, mmap):
        """The tokens of one entry, checked cheaply: dtype, length, first token and largest id. Bit rot that slips
        through here would crash the model's embedding many steps into training."""
        packed = self.packed_tokens.get(digest, False)
        if isinstance(packed, np.ndarray):  # checked with its whole file
            return packed
        if isinstance(packed, str):
            raise _DamagedEntry(packed)
        if digest in self.in_memory:
            tokens = self.in_memory[digest]
        else:
            try:
                # a str path: building 10,000 Path objects would cost a tenth of a cached load
                path = os.path.join(self.folder, f'{digest}.npy')
                tokens = None if mmap else _read_saved_tokens(path, info['n_tokens'])
                if tokens is None:
                    tokens = np.load(path, mmap_mode=mmap, allow_pickle=False)
            except FileNotFoundError:
                tokens = self.in_other_packed(digest)
                if tokens is None:
                    raise (_LostWithItsFile if packed is None else _DamagedEntry)('token file missing') from None
            except (OSError, ValueError, EOFError) as e:
                raise _DamagedEntry(f'unreadable token file ({e})') from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise _DamagedEntry(f'{tokens.dtype} array of shape {tokens.shape}, not uint16 tokens')
        if len(tokens) != info['n_tokens']:
            raise _DamagedEntry(f"{len(tokens)} tokens where the index says {info['n_tokens']}")
        if tokens[0] != START_IDX:
            raise _DamagedEntry(f'first token {tokens[0]}, not the start token {START_IDX}')
        if tokens.max() >= NUM_TOKENS:
            raise _DamagedEntry(f'token id {tokens.max()} outside the vocabulary of {NUM_TOKENS}')
        return tokens

    def meta_of_other_datasets(self):
        """Entries other datasets already tokenized: a file two datasets share is tokenized once."""
        if self.other_meta is None:
            self.other_meta, self.other_packed = {}, {}
            for path in self.index_paths():
                if path != self.index_file:
                    meta, packed = self.read_meta(path)
                    self.other_meta.update(meta)
                    if packed is not None:
                        name, digests, lengths = packed
                        ends = np.cumsum(lengths).tolist()
                        for digest, end, length in zip(digests, ends, lengths):
                            self.other_packed[digest] = (name, lengths, end - length, end)
        return self.other_meta

    def in_other_packed(self, digest):
        """The tokens of digest in another dataset's consolidated file, or None."""
        self.meta_of_other_datasets()
        if digest not in self.other_packed:
            return None
        name, lengths, start, end = self.other_packed[digest]
        if name not in self.mapped:
            try:
                self.mapped[name] = _map_packed(os.path.join(self.folder, name), lengths)
            except _DamagedEntry:  # that dataset's own run says so when it reads it
                self.mapped[name] = None
        return None if self.mapped[name] is None else self.mapped[name][start:end]

    def index_paths(self):
        return sorted(self.folder.glob('index-*.json')) + [p for p in [self.legacy_index] if p.exists()]

    @staticmethod
    def read_meta(path):
        """(meta, consolidated file) of an index; empty when it cannot be read."""
        try:
            index, _, meta, _ = _parse_index(path.read_bytes())
            return meta, _packed_of(index)
        except (OSError, ValueError, TypeError):
            return {}, None

    def store(self, digest, tokens):
        self.damaged.discard(digest)  # written anew
        self.packed_tokens.pop(digest, None)
        if self.writable:
            try:
                write_atomically(self.folder / f'{digest}.npy', lambda tmp: _save_npy(tmp, tokens))
                return
            except OSError as e:
                self.cannot_write(e)
        self.in_memory[digest] = tokens

    def write_index(self, files, meta):
        """Save the index of the files whose tokens are done, unless it is unchanged or the folder is read-only."""
        if not self.writable:
            return
        done = {name: f for name, f in files.items() if f['hash'] in meta}
        index = {'root': self.root, 'files': done, 'meta': {f['hash']: meta[f['hash']] for f in done.values()}}
        if self.packed is not None:
            name, digests, lengths = self.packed
            index['packed'] = {'file': name, 'digests': digests, 'lengths': lengths}
        if index == self.saved_index:
            return
        text = json.dumps(index)  # ASCII: a name that is not UTF-8 is kept as a \udcxx escape and read back the same
        try:
            write_atomically(self.index_file, lambda tmp: Path(tmp).write_text(text))
        except OSError as e:
            self.cannot_write(e)
            return
        self.saved_index = index
        self.index_written = True
        if self.legacy_adopted:
            with contextlib.suppress(OSError):
                self.legacy_index.unlink(missing_ok=True)

    def cannot_write(self, error):
        self.writable = False
        self.say(f'cache: cannot write to {self.folder} ({error}); tokenizing in memory for this run')

    def consolidate(self, files, meta):
        """Write the tokens of every file of the dataset into one new consolidated file, in the order of the file
        names, unless the one the index names holds them already; afterwards every entry is a view of it. Each
        content is read and checked as it is written, so memory holds one file's tokens at a time. Returns False
        when nothing could be written (then the entries are read one by one, as a read-only cache is)."""
        order = list(dict.fromkeys(files[name]['hash'] for name in sorted(files)))
        order = [digest for digest in order if 'error' not in meta.get(digest, {'error': ''})]
        if self.packed is not None and self.packed[1] == order and all(
                digest in self.arrays and self.arrays[digest] is self.packed_tokens.get(digest) for digest in order):
            return True
        if not self.writable or not order:
            return False
        kept, lengths = [], []

        def write(tmp):
            with open(tmp, 'wb') as f:
                f.write(_npy_header(0))  # a placeholder of the same size, rewritten once the count is known
                for digest in order:
                    if not self.usable(digest, meta, None, keep=False):
                        continue
                    tokens = self.arrays.get(digest)
                    tokens = np.ascontiguousarray(self.load(digest, meta[digest], None) if tokens is None
                                                  else tokens, dtype='<u2')
                    f.write(memoryview(tokens).cast('B'))
                    kept.append(digest)
                    lengths.append(len(tokens))
                header = _npy_header(sum(lengths))
                assert len(header) == len(_npy_header(0))  # np.save pads every header to a multiple of 64 bytes
                f.seek(0)
                f.write(header)
        name = f"tokens-{self.key}-{hashlib.sha1(' '.join(order).encode()).hexdigest()[:12]}.npy"
        try:
            write_atomically(self.folder / name, write)
        except OSError as e:
            self.say(f'cache: cannot write {self.folder / name} ({e}); reading the token files one by one')
            return False
        if not kept:
            return False
        self.open_packed((name, kept, lengths), quiet=False)
        self.arrays.update((digest, self.packed_tokens[digest]) for digest in kept)
        return True

    def prune(self):
        """Delete the token files that no dataset's index refers to (their files changed or were removed), the
        per-content files whose tokens every index referring to them has in its consolidated file, and temporary
        files that a process killed while writing left behind an hour or more ago."""
        used = set()
        for path in self.index_paths():
            meta, packed = self.read_meta(path)
            if packed is not None:
                used.add(Path(packed[0]).stem)
                meta = set(meta).difference(packed[1])
            used.update(meta)
        for path in self.folder.glob('*.npy'):
            if path.stem not in used:
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in self.folder.glob('*.tmp'):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > 3600:  # old enough that no live writer still owns it
                    path.unlink()

    @contextlib.contextmanager
    def lock(self):
        """Hold the folder's lock file: processes (or nodes sharing cache_dir) update it one at a time. There is no
        lock without fcntl (Windows), on a read-only folder or a file system without locks; atomic writes still
        keep every reader safe there."""
        fd = self.open_lock_file()
        try:
            if fd is not None:
                self.acquire(fd)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def open_lock_file(self):
        if fcntl is None:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.folder / 'lock', os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None

    def acquire(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.say(f'cache: another process is updating {self.folder}; waiting for it')
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK on a network mount without lock support
            pass

    def entries(self, files, meta):
        """load_token_cache's result: name -> dict(meta, tokens=array or None); a source that could not be read is
        there with its reason as its error, so it is counted and named among the skipped files."""
        out = {name: {'error': reason, 'tokens': None} for name, reason in self.unreadable.items()}
        for name, entry in files.items():
            info = meta.get(entry['hash'], {'error': 'its token cache entry is damaged (see above)'})
            out[name] = dict(info, tokens=self.arrays.get(entry['hash']))
        return out


def load_token_cache(path, settings, cache_dir, num_workers=None, verbose=True):
    """Tokenize every MIDI file under path once and keep the tokens in cache_dir.

    The cache is keyed by each file's content hash and the tokenization settings: unchanged files (same size and
    mtime as last time) are not even read, renamed files and files another dataset in cache_dir holds are found by
    hash, new or changed ones are tokenized in parallel worker processes, removed ones are dropped from the index.
    Damaged cache entries are tokenized again. Returns a dict name -> {'tokens': uint16 array (memory-mapped when
    the cache is larger than a quarter of RAM) or None, 'n_notes', 'tempo', 'error'}.
    """
    _check_cache_dir(cache_dir)
    sources = find_midi_sources(path)
    cache = _CacheFolder(Path(cache_dir) / _settings_key(settings), path, verbose)
    # most runs change nothing: that is checked without the lock and without writing, so that readers run side by
    # side and a read-only cache works
    entries = _unchanged_entries(sources, cache)
    if entries is None:
        with cache.lock():
            entries = _update_cache(sources, settings, num_workers, cache)
    return entries


def _check_cache_dir(cache_dir):
    """DatasetError when cache_dir is a file or lies under one: nothing could ever be cached there, and every run
    would tokenize everything again. A folder that cannot be written is fine (tokens are then kept in memory)."""
    path = Path(cache_dir).absolute()
    in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise DatasetError(f'cache_dir {cache_dir}: {in_the_way} is a file, not a folder; give a folder for the '
                           f'token cache (it is created when missing)')


def _unchanged_entries(sources, cache):
    """The entries when every source is in the index with its old size and mtime and sound tokens in the
    consolidated file, else None."""
    files, meta = cache.read_index(quiet=True)
    if len(files) != len(sources) or cache.from_legacy:  # a legacy index.json is replaced by our own
        return None
    mmap = _mmap_mode(meta.values())
    for name, file, _ in sources:
        entry = files.get(name)
        if entry is None or entry['hash'] not in meta or entry['stamp'] != _stamp_or_none(file):
            return None
        if not cache.usable(entry['hash'], meta, mmap, quiet=True):
            return None
        digest = entry['hash']
        if 'error' not in meta[digest] and cache.packed_tokens.get(digest) is not cache.arrays[digest]:
            return None  # read from a file of its own: to be consolidated
    return cache.entries(files, meta)


def _update_cache(sources, settings, num_workers, cache):
    """Read and tokenize what is new, changed or damaged, save the index, then load_token_cache's result."""
    index_files, meta = cache.read_index()  # read again: the process we waited for may have done the work
    cache.damaged.clear()  # ... and healed what looked damaged before
    mmap = _mmap_mode(meta.values())
    files, to_read = {}, []
    for name, file, member in sources:
        old, stamp = index_files.get(name), _stamp_or_none(file)
        if old and old['stamp'] == stamp and cache.usable(old['hash'], meta, mmap):
            files[name] = old
        else:
            to_read.append((name, file, member))
    tokenized = set()
    with _SigtermStops(cache, tokenized):
        try:
            _read_and_tokenize(to_read, settings, num_workers, cache, files, meta, mmap, tokenized)
            # a legacy single index is ours when some of our files are in it unchanged; any other dataset's entries
            # in it stay protected until that dataset runs
            cache.legacy_adopted = cache.from_legacy and any(index_files.get(n) == f for n, f in files.items())
            if not cache.consolidate(files, meta) and tokenized:
                mmap = _mmap_mode(meta[f['hash']] for f in files.values())
                for digest in tokenized:
                    cache.usable(digest, meta, mmap)
        finally:  # the per-content files stay until an index names the consolidated file that holds them
            cache.write_index(files, meta)
    if cache.index_written:
        cache.prune()
    return cache.entries(files, meta)


def _read_and_tokenize(to_read, settings, num_workers, cache, files, meta, mmap, tokenized):
    """Read the sources to_read, hash them, and tokenize the contents the cache lacks, a batch of at most
    TOKENIZE_BATCH_FILES files or TOKENIZE_BATCH_BYTES bytes at a time. Fills files and meta; adds the digests
    tokenized to `tokenized`."""
    bar = tqdm(total=len(to_read), desc='tokenizing', unit='file', disable=not cache.verbose or not to_read)
    todo, todo_bytes, open_zips = {}, 0, {}
    try:
        for name, file, member in to_read:
            try:
                stamp = _stamp(file)
                data = _read_source(file, member, open_zips)
            except UNREADABLE as e:  # counted and named with the skipped files (load_corpus)
                cache.unreadable[name] = str(e) if isinstance(e, NotMidiFile) else f'cannot read ({e})'
                bar.update()
                continue
            digest = hashlib.sha1(data).hexdigest()
            files[name] = {'stamp': stamp, 'hash': digest}
            if digest in todo or digest in tokenized or cache.usable(digest, meta, mmap):
                bar.update()
                continue
            todo[digest] = data
            todo_bytes += len(data)
            if len(todo) >= TOKENIZE_BATCH_FILES or todo_bytes >= TOKENIZE_BATCH_BYTES:
                _tokenize_batch(todo, settings, num_workers, cache, files, meta, bar, tokenized)
                todo, todo_bytes = {}, 0
        if todo:
            _tokenize_batch(todo, settings, num_workers, cache, files, meta, bar, tokenized)
    finally:
        bar.close()
        for zf in open_zips.values():
            zf.close()


def _tokenize_batch(todo, settings, num_workers, cache, files, meta, bar, tokenized):
    """Tokenize new contents (digest -> bytes) in worker processes, storing each result as it arrives. The index is
    saved every INDEX_SAVE_SECONDS and when the run stops early (Ctrl-C), so the next run tokenizes only the rest."""
    jobs = [(digest, data, settings) for digest, data in todo.items()]
    workers = num_workers or min(len(jobs), os.cpu_count() or 1)
    next_save = time.monotonic() + INDEX_SAVE_SECONDS
    try:
        with contextlib.closing(_run_jobs(jobs, workers)) as results:  # closing stops the worker pool at once
            for digest, tokens, info in results:
                if tokens is not None:
                    cache.store(digest, tokens)
                meta[digest] = info
                tokenized.add(digest)
                bar.update()
                if time.monotonic() >= next_save:
                    cache.write_index(files, meta)
                    next_save = time.monotonic() + INDEX_SAVE_SECONDS
    finally:
        cache.write_index(files, meta)


class _Terminated(BaseException):
    """SIGTERM arrived while tokenizing: unwinds like Ctrl-C, so the index of the work done is saved."""


class _SigtermStops:
    """While the cache is being filled, SIGTERM (a scheduler, a container stop) saves the index of what is tokenized,
    says so in one line and exits 143, as a killed process would. Only where nobody else handles SIGTERM (a
    training run installs its own handler later) and in the main thread, where Python delivers signals."""

    def __init__(self, cache, tokenized):
        self.cache, self.tokenized, self.previous = cache, tokenized, None

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            self.previous = signal.signal(signal.SIGTERM, self.stop)

    @staticmethod
    def stop(signum, frame):
        raise _Terminated

    def __exit__(self, kind, error, traceback):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if kind is _Terminated:
            print(f'stopped by SIGTERM while tokenizing: {len(self.tokenized)} new files are kept in the cache '
                  f'({self.cache.folder}); the next run tokenizes only the rest', file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)


def _worker_signals():
    """In each tokenizing worker: Ctrl-C reaches every process of the terminal's group, and only the main process
    should act on it (it stops the pool, then saves the index). A worker that also raises KeyboardInterrupt prints a
    traceback and can die holding the pool's result lock, and the run then hangs instead of stopping. SIGTERM, which
    the pool sends its workers to stop them, ends a worker at once (the main process's handler is inherited by
    fork)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_jobs(jobs, workers):
    if workers > 1 and len(jobs) > 8:
        # fork where it exists: a spawned worker would re-import torch (seconds) before its first file
        context = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn'
        with multiprocessing.get_context(context).Pool(workers, initializer=_worker_signals) as pool:
            yield from pool.imap_unordered(_tokenize_job, jobs, chunksize=16)
    else:
        for job in jobs:
            yield _tokenize_job(job)
