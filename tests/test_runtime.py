"""runtime.py: device and precision choice on simulated machines, collectives, checkpoints, compile."""

import torch

from runtime import compile_model
from tests.conftest import random_tokens, tiny_model


def test_compile_model_keeps_state_dict_keys_and_trains():
    model = tiny_model()
    keys = set(model.state_dict())
    compiled = compile_model(model, backend='eager')  # the wrapping is under test, not inductor's codegen
    assert set(compiled.state_dict()) == keys
    loss, acc = compiled(random_tokens(2, 9))
    loss.backward()
    assert torch.isfinite(loss)
