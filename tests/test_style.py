"""The code style the repo keeps (ruff.toml: pyflakes, pycodestyle and import order at 120 columns), checked by
the test command so a style slip fails like any other test."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_ruff_finds_nothing_to_complain_about():
    ruff = shutil.which('ruff') or shutil.which('ruff', path=str(ROOT / '.venv' / 'bin'))
    command = [ruff] if ruff else [sys.executable, '-m', 'ruff']
    try:
        proc = subprocess.run(command + ['check', '--no-cache', '--output-format', 'concise', '.'], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail('ruff is not installed: pip install -r requirements-test.txt')
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
