"""The GPU path on a real CUDA GPU: bf16 and fp16 training that resumes exactly, flash attention, cached
generation and its CUDA-graph replay, the scripts on a GPU checkpoint, and a two-GPU torchrun.

Skipped as a whole where torch sees no CUDA GPU (the CPU tests simulate device choice; these run the kernels).
Each test is a tiny model and a few steps, well under half a minute on one GPU; `bash benchmarks/gpu_check.sh`
runs this file and the GPU benchmark in one command.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import runtime
from dataset import MIDI_Dataset, load_corpus
from tests.conftest import ROOT, TINY, random_tokens, run, stopped_and_resumed, tiny_model
from tokens import tokenization_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def native_half():
    """bf16 where the GPU runs it natively (Ampere and newer), else fp16: what --dtype auto picks on this GPU."""
    return 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'


def skip_unless_runnable(dtype):
    # torch counts emulated bf16 as supported unless asked not to; training refuses it (runtime.choose_device)
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f'{torch.cuda.get_device_name()} has no native bf16')


def gpu_run_args(data, tmp_path, dtype, *extra):
    """conftest's TINY run on the GPU in the given precision, with its data and token cache."""
    args = list(TINY)
    args[args.index('--dtype') + 1] = dtype
    return args + ['--device', 'cuda', '--data_path', str(data), '--cache_dir', str(tmp_path / 'cache'), *extra]


class DispatchRecorder(TorchDispatchMode):
    """Sees every aten op below autograd (backward included): its name, and each float64 tensor made on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.float64_on_gpu = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == 'cuda':
                self.float64_on_gpu.append(str(func))
        return out


# ----------------------------------------------------------------------------------------------------------
# Training

@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_bf16_and_fp16_training_resumes_exactly_on_the_gpu(data, tmp_path, monkeypatch, dtype):
    skip_unless_runnable(dtype)
    # deterministic cuBLAS workspaces; other GPU kernels (flash backward's atomics) may still differ in the last
    # bits between processes, hence the tolerance below, far under what one optimizer step moves a weight
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    # dropout everywhere, attention included: every GPU mask must be redrawn as the unbroken run drew it (training
    # seeds each step from (seed, rank, step), so no CUDA generator state is saved)
    common = gpu_run_args(data, tmp_path, dtype, '--dropout', '0.1', '--attn_dropout', '0.1', '--validate_every',
                          '100', '--generate_every', '100', '--save_every', '4', '--max_steps', '8')
    full, resumed, at5_path = stopped_and_resumed(common, tmp_path)
    assert full['step'] == resumed['step'] == 8
    assert full['args']['dtype'] == resumed['args']['dtype'] == dtype
    assert abs(full['loss'] - resumed['loss']) < 1e-3
    for key, value in full['model_state_dict'].items():
        torch.testing.assert_close(resumed['model_state_dict'][key], value, rtol=1e-3, atol=1e-4, msg=key)
    if dtype == 'float16':
        # the loss scale (and its growth count) is run state too: a resumed run must not restart it
        at5 = torch.load(at5_path, weights_only=True)
        assert at5['scaler_state_dict'] and resumed['scaler_state_dict']
        assert resumed['scaler_state_dict'] == full['scaler_state_dict']
    else:
        assert not full['scaler_state_dict']  # bf16 has float32's exponent range: no loss scaling


def test_fp16_run_resumes_a_bf16_checkpoint(data, tmp_path):
    first = native_half() if native_half() == 'bfloat16' else 'float32'
    common = ['--save_dir', str(tmp_path / 'ckpt'), '--samples_dir', str(tmp_path / 's'), '--validate_every', '100',
              '--generate_every', '100', '--save_every', '2']
    run(gpu_run_args(data, tmp_path, first, '--max_steps', '2', *common), cwd=tmp_path)
    assert not torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)['scaler_state_dict']
    # the enabled fp16 scaler must start afresh, not be fed the disabled scaler's empty state
    proc = run(gpu_run_args(data, tmp_path, 'float16', '--max_steps', '4', '--checkpoint', 'latest', *common),
               cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'precision float16' in proc.stdout
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest.pt', weights_only=True)
    assert ckpt['step'] == 4 and ckpt['scaler_state_dict']


@pytest.mark.parametrize('attn_dropout', [0.0, 0.1])  # the default, and the original's attention dropout
def test_training_uses_the_flash_attention_kernel(attn_dropout):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip('torch runs flash attention on sm80 (Ampere) and newer only')
    torch.manual_seed(0)
    model = runtime.build_model({'seq_len': 128, 'dim': 64, 'depth': 2, 'heads': 2, 'dim_head': 32,
                                 'dropout': 0.1, 'attn_dropout': attn_dropout}).cuda().train()
    x = random_tokens(2, 129).cuda()
    dtype = getattr(torch, native_half())
    # with flash the only backend allowed, scaled_dot_product_attention raises when an input rules it out (a
    # float32 q from the rotary tables, a dense mask, a layout); the recorder shows attention went through it
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), DispatchRecorder() as recorder:
        with torch.autocast('cuda', dtype=dtype):
            loss, _ = model(x)
        loss.backward()
    flash = [op for op in recorder.ops if 'attention' in op]
    assert flash == ['_scaled_dot_product_flash_attention'] * 2 + ['_scaled_dot_product_flash_attention_backward'] * 2
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------
# Generation

@pytest.fixture
def full_float32(monkeypatch):
    """float32 matmuls in float32: the scripts turn TF32 on (runtime.start_machine), which rounds to 10 mantissa
    bits and can flip a greedy choice between two nearly equal logits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    yield
    torch.set_float32_matmul_precision(previous)


def test_cached_generation_equals_uncached_on_the_gpu(full_float32):
    model = tiny_model(depth=2, max_seq_len=16).cuda().eval()
    prompt = random_tokens(2, 3).cuda()
    new_tokens = 3 * model.max_seq_len  # well past max_seq_len: the cache's ring buffer wraps twice
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, new_tokens) and cached.device.type == 'cuda'
    assert torch.equal(cached, uncached)


def test_a_captured_cuda_graph_replays_on_the_current_values_of_its_inputs():
    from fast_ops import capture_cuda_graph
    x = torch.zeros(5, device='cuda')
    graph, out = capture_cuda_graph(lambda: x * 2 + 1)
    x.copy_(torch.arange(5.0))
    graph.replay()
    assert torch.equal(out, torch.arange(5.0, device='cuda') * 2 + 1)


@pytest.mark.parametrize('prev_tokens, static, tune_clock', [(0, True, False), (3, True, False), (3, 'compile', False),
                                                         (3, True, True)])  # the clock: tune_clock, _length, _key
def test_static_cache_generation_replays_one_cuda_graph_and_equals_the_uncaptured_cache(
        full_float32, monkeypatch, prev_tokens, static, tune_clock):
    import kv_cache
    captures = []
    capture = kv_cache.capture_cuda_graph
    monkeypatch.setattr(kv_cache, 'capture_cuda_graph', lambda fn: captures.append(1) or capture(fn))
    model = tiny_model(depth=2, max_seq_len=16, prev_tokens=prev_tokens, tune_clock=tune_clock,
                       tune_length=tune_clock, tune_key=tune_clock).cuda().eval()
    prompt = random_tokens(2, 3).cuda()
    new_tokens = 3 * model.max_seq_len  # the ring of slots wraps twice
    length = 200 if tune_clock else None
    cached = model.generate(prompt, new_tokens, temperature=0, static_cache=False, length=length)
    graphed = model.generate(prompt, new_tokens, temperature=0, static_cache=static, length=length)
    assert captures == [1]  # captured once, replayed for every further token
    assert torch.equal(graphed, cached)


def test_guided_generation_captures_a_graph_per_cache_and_equals_the_uncaptured_one(full_float32, monkeypatch):
    import kv_cache
    captures = []
    capture = kv_cache.capture_cuda_graph
    monkeypatch.setattr(kv_cache, 'capture_cuda_graph', lambda fn: captures.append(1) or capture(fn))
    model = tiny_model(depth=2, max_seq_len=16).cuda().eval()
    prompt, plain = random_tokens(2, 5).cuda(), random_tokens(2, 2, seed=4).cuda()
    guided = lambda static: model.generate(prompt, 40, temperature=0, guidance=2.0, unconditioned=plain,
                                           static_cache=static)
    cached = guided(False)
    assert torch.equal(guided(True), cached)
    assert captures == [1, 1]  # the asked rows' cache and the unasked rows' cache


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_kv_cache_holds_the_autocast_dtype(monkeypatch, dtype):
    skip_unless_runnable(dtype)
    model = tiny_model(depth=2, max_seq_len=16).cuda().eval()
    caches = []
    new_cache = model.net.new_cache

    def spy(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]
    monkeypatch.setattr(model.net, 'new_cache', spy)
    with torch.autocast('cuda', dtype=getattr(torch, dtype)):
        out = model.generate(random_tokens(2, 3).cuda(), 20, temperature=0, use_cache=True)
    assert out.shape == (2, 20) and len(caches) == 1
    # a float32 cache would cost twice the memory and a conversion of the whole window per token
    assert caches[0].keys.dtype == caches[0].values.dtype == getattr(torch, dtype)
    assert caches[0].keys.device.type == 'cuda'


# ----------------------------------------------------------------------------------------------------------
# The scripts on a GPU checkpoint

def test_generate_and_evaluate_run_on_the_gpu_checkpoint(data, tmp_path):
    args = gpu_run_args(data, tmp_path, 'auto', '--save_dir', str(tmp_path / 'ckpt'), '--samples_dir',
                        str(tmp_path / 's'), '--max_steps', '4', '--validate_every', '2', '--generate_every', '4',
                        '--save_every', '4')
    run(args, cwd=tmp_path)
    best = tmp_path / 'ckpt' / 'best.pt'
    assert best.exists()
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def script(name, *script_args):
        proc = subprocess.run([sys.executable, str(ROOT / name), '--checkpoint', str(best), '--device', 'cuda',
                               *script_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f'{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
        return proc

    script('generate.py', '--num_samples', '2', '--length', '40', '--no_audio', '--output_dir', str(tmp_path / 'g'))
    for name in ('sample_0.mid', 'sample_1.mid', 'sample_0.png', 'sample_1.png'):
        assert (tmp_path / 'g' / name).stat().st_size > 0, name

    proc = script('generate.py', '--num_samples', '1', '--length', '40', '--no_audio', '--int8', '--output_dir',
                  str(tmp_path / 'q'))
    notes = [line for line in proc.stdout.splitlines() if '--int8' in line]
    assert len(notes) == 1 and 'int8 is for CPU generation' in notes[0], proc.stdout
    assert (tmp_path / 'q' / 'sample_0.mid').stat().st_size > 0

    script('evaluate.py', '--num_samples', '4', '--sample_length', '40', '--output_dir', str(tmp_path / 'e'))
    report = json.loads((tmp_path / 'e' / 'evaluation.json').read_text())
    assert report['device'].startswith('cuda') and report['samples']['count'] == 4
    assert (tmp_path / 'e' / 'evaluation.png').stat().st_size > 0


@pytest.mark.parametrize('dtype', ['auto', 'float32'])
def test_validation_on_the_gpu_creates_no_float64_tensors(data, tmp_path, dtype):
    # MPS has no float64 at all; a GPU run that makes none here keeps validation portable to it
    train, val, _ = load_corpus(data, tokenization_settings(), tmp_path / 'cache', min_notes=10, verbose=False)
    dataset = MIDI_Dataset(list(train) + list(val), 32, rand_start=False)
    machine = runtime.choose_device('cuda', dtype)
    torch.manual_seed(0)
    model = runtime.build_model({'seq_len': 32, 'dim': 32, 'depth': 2, 'heads': 2, 'dim_head': 16,
                                 'dropout': 0.1}).to(machine.device)
    with DispatchRecorder() as recorder:
        loss, acc = runtime.evaluate_split(model, dataset, 8, machine)
        with machine.autocast():
            model.generate(random_tokens(2, 3).to(machine.device), 40, use_cache=True)  # past seq_len
    assert recorder.float64_on_gpu == []
    assert loss == loss and 0 <= acc <= 1  # not NaN


# ----------------------------------------------------------------------------------------------------------
# Two GPUs

def test_two_gpu_torchrun_keeps_ranks_in_sync(data, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip('needs two CUDA GPUs')
    # --device auto: each process takes cuda:LOCAL_RANK and NCCL; samples longer than seq_len use the sliding cache
    args = gpu_run_args(data, tmp_path, 'auto', '--save_dir', str(tmp_path / 'ckpt'), '--samples_dir',
                        str(tmp_path / 'samples'), '--max_steps', '4', '--validate_every', '2', '--generate_every',
                        '2', '--save_every', '2', '--generate_length', '40')
    args[args.index('--device') + 1] = 'auto'
    proc = run(args, cwd=tmp_path, torchrun=2)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'device cuda:0 (2 processes)' in proc.stdout, output
    assert 'ranks in sync: True' in proc.stdout, output
    assert (tmp_path / 'ckpt' / 'latest.pt').exists() and (tmp_path / 'samples' / 'sample_step_4.mid').exists()
