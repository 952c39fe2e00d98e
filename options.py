"""Settings from the command line and config files, and one up-front check of every value.

Scripts keep their settings as plain attributes with a one-line comment each (training's `Args`); this module
turns those into `--field value` options and reads nanoGPT-style config files, so no option is written twice:

    python custom_training.py config/quick_cpu.py --max_steps 100

A config file is plain Python assigning fields (`dim = 256`), applied in order before the `--field value`
overrides. `check_args` then refuses a bad value before anything is built or written, with one line that names
the field, the value and what is allowed. Rules are keyed by field name, so every script that uses a name
(training, generate.py, evaluate.py) gets the same check. Standard library only: checking costs no torch import.
"""

import argparse
import difflib
import inspect
import math
import os
import re
import sys

from parts import parse_programs


class OptionError(ValueError):
    """A setting that cannot work; the message is one line naming the field, its value and what is allowed."""


# -----------------------------------------------------------------------------
# rules: each takes a value and returns None when it is allowed, else what is allowed ('an integer >= 1')

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)  # bool is a subclass of int: True is not 1 here


def _is_number(value):
    # an int is fine where a float is asked for; nan and inf pass every comparison test wrongly, so refuse them
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _range_text(min, max, min_open, max_open):
    if min is not None and max is not None:
        return f' in {"(" if min_open else "["}{min}, {max}{")" if max_open else "]"}'
    if min is not None:
        return f' {">" if min_open else ">="} {min}'
    if max is not None:
        return f' {"<" if max_open else "<="} {max}'
    return ''


def _in_range(value, min, max, min_open, max_open):
    return ((min is None or (value > min if min_open else value >= min)) and
            (max is None or (value < max if max_open else value <= max)))


def integer(min=None, max=None, even=False):
    allowed = f'{"an even" if even else "an"} integer' + (f' in {min}..{max}' if min is not None and max is not None
                                                         else _range_text(min, max, False, False))

    def rule(value):
        if _is_int(value) and _in_range(value, min, max, False, False) and not (even and value % 2):
            return None
        return allowed
    return rule


def number(min=None, max=None, min_open=False, max_open=False):
    allowed = 'a number' + _range_text(min, max, min_open, max_open)

    def rule(value):
        if isinstance(value, float) and not math.isfinite(value):  # say what is wrong with inf and nan
            return 'a finite' + allowed.removeprefix('a')
        return None if _is_number(value) and _in_range(value, min, max, min_open, max_open) else allowed
    return rule


def choice(*values):
    allowed = 'one of ' + ', '.join(repr(v) for v in values)

    def rule(value):
        return None if isinstance(value, str) and value in values else allowed
    return rule


def boolean():
    def rule(value):
        return None if isinstance(value, bool) else 'true or false'
    return rule


def string():
    def rule(value):
        return None if isinstance(value, str) else 'a string'
    return rule


def file_path():
    """A path as text; '' names no file (and a script's `if path:` would take it for the option not given)."""
    def rule(value):
        return None if isinstance(value, str) and value else 'a file path'
    return rule


def optional(inner, none_means=None):
    """None, or whatever `inner` allows; `none_means` says what None does ('off'), for the message."""
    def rule(value):
        if value is None:
            return None
        complaint = inner(value)
        return complaint and f'None{f" ({none_means})" if none_means else ""} or {complaint}'
    return rule


def writable_dir():
    """A folder that exists and is writable, or could be made: its nearest existing ancestor is a writable folder.
    Nothing is created here: a refused run leaves no empty folders behind."""
    def rule(value):
        if not isinstance(value, str) or not value:
            return 'a folder path'
        path = os.path.abspath(value)
        if os.path.exists(path) and not os.path.isdir(path):
            return 'a folder, not an existing file'
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            return f'a folder we can create, but {path} is a file'
        if not os.access(path, os.W_OK | os.X_OK):
            return f'a folder we can write to, but {path} is not writable'
        return None
    return rule


def device_name():
    # syntax only: whether cuda or mps is present is decided where the device is set up
    def rule(value):
        ok = isinstance(value, str) and re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', value)
        return None if ok else "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"
    return rule


EVERY = integer(min=1)  # step intervals, counts and lengths
# new tokens per generated piece: about 33,000 notes, hours of melody. Every step appends to the whole sequence (and
# the repeat memory compares against all of it), so time grows with the square of the length: a length beyond this
# would run for days, and is far more likely a typo than a wish
MAX_GENERATE_LENGTH = 100_000
GENERATE_LENGTH = integer(min=1, max=MAX_GENERATE_LENGTH)
# set_tempo stores microseconds per quarter in 3 bytes, so below ~3.6 bpm it overflows; 1000 bpm is beyond any music
BPM = optional(number(min=4, max=1000), 'the training set median')
FOLDER = writable_dir()


def program_list():
    """'melody=73,bass=33': a GM program (0-127) per role of tracks='parts' (parts.parse_programs reads it)."""
    def rule(value):
        try:
            parse_programs(value)
        except (AttributeError, ValueError):
            return ("role=program pairs, each role once, e.g. 'melody=73,bass=33' (roles melody, bass, harmony, drums; "
                    "programs 0-127)")
        return None
    return rule

RULES = {
    # model
    'seq_len': integer(min=1),
    'dim': integer(min=1),
    'depth': integer(min=1),
    'heads': integer(min=1),
    'dim_head': integer(min=2, even=True),  # rotary embeddings rotate pairs of channels
    'dropout': number(min=0, max=1, max_open=True),  # 1 would zero every activation
    'attn_dropout': number(min=0, max=1, max_open=True),
    'prev_tokens': integer(min=0, max=16),  # a note is 2-3 tokens: 16 reach back about 6 notes
    'tune_clock': boolean(),
    'tune_length': boolean(),
    'tune_key': boolean(),
    'tune_labels': boolean(),
    # optimisation
    'batch_size': integer(min=1),
    'grad_accum': integer(min=1),
    'lr': number(min=0, min_open=True),
    'weight_decay': number(min=0),
    'grad_clip': number(min=0),  # 0 = off
    'num_epochs': integer(min=1),
    'max_steps': optional(integer(min=1), 'num_epochs decides'),
    'lr_schedule': choice('constant', 'cosine'),
    'warmup_steps': integer(min=0),
    'min_lr': number(min=0),
    # data
    'data_path': string(),
    'cache_dir': string(),
    'val_fraction': number(min=0, max=1, max_open=True),  # 1 would leave nothing to train on
    'min_notes': integer(min=0),
    'aug': boolean(),
    'pack': boolean(),
    'tune_mask': boolean(),
    'aug_range': integer(min=0, max=24),  # two octaves either way; wider pushes most tunes off the 0..127 pitches
    'timing': choice('ms', 'beats'),
    'beat_division': integer(min=1, max=96),  # 96 steps a beat is finer than any notated rhythm
    'include_drums': boolean(),
    'tracks': choice('all', 'melody', 'parts'),
    'num_workers': integer(min=0),
    'align_windows': boolean(),
    'voice_leading_loss': number(min=0, max=100),  # a weight; past 100 the penalty swamps the cross-entropy
    'voice_leading_floor': optional(number(min=0, max=1, min_open=True), 'the -log(1 - p) penalty'),
    'condition': boolean(),
    'condition_dropout': number(min=0, max=1),  # 1: the header is never seen whole
    'tonic_ending_loss': number(min=0, max=100),  # a weight, as voice_leading_loss's
    # logging, validation, samples, checkpoints
    'print_stats_every': EVERY,
    'validate_every': EVERY,
    'val_tokens': optional(integer(min=1), 'the whole validation split'),
    'generate_every': EVERY,
    'save_every': EVERY,
    'generate_length': GENERATE_LENGTH,
    'prompt_length': integer(min=0),  # 0 = start token only
    'temperature': number(min=0),  # 0 = greedy
    'grammar_constrained': boolean(),
    # above 0.5 most pieces lock into a loop within a few hundred tokens (README), and past 0.9 the weight rounds to 1
    'repeat_memory': number(min=0, max=0.5),
    'voice_leading': boolean(),
    'guidance': number(min=0, max=10),  # generate.py and evaluate.py: 1 = off; the bound takes 15 for the typo it is
    'end_guidance': optional(number(min=0, max=10), 'as guidance'),
    'top_p': optional(number(min=0, max=1, min_open=True), 'off'),  # 0 would keep no token: None turns it off
    'top_k': optional(integer(min=1), 'off'),
    'output_tempo': BPM,
    'programs': optional(program_list(), "the training set's most common"),
    'audio': boolean(),
    'save_dir': FOLDER,
    'samples_dir': FOLDER,
    'checkpoint': optional(string()),
    'init_from': optional(string(), 'new weights'),
    # machine
    'device': device_name(),
    'dtype': choice('auto', 'bfloat16', 'float16', 'float32'),
    'compile': boolean(),
    'threads': integer(min=0),  # 0 = one a core
    'seed': integer(min=0, max=2**32 - 1),  # the range every seeding API (numpy's too) accepts
    'max_bad_steps': integer(min=1),
    # names only generate.py / evaluate.py use
    'num_samples': EVERY,
    'length': GENERATE_LENGTH,  # generate.py: new tokens per sample
    'prompt_notes': EVERY,
    'tempo': BPM,
    'sample_length': optional(GENERATE_LENGTH, 'the median held-out piece length'),
    'ngram': integer(min=1, max=6),  # counts of longer n-grams are too sparse to say anything
    'c2st_pieces': EVERY,  # evaluate.py: generated pieces for the classifier two-sample test
    'c2st_notes': integer(min=2),  # an interval needs two notes
    'no_c2st': boolean(),
    'output_dir': FOLDER,
    'prompt': optional(file_path(), 'no prompt'),
}


def _show(value):
    return repr(value) if isinstance(value, str) else str(value)


def _cross_check(args, names):
    """Rules between fields, checked once each field alone is fine."""
    # the constant schedule never reads min_lr, so a small --lr there must not trip over min_lr's default
    if {'lr', 'min_lr', 'lr_schedule'} <= set(names) and args.lr_schedule == 'cosine' and args.min_lr > args.lr:
        raise OptionError(f'--min_lr {_show(args.min_lr)}: must be <= --lr ({_show(args.lr)}) '
                          f'with the cosine schedule, which decays from lr down to min_lr')
    # training's own samples: only tracks='parts' has a melody and a bass to lead (generate.py checks the checkpoint)
    if {'voice_leading', 'tracks'} <= set(names) and args.voice_leading and args.tracks != 'parts':
        raise OptionError(f"--voice_leading true: needs --tracks parts (got {args.tracks!r}, which has no melody and "
                          f"bass roles)")
    if {'voice_leading_loss', 'tracks'} <= set(names) and args.voice_leading_loss and args.tracks != 'parts':
        raise OptionError(f"--voice_leading_loss {_show(args.voice_leading_loss)}: needs --tracks parts (got "
                          f"{args.tracks!r}, which has no melody and bass roles; 0 turns it off)")
    # aligned windows are cut from the tunes laid end to end; with pack off each window is a crop of one tune from a
    # random start, and the option would be ignored without a word
    if {'align_windows', 'pack'} <= set(names) and args.align_windows and not args.pack:
        raise OptionError('--align_windows true: needs --pack true (windows are aligned to tune starts in the packed '
                          'stream; --pack false crops each tune from a random start)')
    if {'voice_leading_floor', 'voice_leading_loss'} <= set(names) and args.voice_leading_floor is not None \
            and not args.voice_leading_loss:
        raise OptionError(f'--voice_leading_floor {_show(args.voice_leading_floor)}: needs --voice_leading_loss '
                          f'above 0 (the floor shapes that loss term, which is off)')
    if {'tonic_ending_loss', 'condition'} <= set(names) and args.tonic_ending_loss and not args.condition:
        raise OptionError(f'--tonic_ending_loss {_show(args.tonic_ending_loss)}: needs --condition true (the key '
                          f'whose tonic a tune should end on is in its header; 0 turns it off)')
    if {'tune_key', 'condition'} <= set(names) and args.tune_key and not args.condition:
        raise OptionError('--tune_key true: needs --condition true (the key is read from a tune\'s header; false turns '
                          'it off)')
    if {'tune_labels', 'condition'} <= set(names) and args.tune_labels and not args.condition:
        raise OptionError('--tune_labels true: needs --condition true (the labels are a tune\'s header; false turns it '
                          'off)')
    # training's own samples: only a conditioned model has a header to lean towards
    if {'guidance', 'condition'} <= set(names) and args.guidance != 1 and not args.condition:
        raise OptionError(f'--guidance {_show(args.guidance)}: needs --condition true (classifier-free guidance '
                          f'leans towards what a header asks; 1 turns it off)')
    if {'end_guidance', 'condition'} <= set(names) and args.end_guidance not in (None, 1) and not args.condition:
        raise OptionError(f'--end_guidance {_show(args.end_guidance)}: needs --condition true (the end leans towards '
                          f'the key a header asks; none turns it off)')


def check_args(args, names=None, rules=RULES):
    """Raise OptionError('--seq_len 0: must be an integer >= 1') for the first field of args that breaks its rule.

    `names` limits the check to those fields (default: all of them); a field without a rule is left alone.
    `rules` lets a script whose field means something else when None widen one rule, e.g.
    `check_args(args, rules={**RULES, 'dtype': optional(RULES['dtype'])})`."""
    fields = vars(args)
    names = list(fields) if names is None else [n for n in names if n in fields]
    for name in names:
        complaint = rules[name](fields[name]) if name in rules else None
        if complaint:
            raise OptionError(f'--{name} {_show(fields[name])}: must be {complaint}')
    _cross_check(args, names)


def exit_on_bad_args(args, names=None, rules=RULES):
    """check_args, and on a bad value print one 'error: ...' line to stderr and exit 2, before anything is written."""
    try:
        check_args(args, names, rules)
    except OptionError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# command line and config files

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: 'error: ...' and exit 2, no usage block above it (--help has it)."""

    def error(self, message):
        self.exit(2, f'error: {message}\n')


TRUE_WORDS = ('1', 'true', 'yes', 'on')
FALSE_WORDS = ('0', 'false', 'no', 'off')


def parse_bool(text):
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


class _StoreNot(argparse.Action):
    """`--no-name` alone stores False; `--no-name true|false` stores the word's opposite."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not values)


def add_switch(parser, name, default=False, help=None):
    """An on/off option written every way a user may try: `--name` alone, `--name true` or `--name false` (the
    training script's `--field value`), and `--no-name` or `--no_name` for off, which a word turns round as it
    reads (`--no_name false` is on; the no-form is left out where the name starts with no_: `--no_stop false`
    says it already)."""
    parser.add_argument(f'--{name}', type=parse_bool, nargs='?', const=True, default=default,
                        metavar='true|false', help=help)
    if not name.startswith('no_'):
        parser.add_argument(f'--no-{name}', f'--no_{name}', dest=name, action=_StoreNot, type=parse_bool, nargs='?',
                            const=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _value_parser(default):
    """Text -> value, read the way the field's default is typed; 'none' or 'null' gives None for any field."""
    def parse(text):
        word = text.strip().lower()
        if word in ('none', 'null'):
            return None
        if isinstance(default, bool):
            return parse_bool(text)
        if isinstance(default, (int, float)) or default is None:
            if not isinstance(default, float):
                try:
                    return int(text)  # before float: large ints (seeds) keep every digit
                except ValueError:
                    pass
            try:
                value = float(text)
            except ValueError:
                if default is None:
                    return text  # an optional string, e.g. a checkpoint path
                raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
            # '1e3' is 1000 for an integer field; '2.5' stays 2.5 so check_args can refuse it by name
            return int(value) if isinstance(default, int) and value.is_integer() else value
        return text
    return parse


def field_comments(args):
    """{field: its trailing comment} from the source of args' class, for --help; {} when there is no source."""
    try:
        source = inspect.getsource(type(args))
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r'self\.(\w+)\s*=.*?#\s*(.*)', source))


def apply_config(args, path):
    """Run a config file (plain Python) in an empty namespace and copy what it assigns onto args; returns the names
    it set. Names starting with '_' and imported modules, functions and classes are the file's own helpers."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise OptionError(f'config file {path}: not a regular file')
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except OSError as e:
        raise OptionError(f'config file {path}: cannot read it ({e.strerror or e})') from None
    except UnicodeDecodeError as e:
        raise OptionError(f'config file {path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); '
                          f'save it as UTF-8') from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)  # noqa: S102  the user's own settings file, as in nanoGPT
    except Exception as e:  # noqa: BLE001  whatever a config raises, report it as one line naming the file
        raise OptionError(f'config file {path}: {type(e).__name__}: {e}') from None
    fields, assigned = vars(args), []
    for name, value in namespace.items():
        if name.startswith('_') or inspect.ismodule(value) or callable(value):
            continue
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ''
            raise OptionError(f'config file {path}: {name!r} is not a setting{hint}')
        setattr(args, name, value)
        assigned.append(name)
    return assigned


def parse_args(args, argv=None, description=None):
    """Fill `args` (an object with plain attributes, e.g. an Args instance) from config files and --field value.

    Every attribute becomes `--name value`, read the way its default is typed; the help text is the field's
    comment in the source of args' class. Positional `*.py` arguments are config files, applied in order before
    any --name value, wherever they stand on the line. Returns args."""
    return parse_args_and_given(args, argv, description)[0]


def parse_args_and_given(args, argv=None, description=None):
    """parse_args, and the names of the fields a config file or the command line set, in the order first set
    (a resumed run takes every other setting from its checkpoint)."""
    defaults = dict(vars(args))
    comments = field_comments(args)
    parser = ArgumentParser(description=description)
    parser.add_argument('config_files', nargs='*', metavar='config.py',
                        help='config files (Python assigning fields, e.g. dim = 256), applied in order')
    for name, default in defaults.items():
        # SUPPRESS keeps options the user did not give out of the result, so they cannot undo a config file
        parser.add_argument(f'--{name}', type=_value_parser(default), default=argparse.SUPPRESS, metavar='V',
                            help=f'{comments.get(name, "")} (default: {default})'.replace('%', '%%'))
    given = vars(parser.parse_intermixed_args(argv))
    names = []
    for path in given.pop('config_files'):
        if not path.endswith('.py'):
            parser.error(f'{path!r}: config files are Python files ending in .py; settings are --name value')
        try:
            names += apply_config(args, path)
        except OptionError as e:
            parser.exit(2, f'error: {e}\n')
    for name, value in given.items():
        setattr(args, name, value)
    names += given
    return args, list(dict.fromkeys(names))
