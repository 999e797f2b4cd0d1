"""The sampler where the logits are: on a (pretend, tests/fake_device.py) CUDA device every
index and parameter tensor follows the logits, no [S, V] copy goes to the host, and the tokens,
seeded or not, and the logprobs are exactly those of the same batch sampled on the CPU."""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from fake_device import DeviceMixError, FakeCuda
from worker.sampler import Sampler, SamplingRow, compute_prompt_logprobs

V = 3000


def _row(output=(4, 5, 5), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1, 2, 3], list(output), 0, (7,))


ROWS = [
    _row(temperature=0),
    _row(temperature=0, logprobs=3, repetition_penalty=1.3),
    _row(temperature=0.8, top_k=40, top_p=0.9, seed=11),
    _row(temperature=1.0, top_p=0.3, seed=12),                    # rejection rounds
    _row(temperature=0.7, min_p=0.05, seed=13, logprobs=2),
    _row(temperature=1.2, presence_penalty=0.5, frequency_penalty=0.3, seed=14),
    _row(temperature=1.0, logit_bias={3: 5.0, 9: -100.0}, min_tokens=9, seed=15),
    _row(temperature=1.0),                                        # unseeded: the generator
    _row(temperature=0.9, top_k=5),
]


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(ROWS), V, generator=g) * 3


def test_sampling_on_the_device_matches_the_cpu_exactly():
    cpu_sampler, dev_sampler = Sampler(seed=5), Sampler(seed=5)
    with FakeCuda() as dev:
        for step in range(3):   # the unseeded rows' generator advances alike on both
            x = _logits(step)
            expected = cpu_sampler(x.clone(), ROWS)
            on_device = dev.put(x)
            got = dev_sampler(on_device, ROWS)
            assert got.token_ids == expected.token_ids
            assert got.logprobs == expected.logprobs and got.top_logprobs == expected.top_logprobs
            assert on_device.device.type == "cuda"
            assert torch.equal(on_device, dev.put(x))   # penalties were undone on the device
        assert not dev.mixes
        assert not dev.to_host, f"device tensors copied to the host: {dev.to_host}"


def test_all_greedy_batch_on_the_device_takes_one_argmax():
    rows = [_row(temperature=0)] * 4
    x = torch.randn(4, V)
    with FakeCuda() as dev:
        assert Sampler()(dev.put(x), rows).token_ids == x.argmax(-1).tolist()


def test_prompt_logprobs_index_follows_the_logits():
    x = torch.randn(6, V)
    ids = [3, 9, 0, V - 1, 17, 2]
    expected = compute_prompt_logprobs(x, ids, 4)
    with FakeCuda() as dev:
        assert compute_prompt_logprobs(dev.put(x), ids, 4) == expected


def test_the_fake_device_catches_a_host_index():
    """The check itself: a CPU index into device logits fails, as on a GPU."""
    with FakeCuda() as dev, pytest.raises(DeviceMixError):
        dev.put(torch.randn(2, V)).gather(1, torch.tensor([[1], [2]]))
