"""custom_basic_transformer.py on tiny models: masking, loss, cache, generation, sampling filters."""

import pytest
import torch

from custom_basic_transformer import (
    CLOCK_READINGS,
    NO_DEGREE,
    UNTOLD,
    AutoregressiveWrapper,
    MusicTransformer,
    clock_after,
    clock_reading,
    degree_reading,
    elapsed_from_head,
    key_after,
    labels_after,
    printModelParameters,
    time_left,
    top_k,
    top_p,
    tune_clock,
    tune_keys,
    tune_labels,
)
from tests.conftest import PAD, VOCAB, random_tokens, tiny_model
from tokens import NUM_TOKENS, PAD_IDX, START_IDX


def test_defaults_use_dataset_vocabulary_and_ignore_its_pad_token():
    model = AutoregressiveWrapper(MusicTransformer(dim=32, depth=1, heads=2, dim_head=8, max_seq_len=8))
    assert model.net.num_tokens == NUM_TOKENS
    assert model.pad_value == PAD_IDX and model.ignore_index == PAD_IDX
    assert model.max_seq_len == 8


def test_logits_shape_and_loss_accuracy_are_scalars():
    model = tiny_model()
    x = random_tokens(3, 9)
    assert model.net(x).shape == (3, 9, VOCAB)
    loss, acc = model(x)
    assert loss.shape == () and acc.shape == ()
    assert acc.dtype.is_floating_point and 0.0 <= acc.item() <= 1.0
    assert torch.isfinite(loss) and loss.requires_grad


def test_changing_a_future_token_never_changes_past_logits():
    model = tiny_model().eval()
    x = random_tokens(2, 12)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % PAD
    before, after = model.net(x), model.net(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize('right', [True, False])
def test_padding_is_excluded_from_loss_and_accuracy(right):
    model = tiny_model().eval()
    first = torch.tensor([[5]])
    logits = model.net(first)[0, 0]
    predicted = logits.argmax().item()
    target = predicted if right else (predicted + 1) % PAD
    # only the first target is real; the other nine are padding
    x = torch.tensor([[5, target] + [PAD] * 9])
    loss, acc = model(x)
    assert acc.item() == (1.0 if right else 0.0)
    expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
    torch.testing.assert_close(loss, expected)


def test_batch_of_only_padding_gives_zero_loss_that_backpropagates():
    model = tiny_model()
    loss, acc = model(torch.full((2, 6), PAD))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_state_dict_holds_parameters_only_and_round_trips():
    model = tiny_model().eval()
    state = model.state_dict()
    assert set(state) == {name for name, _ in model.named_parameters()}
    fresh = tiny_model(seed=7).eval()
    fresh.load_state_dict(state)
    x = random_tokens(2, 10)
    torch.testing.assert_close(fresh.net(x), model.net(x))


def test_rotary_tables_are_not_saved_even_after_generation_grows_them():
    model = tiny_model(max_seq_len=8)
    model.generate(torch.tensor([1, 2]), 20, temperature=0)
    assert model.net.rotary.cos.shape[0] >= 22
    assert not any('rotary' in key for key in model.state_dict())
    # grown tables are ordinary tensors: training still works after generation
    model.train()
    model(random_tokens(2, 9))[0].backward()


def test_previous_embedding_sums_the_tables_of_the_tokens_before_within_the_tune():
    torch.manual_seed(0)
    net = MusicTransformer(dim=16, depth=1, heads=2, dim_head=8, max_seq_len=8, prev_tokens=3)
    # -1: no token; a tune starts at column 3 of the first row
    seq = torch.tensor([[-1, -1, 5, START_IDX, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8]])
    expected = torch.zeros(2, 5, 16)
    for row in range(2):
        for t in range(5):  # output position t is seq column t + 3
            for d in (1, 2, 3):
                token = seq[row, t + 3 - d]
                tune_starts_after_it = (seq[row, t + 4 - d:t + 4] == START_IDX).any()
                if token >= 0 and not tune_starts_after_it:
                    expected[row, t] += net.prev_emb.weight[token + (d - 1) * NUM_TOKENS]
    torch.testing.assert_close(net.previous_embedding(seq), expected)


@pytest.mark.parametrize('prev_tokens', [0, 3])
@pytest.mark.parametrize('new_tokens', [10, 45])  # inside max_seq_len 16, and well beyond it
@pytest.mark.parametrize('batch', [1, 3])
def test_greedy_generation_with_cache_equals_without(new_tokens, batch, prev_tokens):
    model = tiny_model(depth=3, max_seq_len=16, prev_tokens=prev_tokens)
    prompt = random_tokens(batch, 4)
    cached = model.generate(prompt, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (batch, new_tokens)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize('prev_tokens', [0, 1, 3])
def test_cached_logits_match_uncached_inside_and_beyond_max_seq_len(prev_tokens):
    model = tiny_model(depth=3, max_seq_len=16, prev_tokens=prev_tokens).eval()
    sequence = random_tokens(2, 50)
    net = model.net
    cache = net.new_cache(2)
    with torch.no_grad():
        cached = [net(sequence[:, :5], cache=cache)[:, -1]]
        cached += [net(sequence[:, t:t + 1], cache=cache)[:, -1] for t in range(5, 50)]
        uncached = [net(sequence[:, :t])[:, -1] for t in range(5, 51)]
    for step, (c, u) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(c, u, atol=1e-5, rtol=1e-5, msg=f'step {step}')


@pytest.mark.parametrize('prev_tokens', [0, 3])
def test_prompt_longer_than_max_seq_len_fills_the_cache_correctly(prev_tokens):
    model = tiny_model(depth=2, max_seq_len=8, prev_tokens=prev_tokens)
    prompt = random_tokens(2, 21)
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize('prev_tokens', [0, 3])
def test_static_cache_generation_equals_the_cached_one_past_max_seq_len_and_the_rotary_table(monkeypatch, prev_tokens):
    import custom_basic_transformer
    monkeypatch.setattr(custom_basic_transformer, 'ROTARY_TABLE_POSITIONS', 24)  # 16 + 24 + 5: table ends at 24
    model = tiny_model(depth=3, max_seq_len=16, prev_tokens=prev_tokens)
    prompt = random_tokens(2, 5)
    cached = model.generate(prompt, 40, temperature=0)
    assert torch.equal(model.generate(prompt, 40, temperature=0, static_cache=True), cached)


def test_compiled_static_cache_step_compiles_once_and_equals_the_cached_generation():
    from torch._dynamo.utils import counters
    counters.clear()
    model = tiny_model(depth=2, max_seq_len=16, prev_tokens=3, tune_clock=True).eval()
    prompt = random_tokens(2, 5)
    # 40 tokens: the ring of 16 slots wraps; a second call with another prompt length reuses the compiled step
    assert torch.equal(model.generate(prompt, 40, temperature=0, static_cache='compile'),
                       model.generate(prompt, 40, temperature=0))
    other = random_tokens(2, 7, seed=2)
    assert torch.equal(model.generate(other, 20, temperature=0, static_cache='compile'),
                       model.generate(other, 20, temperature=0))
    assert counters['stats']['unique_graphs'] == 1


def test_static_cache_logits_match_the_cached_ones_under_bf16_autocast():
    # bf16 sums over a masked full window and over the filled slots round differently: close, not equal
    model = tiny_model(depth=3, max_seq_len=16, prev_tokens=3).eval()
    sequence = random_tokens(2, 24)
    net = model.net
    logits = []
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        for cache in (net.new_cache(2, dtype=torch.bfloat16), net.new_cache(2, dtype=torch.bfloat16, static=True)):
            net(sequence[:, :5], cache=cache)
            logits.append(torch.stack([cache.decode(net, sequence[:, t:t + 1]) for t in range(5, 24)]).float())
    torch.testing.assert_close(logits[1], logits[0], atol=0.03, rtol=0.03)


def test_static_cache_step_runs_the_same_ops_on_the_same_shapes_at_every_position():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            calls.append((str(func), shapes, [a for a in args if isinstance(a, (int, float, bool))]))
            return func(*args, **(kwargs or {}))

    model = tiny_model(depth=2, max_seq_len=8, prev_tokens=3, tune_clock=True, tune_length=True, tune_key=True).eval()
    net = model.net
    cache = net.new_cache(1, static=True)
    steps = []
    with torch.inference_mode():
        net(random_tokens(1, 3), cache=cache, length=torch.tensor([40]))
        for t in range(12):  # positions 3 .. 14: before and after the ring of 8 slots wraps
            calls = []
            with Recorder():
                cache.decode(net, torch.tensor([[t % PAD]]))
            steps.append(calls)
    # a CUDA graph replays what it captured: no shape and no Python number may depend on the position
    assert all(step == steps[0] for step in steps) and len(steps[0]) > 20


def test_single_layer_sliding_window_equals_reencoding_the_last_window():
    # with one layer, the cache of the last max_seq_len positions is exactly the original's crop-and-re-encode
    model = tiny_model(depth=1, max_seq_len=8).eval()
    out = model.generate(torch.tensor([[3, 4]]), 30, temperature=0, return_prime=True)
    with torch.no_grad():
        for t in range(2, out.shape[1]):
            window = out[:, max(0, t - 8):t]
            assert model.net(window)[0, -1].argmax().item() == out[0, t].item()


def test_deeper_model_long_context_differs_from_reencoding_only_past_the_window():
    model = tiny_model(depth=3, max_seq_len=8).eval()
    sequence = random_tokens(1, 30)
    with torch.no_grad():
        inside = model.net(sequence[:, :8])[0, -1]
        full_inside = model.net(sequence)[0, 7]
        sliding = model.net(sequence)[0, -1]
        recoded = model.net(sequence[:, -8:])[0, -1]
    torch.testing.assert_close(inside, full_inside)
    assert not torch.allclose(sliding, recoded, atol=1e-4)


def test_generation_restores_train_mode_and_returns_ordinary_tensors():
    model = tiny_model(dropout_p=0.1)
    model.train()
    out = model.generate(torch.tensor([1, 2, 3]), 5)
    assert model.training and all(m.training for m in model.modules())
    assert out.shape == (5,) and out.dtype == torch.long and not out.is_inference()
    model.eval()
    model.generate(torch.tensor([1]), 3)
    assert not model.training


def test_return_prime_keeps_the_prompt():
    model = tiny_model()
    prompt = random_tokens(2, 3)
    out = model.generate(prompt, 4, temperature=0, return_prime=True)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)


def test_eos_stops_generation_and_pads_rows_that_finished():
    model = tiny_model().eval()
    prompt = random_tokens(2, 3)
    greedy = model.generate(prompt, 12, temperature=0)
    eos = greedy[0, 2].item()
    out = model.generate(prompt, 12, temperature=0, eos_token=eos)
    for row in range(2):
        hits = (greedy[row] == eos).nonzero()
        if len(hits):
            stop = hits[0].item()
            assert torch.equal(out[row, :stop + 1], greedy[row, :stop + 1])
            assert torch.all(out[row, stop + 1:] == PAD)
    if all((greedy[row] == eos).any() for row in range(2)):
        last_stop = max((greedy[row] == eos).nonzero()[0].item() for row in range(2))
        assert out.shape[1] == last_stop + 1


def test_bad_generation_arguments_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match='prompt'):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='prompt'):
        model.generate(torch.zeros(1, 1, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match='temperature'):
        model.generate(torch.tensor([1]), 3, temperature=-1)
    for strength in (-0.1, 0.51, 1.0, float('nan')):
        with pytest.raises(ValueError, match=r'repeat_memory must be in \[0, 0.5\]'):
            model.generate(torch.tensor([1]), 3, repeat_memory=strength)


@pytest.mark.parametrize('use_cache', [True, False])
def test_guidance_0_follows_the_unconditioned_prompt_and_1_the_plain_model(use_cache):
    model = tiny_model(depth=2, max_seq_len=16)
    prompt, plain = random_tokens(2, 6, seed=3), random_tokens(2, 3, seed=4)
    generate = lambda p, **k: model.generate(p, 24, temperature=0, use_cache=use_cache, **k)
    assert torch.equal(generate(prompt, guidance=0.0, unconditioned=plain), generate(plain))
    assert torch.equal(generate(prompt, guidance=1.0, unconditioned=plain), generate(prompt))
    assert not torch.equal(generate(prompt), generate(plain))  # so the two checks above can fail


def test_guided_generation_with_a_static_cache_equals_the_cached_one():  # two caches: each row pair its own graph
    model = tiny_model(depth=2, max_seq_len=16)
    prompt, plain = random_tokens(2, 6, seed=3), random_tokens(2, 3, seed=4)
    guided = lambda **k: model.generate(prompt, 30, temperature=0, guidance=2.5, unconditioned=plain, **k)
    assert torch.equal(guided(static_cache=True), guided())


def test_guidance_draws_from_the_unconditioned_log_probabilities_plus_guidance_times_the_difference():
    model = tiny_model()
    prompt, plain = torch.tensor([14, 15, 22, 30, 2]), torch.tensor([14, 2])
    asked, nothing = (first_step_logits(model, p).log_softmax(-1) for p in (prompt, plain))
    for guidance in (0.5, 3.0):
        expected = (nothing + guidance * (asked - nothing)).argmax()
        drawn = model.generate(prompt, 1, temperature=0, guidance=guidance, unconditioned=plain)
        assert drawn.item() == expected.item()
    for guidance in (0.5, 3.0):  # each draws what the plain model would not, so the check above can fail
        assert (nothing + guidance * (asked - nothing)).argmax() != asked.argmax()


def test_end_guidance_steers_the_draw_of_the_end_token_alone(monkeypatch):
    model = tiny_model()
    prompt, plain = torch.tensor([14, 15, 22, 30, 2]), torch.tensor([14, 2])
    asked, nothing = (first_step_logits(model, p).log_softmax(-1) for p in (prompt, plain))
    seen, draw = [], torch.multinomial
    monkeypatch.setattr(torch, 'multinomial', lambda probs, n: seen.append(probs[0]) or draw(probs, n))
    eos = 7

    def expected(guidance, end):
        strength = torch.full_like(asked, guidance)
        strength[eos] = end
        return (nothing + strength * (asked - nothing)).softmax(-1)

    for guidance, end, stop, want in ((2.0, 5.0, eos, expected(2.0, 5.0)), (2.0, None, eos, expected(2.0, 2.0)),
                                      (1.0, 3.0, eos, expected(1.0, 3.0)),  # the end alone steered
                                      (1.0, 3.0, None, asked.softmax(-1))):  # no end to draw: the plain model
        seen.clear()
        model.generate(prompt, 1, guidance=guidance, end_guidance=end, unconditioned=plain, eos_token=stop)
        assert torch.allclose(seen[0], want, atol=1e-6), (guidance, end, stop)
    # the end's strength moves its probability, and through it every other token's: the checks above can fail
    assert not torch.allclose(expected(2.0, 5.0), expected(2.0, 2.0), atol=1e-4)
    assert not torch.allclose(expected(1.0, 3.0), asked.softmax(-1), atol=1e-4)


def test_guidance_is_checked_against_the_prompt():
    model = tiny_model()
    with pytest.raises(ValueError, match='guidance must be at least 0'):
        model.generate(torch.tensor([1, 2]), 3, guidance=-1.0, unconditioned=torch.tensor([1]))
    with pytest.raises(ValueError, match='end_guidance must be at least 0'):
        model.generate(torch.tensor([1, 2]), 3, end_guidance=-1.0, unconditioned=torch.tensor([1]))
    with pytest.raises(ValueError, match='unconditioned must hold a prompt for each row'):
        model.generate(torch.tensor([[1, 2], [1, 3]]), 3, guidance=2.0, unconditioned=torch.tensor([[1]]))


def test_filled_cache_refuses_several_tokens_at_once():
    model = tiny_model().eval()
    cache = model.net.new_cache(1)
    model.net(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match='one new token'):
        model.net(torch.tensor([[3, 4]]), cache=cache)


def first_step_logits(model, prompt):
    with torch.no_grad():
        return model.eval().net(prompt[None])[0, -1]


def test_top_k_sampling_only_draws_the_k_most_likely_tokens():
    model = tiny_model()
    prompt = torch.tensor([4, 9, 2])
    allowed = set(first_step_logits(model, prompt).topk(3).indices.tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, top_k=3)
    assert set(drawn.flatten().tolist()) <= allowed
    # the original's filter function: thres 0.9 of 40 tokens keeps ceil(4) of them
    allowed4 = set(first_step_logits(model, prompt).topk(4).indices.tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, filter_logits_fn=top_k, filter_thres=0.9)
    assert set(drawn.flatten().tolist()) <= allowed4


def test_top_p_sampling_only_draws_from_the_nucleus():
    model = tiny_model()
    prompt = torch.tensor([4, 9, 2])
    probs = (first_step_logits(model, prompt) / 2.0).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    # nucleus: tokens whose predecessors' mass is still below 0.3
    nucleus = set(order[(sorted_probs.cumsum(0) - sorted_probs) < 0.3].tolist())
    drawn = model.generate(prompt.repeat(300, 1), 1, temperature=2.0, top_p=0.3)
    assert set(drawn.flatten().tolist()) <= nucleus
    assert len(nucleus) < VOCAB


@pytest.mark.parametrize('use_cache', [True, False])
def test_generation_draws_only_tokens_the_table_allows_after_the_one_before(use_cache):
    model = tiny_model(max_seq_len=8)  # 30 new tokens also run past the window
    allowed = torch.rand(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) < 0.1
    allowed[torch.arange(VOCAB), torch.randint(0, VOCAB, (VOCAB,), generator=torch.Generator().manual_seed(4))] = True
    prompt = random_tokens(8, 3)
    torch.manual_seed(0)
    out = model.generate(prompt, 30, temperature=3.0, allowed_next=allowed, use_cache=use_cache, return_prime=True)
    pairs = out[:, 2:-1].flatten(), out[:, 3:].flatten()  # from the prompt's last token on
    assert bool(allowed[pairs].all())
    torch.manual_seed(0)
    free = model.generate(prompt, 30, temperature=3.0, use_cache=use_cache, return_prime=True)
    assert not bool(allowed[free[:, 2:-1].flatten(), free[:, 3:].flatten()].all())  # the table did the work
    greedy = model.generate(prompt, 30, temperature=0, allowed_next=allowed, use_cache=use_cache, return_prime=True)
    assert bool(allowed[greedy[:, 2:-1].flatten(), greedy[:, 3:].flatten()].all())


@pytest.mark.parametrize('table, message', [
    (torch.ones(VOCAB, VOCAB - 1, dtype=torch.bool), 'shape'),
    (torch.ones(VOCAB, VOCAB), 'torch.float32 tensor'),
    (torch.ones(VOCAB, VOCAB, dtype=torch.bool).numpy(), 'got a ndarray'),
    ([[True] * VOCAB] * VOCAB, 'got a list'),
    (torch.ones(VOCAB, VOCAB, dtype=torch.bool).index_fill(0, torch.tensor([5, 7]), False),
     'allows no token after token 5 [(]2 such rows[)]')])
def test_a_bad_allowed_next_table_is_refused_saying_what_is_wrong(table, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(torch.tensor([4, 9, 2]), 3, allowed_next=table)


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing():
    model = tiny_model()
    prompt = random_tokens(4, 3)
    assert torch.equal(model.generate(prompt, 12, temperature=1e-40), model.generate(prompt, 12, temperature=0))


def test_filters_keep_the_expected_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isfinite(top_k(logits, k=2)).tolist() == [[False, True, False, True]]
    # probabilities ~ [0.03, 0.64, 0.09, 0.24]: 0.64 < 0.8 so the nucleus needs the second token too
    assert torch.isfinite(top_p(logits, thres=0.8)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p(logits, thres=0.5)).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_training_and_inference_paths_give_the_same_logits(dtype):
    # with gradients: RotaryQKV (and on bf16 our attention backward); without: the plain formula
    model = tiny_model(dropout_p=0.0)
    x = random_tokens(2, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        trained = model.net(x)
        with torch.no_grad():
            inferred = model.net(x)
    assert trained.requires_grad and not inferred.requires_grad
    # the same arithmetic in another order: float rounding only (a bf16 ulp of the logits is ~0.002)
    tolerance = {'rtol': 1e-5, 'atol': 1e-6} if dtype == torch.float32 else {'rtol': 2e-2, 'atol': 8e-3}
    torch.testing.assert_close(trained, inferred, **tolerance)


def test_training_mode_uses_dropout_and_eval_mode_is_deterministic():
    model = tiny_model(dropout_p=0.3, attn_dropout=0.3)
    x = random_tokens(2, 10)
    model.train()
    assert not torch.equal(model.net(x), model.net(x))
    model.eval()
    assert torch.equal(model.net(x), model.net(x))


def test_a_few_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(4, 17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(x)[0].item()
    for _ in range(30):
        optimizer.zero_grad()
        model(x)[0].backward()
        optimizer.step()
    assert model(x)[0].item() < first - 0.5


def test_cpu_bf16_autocast_forward_and_backward():
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(2, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, acc = model(x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_backward_called_under_bf16_autocast_gives_the_same_gradients():
    # autocast is meant for the forward only, but a training loop may call backward inside it too
    model = tiny_model(dropout_p=0.1)
    x = random_tokens(2, 16)
    grads = []
    for backward_inside in (False, True):
        torch.manual_seed(0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss, _ = model(x)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    for outside, inside in zip(*grads):
        assert torch.equal(outside, inside)


def test_print_model_parameters_counts_every_parameter(capsys):
    model = tiny_model()
    total = printModelParameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert f'{total:,}' in capsys.readouterr().out


def test_generation_under_bf16_autocast_with_a_multi_token_prompt():
    # the training script samples inside its autocast context; cache writes must take bf16 keys/values
    model = tiny_model(max_seq_len=8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.generate(random_tokens(2, 5), 12, temperature=0)
    assert out.shape == (2, 12) and int(out.min()) >= 0 and int(out.max()) < VOCAB


@pytest.mark.parametrize('prev_tokens', [0, 3])
def test_tune_mask_makes_each_tune_of_a_packed_window_see_only_itself(prev_tokens):
    torch.manual_seed(0)
    net = MusicTransformer(dim=32, depth=2, heads=4, dim_head=8, max_seq_len=16, dropout=0.0,
                           prev_tokens=prev_tokens).eval()
    first, second = random_tokens(1, 6, seed=2), random_tokens(1, 10, seed=3)
    first[0, 0] = second[0, 0] = START_IDX
    window = torch.cat([first, second], dim=1)
    tunes = torch.cumsum(window == START_IDX, dim=1)
    masked = net(window, tunes=tunes)
    # rotary attention depends only on offsets, so the second tune gives the logits it gives alone
    torch.testing.assert_close(masked[:, :6], net(first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[:, 6:], net(second), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(window)[:, 6:], net(second), atol=1e-3)  # plain causal attention looks across


def test_tune_mask_changes_nothing_inside_one_tune_and_trains():
    torch.manual_seed(0)
    model = AutoregressiveWrapper(MusicTransformer(dim=32, depth=2, heads=4, dim_head=8, max_seq_len=16,
                                                   dropout=0.0))
    x = random_tokens(2, 17, seed=4)  # no start token: one tune (or its continuation) per window
    plain, masked = model(x)[0], model(x, tune_mask=True)[0]
    torch.testing.assert_close(plain, masked)
    x[:, 5] = START_IDX
    loss, _ = model(x, tune_mask=True)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_previous_token_embeddings_are_the_tokens_before_and_stop_at_a_tunes_start():
    torch.manual_seed(0)
    net = MusicTransformer(dim=16, depth=1, heads=2, dim_head=8, max_seq_len=16, prev_tokens=2)
    table, n = net.prev_emb.weight, net.num_tokens  # rows d * n + token: the token d + 1 back
    x = torch.tensor([[5, 9, START_IDX, 7, 300]])
    added = net.previous_embedding(torch.cat((torch.tensor([[-1, -1]]), x), dim=1))[0]
    assert not added[0].any()  # nothing before the window
    torch.testing.assert_close(added[1], table[5])  # 1 back: 5; 2 back: nothing
    assert not added[2].any()  # a tune's start token sees nothing of the tune before
    torch.testing.assert_close(added[3], table[START_IDX])  # 1 back: the start token; 2 back: the last tune
    torch.testing.assert_close(added[4], table[7] + table[n + START_IDX])
    # tokens given before the window count as what came before it
    added = net.previous_embedding(torch.cat((torch.tensor([[3, 4]]), x), dim=1))[0]
    torch.testing.assert_close(added[0], table[4] + table[n + 3])
    assert 'prev_emb.weight' not in MusicTransformer(dim=16, depth=1, heads=2, dim_head=8).state_dict()


def test_on_token_sees_every_step_and_a_stop_keeps_a_prefix_of_the_same_tokens():
    model = tiny_model(max_seq_len=8)
    prompt = random_tokens(3, 4)
    torch.manual_seed(5)
    plain = model.generate(prompt, 30, repeat_memory=0.3, return_prime=True)
    seen = []
    torch.manual_seed(5)
    watched = model.generate(prompt, 30, repeat_memory=0.3, return_prime=True, on_token=seen.append)
    assert torch.equal(plain, watched) and [s.shape[1] for s in seen] == list(range(5, 35))

    def stop_after_12(out):
        seen.append(out)
        if out.shape[1] == 4 + 12:
            raise KeyboardInterrupt
    seen.clear()
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        model.generate(prompt, 30, repeat_memory=0.3, on_token=stop_after_12)
    assert torch.equal(seen[-1], plain[:, :16])  # what a Ctrl-C leaves is what the full run began with


# -----------------------------------------------------------------------------
# the tune clock

def clocked_model(seed=0, **kwargs):
    """A tiny model of the whole vocabulary (start tokens included) with a tune clock."""
    torch.manual_seed(seed)
    return AutoregressiveWrapper(MusicTransformer(dim=32, depth=3, heads=4, dim_head=8, max_seq_len=16, dropout=0.0,
                                                  prev_tokens=3, tune_clock=True, **kwargs)).eval()


def tunes_of(batch, n, starts, seed=1):
    """Random tokens of the whole vocabulary but the start token, with start tokens at the given positions of each
    row."""
    seq = torch.randint(0, START_IDX, (batch, n), generator=torch.Generator().manual_seed(seed))
    for row, positions in enumerate(starts):
        seq[row, positions] = START_IDX
    return seq


def keyed_tunes(batch, n, starts, seed=1):
    """tunes_of with a key token after every start token but the first of each row (a tune without a key)."""
    seq = tunes_of(batch, n, starts, seed)
    for row, positions in enumerate(starts):
        for i, p in enumerate(positions[1:]):
            seq[row, p + 1] = 768 + (5 * i + row) % 24
    return seq


def test_the_tune_clock_reads_the_time_steps_since_the_tunes_start_token_and_unknown_without_one_in_the_window():
    # a token before any start, the start, a header token, then notes [time, duration, pitch]
    x = torch.tensor([[5, START_IDX, 768, 10, 130, 300, 20, 131, 301, 3, 302]])
    since, elapsed = tune_clock(x, window=9)
    assert since.tolist() == [[9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]  # at most the window
    assert elapsed[0, 1:].tolist() == [0, 0, 10, 10, 10, 30, 30, 30, 33, 33]  # time tokens only, the own included
    unknown = CLOCK_READINGS
    assert clock_reading(since, elapsed, 9).tolist() == [[unknown, 0, 0, 1, 1, 1, 3, 3, 3, 4, unknown]]
    # a tune_labels model's clock reads on past the window; before the first start token it reads the head's time
    assert clock_reading(since, elapsed, 9, past_window=True)[0, -1] == 4
    assert clock_reading(since, elapsed_from_head(x, elapsed), 9, past_window=True)[0, 0] == unknown
    assert clock_reading(since, elapsed_from_head(x, elapsed, torch.tensor([[-1, -1, -1, 11]])), 9,
                         past_window=True)[0, :2].tolist() == [2, 0]  # (11 + 5) // 8, then the tune's own start
    # the last reading holds everything longer; a new start sets the clock back
    x = torch.tensor([[START_IDX] + [127] * 20 + [START_IDX, 9]])
    assert clock_reading(*tune_clock(x, 64), 64)[0, [1, 20, 21, 22]].tolist() == [15, CLOCK_READINGS - 1, 0, 1]
    # a cache moves the clock one token at a time: the same readings
    seq = tunes_of(2, 40, [[0, 17], [5]])
    since, elapsed = tune_clock(seq, 16)
    state = tune_clock(seq[:, :1], 16)
    state = (state[0][:, 0], state[1][:, 0])
    for t in range(1, 40):
        state = clock_after(*state, seq[:, t], 16)
        assert torch.equal(state[0], since[:, t]) and torch.equal(state[1], elapsed[:, t]), t
    # the time not known before a row's first start token stays so one token at a time, and from any cut given the
    # time before it as its head (as a training window is) the time is the whole sequence's
    elapsed = elapsed_from_head(seq, elapsed)
    assert (elapsed[1, :5] == -1).all() and (elapsed[:, 5:] >= 0).all()
    state = (since[:, 0], elapsed[:, 0])
    for t in range(1, 40):
        state = clock_after(*state, seq[:, t], 16)
        assert torch.equal(state[1], elapsed[:, t]), t
        head = torch.cat((torch.full((2, 3), -1), elapsed[:, t - 1:t]), dim=1)
        assert torch.equal(elapsed_from_head(seq[:, t:], tune_clock(seq[:, t:], 16)[1], head), elapsed[:, t:]), t


def test_a_clock_table_of_zeros_gives_the_model_without_a_clock():
    # what fine-tuning a model without a clock into one with a clock starts from
    clocked = clocked_model()
    torch.manual_seed(0)
    plain = MusicTransformer(dim=32, depth=3, heads=4, dim_head=8, max_seq_len=16, dropout=0.0, prev_tokens=3).eval()
    weights = dict(plain.state_dict(), **{'clock_emb.weight': torch.zeros_like(clocked.net.clock_emb.weight)})
    clocked.net.load_state_dict(weights)
    seq = tunes_of(2, 30, [[0, 12], [3]])
    torch.testing.assert_close(clocked.net(seq), plain(seq), rtol=0, atol=1e-6)
    clocked.net.clock_emb.weight.data.normal_()
    assert not torch.allclose(clocked.net(seq), plain(seq), atol=1e-3)


@pytest.mark.parametrize('static', [False, True])
# keyed: a tune key too (its table random), and tunes with a key; labelled: tune labels as well (their table random)
@pytest.mark.parametrize('keyed, labelled', [(False, False), (True, False), (True, True)])
def test_cached_logits_with_a_tune_clock_match_uncached_across_tune_starts_inside_and_beyond_the_window(static, keyed,
                                                                                                       labelled):
    net = clocked_model(tune_key=keyed, tune_labels=labelled).net
    seq = tunes_of(2, 50, [[0, 20, 37], [3, 40]])
    if keyed:
        net.key_emb.weight.data.normal_()
        seq = keyed_tunes(2, 50, [[0, 20, 37], [3, 12, 40]])
    if labelled:
        net.labels_emb.weight.data.normal_()
    cache = net.new_cache(2, static=static)
    with torch.no_grad():
        cached = [net(seq[:, :5], cache=cache)[:, -1]] + [cache.decode(net, seq[:, t:t + 1]) for t in range(5, 50)]
        uncached = [net(seq[:, :t])[:, -1] for t in range(5, 51)]
    for step, (c, u) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(c, u, atol=1e-5, rtol=1e-5, msg=f'step {step}')


def test_generation_with_a_tune_clock_is_the_same_cached_uncached_and_static_from_a_prompt_longer_than_the_window():
    model = clocked_model()
    prompt = tunes_of(2, 21, [[0, 9], [2]])
    # the grammar lets a start token come only now and then: a tune begins inside the generated part too
    allowed = torch.ones(NUM_TOKENS, NUM_TOKENS, dtype=torch.bool)
    allowed[:, PAD_IDX] = False
    cached = model.generate(prompt, 40, temperature=0, allowed_next=allowed)
    assert torch.equal(model.generate(prompt, 40, temperature=0, allowed_next=allowed, use_cache=False), cached)
    assert torch.equal(model.generate(prompt, 40, temperature=0, allowed_next=allowed, static_cache=True), cached)
    forced = model.generate(prompt, 40, temperature=0, force=lambda out, token: torch.where(
        torch.tensor(out.shape[1] % 13 == 0), torch.full_like(token, START_IDX), token))
    assert (forced == START_IDX).any()
    assert torch.equal(model.generate(prompt, 40, temperature=0, use_cache=False, force=lambda out, token: torch.where(
        torch.tensor(out.shape[1] % 13 == 0), torch.full_like(token, START_IDX), token)), forced)


# -----------------------------------------------------------------------------
# a tune told its length

def test_the_time_left_is_read_up_to_the_next_start_token_and_unknown_without_one():
    x = torch.tensor([[5, START_IDX, 768, 10, 130, 300, 20, 131, 301, START_IDX, 9, 300]])
    known, left = time_left(x)
    assert known.tolist() == [[True] * 9 + [False] * 3]
    assert left[0, :9].tolist() == [0, 30, 30, 20, 20, 20, 0, 0, 0]  # the time tokens after, up to the next start


def test_in_training_about_a_third_of_the_tunes_are_told_nothing_as_a_whole_and_not_as_if_their_end_were_far():
    net = clocked_model(tune_length=True).net
    seq = tunes_of(64, 60, [[0, 20, 40]] * 64)
    elapsed = tune_clock(seq, 16)[1]
    readings = net.left_readings(seq, None, elapsed, None)
    assert (readings[:, :40] < CLOCK_READINGS).all()  # the tunes whose end is in view are told
    assert (readings[:, 40:] == CLOCK_READINGS).all()  # the last one's end is not
    net.train()
    torch.manual_seed(0)
    readings = net.left_readings(seq, None, elapsed, None)
    untold = (readings[:, :40] == UNTOLD).reshape(64, 2, 20)
    assert (untold == untold[..., :1]).all()  # a tune is told, or not, as a whole
    assert 0.2 < untold[..., 0].float().mean() < 0.4
    assert ((readings[:, :40] < CLOCK_READINGS) | (readings[:, :40] == UNTOLD)).all()


@pytest.mark.parametrize('static', [False, True])
@pytest.mark.parametrize('asked', [(120, 400), (-1, 300)])  # -1: told nothing, as generate asks when given no length
def test_cached_logits_of_a_tune_asked_its_length_match_uncached_inside_and_beyond_the_window(static, asked):
    net = clocked_model(tune_length=True).net
    seq = tunes_of(2, 50, [[0, 6], [2]])
    length = torch.tensor(asked)
    cache = net.new_cache(2, static=static)
    with torch.no_grad():
        cached = [net(seq[:, :8], cache=cache, length=length)[:, -1]]
        cached += [cache.decode(net, seq[:, t:t + 1]) for t in range(8, 50)]
        uncached = [net(seq[:, :t], length=length)[:, -1] for t in range(8, 51)]
    for step, (c, u) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(c, u, atol=1e-5, rtol=1e-5, msg=f'step {step}')


def test_generation_asked_a_length_is_the_same_cached_uncached_and_static_and_the_length_steers_it():
    model = clocked_model(tune_length=True)
    model.net.length_emb.weight.data.mul_(50)  # a tiny random model: make the length embedding count
    prompt = tunes_of(2, 21, [[0, 9], [2]])
    cached = model.generate(prompt, 40, temperature=0, length=300)
    assert torch.equal(model.generate(prompt, 40, temperature=0, length=300, use_cache=False), cached)
    assert torch.equal(model.generate(prompt, 40, temperature=0, length=300, static_cache=True), cached)
    assert not torch.equal(model.generate(prompt, 40, temperature=0, length=20), cached)
    untold = model.generate(prompt, 40, temperature=0)  # told nothing: as a length of -1
    assert not torch.equal(untold, cached) and torch.equal(model.generate(prompt, 40, temperature=0, length=-1), untold)


# -----------------------------------------------------------------------------
# the tune key: each pitch's degree in the key its tune's header names

def test_a_pitch_reads_its_degree_in_its_tunes_key_while_the_start_token_is_in_view():
    d_major, e_minor, no = 768 + 2, 780 + 4, NO_DEGREE
    # before any start; a D major tune (D4, F#4, A3); a headerless tune; an E minor tune (E4, G4) and a parts-mode bass
    # B2 (role block 384-511); a meter token right after a start is not a key
    x = torch.tensor([[5, 300, START_IDX, d_major, 10, 130, 318, 322, 313,
                       START_IDX, 792, 318, START_IDX, e_minor, 320, 323, 384 + 47]])
    since = tune_clock(x, 64)[0]
    keys = tune_keys(x, since, 64)
    assert keys[0].tolist() == [-1, -1, -1, 2, 2, 2, 2, 2, 2, -1, -1, -1, -1, 16, 16, 16, 16]
    rows = degree_reading(x, keys)[0].tolist()
    assert rows == [no, no, no, no, no, no, 0, 4, 7, no, no, no, no, no, 12, 15, 19]
    # a tune whose start token is the window or more back reads no degree, as its clock reads 'unknown'
    near = tune_clock(x, 6)[0]
    assert degree_reading(x, tune_keys(x, near, 6))[0, 6:9].tolist() == [0, 4, no]  # 4, 5 and 6 positions after it
    # a cache moves the key one token at a time: the same keys, inside the window and beyond it
    for window, clock in ((64, since), (6, near)):
        keys = tune_keys(x, clock, window)
        state = keys[:, 0]
        for t in range(1, x.shape[1]):
            state = key_after(state, clock[:, t], x[:, t], window)
            assert torch.equal(state, keys[:, t]), (window, t)


def test_a_key_table_of_zeros_gives_the_model_without_one_and_a_trained_one_changes_only_keyed_tunes():
    keyed = clocked_model(tune_key=True)
    plain = clocked_model()
    zeros = torch.zeros_like(keyed.net.key_emb.weight)
    keyed.net.load_state_dict(dict(plain.net.state_dict(), **{'key_emb.weight': zeros}))
    seq = keyed_tunes(2, 30, [[0, 12], [3, 9]])
    torch.testing.assert_close(keyed.net(seq), plain.net(seq), rtol=0, atol=1e-6)
    keyed.net.key_emb.weight.data[:NO_DEGREE].normal_()  # the row of 'no degree' stays zero
    with torch.no_grad():
        diff = (keyed.net(seq) - plain.net(seq)).abs().amax(dim=-1)
    assert (diff[0, :13] < 1e-6).all() and (diff[0, 14:] > 1e-3).any()  # tune 1 of row 0 has no key


def test_generation_with_a_tune_key_is_the_same_cached_uncached_and_static_and_the_key_counts():
    model = clocked_model(tune_key=True)
    model.net.key_emb.weight.data.normal_()
    prompt = keyed_tunes(2, 21, [[0, 9], [2, 14]])
    cached = model.generate(prompt, 40, temperature=0)
    assert torch.equal(model.generate(prompt, 40, temperature=0, use_cache=False), cached)
    assert torch.equal(model.generate(prompt, 40, temperature=0, static_cache=True), cached)
    other = prompt.clone()
    other[0, 10], other[1, 15] = 768 + 7, 768 + 20
    with torch.no_grad():  # the next token's distribution moves with the key asked
        assert ((model.net(other)[:, -1] - model.net(prompt)[:, -1]).abs().amax(dim=-1) > 1e-4).all()


# -----------------------------------------------------------------------------
# a tune's labels wherever its start token lies (tune_labels)

def test_tune_labels_hold_each_kind_of_header_id_from_where_it_is_read_to_the_next_start_token():
    key, meter, style = 770, 795, 803
    x = torch.tensor([[5, START_IDX, key, meter, 10, 130, 300, START_IDX, style, 10, 130]])
    assert tune_labels(x).tolist() == [[[-1, -1, -1], [-1, -1, -1], [key, -1, -1], [key, meter, -1], [key, meter, -1],
                                        [key, meter, -1], [key, meter, -1], [-1, -1, -1], [-1, -1, style],
                                        [-1, -1, style], [-1, -1, style]]]
    # a window cut from inside a tune is given its head; the head ends at the next start token
    head = torch.tensor([[771, -1, 804]])
    assert tune_labels(x[:, 4:], head)[0, :3].tolist() == [[771, -1, 804]] * 3
    assert tune_labels(x[:, 4:], head)[0, 3:].tolist() == tune_labels(x)[0, 7:].tolist()
    # a header id inside the window adds to the head, for the tune the head is of
    assert tune_labels(x[:, 3:], torch.tensor([[key, -1, -1]]))[0, 0].tolist() == [key, meter, -1]
    # read one token at a time, as a cache does, and from any cut with the labels before it as its head: the same
    seq = torch.randint(0, NUM_TOKENS, (3, 80), generator=torch.Generator().manual_seed(2))
    full = tune_labels(seq)
    state = full[:, 0]
    for t in range(1, 80):
        state = labels_after(state, seq[:, t])
        assert torch.equal(state, full[:, t]), t
        assert torch.equal(tune_labels(seq[:, t:], full[:, t - 1]), full[:, t:]), t


@pytest.mark.parametrize('reading', ['key', 'clock'])
def test_with_tune_labels_the_key_asked_and_the_clock_still_count_once_the_header_has_left_the_window(reading):
    # a tune of 40 tokens in a model of window 16 and depth 1: its header and first notes are out of reach of the last
    # position; the key it was asked (tune_key) and the time of its first notes (tune_clock) reach it only through
    # its labels and the clock that reads on with them
    if reading == 'key':
        prompt = keyed_tunes(1, 40, [[0, 2]])
        prompt[0, 4:] = prompt[0, 4:].clamp(max=767)  # notes only after the header: no header id later in the tune
        other = prompt.clone()
        other[0, 3] = 768 + 9
    else:
        prompt = tunes_of(1, 40, [[0]]).clamp(min=300)  # no time token ...
        prompt[0, 2] = 6  # ... but one, long before the end; the other tune has 6 more steps (a reading further)
        other = prompt.clone()
        other[0, 2] = 12
    for labelled in (False, True):
        torch.manual_seed(0)
        net = MusicTransformer(dim=32, depth=1, heads=4, dim_head=8, max_seq_len=16, dropout=0.0,
                               tune_labels=labelled, **{f'tune_{reading}': True}).eval()
        getattr(net, f'{reading}_emb').weight.data.normal_()
        with torch.no_grad():
            moved = (net(other)[:, -1] - net(prompt)[:, -1]).abs().max()
        assert (moved > 1e-4) == labelled, labelled
    model = AutoregressiveWrapper(net)
    cached = model.generate(prompt, 30, temperature=0)
    assert torch.equal(model.generate(prompt, 30, temperature=0, use_cache=False), cached)
    assert torch.equal(model.generate(prompt, 30, temperature=0, static_cache=True), cached)


def test_a_labels_table_of_zeros_gives_the_model_without_tune_labels_inside_the_window():
    # what fine-tuning a model without labels into one with them starts from (beyond the window, the key it reads
    # is the labels' and so known: that is the point of adding them)
    labelled = clocked_model(tune_key=True, tune_labels=True)
    plain = clocked_model(tune_key=True)
    labelled.net.load_state_dict(dict(plain.net.state_dict(), **{
        'labels_emb.weight': torch.zeros_like(labelled.net.labels_emb.weight)}))
    seq = keyed_tunes(2, 16, [[0, 6], [3]])
    with torch.no_grad():
        torch.testing.assert_close(labelled.net(seq), plain.net(seq), rtol=0, atol=1e-6)
