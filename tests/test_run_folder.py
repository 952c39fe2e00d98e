"""run_folder.py: one run per save folder, earlier runs kept, named checkpoints never lost, paths that mean the same
from any working directory. The data-loss cases run real training processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import custom_training
import runtime
from options import parse_args
from run_folder import LOCK_NAME, RunFolderBusy, RunFolderError, RunLock, check_outputs_outside_data, keep_earlier_run
from tests.conftest import ROOT, TINY, make_folder, run

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='the lock is tested where flock exists')


def launch(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, str(ROOT / 'custom_training.py')] + [str(a) for a in args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_training(args, cwd):
    """A training process that runs until stopped, from the moment its first checkpoint shows it is training."""
    proc = launch(args, cwd)
    latest = Path(args[args.index('--save_dir') + 1]) / 'latest.pt'
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert latest.exists(), proc.communicate(timeout=60)
    return proc


def endless(data, tmp_path, save_dir):
    return TINY + ['--data_path', data, '--cache_dir', tmp_path / 'cache', '--save_dir', save_dir,
                   '--samples_dir', tmp_path / 'samples', '--max_steps', '100000', '--validate_every', '100000',
                   '--generate_every', '100000', '--save_every', '2']


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first_and_the_first_keeps_its_files(data, tmp_path):
    save_dir = tmp_path / 'ckpt'
    first = start_training(endless(data, tmp_path, save_dir), tmp_path)
    attempts = []
    try:  # a new run and a resume, both at once
        attempts += [launch(TINY + ['--data_path', data, '--save_dir', save_dir, '--cache_dir', tmp_path / 'cache2',
                                    '--samples_dir', tmp_path / 'samples2', '--max_steps', '2'], tmp_path),
                     launch(['--checkpoint', 'latest', '--save_dir', save_dir], tmp_path)]
        refusals = [(*proc.communicate(timeout=120), proc.returncode) for proc in attempts]
    finally:
        for proc in attempts:
            proc.kill()  # a run that was not refused must not outlive the test
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    for _, refusal, code in refusals:
        lines = refusal.strip().splitlines()
        assert code == 1 and len(lines) == 1, refusal
        assert lines[0].startswith(f'error: {save_dir} is in use by another training run (pid {first.pid} on ')
        assert 'custom_training.py' in lines[0] and 'started ' in lines[0] and '--save_dir' in lines[0]
    # the refused run wrote nothing: no cache, no samples, nothing moved aside
    assert not (tmp_path / 'cache2').exists() and not (tmp_path / 'samples2').exists()
    assert first.returncode == 130, err
    step = int(out.split('saved ')[1].split(' at step ')[1].split(';')[0])
    assert torch.load(save_dir / 'latest.pt', weights_only=True)['step'] == step
    assert sorted(p.name for p in save_dir.iterdir()) == ['latest.pt', 'metrics.csv']  # no runs/, no lock left


def test_a_lock_left_by_a_killed_run_does_not_block_the_next_one(data, tmp_path):
    save_dir = tmp_path / 'ckpt'
    killed = start_training(endless(data, tmp_path, save_dir), tmp_path)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert json.loads((save_dir / LOCK_NAME).read_text())['pid'] == killed.pid  # its record stays behind
    proc = run(TINY + ['--data_path', str(data), '--save_dir', str(save_dir), '--cache_dir', str(tmp_path / 'cache'),
                       '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '2'], cwd=tmp_path)
    taken = [line for line in proc.stdout.splitlines() if 'no longer running' in line]
    assert len(taken) == 1 and f'pid {killed.pid} on ' in taken[0] and 'this run takes it over' in taken[0]
    assert torch.load(save_dir / 'latest.pt', weights_only=True)['step'] == 2
    assert not (save_dir / LOCK_NAME).exists()


def test_the_lock_is_one_holder_at_a_time_and_a_refused_folder_is_left_as_it_was(tmp_path):
    first = RunLock.take(tmp_path / 'ckpt', log=print)
    with pytest.raises(RunFolderBusy, match=f'pid {os.getpid()} on '):
        RunLock.take(tmp_path / 'ckpt', log=print)  # another open file of the same lock: refused as another process
    first.release()
    assert not (tmp_path / 'ckpt').exists()  # the lock made the folder and nothing was written there
    again = RunLock.take(tmp_path / 'ckpt', log=print)
    again.release()


def test_a_run_lock_that_is_a_link_is_refused_and_the_file_it_names_is_left_alone(tmp_path):
    precious = tmp_path / 'precious.txt'
    precious.write_text('precious data')
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / LOCK_NAME).symlink_to(precious)
    with pytest.raises(OSError):  # custom_training turns it into one line naming the folder
        RunLock.take(tmp_path / 'ckpt', log=print)
    assert precious.read_text() == 'precious data'


@pytest.mark.parametrize('record', [{'pid': 1, 'started': 'yesterday'}, {'pid': 1, 'started': 1e30},
                                    {'pid': [1], 'host': None, 'started': None, 'command': 7}])
def test_a_damaged_lock_record_left_behind_is_taken_over_with_one_line(tmp_path, record):
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / LOCK_NAME).write_text(json.dumps(record))
    lines = []
    lock = RunLock.take(tmp_path / 'ckpt', log=lines.append)
    lock.release()
    assert len(lines) == 1 and 'is no longer running; this run takes it over' in lines[0], lines


def test_init_from_an_earlier_run_kept_in_the_folder_keeps_every_file_of_that_run(data, tmp_path):
    save_dir = tmp_path / 'S'
    common = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--samples_dir',
                     str(tmp_path / 'samples'), '--save_dir', str(save_dir), '--max_steps', '2', '--validate_every',
                     '2', '--generate_every', '100']
    run(common, cwd=tmp_path)  # run A
    run(common, cwd=tmp_path)  # run B: A goes to runs/1
    run_a = save_dir / 'runs' / '1'
    before = {p.relative_to(run_a).as_posix(): p.read_bytes() for p in run_a.rglob('*') if p.is_file()}
    assert [name for name in sorted(before) if '/' not in name] == ['best.pt', 'latest.pt', 'metrics.csv',
                                                                    'training_progress.png']
    proc = run(common + ['--init_from', str(run_a / 'latest.pt')], cwd=tmp_path)  # run C: B goes to runs/2
    assert 'fine-tuning from' in proc.stdout
    assert {p.relative_to(run_a).as_posix(): p.read_bytes() for p in run_a.rglob('*') if p.is_file()} == before
    assert sorted(p.name for p in (save_dir / 'runs').iterdir()) == ['1', '2']
    assert (save_dir / 'runs' / '2' / 'latest.pt').exists() and (save_dir / 'latest.pt').exists()


def no_data_work(monkeypatch):
    def tokenizing(*args, **kwargs):
        raise AssertionError('the data was read before the run was refused')
    monkeypatch.setattr(custom_training, 'load_corpus', tokenizing)


@pytest.mark.parametrize('flag, name', [('--init_from', 'latest.pt'), ('--init_from', 'best.pt'),
                                        ('--checkpoint', 'best.pt')])
def test_a_checkpoint_the_run_would_write_over_is_refused_in_one_line_and_kept(trained, data, tmp_path, capsys,
                                                                               monkeypatch, flag, name):
    from tests.test_training import train_in_process
    no_data_work(monkeypatch)
    save_dir = tmp_path / 'S'
    save_dir.mkdir()
    (save_dir / name).write_bytes((trained[0] / 'ckpt' / name).read_bytes())
    code, out, err = train_in_process(TINY + ['--data_path', data, '--save_dir',
                                              save_dir, '--cache_dir', tmp_path / 'cache', flag, save_dir / name],
                                      capsys)
    assert code == 1 and err.splitlines() == [err.strip()], err
    assert err.startswith(f'error: {flag} {save_dir / name} is a checkpoint of --save_dir {save_dir}, which this '
                          f'run writes over')
    assert sorted(p.name for p in save_dir.iterdir()) == [name] and not (tmp_path / 'cache').exists()


# ----------------------------------------------------------------------------------------------------------
# Paths

def settled(argv):
    args = parse_args(custom_training.Args(), [str(a) for a in argv])
    custom_training.settle_paths(args, log=print)
    return args


def test_relative_folders_are_saved_as_absolute_paths_from_where_the_run_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / 'content' / 'dataset', n=2)
    args = settled(['--samples_dir', 'out/samples'])
    assert args.data_path == str(tmp_path / 'content' / 'dataset')
    assert args.cache_dir == str(tmp_path / 'content' / 'cache')
    assert args.save_dir == str(tmp_path / 'content' / 'checkpoints')
    assert args.samples_dir == str(tmp_path / 'out' / 'samples')


def test_an_empty_default_data_folder_trains_on_the_bundled_set_and_saves_that_folder(tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr(runtime, 'BUNDLED_DATASET', make_folder(tmp_path / 'bundled', n=2))
    monkeypatch.chdir(tmp_path)
    assert settled([]).data_path == str(tmp_path / 'bundled')
    assert 'holds no MIDI files: training on the bundled' in capsys.readouterr().out
    # a folder named by its absolute path is the user's, never replaced by the bundled set
    assert settled(['--data_path', tmp_path / 'content' / 'dataset']).data_path == str(tmp_path / 'content' /
                                                                                        'dataset')


@pytest.mark.parametrize('name', ['samples_dir', 'save_dir', 'cache_dir'])
def test_an_output_folder_inside_the_data_folder_is_refused_in_one_line_before_any_work(data, tmp_path, capsys,
                                                                                         monkeypatch, name):
    from tests.test_training import folders, nothing_written, train_in_process
    no_data_work(monkeypatch)
    inside = data / 'generated'
    argv = TINY + ['--data_path', data] + folders(tmp_path) + [f'--{name}', inside]
    code, out, err = train_in_process(argv, capsys)
    assert code == 1 and err.splitlines() == [err.strip()], err
    assert err.startswith(f'error: --{name} {inside} lies inside --data_path {data}: the next run would train on')
    assert not inside.exists() and nothing_written(tmp_path)


def test_outputs_beside_the_data_folder_are_allowed(tmp_path):
    args = parse_args(custom_training.Args(), ['--data_path', str(tmp_path / 'data'), '--samples_dir',
                                               str(tmp_path / 'data-samples')])
    check_outputs_outside_data(args, {args.data_path})  # a shared name prefix is not "inside"
    with pytest.raises(RunFolderError):
        check_outputs_outside_data(args, {str(tmp_path)})


def test_evaluate_from_another_directory_reads_the_runs_own_data_and_cache_and_refuses_them_when_gone(tmp_path):
    from tests.test_evaluate import run_evaluate
    project, elsewhere = tmp_path / 'project', tmp_path / 'elsewhere'
    make_folder(project / 'content' / 'dataset', n=8)
    elsewhere.mkdir()
    run(TINY + ['--max_steps', '2', '--validate_every', '100', '--generate_every', '100'], cwd=project)
    checkpoint = project / 'content' / 'checkpoints' / 'latest.pt'
    saved = torch.load(checkpoint, weights_only=True)['args']
    assert saved['data_path'] == str(project / 'content' / 'dataset')
    proc = run_evaluate(['--checkpoint', checkpoint, '--num_samples', '1', '--sample_length', '16', '--no_c2st',
                         '--output_dir', elsewhere / 'report'], elsewhere)
    assert 'bundled' not in proc.stdout + proc.stderr
    assert json.loads((elsewhere / 'report' / 'evaluation.json').read_text())['data_path'] == saved['data_path']
    assert not (elsewhere / 'content').exists()  # no cache written where it was started
    for song in (project / 'content' / 'dataset').iterdir():
        song.unlink()
    proc = run_evaluate(['--checkpoint', checkpoint, '--no_c2st'], elsewhere, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert 'no MIDI files' in proc.stderr and str(project / 'content' / 'dataset') in proc.stderr


def test_under_torchrun_a_folder_in_use_stops_every_rank_with_one_line(data, tmp_path):
    holder = RunLock.take(tmp_path / 'ckpt', log=print)  # this test's process stands in for the first run
    try:
        proc = run(TINY + ['--data_path', str(data), '--save_dir', str(tmp_path / 'ckpt'), '--cache_dir',
                           str(tmp_path / 'cache'), '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '2'],
                   cwd=tmp_path, check=False, torchrun=2)
    finally:
        holder.release()
    refusals = [line for line in proc.stderr.splitlines() if 'is in use by another training run' in line]
    assert proc.returncode != 0 and len(refusals) == 1, proc.stderr[-3000:]
    assert refusals[0].startswith(f'error: {tmp_path / "ckpt"} is in use by another training run (pid {os.getpid()}')
    assert not (tmp_path / 'cache').exists() and not (tmp_path / 'samples').exists()


def test_a_move_aside_that_fails_part_way_puts_back_what_moved(tmp_path, monkeypatch):
    save_dir = tmp_path / 'ckpt'
    save_dir.mkdir()
    for name in ('latest.pt', 'best.pt', 'metrics.csv'):
        (save_dir / name).write_text(name)
    real = Path.replace

    def fails_on_best(self, target):
        if self.name == 'best.pt' and 'runs' in str(target):
            raise PermissionError(1, 'Operation not permitted')
        return real(self, target)
    monkeypatch.setattr(Path, 'replace', fails_on_best)
    with pytest.raises(RunFolderError, match='it is left where it was'):
        keep_earlier_run(save_dir, log=print)
    assert sorted(p.name for p in save_dir.iterdir() if p.is_file()) == ['best.pt', 'latest.pt', 'metrics.csv']
    assert (save_dir / 'latest.pt').read_text() == 'latest.pt'
