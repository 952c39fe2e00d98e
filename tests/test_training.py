"""End-to-end: `python custom_training.py --...` as a user runs it, resuming, torchrun, and generate.py."""

import csv
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

import custom_training
import dataset
import runtime
from options import check_args, parse_args, parse_args_and_given
from tests.conftest import (
    ROOT,
    TINY,
    allowed_next_tables,
    generate_arguments,
    in_process,
    melody,
    run,
    stopped_and_resumed,
    write_midi,
)
from tokens import START_IDX
from voice_leading import VoiceLeading


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
    assert {'model_state_dict', 'optimizer_state_dict', 'scaler_state_dict', 'loss', 'data_position'} <= set(ckpt)


def test_training_samples_are_listed_on_their_folders_page_newest_first_with_their_step(trained):
    from tests.test_sample_page import read_page
    samples = trained[0] / 'samples'
    page = read_page(samples)
    assert page.names == ['sample_step_6', 'sample_step_3'] and 'step 6' in page.texts and 'step 3' in page.texts
    audio = [('audio', 'sample_step_3.wav')] if (samples / 'sample_step_3.wav').exists() else []  # with FluidSynth
    assert [link for link in page.links if link[1].startswith('sample_step_3')] == \
        [('a', 'sample_step_3.mid')] + audio + [('img', 'sample_step_3.png')]


def test_cpu_bf16_autocast_trains_and_samples(data, tmp_path):
    # the other runs use float32; this one trains in bf16 autocast (the default on CPUs with bf16 instructions),
    # so the model's CPU bf16 pieces (attention backward, GELU + dropout) run inside the real training loop
    args = TINY + ['--dtype', 'bfloat16', '--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'),
                   '--save_dir', str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 'samples'),
                   '--max_steps', '3', '--validate_every', '3', '--generate_every', '3', '--save_every', '3']
    proc = run(args, cwd=tmp_path)
    assert 'precision bfloat16' in proc.stdout, proc.stdout[-2000:]
    rows = list(csv.DictReader(open(tmp_path / 'ckpt/metrics.csv')))
    assert rows and all(float(r['train_loss']) == float(r['train_loss']) for r in rows)  # not NaN
    assert (tmp_path / 'samples' / 'sample_step_3.mid').stat().st_size > 0


def test_resumed_run_ends_where_an_unbroken_run_would(data, tmp_path):
    # with previous-token embeddings, as the quick recipe has them, and a tune clock
    common = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--validate_every', '100',
                     '--generate_every', '100', '--save_every', '4', '--prev_tokens', '3', '--tune_clock', 'true',
                     '--max_steps', '8']
    full, resumed, _ = stopped_and_resumed(common, tmp_path)
    assert full['step'] == resumed['step'] == 8 and resumed['args']['prev_tokens'] == 3
    assert resumed['args']['tune_clock'] is True and 'net.clock_emb.weight' in resumed['model_state_dict']
    assert abs(full['loss'] - resumed['loss']) < 1e-4
    for key, value in full['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=1e-4, atol=1e-5)


def test_a_stopped_config_run_resumed_with_checkpoint_latest_alone_ends_where_the_unbroken_run_would(
        data, tmp_path, monkeypatch, capsys):
    # the settings live only in the config file: the resume must take them (cosine schedule, lr, data, steps)
    # from the checkpoint, or it continues at the defaults on the bundled songs
    config = tmp_path / 'tiny_cosine.py'
    pairs = dict(zip(TINY[::2], TINY[1::2]))
    config.write_text(''.join(f'{name[2:]} = {value!r}\n' if not value[0].isdigit() else f'{name[2:]} = {value}\n'
                              for name, value in pairs.items()) +
                      f"data_path = {str(data)!r}\nlr_schedule = 'cosine'\nlr = 2e-3\nmin_lr = 1e-4\n"
                      'warmup_steps = 2\nmax_steps = 8\nvalidate_every = 100\ngenerate_every = 100\n'
                      'save_every = 100\naudio = False\n')
    monkeypatch.chdir(tmp_path)
    assert train_in_process([config, '--save_dir', 'full', '--samples_dir', 'full_samples'], capsys)[0] == 0
    real_get_lr = custom_training.get_lr

    def ctrl_c_at_step_5(args, step, max_steps):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(args, step, max_steps)
    monkeypatch.setattr(custom_training, 'get_lr', ctrl_c_at_step_5)
    assert train_in_process([config], capsys)[0] == 130
    monkeypatch.setattr(custom_training, 'get_lr', real_get_lr)
    stopped = torch.load(tmp_path / 'content' / 'checkpoints' / 'latest.pt', weights_only=True)
    assert stopped['step'] == 6
    code, out, err = train_in_process(['--checkpoint', 'latest'], capsys)
    assert code == 0 and 'precision float32' in out, err  # the config's precision, not the default 'auto'
    resuming = [line for line in out.splitlines() if line.startswith('resuming')]
    assert resuming == [f"resuming from {tmp_path / 'content' / 'checkpoints' / 'latest.pt'} at step 6 with the "
                        f"settings it was trained with"]
    full = torch.load(tmp_path / 'full' / 'latest.pt', weights_only=True)
    resumed = torch.load(tmp_path / 'content' / 'checkpoints' / 'latest.pt', weights_only=True)
    assert full['step'] == resumed['step'] == 8 and resumed['args']['lr_schedule'] == 'cosine'
    for key, value in full['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=1e-4, atol=1e-5)
    # what the command line gives overrides the checkpoint, and the one line names it
    code, out, err = train_in_process(['--checkpoint', 'latest', '--max_steps', '9', '--lr', '1e-3'], capsys)
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith('resuming')] == [
        f"resuming from {tmp_path / 'content' / 'checkpoints' / 'latest.pt'} at step 8 with the settings it was "
        f"trained with, except --max_steps, --lr from the command line or config file"]
    assert torch.load(tmp_path / 'content' / 'checkpoints' / 'latest.pt', weights_only=True)['step'] == 9


def test_two_process_torchrun_samples_past_seq_len_validates_saves_and_keeps_ranks_in_sync(data, tmp_path):
    # samples of 8 + 64 tokens run past seq_len 32 on rank 0 only; validation and checkpoints come on the way;
    # previous-token embeddings as in the quick recipe (their tables must stay in sync too)
    args = TINY + ['--prev_tokens', '2', '--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 'samples'), '--max_steps', '6',
                   '--validate_every', '2', '--generate_every', '2', '--save_every', '2', '--generate_length', '64']
    proc = run(args, cwd=tmp_path, torchrun=2)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '(2 processes)' in proc.stdout, output
    assert 'ranks in sync: True' in proc.stdout, output
    assert proc.stdout.count('validation loss') == 3
    for step in (2, 4, 6):
        assert (tmp_path / 'samples' / f'sample_step_{step}.mid').exists()
    assert torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)['step'] == 6


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


def test_training_samples_use_the_same_repeat_memory_as_generate_and_evaluate():
    import sampling
    assert custom_training.Args().repeat_memory == sampling.REPEAT_MEMORY


def test_command_line_overrides_parse_numbers_booleans_and_none():
    args = parse_args(custom_training.Args(), ['--dim', '64', '--lr', '1e-3', '--aug', 'false', '--max_steps', '7',
                                       '--top_p', 'none', '--checkpoint', 'latest', '--top_k', '5'])
    assert args.dim == 64 and isinstance(args.dim, int) and args.lr == 1e-3 and args.aug is False
    assert args.max_steps == 7 and args.top_p is None and args.checkpoint == 'latest' and args.top_k == 5
    with pytest.raises(SystemExit):
        parse_args(custom_training.Args(), ['--aug', 'maybe'])


ON_TOP_OF = {'parts_own_cpu.py': ['parts_cpu.py'],  # a later step's config, applied after its earlier steps'
             'conditioned_key_cpu.py': ['conditioned_cpu.py'],
             'conditioned_key_long_cpu.py': ['conditioned_cpu.py', 'conditioned_key_cpu.py'],
             'conditioned_key_1024_cpu.py': ['conditioned_cpu.py', 'conditioned_key_cpu.py',
                                             'conditioned_key_long_cpu.py'],
             'conditioned_key_length_cpu.py': ['conditioned_cpu.py', 'conditioned_key_cpu.py',
                                               'conditioned_key_long_cpu.py', 'conditioned_key_1024_cpu.py']}


@pytest.mark.parametrize('config', sorted((ROOT / 'config').glob('*.py')), ids=lambda p: p.name)
def test_shipped_config_files_pass_the_training_checks(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default ./content/... folders are checked against a writable folder
    first = [str(ROOT / 'config' / name) for name in ON_TOP_OF.get(config.name, [])]
    args = parse_args(custom_training.Args(), first + [str(config)])
    check_args(args)
    assert args.max_steps and args.pack and args.prev_tokens  # the recipes' own values, not the defaults


def test_persistent_non_finite_loss_stops_with_a_clear_message(data, tmp_path):
    # an absurd learning rate blows the weights up after the first step: every later loss is NaN or inf
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 's'), '--max_steps', '50',
                   '--lr', '1e12', '--grad_clip', '0', '--max_bad_steps', '3', '--validate_every', '1000',
                   '--generate_every', '1000', '--save_every', '1']
    proc = run(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert 'non-finite loss, step skipped' in proc.stdout
    assert '3 non-finite losses in a row' in proc.stderr and 'Traceback' not in proc.stderr
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['step'] >= 1  # the last good checkpoint is still there


@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_with_the_signal_code(data, tmp_path, signum, code):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 's'), '--max_steps', '100000',
                   '--validate_every', '100000', '--generate_every', '100000', '--save_every', '100000']
    proc = subprocess.Popen([sys.executable, str(ROOT / 'custom_training.py')] + args, cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'ckpt' / 'metrics.csv').exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signum)
        proc.send_signal(signum)  # a second one while it stops must not print a traceback nor hurt the save
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, out + err
    assert f'stopped by {signal.Signals(signum).name}: saved' in out, out + err
    assert 'Traceback' not in err
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['step'] >= 2
    assert not list((tmp_path / 'ckpt').glob('*.tmp'))


@pytest.mark.skipif(not hasattr(signal, 'SIGHUP'), reason='SIGHUP')
def test_a_run_started_with_sighup_ignored_like_nohup_outlives_its_terminal(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    args = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--save_dir',
                   str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 's'), '--max_steps', '100000',
                   '--validate_every', '100000', '--generate_every', '100000', '--save_every', '100000']
    proc = subprocess.Popen([sys.executable, str(ROOT / 'custom_training.py')] + args, cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'ckpt' / 'metrics.csv').exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGHUP)  # the terminal closes
        time.sleep(2)
        assert proc.poll() is None  # still training
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and 'stopped by SIGTERM: saved' in out and 'SIGHUP' not in out, out + err


@pytest.mark.parametrize('tune_mask, pack, masked', [('true', 'true', True), ('false', 'true', False),
                                                      ('true', 'false', False)])
def test_tune_mask_reaches_the_training_forward_of_packed_windows_only(data, tmp_path, monkeypatch, capsys,
                                                                          tune_mask, pack, masked):
    import custom_basic_transformer
    seen = []
    real = custom_basic_transformer.attention_mask
    monkeypatch.setattr(custom_basic_transformer, 'attention_mask',
                        lambda *a, **k: seen.append(k.get('tunes', a[3] if len(a) > 3 else None)) or real(*a, **k))
    argv = TINY + ['--data_path', data, '--max_steps', '2', '--validate_every', '100', '--generate_every', '100',
                   '--tune_mask', tune_mask, '--pack', pack] + folders(tmp_path)
    code, out, err = train_in_process(argv, capsys)
    assert code == 0, err
    assert bool([t for t in seen if t is not None]) == masked


def test_every_validation_of_a_run_scores_the_same_sample_of_val_tokens(data, tmp_path, monkeypatch, capsys):
    scored = []
    real = custom_training.evaluate_split
    monkeypatch.setattr(custom_training, 'evaluate_split',
                        lambda model, ds, *a, **kw: scored.append((list(ds.indices), len(ds.dataset))) or
                        real(model, ds, *a, **kw))
    argv = TINY + ['--data_path', data, '--max_steps', '3', '--validate_every', '1', '--generate_every', '100',
                   '--val_tokens', '100'] + folders(tmp_path)
    code, out, err = train_in_process(argv, capsys)
    assert code == 0, err
    (sample, windows), *others = scored
    assert len(others) == 2 and all(other == (sample, windows) for other in others)
    assert 0 < len(sample) < windows
    assert f'validation: {len(sample)} of the {windows} held-out windows (val_tokens=100)' in out


def test_ctrl_c_outside_the_training_loop_stops_with_one_line(data, tmp_path, monkeypatch, capsys):
    # reading the data is where a start-up Ctrl-C most often lands (tokenizing a new folder takes minutes)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(dataset, 'load_corpus', interrupted)  # the script below imports it afresh from here
    argv = TINY + ['--data_path', str(data)] + [str(a) for a in folders(tmp_path)]
    monkeypatch.setattr(sys, 'argv', ['custom_training.py'] + argv)
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / 'custom_training.py'), run_name='__main__')
    assert stopped.value.code == 130
    assert capsys.readouterr().err == ('stopped by Ctrl-C outside the training loop: no checkpoint to save (files '
                                       'tokenized so far stay in the cache)\n')


def test_resuming_a_finished_run_says_there_is_nothing_to_train(data, tmp_path, capsys):
    argv = TINY + ['--data_path', data, '--max_steps', '2', '--validate_every', '100', '--generate_every', '100']
    assert train_in_process(argv + folders(tmp_path), capsys)[0] == 0
    code, out, err = train_in_process(argv + folders(tmp_path) + ['--checkpoint', 'latest'], capsys)
    assert code == 0, err
    assert 'the checkpoint is at step 2 already: nothing to train (raise --max_steps to go on)' in out


def test_each_new_run_in_a_used_folder_keeps_the_earlier_ones_in_numbered_folders_and_a_resume_moves_nothing(
        data, tmp_path, capsys):
    argv = TINY + ['--data_path', data, '--validate_every', '2', '--generate_every', '100'] + folders(tmp_path)
    ckpt = tmp_path / 'ckpt'
    step_of = lambda path: torch.load(path, weights_only=True)['step']
    assert train_in_process(argv + ['--max_steps', '3'], capsys)[0] == 0
    assert not (ckpt / 'runs').exists()  # a first run has nothing to keep
    for steps, number in ((2, 1), (1, 2)):  # run again instead of resuming, twice
        code, out, err = train_in_process(argv + ['--max_steps', str(steps)], capsys)
        assert code == 0, err
        assert f'{ckpt} held an earlier run: its checkpoints are now in {ckpt / "runs" / str(number)}' in out
    assert step_of(ckpt / 'runs' / '1' / 'latest.pt') == 3 and step_of(ckpt / 'runs' / '2' / 'latest.pt') == 2
    assert step_of(ckpt / 'latest.pt') == 1
    assert sorted(p.name for p in (ckpt / 'runs' / '1').iterdir() if p.is_file()) == \
        ['best.pt', 'latest.pt', 'metrics.csv', 'training_progress.png']
    code, out, err = train_in_process(argv + ['--max_steps', '4', '--checkpoint', 'latest'], capsys)
    assert code == 0 and 'held an earlier run' not in out, err
    assert step_of(ckpt / 'latest.pt') == 4 and sorted(p.name for p in (ckpt / 'runs').iterdir()) == ['1', '2']
    assert not (ckpt / 'run.lock').exists()  # a finished run lets go of its folder


def test_an_earlier_run_that_cannot_be_moved_aside_stops_with_one_line_and_stays(data, tmp_path, capsys):
    argv = TINY + ['--data_path', data, '--max_steps', '1', '--validate_every', '100', '--generate_every', '100']
    assert train_in_process(argv + folders(tmp_path), capsys)[0] == 0
    (tmp_path / 'ckpt' / 'runs').write_text('a file where the kept runs go')
    code, out, err = train_in_process(argv + folders(tmp_path), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert 'moving it to' in err and 'Not a directory' in err and '--checkpoint latest' in err
    assert torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)['step'] == 1  # the earlier run is intact


def test_a_new_run_in_a_used_folder_keeps_the_earlier_runs_samples_with_its_checkpoints(data, tmp_path, capsys):
    argv = TINY + ['--data_path', data, '--max_steps', '2', '--validate_every', '2', '--generate_every', '2',
                   '--audio', 'false'] + folders(tmp_path)
    samples = tmp_path / 'samples'
    assert train_in_process(argv, capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in samples.glob('sample_step_*')}
    assert sorted(first) == ['sample_step_2.mid', 'sample_step_2.png']
    code, out, err = train_in_process(argv + ['--seed', '7'], capsys)  # another run, same folders
    assert code == 0, err
    kept = tmp_path / 'ckpt' / 'runs' / '1' / 'samples'
    assert f'and its 2 sample files in {kept}' in out
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == first  # the earlier run's samples, untouched
    assert sorted(p.name for p in samples.glob('sample_step_*')) == ['sample_step_2.mid', 'sample_step_2.png']


@pytest.mark.parametrize('constrained', ['true', 'false'])
def test_training_samples_follow_the_token_grammar_unless_turned_off(data, tmp_path, capsys, monkeypatch, constrained):
    tables = allowed_next_tables(monkeypatch)
    argv = TINY + ['--data_path', data, '--max_steps', '1', '--audio', 'false', '--grammar_constrained', constrained]
    code, out, err = train_in_process(argv + folders(tmp_path), capsys)
    assert code == 0, err
    assert tables and all((t is not None) == (constrained == 'true') for t in tables)


def test_training_samples_of_a_parts_run_are_drawn_with_voice_leading_when_asked(data, tmp_path, capsys, monkeypatch):
    hooks = generate_arguments(monkeypatch, 'constrain')
    argv = TINY + ['--data_path', data, '--max_steps', '1', '--audio', 'false', '--tracks', 'parts',
                   '--voice_leading', 'true']
    code, out, err = train_in_process(argv + folders(tmp_path), capsys)
    assert code == 0, err
    assert hooks and all(isinstance(hook, VoiceLeading) for hook in hooks)


def test_a_parts_run_with_a_voice_leading_loss_trains_on_the_windows_avoided_pitches(data, tmp_path, capsys,
                                                                                       monkeypatch):
    seen = []
    real = custom_training.avoided_targets
    monkeypatch.setattr(custom_training, 'avoided_targets', lambda x: seen.append(x.clone()) or real(x))
    argv = TINY + ['--data_path', data, '--max_steps', '2', '--audio', 'false', '--tracks', 'parts',
                   '--voice_leading_loss', '2']
    code, out, err = train_in_process(argv + folders(tmp_path), capsys)
    assert code == 0, err
    assert len(seen) == 4 and not torch.equal(seen[0], seen[1])  # every micro-batch of 2 steps of grad_accum 2
    saved = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=False)
    assert saved['args']['voice_leading_loss'] == 2


# -----------------------------------------------------------------------------
# bad input and failing writes: one line and a non-zero exit, or a one-line warning and the run goes on

def train_in_process(argv, capsys):
    return in_process(lambda a: custom_training.main(*parse_args_and_given(custom_training.Args(), a)), argv,
                      capsys)


def folders(tmp_path):
    return ['--save_dir', tmp_path / 'ckpt', '--samples_dir', tmp_path / 'samples', '--cache_dir', tmp_path / 'cache']


def nothing_written(tmp_path):
    return not any((tmp_path / name).exists() for name in ('ckpt', 'samples', 'cache'))


BAD_SETTINGS = ['--seq_len 0', '--batch_size 0', '--batch_size 2.5', '--grad_accum 0', '--lr -1', '--timing foo',
                '--dtype float8', '--heads 0', '--dropout 1.5', '--val_fraction 2', '--generate_length -5',
                '--lr_schedule linear', '--top_p 0', '--temperature -1', '--save_every 0', '--validate_every 0',
                '--print_stats_every 0', '--aug_range -3', '--max_steps 0']


@pytest.mark.parametrize('setting', BAD_SETTINGS)
def test_a_bad_setting_exits_2_with_one_line_naming_it_and_writes_nothing(tmp_path, monkeypatch, capsys, setting):
    monkeypatch.chdir(tmp_path)
    code, out, err = train_in_process(setting.split() + folders(tmp_path), capsys)
    assert code == 2 and err.splitlines() == [err.strip()], err
    assert err.startswith(f'error: {setting.split()[0]} ') and 'must be' in err
    assert nothing_written(tmp_path) and not (tmp_path / 'content').exists()


def test_bad_settings_and_config_files_stop_the_real_command_before_anything_is_written(tmp_path):
    (tmp_path / 'bad.py').write_text('dim = 0\n')
    for argv, start in ((['--batch_size', '2.5'], 'error: --batch_size 2.5: '),
                        ([str(tmp_path / 'bad.py')], 'error: --dim 0: ')):
        proc = run(argv + [str(a) for a in folders(tmp_path)], cwd=tmp_path, check=False, timeout=60)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith(start) and not proc.stdout
        assert nothing_written(tmp_path)


@pytest.mark.parametrize('text, start', [('dim = 0\n', 'error: --dim 0: must be'),
                                         ('dimm = 64\n', "error: config file {}: 'dimm' is not a setting")])
def test_a_bad_config_file_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, text, start):
    config = tmp_path / 'bad.py'
    config.write_text(text)
    code, out, err = train_in_process([config] + folders(tmp_path), capsys)
    assert code == 2 and err.splitlines() == [err.strip()], err
    assert err.startswith(start.format(config)) and nothing_written(tmp_path)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text', 'midi', 'state_dict', 'folder', 'missing',
                                  'weights_of_another_size'])
def test_resuming_from_a_bad_checkpoint_is_one_line_naming_it(trained, data, tmp_path, capsys, kind):
    from tests.test_generate import BAD_CHECKPOINTS, make_bad_checkpoint
    (tmp_path / 'bad').mkdir()
    path = make_bad_checkpoint(kind, trained[0] / 'ckpt' / 'latest.pt', tmp_path / 'bad')
    code, out, err = train_in_process(TINY + ['--data_path', data, '--checkpoint', path] + folders(tmp_path), capsys)
    errors = [line for line in err.splitlines() if 'error' in line.lower()]  # the tokenizing bar may come first
    assert code == 1 and len(errors) == 1 and errors[0].startswith('error: '), err
    assert str(path) in errors[0] and 'Traceback' not in err
    assert BAD_CHECKPOINTS[kind] is None or BAD_CHECKPOINTS[kind] in errors[0]
    assert not (tmp_path / 'ckpt').exists() and not (tmp_path / 'samples').exists()


def write_one_file_dataset(folder):
    folder.mkdir()
    write_midi(folder / 'only.mid', melody(80))
    return folder


@pytest.mark.parametrize('dataset', ['val_fraction 0', 'one file'])
def test_a_run_without_validation_writes_latest_metrics_and_curves_and_generate_uses_latest(
        data, tmp_path, capsys, dataset):
    import generate
    source = ['--val_fraction', '0', '--data_path', data] if dataset == 'val_fraction 0' else \
        ['--data_path', write_one_file_dataset(tmp_path / 'one')]
    code, out, err = train_in_process(TINY + source + folders(tmp_path) + [
        '--max_steps', '4', '--validate_every', '2', '--generate_every', '4', '--audio', 'false'], capsys)
    assert code == 0, err
    assert sum('no validation' in line for line in out.splitlines()) == 1, out  # one note, not one per module
    for name in ('latest.pt', 'metrics.csv', 'training_progress.png'):
        assert (tmp_path / 'ckpt' / name).stat().st_size > 0, name
    assert not (tmp_path / 'ckpt' / 'best.pt').exists()
    assert torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)['step'] == 4
    rows = list(csv.DictReader(open(tmp_path / 'ckpt' / 'metrics.csv')))
    assert [r['step'] for r in rows] == ['2', '4'] and not any(r['val_loss'] for r in rows)

    generate.main(['--checkpoint', str(tmp_path / 'ckpt' / 'best.pt'), '--output_dir', str(tmp_path / 'gen'),
                   '--num_samples', '1', '--length', '16', '--no_audio'])
    out = capsys.readouterr().out
    assert sum('best.pt does not exist' in line for line in out.splitlines()) == 1
    assert f'checkpoint {tmp_path / "ckpt" / "latest.pt"} (step 4' in out
    assert (tmp_path / 'gen' / 'sample_0.mid').exists()


def test_samples_or_metrics_that_cannot_be_written_are_warnings_and_latest_pt_holds_the_last_step(
        data, tmp_path, capsys):
    # a folder where a sample or metrics.csv should go fails those writes as a full disk would; with no checkpoint
    # before the end, a crash at step 2 would lose the whole run, and at step 4 the sample is due right after
    # latest.pt is written, which it must not cost
    for name in ('samples/sample_step_2.mid', 'samples/sample_step_4.mid', 'ckpt/metrics.csv'):
        (tmp_path / name).mkdir(parents=True)
    code, out, err = train_in_process(TINY + ['--data_path', data, '--max_steps', '4', '--validate_every', '100',
                                              '--generate_every', '2', '--save_every', '100', '--audio', 'false']
                                      + folders(tmp_path), capsys)
    assert code == 0 and 'Traceback' not in err, err
    warnings = [line for line in out.splitlines() if line.startswith('warning: ')]
    sample = 'warning: cannot write sample {}: Is a directory; training goes on'
    metrics = f'warning: cannot write {tmp_path / "ckpt" / "metrics.csv"}: Is a directory; training goes on'
    # metrics rows and samples at steps 2 and 4 (print_stats_every 2)
    assert sorted(warnings) == sorted([sample.format(tmp_path / 'samples' / f'sample_step_{step}.mid')
                                       for step in (2, 4)] + [metrics] * 2)
    assert torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)['step'] == 4


def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_keeps_the_previous_one(
        data, tmp_path, capsys, monkeypatch):
    import errno

    import runtime
    real_save, saves = torch.save, []

    def full_after_the_first_save(obj, f):
        saves.append(f)
        if len(saves) == 1:
            return real_save(obj, f)
        with open(f, 'wb') as out:
            out.write(b'PK\x03\x04 partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(runtime.torch, 'save', full_after_the_first_save)
    code, out, err = train_in_process(TINY + ['--data_path', data, '--max_steps', '6', '--save_every', '2',
                                              '--validate_every', '100', '--generate_every', '100', '--audio',
                                              'false'] + folders(tmp_path), capsys)
    monkeypatch.undo()
    latest = tmp_path / 'ckpt' / 'latest.pt'
    assert code == 1 and len(saves) == 2, err
    errors = [line for line in err.splitlines() if 'error:' in line]
    # on a line of its own, not after the progress bar
    assert errors == [f'error: cannot write {latest}: no space left on the device; the previous checkpoint is kept']
    assert 'Traceback' not in err
    assert not list((tmp_path / 'ckpt').glob('*.tmp'))
    assert torch.load(latest, weights_only=True)['step'] == 2


@pytest.mark.parametrize('kind', ['missing file', 'another shape', 'parts weights, all tracks',
                                  'all weights, parts tracks', 'clocked weights, no clock'])
def test_a_bad_init_from_is_refused_in_one_line_before_any_data_is_tokenized(trained, data, tmp_path, capsys,
                                                                              monkeypatch, kind):
    def tokenizing(*args, **kwargs):
        raise AssertionError('the data was read before --init_from was checked')
    monkeypatch.setattr(custom_training, 'load_corpus', tokenizing)
    source, extra, expected = {
        'missing file': (tmp_path / 'nope.pt', [], 'not found'),
        'another shape': (trained[0] / 'ckpt' / 'latest.pt', ['--dim', '64'], '--dim 32 (not 64)'),
        'parts weights, all tracks': (tmp_path / 'parts.pt', [], "--tracks 'parts' (not 'all')"),
        'all weights, parts tracks': (trained[0] / 'ckpt' / 'latest.pt', ['--tracks', 'parts'],
                                      "--tracks 'all' (not 'parts')"),
        'clocked weights, no clock': (tmp_path / 'clocked.pt', [], '--tune_clock True (not False)'),
    }[kind]
    if kind in ('parts weights, all tracks', 'clocked weights, no clock'):  # the tiny run's weights, saved as other
        ckpt = torch.load(trained[0] / 'ckpt' / 'latest.pt', weights_only=True)
        changed = {'tracks': 'parts'} if kind.startswith('parts') else {'tune_clock': True}
        torch.save({**ckpt, 'args': {**ckpt['args'], **changed}}, source)
    code, out, err = train_in_process(TINY + ['--data_path', data, '--init_from', source] + extra + folders(tmp_path),
                                      capsys)
    assert code == 1 and err.splitlines() == [err.strip()], err
    assert err.startswith('error: ') and str(source) in err and 'Traceback' not in err
    assert expected in err
    assert nothing_written(tmp_path)


def test_weights_of_all_tracks_fine_tune_with_melody_tracks_whose_pitch_ids_mean_the_same(trained, data, tmp_path,
                                                                                           capsys, monkeypatch):
    class DataRead(Exception):
        pass

    def reading(*args, **kwargs):
        raise DataRead  # the weights were accepted: the run went on to its data
    monkeypatch.setattr(custom_training, 'load_corpus', reading)
    with pytest.raises(DataRead):
        train_in_process(TINY + ['--data_path', data, '--init_from', trained[0] / 'ckpt' / 'latest.pt', '--tracks',
                                 'melody'] + folders(tmp_path), capsys)


def test_fine_tuning_starts_a_new_run_from_the_weights_and_refuses_another_shape(trained, data, tmp_path):
    source = trained[0] / 'ckpt' / 'latest.pt'
    common = TINY + ['--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), '--samples_dir',
                     str(tmp_path / 's'), '--validate_every', '100', '--generate_every', '100']
    # a learning rate of 1e-9 leaves the weights where they started: they must be the source's
    proc = run(common + ['--save_dir', str(tmp_path / 'tuned'), '--max_steps', '2', '--lr', '1e-9', '--init_from',
                         str(source)], cwd=tmp_path)
    assert 'fine-tuning from' in proc.stdout and 'a new run starts at step 0' in proc.stdout
    tuned = torch.load(tmp_path / 'tuned' / 'latest.pt', weights_only=True)
    assert tuned['step'] == 2  # a new run: the source's 6 steps are not counted
    assert tuned['optimizer_state_dict']['state'][0]['step'] == 2  # and a fresh optimizer
    start = torch.load(source, weights_only=True)['model_state_dict']
    for key, value in start.items():
        torch.testing.assert_close(tuned['model_state_dict'][key], value, rtol=0, atol=1e-6)
    refused = run(common + ['--save_dir', str(tmp_path / 'wide'), '--dim', '64', '--init_from', str(source)],
                  cwd=tmp_path, check=False)
    assert refused.returncode != 0 and 'Traceback' not in refused.stderr
    assert 'cannot fine-tune from' in refused.stderr and "--dim 32 (not 64)" in refused.stderr


def test_fine_tuning_may_add_a_tune_clock_length_and_key_that_start_at_zero_so_the_model_starts_as_the_one_it_loads(
        trained):
    source = trained[0] / 'ckpt' / 'latest.pt'
    saved = torch.load(source, weights_only=True)
    args = custom_training.Args()
    vars(args).update(saved['args'], init_from=str(source), tune_clock=True, tune_length=True, tune_key=True,
                      condition=True)
    model = runtime.build_model(vars(args))
    custom_training.load_init_weights(args, model, log=lambda line: None)
    assert not any(table.weight.any() for table in (model.net.clock_emb, model.net.length_emb, model.net.key_emb))
    plain = runtime.build_model(saved['args'])
    plain.load_state_dict(saved['model_state_dict'])
    x = torch.tensor([[START_IDX, 770, 10, 130, 300, 8, 131, 302, START_IDX, 4, 140, 305]])
    torch.testing.assert_close(model.eval().net(x), plain.eval().net(x), rtol=0, atol=1e-6)


def test_a_data_folder_named_in_bytes_that_are_not_utf8_trains_and_evaluates_on_a_strict_utf8_stdout(tmp_path):
    from tests.conftest import make_folder
    folder = os.fsencode(tmp_path)
    data = make_folder(tmp_path / 'midi', n=6, notes=40).rename(os.fsdecode(folder + b'/d\xe9ta'))
    out = os.fsdecode(folder + b'/r\xe9sults')
    # a desktop's UTF-8 locale writes stdout strictly, as PYTHONIOENCODING=utf-8 does here
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHONIOENCODING='utf-8')
    train = subprocess.run([sys.executable, str(ROOT / 'custom_training.py'), *TINY, '--data_path', data,
                            '--max_steps', '1', '--audio', 'false', '--save_dir', out + '/ckpt', '--samples_dir',
                            out + '/samples', '--cache_dir', tmp_path / 'cache'], env=env, capture_output=True,
                           timeout=240)
    assert train.returncode == 0, train.stderr.decode()[-2000:]
    assert b'checkpoints in ' + folder + b'/r\xe9sults/ckpt' in train.stdout  # the folder's own bytes
    evaluate = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), '--checkpoint', out + '/ckpt/latest.pt',
                               '--data_path', data, '--no_c2st', '--tunes', '0', '--num_samples', '2',
                               '--sample_length', '20', '--cache_dir', tmp_path / 'cache'], env=env,
                              capture_output=True, timeout=240)
    assert evaluate.returncode == 0, evaluate.stderr.decode()[-2000:]
    assert evaluate.stdout.splitlines()[-1].startswith(b'report: ' + folder + b'/r\xe9sults/ckpt/evaluation.json')
