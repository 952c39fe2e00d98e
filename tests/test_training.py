"""End-to-end: `python custom_training.py --...` as a user runs it, resuming, torchrun, and generate.py."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_training
from tests.test_dataset import make_folder, melody, write_midi

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--dim', '32', '--depth', '2', '--heads', '2', '--dim_head', '16', '--seq_len', '32', '--batch_size', '4',
        '--grad_accum', '2', '--generate_length', '24', '--prompt_length', '8', '--min_notes', '10',
        '--print_stats_every', '2', '--dtype', 'float32']


def run(args, cwd, check=True, timeout=240, torchrun=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    cmd = [sys.executable, str(ROOT / 'custom_training.py')] + args
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] + cmd[1:]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data') / 'midi', n=16, notes=80)


def paths(tmp, name):
    return ['--data_path', str(tmp.parent / 'data'), '--cache_dir', str(tmp / 'cache'),
            '--save_dir', str(tmp / name / 'ckpt'), '--samples_dir', str(tmp / name / 'samples')]


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """One tiny run that writes everything a user looks at."""
    tmp = tmp_path_factory.mktemp('run')
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp / 'cache'), '--save_dir', str(tmp / 'ckpt'),
                   '--samples_dir', str(tmp / 'samples'), '--max_steps', '6', '--validate_every', '3',
                   '--generate_every', '3', '--save_every', '3']
    proc = run(args, cwd=tmp)
    return tmp, proc


def test_tiny_training_run_writes_plot_metrics_samples_and_checkpoints(trained):
    tmp, proc = trained
    for name in ('ckpt/training_progress.png', 'ckpt/metrics.csv', 'ckpt/latest.pt', 'ckpt/best.pt',
                 'samples/sample_step_3.mid', 'samples/sample_step_3.png', 'samples/sample_step_6.mid'):
        assert (tmp / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp / 'ckpt/metrics.csv')))
    assert [r['step'] for r in rows] == ['2', '3', '4', '6']
    assert rows[1]['val_loss'] and 0 <= float(rows[1]['val_acc']) <= 1
    assert 'parameters' in proc.stdout.lower() and 'precision float32' in proc.stdout
    ckpt = torch.load(tmp / 'ckpt/latest.pt', weights_only=True)
    assert ckpt['step'] == 6 and ckpt['tokenization']['timing'] == 'ms' and ckpt['args']['dim'] == 32
    assert {'model_state_dict', 'optimizer_state_dict', 'loss', 'rng_state'} <= set(ckpt)


def test_resumed_run_ends_where_an_unbroken_run_would(data, tmp_path):
    common = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--validate_every', '100',
                     '--generate_every', '100', '--save_every', '4', '--max_steps', '8']
    run(common + ['--save_dir', str(tmp_path / 'full'), '--samples_dir', str(tmp_path / 's1')], cwd=tmp_path)
    part = ['--save_dir', str(tmp_path / 'part'), '--samples_dir', str(tmp_path / 's2')]
    run(common[:-1] + ['5'] + part, cwd=tmp_path)  # stops at step 5 with a checkpoint saved at step 4 ...
    shutil.copy(tmp_path / 'part' / 'latest.pt', tmp_path / 'part' / 'at5.pt')
    run(common + part + ['--checkpoint', str(tmp_path / 'part' / 'at5.pt')], cwd=tmp_path)
    full = torch.load(tmp_path / 'full' / 'latest.pt', weights_only=True)
    resumed = torch.load(tmp_path / 'part' / 'latest.pt', weights_only=True)
    assert full['step'] == resumed['step'] == 8
    assert abs(full['loss'] - resumed['loss']) < 1e-4
    for key, value in full['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=1e-4, atol=1e-5)


def test_two_process_torchrun_keeps_ranks_in_sync(data, tmp_path):
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '4',
                   '--validate_every', '2', '--generate_every', '4', '--save_every', '4']
    proc = run(args, cwd=tmp_path, torchrun=2)
    assert '(2 processes)' in proc.stdout
    assert 'ranks in sync: True' in proc.stdout
    assert (tmp_path / 'ckpt' / 'latest.pt').exists() and (tmp_path / 'samples' / 'sample_step_4.mid').exists()


def test_empty_data_folder_stops_with_a_clear_message(tmp_path):
    (tmp_path / 'nothing').mkdir()
    proc = run(TINY + ['--data_path', str(tmp_path / 'nothing'), '--cache_dir', str(tmp_path / 'c')],
               cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert 'no MIDI files' in proc.stderr and 'Traceback' not in proc.stderr


def test_help_lists_every_args_field_with_its_default(tmp_path):
    proc = run(['--help'], cwd=tmp_path)
    for name, value in vars(custom_training.Args()).items():
        assert f'--{name}' in proc.stdout
    assert 'sequence length for training' in proc.stdout and '(default: 100)' in proc.stdout


def test_command_line_overrides_parse_numbers_booleans_and_none():
    args = custom_training.parse_args(['--dim', '64', '--lr', '1e-3', '--aug', 'false', '--max_steps', '7',
                                       '--top_p', 'none', '--checkpoint', 'latest', '--top_k', '5'])
    assert args.dim == 64 and isinstance(args.dim, int) and args.lr == 1e-3 and args.aug is False
    assert args.max_steps == 7 and args.top_p is None and args.checkpoint == 'latest' and args.top_k == 5
    with pytest.raises(SystemExit):
        custom_training.parse_args(['--aug', 'maybe'])


def test_generate_writes_samples_from_a_checkpoint(trained, tmp_path):
    tmp, _ = trained
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(tmp / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path), '--num_samples', '2', '--length', '40', '--no_audio']
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    assert (tmp_path / 'sample_0.mid').exists() and (tmp_path / 'sample_1.png').exists()


def test_generate_continues_a_prompt_keeping_it_verbatim(trained, tmp_path):
    import TMIDIX
    tmp, _ = trained
    prompt = write_midi(tmp_path / 'tune.mid', melody(30, seed=5))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / 'generate.py'), '--checkpoint', str(tmp / 'ckpt' / 'latest.pt'),
           '--output_dir', str(tmp_path / 'out'), '--num_samples', '1', '--length', '30', '--prompt', str(prompt),
           '--prompt_notes', '12', '--no_audio']
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    original = TMIDIX.midi2notes(str(prompt), unit='ms')[:12]
    out = TMIDIX.midi2notes(str(tmp_path / 'out' / 'continuation_tune_0.mid'), unit='ms')
    assert [n[4] for n in out[:12]] == [n[4] for n in original]
    assert all(abs(a[1] - b[1]) < 32 for a, b in zip(original, out))
    assert (tmp_path / 'out' / 'continuation_tune_0.png').exists()
