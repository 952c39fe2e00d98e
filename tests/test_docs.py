"""The docs tell the truth about the commands: every command line in the README and docs/ that runs one of the
repository's scripts parses with that script's own option rules (checked without running the script's work), every
relative link and image exists, and the README's settings table holds `Args()`'s defaults.

A script's rules are its own parser: custom_training.py's comes from options.parse_args over `Args`, with config
files applied and every value checked as a real run checks it; the argparse scripts are run with argparse stopped
right after parsing (and after options' value check, where the script makes one), so their own parser, defaults
and types decide. A flag must be spelled out in full: argparse would take an unambiguous prefix, but a prefix in the
docs breaks as soon as another option starts the same way.
"""

import argparse
import ast
import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

import options

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')), ROOT / 'benchmarks' / 'README.md']
TRAINING = 'custom_training.py'
# scripts that hand the options they do not know to another script
PASSES_ON = {'benchmarks/bench_time_to_quality.py': TRAINING}


class DocError(AssertionError):
    """A command or link in the docs that does not work."""


# -----------------------------------------------------------------------------
# finding commands and links in markdown

FENCE = re.compile(r'^```.*?$(.*?)^```', re.MULTILINE | re.DOTALL)
INLINE = re.compile(r'`([^`\n]+)`')
STARTS = ('python', 'python3', 'torchrun', 'bash')


def _words(command):
    """The command's words after any leading VAR=value settings."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r'\w+=.*', words[0]):
        words.pop(0)
    return words


def commands_in(text):
    """Command lines of a markdown text that start a program: the lines of fenced blocks (backslash continuations
    joined, comments dropped) and inline code that begins with python, torchrun or bash; each `&&` part apart."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace('\\\n', ' ').splitlines()
    lines += INLINE.findall(FENCE.sub('', text))
    commands = []
    for line in lines:
        for part in line.split('&&'):
            part = part.strip()
            words = _words(part) if part else []
            if words and words[0] in STARTS and part not in commands:
                commands.append(part)
    return commands


LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)|<img[^>]*\bsrc="([^"]+)"')


def broken_links(doc, text):
    """Relative link and image targets of a markdown text (outside code) that do not exist, relative to doc."""
    text = INLINE.sub('', FENCE.sub('', text))
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r'[a-z][a-z0-9+.-]*:', target, re.IGNORECASE) or target.startswith('#'):
            continue  # a web address, mailto: or an anchor in the same page
        path = target.split('#')[0]
        resolved = ROOT / path.lstrip('/') if path.startswith('/') else doc.parent / path
        if not resolved.exists():
            broken.append(target)
    return broken


# -----------------------------------------------------------------------------
# checking a command with its script's own rules

class _Parsed(Exception):
    """Raised in place of the script's work once its options are parsed (and checked)."""

    def __init__(self, parser, namespace, extra):
        super().__init__()
        self.parser, self.namespace, self.extra = parser, namespace, extra


def _training_args():
    from custom_training import Args  # the real class: importing the script runs no training
    return Args


def _check_training(argv):
    if argv in (['--help'], ['-h']):
        return
    names = {f'--{name}' for name in vars(_training_args()())} | {'--help', '-h'}
    _full_names(argv, names, TRAINING)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = options.parse_args(_training_args()(), argv)
        options.check_args(args)
    except SystemExit as e:
        raise DocError(f'{TRAINING} {shlex.join(argv)}: {stderr.getvalue().strip() or e}') from None
    except options.OptionError as e:
        raise DocError(f'{TRAINING} {shlex.join(argv)}: {e}') from None


def _full_names(argv, names, script):
    for word in argv:
        if word == '--':
            break
        flag = word.split('=')[0]
        if flag.startswith('-') and flag not in names and not re.fullmatch(r'-\d.*', flag):
            raise DocError(f'{script}: {flag} is not one of its options')


def _run_parser(script, argv):
    """Run script with argv until its options are parsed (and value-checked, where it calls
    options.exit_on_bad_args); return what its parser made of them. SystemExit from the parser is a DocError."""
    path = ROOT / script
    checks_values = 'exit_on_bad_args(' in path.read_text(encoding='utf-8')
    real_known, real_args, real_check = (argparse.ArgumentParser.parse_known_args,
                                         argparse.ArgumentParser.parse_args, options.exit_on_bad_args)
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            namespace, extra = real_known(self, args, namespace)
        finally:
            depth[0] -= 1
        if depth[0] == 0:  # the script's own call, not parse_args' inner one
            raise _Parsed(self, namespace, extra)
        return namespace, extra

    def parse_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            namespace = real_args(self, args, namespace)
        finally:
            depth[0] -= 1
        if not checks_values:
            raise _Parsed(self, namespace, [])
        parsers.append(self)
        return namespace

    def exit_on_bad_args(args, *rest, **kwargs):
        real_check(args, *rest, **kwargs)
        raise _Parsed(parsers[-1] if parsers else None, args, [])

    parsers = []
    stderr, argv_before = io.StringIO(), sys.argv
    argparse.ArgumentParser.parse_known_args = parse_known_args
    argparse.ArgumentParser.parse_args = parse_args
    options.exit_on_bad_args = exit_on_bad_args
    sys.argv = [str(path), *argv]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name='__main__')
    except _Parsed as parsed:
        return parsed
    except SystemExit as e:
        if e.code == 0 and argv in (['--help'], ['-h']):
            return None
        raise DocError(f'{script} {shlex.join(argv)}: {stderr.getvalue().strip() or f"exit {e.code}"}') from None
    finally:
        argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = real_known, real_args
        options.exit_on_bad_args = real_check
        sys.argv = argv_before
    raise DocError(f'{script}: its options were never parsed; this check cannot see its rules')


def _check_sys_argv_script(script, argv):
    """A script that reads sys.argv itself takes positionals only, as many as the sys.argv[N] it reads."""
    source = (ROOT / script).read_text(encoding='utf-8')
    most = max((int(n) for n in re.findall(r'sys\.argv\[(\d+)\]', source)), default=0)
    if any(word.startswith('-') for word in argv):
        raise DocError(f'{script} takes no options, only up to {most} arguments: {shlex.join(argv)}')
    if len(argv) > most:
        raise DocError(f'{script} takes at most {most} arguments, the docs give {len(argv)}: {shlex.join(argv)}')


def check_script(script, argv):
    if not (ROOT / script).is_file():
        raise DocError(f'{script}: no such script in the repository')
    if script == TRAINING:
        return _check_training(argv)
    if 'ArgumentParser' not in (ROOT / script).read_text(encoding='utf-8'):
        return _check_sys_argv_script(script, argv)
    parsed = _run_parser(script, argv)
    if parsed is None:
        return
    passed_on = parsed.extra if script in PASSES_ON else []
    if parsed.extra and not passed_on:
        raise DocError(f'{script}: unknown arguments {shlex.join(parsed.extra)}')
    own = list(argv)
    for word in passed_on:
        own.remove(word)
    if parsed.parser is not None:
        _full_names(own, set(parsed.parser._option_string_actions), script)
    if passed_on:
        check_script(PASSES_ON[script], passed_on)
    if script == 'tools/c2st_seeds.py' and parsed.namespace.evaluate_args:
        check_script('evaluate.py', ['--checkpoint', 'CHECKPOINT', *parsed.namespace.evaluate_args])


def check_command(command):
    """Raise DocError when a command line of the docs would not be accepted by the script it runs."""
    words = _words(command)
    program, rest = words[0], words[1:]
    if program == 'bash':
        if not rest or not (ROOT / rest[0]).is_file():
            raise DocError(f'{command}: no such shell script in the repository')
        return
    if program == 'torchrun':
        scripts = [i for i, w in enumerate(rest) if w.endswith('.py')]
        if not scripts:
            raise DocError(f'{command}: torchrun without a script')
        rest = rest[scripts[0]:]
    elif rest[:1] == ['-m']:
        return  # a module of an installed package (python -m pytest), not a script of this repository
    if not rest:
        raise DocError(f'{command}: no script')
    check_script(rest[0], rest[1:])


# -----------------------------------------------------------------------------
# the README's settings table

def settings_table(text):
    """{field: default} from the markdown table whose header starts with `| field | default |`."""
    rows, inside = {}, False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and cells[:2] == ['field', 'default']:
            inside = True
            continue
        if not inside:
            continue
        if not line.startswith('|'):
            break
        if set(cells[0]) <= set('-: '):
            continue
        name, default = cells[0].strip('`'), cells[1].strip('`')
        if name in rows:
            raise DocError(f'settings table: {name} twice')
        rows[name] = ast.literal_eval(default)
    return rows


def settings_table_mismatches(table, defaults):
    wrong = []
    for name, value in table.items():
        if name not in defaults:
            wrong.append(f'{name} is not an Args field')
        elif type(value) is not type(defaults[name]) or value != defaults[name]:
            wrong.append(f'{name}: the table says {value!r}, Args says {defaults[name]!r}')
    return wrong


# -----------------------------------------------------------------------------
# the docs

def _doc_commands():
    return [pytest.param(doc, command, id=f'{doc.relative_to(ROOT)}: {command[:60]}')
            for doc in DOCS for command in commands_in(doc.read_text(encoding='utf-8'))]


@pytest.fixture(autouse=True)
def at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config files and scripts are named relative to the repository root
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.parametrize('doc, command', _doc_commands())
def test_every_command_in_the_docs_parses_with_its_scripts_own_rules(doc, command):
    check_command(command)


def test_the_docs_name_the_commands_a_newcomer_needs():
    commands = commands_in((ROOT / 'README.md').read_text(encoding='utf-8'))
    assert 'pip install -r requirements-test.txt && python -m pytest tests' in \
        (ROOT / 'README.md').read_text(encoding='utf-8')  # .ci/run reads this line
    for needed in ('python generate.py', 'python custom_training.py config/quick_cpu.py', 'python evaluate.py'):
        assert any(c.startswith(needed) for c in commands), needed


@pytest.mark.parametrize('doc', DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_and_image_in_the_docs_exists(doc):
    assert broken_links(doc, doc.read_text(encoding='utf-8')) == []


def test_the_readme_settings_table_holds_the_args_defaults():
    table = settings_table((ROOT / 'README.md').read_text(encoding='utf-8'))
    assert len(table) >= 10
    assert settings_table_mismatches(table, vars(_training_args()())) == []


# -----------------------------------------------------------------------------
# the checker itself: made-up doc lines it must refuse

@pytest.mark.parametrize('command', [
    'python generate.py --num_smaples 4',                              # a mistyped flag
    'python generate.py --num_sample 4',                               # a prefix argparse alone would take
    'python generate.py --num_samples four',                           # a value of the wrong type
    'python generate.py --temperature -1',                             # a value options' rules refuse
    'python custom_training.py --max_stpes 100',
    'python custom_training.py --seq_len 0',
    'python custom_training.py config/no_such_config.py',
    'OMP_NUM_THREADS=1 python custom_training.py config/quick_cpu.py --dimm 64',
    'torchrun --nproc_per_node=2 custom_training.py --lr fast',
    'python evaluate.py --checkpoint best.pt --c2st_peices 10',
    'python benchmarks/bench_time_to_quality.py config/quick_cpu.py --minutes 8 --max_step 10',
    'python benchmarks/bench_model.py --device tpu',
    'python tools/c2st_seeds.py --checkpoint a.pt --work_dir w --output o -- --no_c2sst',
    'python tools/c2st_seeds.py --checkpoint a.pt --output o',        # a required option missing
    'python tools/ship_model.py a.pt b.pt c d.pt',                      # more arguments than it reads
    'python benchmarks/bench_data.py --fast',
    'python no_such_script.py',
    'bash benchmarks/no_such.sh',
])
def test_the_checker_refuses_a_command_its_script_would_refuse(command):
    with pytest.raises(DocError):
        check_command(command)


@pytest.mark.parametrize('command', [
    'python generate.py --num_samples 4 --top_p none --no_audio',
    'python custom_training.py config/quick_cpu.py --max_steps 5000 --aug false --checkpoint none',
    'torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST custom_training.py config/quick_gpu.py',
    'python benchmarks/bench_time_to_quality.py config/quick_cpu.py --minutes 8 --prev_tokens 6',
    'python tools/c2st_seeds.py --checkpoint a.pt --work_dir w --output o -- --no_c2st',
    'python tools/ship_model.py content/checkpoints/best.pt models/x.pt',
    'python custom_training.py --help',
])
def test_the_checker_accepts_what_the_script_accepts(command):
    check_command(command)


def test_commands_are_found_in_fences_and_inline_code_but_not_in_prose():
    text = ('Run `python generate.py --length 8` or not.\n\n```bash\npip install x && python a.py \\\n    --b 1  # c\n'
            'echo hi\n```\nThen python b.py in prose, and `--flag` alone.\n')
    assert commands_in(text) == ['python a.py      --b 1  # c', 'python generate.py --length 8']


def test_a_missing_link_or_image_is_reported_and_web_links_are_not(tmp_path):
    doc = tmp_path / 'doc.md'
    (tmp_path / 'here.md').write_text('')
    text = ('[a](here.md) [b](missing.md#part) ![c](img/none.png) [d](https://example.com/x) [e](#anchor) '
            '`[f](in_code.md)`')
    assert broken_links(doc, text) == ['missing.md#part', 'img/none.png']


def test_a_settings_table_row_that_differs_from_args_is_reported():
    text = ('| field | default | meaning |\n| --- | --- | --- |\n| `lr` | `3e-3` | x |\n| `dimm` | `4` | y |\n'
            '| `aug` | `1` | z |\n\nafter the table\n| `seed` | `0` | not a row of it |\n')
    table = settings_table(text)
    assert settings_table_mismatches(table, {'lr': 3e-4, 'aug': True}) == [
        "lr: the table says 0.003, Args says 0.0003", 'dimm is not an Args field',
        'aug: the table says 1, Args says True']
