"""benchmarks/bench_scale.py: what it refuses before minutes of measuring start."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize('option, value', [('--sizes', '1,x'), ('--sizes', ','), ('--sizes', '-5'), ('--sizes', '0'),
                                           ('--sizes', '100,,300'), ('--workers', '0'), ('--ab_files', 'many')])
def test_a_malformed_count_is_one_line_naming_the_option_and_what_is_allowed(option, value):
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_scale.py'), option, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == '', proc.stdout
    assert proc.stderr.startswith(f'error: argument {option}: {value!r}: expected ') and proc.stderr.count('\n') == 1
