"""runtime.py: device and precision choice on simulated machines, collectives, checkpoints, compile."""

import errno
import math
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import runtime
from custom_basic_transformer import AutoregressiveWrapper, MusicTransformer
from dataset import MIDI_Dataset, validation_sample
from runtime import (
    CheckpointError,
    DeviceError,
    Machine,
    all_gather,
    all_reduce,
    choose_device,
    compile_model,
    evaluate_split,
    load_checkpoint,
    save_checkpoint,
    start_machine,
    torchrun_ranks,
)
from sampling import generation_model, graphed_decoding
from tests.conftest import PAD, ROOT, random_tokens, tiny_model
from tokens import NUM_TOKENS, START_IDX


def test_optimizer_is_fused_on_the_cpu_and_decays_only_matrices():
    from runtime import build_optimizer
    model = tiny_model()
    optimizer = build_optimizer(model, 1e-3, 0.1, 'cpu')
    decayed, plain = optimizer.param_groups
    assert decayed['fused'] and decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decayed['params']) and all(p.dim() < 2 for p in plain['params'])
    assert len(decayed['params']) + len(plain['params']) == len(list(model.parameters()))


def test_compile_model_keeps_state_dict_keys_and_trains():
    model = tiny_model()
    keys = set(model.state_dict())
    compiled = compile_model(model, backend='eager')  # the wrapping is under test, not inductor's codegen
    assert set(compiled.state_dict()) == keys
    loss, acc = compiled(random_tokens(2, 9))
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------
# Device and precision on simulated machines

def simulate_cuda(monkeypatch, gpus=1, native_bf16=True):
    """A machine with `gpus` CUDA GPUs as far as runtime.py can tell; Ampere+ GPUs run bf16 natively."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
    # torch counts emulated bf16 as supported unless asked not to: only the including_emulation=False answer
    # tells a V100 from an A100
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Simulated GPU')


def simulate_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)


def test_one_gpu_auto_gives_an_indexed_device_and_bf16(monkeypatch):
    simulate_cuda(monkeypatch)
    machine = choose_device('auto')
    assert machine.device == torch.device('cuda', 0) and machine.device.index == 0
    assert machine.dtype == torch.bfloat16 and not machine.grad_scaler().is_enabled()
    assert choose_device('cuda').device == torch.device('cuda', 0)


def test_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    simulate_cuda(monkeypatch, gpus=2)
    machine = choose_device('auto', local_rank=1, rank=3, world=4)
    assert machine.device == torch.device('cuda', 1) and (machine.rank, machine.world) == (3, 4)
    assert torchrun_ranks({'WORLD_SIZE': '4', 'RANK': '3', 'LOCAL_RANK': '1'}) == (3, 4, 1)
    assert torchrun_ranks({}) == (0, 1, 0)


def test_pre_ampere_gpu_trains_in_fp16_with_a_gradient_scaler(monkeypatch):
    simulate_cuda(monkeypatch, native_bf16=False)
    machine = choose_device('auto')
    assert machine.dtype == torch.float16 and machine.grad_scaler().is_enabled()
    with pytest.raises(DeviceError, match='no native bf16'):
        choose_device('cuda', 'bfloat16')


def test_mps_computes_in_float32(monkeypatch):
    simulate_mps(monkeypatch)
    machine = choose_device('auto')
    assert machine.device.type == 'mps' and machine.dtype == torch.float32
    assert isinstance(machine.autocast(), nullcontext)
    with pytest.raises(DeviceError, match='MPS'):
        choose_device('mps', 'bfloat16')


def test_cpu_trains_in_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch):
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: True)
    machine = choose_device('cpu')
    assert machine.device == torch.device('cpu') and machine.dtype == torch.bfloat16
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: False)  # emulated bf16: float32 is faster
    assert choose_device('cpu').dtype == torch.float32
    assert choose_device('cpu', 'bfloat16').dtype == torch.bfloat16  # asked for: given


@pytest.mark.parametrize('flags, native', [('fpu avx2 avx512f avx512bw', False),
                                           ('fpu avx512f avx512_bf16 avx512_vnni', True),
                                           ('fpu avx512f amx_bf16 amx_tile', True)])
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path, flags, native):
    (tmp_path / 'cpuinfo').write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n')
    assert runtime.cpu_has_native_bf16(str(tmp_path / 'cpuinfo')) is native
    assert runtime.cpu_has_native_bf16(str(tmp_path / 'missing')) is False


@pytest.mark.parametrize('requested', ['cuda', 'cuda:0', 'mps', 'tpu'])
def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch, requested):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    with pytest.raises(DeviceError) as error:
        choose_device(requested)
    assert str(error.value).startswith(f'--device {requested}') and '\n' not in str(error.value)


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    simulate_cuda(monkeypatch, gpus=2)
    with pytest.raises(DeviceError, match='GPU 2 does not exist'):
        choose_device('cuda:2')


def test_starting_on_a_gpu_sets_an_indexed_device_and_tf32(monkeypatch):
    # torch.cuda.set_device(torch.device('cuda')) raises "Expected a torch.device with a specified index"
    simulate_cuda(monkeypatch)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: chosen.append(torch.device(device)))
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('highest')
        machine = start_machine('auto')
        assert torch.get_float32_matmul_precision() == 'high'  # TF32 matmuls on Ampere+
    finally:
        torch.set_float32_matmul_precision(precision)
    assert chosen == [torch.device('cuda', 0)] and chosen[0].index == 0
    assert machine.device == chosen[0]


def test_training_with_a_missing_gpu_stops_with_one_line_and_exit_2(tmp_path):
    from tests.conftest import run
    proc = run(['--device', 'cuda', '--save_dir', str(tmp_path / 'ckpt')], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().startswith('error: --device cuda') and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'ckpt').exists()


# ----------------------------------------------------------------------------------------------------------
# Collectives and buffers: NCCL's rules, checked on the CPU

def test_collectives_refuse_a_tensor_off_the_process_device(monkeypatch):
    simulate_cuda(monkeypatch)
    machine = choose_device('cuda')  # a CUDA process; the tensor below was built on the CPU by mistake
    with pytest.raises(RuntimeError, match='collective got a tensor on cpu'):
        all_reduce(torch.zeros(3), machine)
    with pytest.raises(RuntimeError, match='collective got a tensor on cpu'):
        all_gather(torch.zeros(3), machine)


def test_all_gather_builds_its_outputs_on_the_process_device(monkeypatch):
    # the meta device stands in for a GPU: a CPU-built output list (zeros_like of a CPU tensor) would fail
    machine = Machine(torch.device('meta'), torch.float32, rank=0, world=2)
    handed = []
    monkeypatch.setattr(runtime.dist, 'all_gather', lambda outputs, tensor: handed.extend(outputs + [tensor]))
    gathered = all_gather(torch.zeros(3, device='meta'), machine)
    assert len(gathered) == 2 and all(t.device.type == 'meta' for t in handed)


def test_only_runtime_calls_collectives_directly():
    # every collective goes through runtime's device-checking wrappers (DDP's own are torch's business)
    for path in ROOT.glob('*.py'):
        if path.name != 'runtime.py':
            text = path.read_text()
            for call in ('dist.all_reduce', 'dist.all_gather', 'dist.broadcast', 'dist.reduce'):
                assert call not in text, f'{path.name} calls {call}'


class Float64Guard(TorchDispatchMode):
    """Records every float64 tensor an op creates: MPS has none, so validation must not ask for one."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.seen.append(func)
        return out


def test_validation_and_sampling_create_no_float64_tensors():
    model = tiny_model(max_seq_len=16)
    sequences = [np.array([START_IDX % PAD] + list(range(1, 33)), dtype=np.uint16) % PAD for _ in range(3)]
    dataset = MIDI_Dataset(sequences, 16, pad_idx=PAD, rand_start=False)
    machine = choose_device('cpu', 'float32')
    with Float64Guard() as guard:
        loss, acc = evaluate_split(model, dataset, 2, machine)
        model.generate(random_tokens(2, 3), 20)
    assert guard.seen == [] and math.isfinite(loss)


def test_no_buffer_changes_shape_when_generating_past_seq_len_and_the_rotary_table(monkeypatch):
    import custom_basic_transformer
    monkeypatch.setattr(custom_basic_transformer, 'ROTARY_TABLE_POSITIONS', 0)  # the table ends at max_seq_len
    model = tiny_model(depth=2, max_seq_len=8)
    shapes = {name: b.shape for name, b in model.named_buffers()}
    prompt = random_tokens(2, 3)
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    assert {name: b.shape for name, b in model.named_buffers()} == shapes
    assert torch.equal(cached, model.generate(prompt, 30, temperature=0, use_cache=False))


def test_kv_cache_is_kept_in_the_autocast_dtype(monkeypatch):
    model = tiny_model(max_seq_len=8)
    caches = []
    new_cache = model.net.new_cache
    monkeypatch.setattr(model.net, 'new_cache', lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model.generate(random_tokens(1, 3), 4)
    model.generate(random_tokens(1, 3), 4)
    assert [c.keys.dtype for c in caches] == [torch.bfloat16, torch.float32]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def test_an_fp16_run_resumes_a_checkpoint_whose_scaler_was_off():
    from custom_training import TrainState, restore
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    saved = {'model_state_dict': model.state_dict(), 'optimizer_state_dict': optimizer.state_dict(),
             'scaler_state_dict': torch.amp.GradScaler('cpu', enabled=False).state_dict(),
             'step': 3, 'epoch': 0, 'data_position': 6, 'best_val_loss': 1.0}
    assert saved['scaler_state_dict'] == {}  # what a bf16 / fp32 run saves
    scaler = torch.amp.GradScaler('cpu', enabled=True)
    state = TrainState()
    restore(saved, model, optimizer, scaler, state)
    assert scaler.is_enabled() and state.step == 3 and state.position == 6


@pytest.mark.parametrize('content, expected', [
    (b'', 'not a readable checkpoint'),
    (b'hello, I am a text file\n', 'not a readable checkpoint'),
    (b'MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0', 'not a readable checkpoint'),
    ('truncated', 'not a readable checkpoint'),
    ('state_dict', 'not a checkpoint of this project'),
    ('folder', 'is a folder'),
    ('missing', 'not found'),
])
def test_a_file_that_is_no_checkpoint_gives_one_line_naming_it(tmp_path, content, expected):
    path = tmp_path / 'thing.pt'
    if content == 'truncated':
        torch.save({'model_state_dict': tiny_model().state_dict(), 'args': {}, 'tokenization': {}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == 'state_dict':
        torch.save(tiny_model().state_dict(), path)
    elif content == 'folder':
        path.mkdir()
    elif content != 'missing':
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and expected in message and '\n' not in message
    assert 'best.pt' in message  # says what a checkpoint is


@pytest.mark.parametrize('tokenization', [None, {}, {'timing': 'weird', 'beat_division': 12, 'include_drums': False},
                                          {'timing': 'ms', 'beat_division': 0, 'include_drums': False}, 'ms'])
def test_a_checkpoint_with_damaged_tokenization_settings_gives_one_line(tmp_path, tokenization):
    # refused on loading: otherwise generate.py would meet them when writing the first sample, evaluate.py per file
    path = tmp_path / 'odd.pt'
    torch.save({'model_state_dict': tiny_model().state_dict(), 'args': {}, 'tokenization': tokenization}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f'{path}: its tokenization settings are damaged') and '\n' not in message


@pytest.mark.parametrize('field, value', [('styles', 'reels'), ('styles', ['reels', 3]), ('styles', ['reels', 'reels']),
                                          ('styles', [f's{i}' for i in range(1000)]), ('tune_lengths', [120]),
                                          ('tune_lengths', {'reels': [120]}), ('tune_lengths', {'': []}),
                                          ('tune_lengths', {'': [120.5]}), ('tune_lengths', {'': [-4]}),
                                          ('tune_lengths', {'': [2**63]}), ('tune_lengths', {'': torch.arange(3)}),
                                          ('tune_lengths', {'reels': torch.arange(3)})])
def test_a_checkpoint_with_damaged_styles_or_tune_lengths_gives_one_line(tmp_path, field, value):
    # generate.py reads style ids and draws lengths from these: a hand-edited one is named on loading
    path = tmp_path / 'odd.pt'
    tokenization = {'timing': 'ms', 'beat_division': 12, 'include_drums': False}
    state = {'model_state_dict': tiny_model().state_dict(), 'args': {}, 'tokenization': tokenization}
    torch.save({**state, 'styles': ['reels', 'jigs'], 'tune_lengths': {'': [96, 120], 'reels': [96]}}, path)
    assert load_checkpoint(path)['tune_lengths']['reels'] == [96]  # the sound form loads
    torch.save({**state, field: value}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f'{path}: its {field} are damaged') and '\n' not in message


@pytest.mark.parametrize('damage, says', [
    (None, None),
    ({'dim': -4}, 'its saved args do not describe a model (dim -4: must be an integer >= 1)'),
    ({'heads': 2.5}, 'its saved args do not describe a model (heads 2.5: must be an integer >= 1)'),
    ('args', 'its saved args do not describe a model (a str, not a dict of settings)'),
    ('nan', 'its weights hold NaN or infinite values'),
    ('inf', 'its weights hold NaN or infinite values'),
])
def test_a_checkpoint_whose_args_or_weights_cannot_make_a_model_gives_one_line(tmp_path, damage, says):
    from tokens import tokenization_settings
    config = dict(dim=16, depth=1, heads=2, dim_head=8, seq_len=16, dropout=0.0)
    weights = runtime.build_model(config).state_dict()
    if damage in ('nan', 'inf'):  # a damaged file, or a run that diverged, holds weights no sampling survives
        weights['net.token_emb.weight'][3, 5] = float(damage)
    args = 'args' if damage == 'args' else {**config, **(damage if isinstance(damage, dict) else {})}
    path = tmp_path / 'model.pt'
    torch.save({'model_state_dict': weights, 'args': args, 'tokenization': tokenization_settings()}, path)
    if says is None:
        assert runtime.load_model(path)[0].net.token_emb.weight.shape == (NUM_TOKENS, 16)
        return
    # args that are no dict are refused on loading: evaluate.py reads them before it builds the model
    load = runtime.load_checkpoint if damage == 'args' else runtime.load_model
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert str(error.value).startswith(f'{path}: {says}') and '\n' not in str(error.value)


shutil_usage = namedtuple('shutil_usage', 'total used free')  # what shutil.disk_usage returns


def test_a_short_write_reported_by_torch_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / 'latest.pt'
    save_checkpoint(path, {'step': 1})

    def short_write(obj, f):
        raise RuntimeError('[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file '
                           'data/0: file write failed\nunexpected pos 1234 vs 1200')
    monkeypatch.setattr(runtime.torch, 'save', short_write)
    monkeypatch.setattr(runtime.shutil, 'disk_usage', lambda p: shutil_usage(total=10**9, used=10**9, free=4096))
    with pytest.raises(CheckpointError, match=r'no space left on the device \(0 MiB free\); the previous') as error:
        save_checkpoint(path, {'step': 2})
    assert 'enforce' not in str(error.value) and '\n' not in str(error.value)
    monkeypatch.setattr(runtime.shutil, 'disk_usage', lambda p: shutil_usage(total=10**12, used=0, free=10**12))
    with pytest.raises(CheckpointError, match='PytorchStreamWriter failed') as error:
        save_checkpoint(path, {'step': 2})
    assert 'unexpected pos' not in str(error.value)  # one line
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / 'latest.pt'
    save_checkpoint(path, {'step': 1})

    def full_disk(obj, f):
        with open(f, 'wb') as out:
            out.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(runtime.torch, 'save', full_disk)
    with pytest.raises(CheckpointError, match='no space left') as error:
        save_checkpoint(path, {'step': 2})
    assert 'previous checkpoint is kept' in str(error.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['latest.pt']


# ----------------------------------------------------------------------------------------------------------
# Generation paths

def test_int8_generation_is_a_cpu_path_chosen_for_one_row_of_a_wide_model(monkeypatch):
    import sampling
    model = tiny_model()  # dim 32
    notes = []
    cpu = choose_device('cpu')
    assert generation_model(model, cpu, batch=1)[0] is model  # narrow: float32 is faster
    monkeypatch.setattr(sampling, 'INT8_MIN_DIM', 32)
    quantized, autocast = generation_model(model, cpu, batch=1, log=notes.append)
    assert quantized is not model and isinstance(autocast, nullcontext) and not notes
    assert generation_model(model, cpu, batch=16)[0] is model  # several rows: the model itself
    assert generation_model(model, cpu, batch=1, int8=False)[0] is model
    assert generation_model(model, cpu, batch=16, int8=True)[0] is not model
    gpu = Machine(torch.device('cuda', 0), torch.float32)
    assert generation_model(model, gpu, batch=1, log=notes.append)[0] is model and not notes
    same, _ = generation_model(model, gpu, int8=True, log=notes.append)
    assert same is model and len(notes) == 1 and 'for CPU generation' in notes[0]


def test_scripts_decode_from_a_cuda_graph_on_a_gpu_and_with_the_plain_cache_elsewhere():
    assert graphed_decoding(Machine(torch.device('cuda', 0), torch.bfloat16))
    assert not graphed_decoding(choose_device('cpu'))
    assert not graphed_decoding(Machine(torch.device('mps'), torch.float32))


def test_validation_batches_windows_of_one_length_and_gives_the_one_window_at_a_time_result():
    torch.manual_seed(0)
    model = AutoregressiveWrapper(MusicTransformer(dim=32, depth=1, heads=2, dim_head=8, max_seq_len=16))
    sequences = [np.arange(1, n + 1, dtype=np.uint16) for n in (40, 6, 17, 5, 8)]
    dataset = MIDI_Dataset(sequences, 16, rand_start=False)  # windows of 17, 17, 8, 6, 17, 5, 8
    machine = choose_device('cpu', 'float32')
    one_at_a_time = evaluate_split(model, dataset, 1, machine)
    widths = []
    forward = model.forward
    model.forward = lambda x, **k: widths.append(x.shape[1]) or forward(x, **k)
    batched = evaluate_split(model, dataset, 2, machine)
    assert widths == [6, 8, 17, 17]  # sorted: (5, 6), (8, 8), (17, 17), (17); no short window pads to 17
    assert batched == pytest.approx(one_at_a_time, rel=1e-6)


def sampled_split():
    """A validation sample whose windows are told apart by their first token (files start 60 ids apart)."""
    sequences = [np.arange(60 * i, 60 * i + n, dtype=np.uint16) for i, n in enumerate((40, 6, 17, 5, 58, 33, 21, 9))]
    dataset = MIDI_Dataset(sequences, 16, rand_start=False)
    return torch.utils.data.Subset(dataset, validation_sample(dataset, 90))


def score_and_record(machine):
    """evaluate_split of a tiny model over sampled_split(): (loss, accuracy), first tokens of the windows scored."""
    torch.manual_seed(0)
    model = AutoregressiveWrapper(MusicTransformer(dim=32, depth=1, heads=2, dim_head=8, max_seq_len=16))
    seen = []
    forward = model.forward
    model.forward = lambda x, **k: seen.extend(x[:, 0].tolist()) or forward(x, **k)
    return evaluate_split(model, sampled_split(), 2, machine), seen


def score_on_rank(rank, store, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        results[rank] = score_and_record(Machine(torch.device('cpu'), torch.float32, rank=rank, world=2))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_share_the_validation_sample_without_overlap_and_agree_on_its_loss(tmp_path):
    alone, windows = score_and_record(choose_device('cpu', 'float32'))
    assert len(windows) < len(sampled_split().dataset)  # a sample, not the whole split
    context = torch.multiprocessing.get_context('fork')  # no re-import of torch in the workers
    with context.Manager() as manager:
        results = manager.dict()
        ranks = [context.Process(target=score_on_rank, args=(rank, tmp_path / 'store', results)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=60)
        assert [process.exitcode for process in ranks] == [0, 0]
        (loss0, seen0), (loss1, seen1) = results[0], results[1]
    assert seen0 and seen1 and not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == sorted(windows)
    assert loss0 == loss1 == pytest.approx(alone, rel=1e-5)


def test_a_checkpoint_from_before_prev_tokens_builds_the_model_it_was_trained_as():
    config = dict(dim=16, depth=1, heads=2, dim_head=8, seq_len=16, dropout=0.0)
    assert runtime.build_model(config).net.prev_emb is None  # its 'args' have no such field: it had no table
    assert runtime.build_model({**config, 'prev_tokens': 3}).net.prev_emb.weight.shape[0] == 3 * NUM_TOKENS


def test_set_cpu_threads_gives_torch_that_many_threads_and_0_leaves_the_default():
    before = torch.get_num_threads()
    try:
        runtime.set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        runtime.set_cpu_threads(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_default_data_folder_is_looked_into_only_up_to_its_first_midi_file(tmp_path, monkeypatch, capsys):
    import token_cache
    from tests.conftest import make_folder
    for part in ('a', 'b', 'c'):
        make_folder(tmp_path / 'dataset' / part, n=4, notes=10)
    (tmp_path / 'dataset' / 'a' / 'huge.mid').write_bytes(bytes(2000))
    monkeypatch.setattr(token_cache, 'MAX_MIDI_BYTES', 1000)
    monkeypatch.setattr(runtime, 'DEFAULT_DATA_PATH', str(tmp_path / 'dataset'))
    real, seen = token_cache._files_under, []

    def counted(root):
        for file in real(root):
            seen.append(file)
            yield file
    monkeypatch.setattr(token_cache, '_files_under', counted)
    assert runtime.resolve_data_path(str(tmp_path / 'dataset')) == str(tmp_path / 'dataset')
    assert len(seen) < 12 and capsys.readouterr().out == ''  # load_corpus's walk names the skipped file, once
    (tmp_path / 'empty').mkdir()
    monkeypatch.setattr(runtime, 'DEFAULT_DATA_PATH', str(tmp_path / 'empty'))
    assert runtime.resolve_data_path(str(tmp_path / 'empty'), log=lambda line: None) == str(runtime.BUNDLED_DATASET)


FAULTS_OF_A_REPEATED_STEP = '''
import resource, sys
import torch
import runtime
if sys.argv[1] == 'keep':
    assert runtime.keep_freed_memory()
def step():  # a training step's pattern: tensors of several megabytes, all freed at its end
    blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(10)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='a glibc setting')
def test_keep_freed_memory_lets_a_repeated_step_reuse_its_pages():
    def page_faults(mode):
        done = subprocess.run([sys.executable, '-c', FAULTS_OF_A_REPEATED_STEP, mode], capture_output=True,
                              text=True, cwd=ROOT, check=True)
        return int(done.stdout)
    # glibc's defaults hand the freed 80 MB back to the OS, so each step faults its 20,480 pages in again
    assert page_faults('keep') < page_faults('default') / 4


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGTERM')
def test_sigterm_inside_sigterm_as_ctrl_c_is_a_keyboard_interrupt_named_sigterm_with_status_143():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as stop:
        with runtime.sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode: never reached
    assert runtime.stopped_by(stop.value) == ('SIGTERM', 143)
    assert runtime.stopped_by(KeyboardInterrupt()) == ('Ctrl-C', 130)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGTERM')
def test_sigterm_as_ctrl_c_leaves_a_sigterm_handler_already_set_in_place():
    def ours(signum, frame):
        pass
    before = signal.signal(signal.SIGTERM, ours)
    try:
        with runtime.sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)
