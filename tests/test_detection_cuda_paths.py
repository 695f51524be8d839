"""``finetune-det``'s CUDA-only set-up, checked without a GPU by standing in for the few ``torch.cuda`` calls it makes.

Each of these failed on a GPU machine before 2026-11-25 and cannot run for real on the CPU-only CI.
"""
from datetime import timedelta

import pytest
import torch

from vitzoo.detection import checkpoint, distributed


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two GPUs, current device 0; ``set_device`` records its argument as ``torch.cuda.set_device`` checks it
    (an index is required: ``torch.device('cuda')`` without one is a ValueError)."""
    calls = []

    def set_device(device):
        device = torch.device(device) if not isinstance(device, int) else torch.device('cuda', device)
        if device.index is None:
            raise ValueError(f'Expected a torch.device with a specified index or an integer, but got:{device}')
        calls.append(device)

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize('device', [None, 'cuda'])
def test_single_gpu_run_gets_an_indexed_device(fake_cuda, device):
    ctx = distributed.init_distributed(device)  # raised ValueError on every one-GPU run before
    assert ctx.device == torch.device('cuda', 0) and fake_cuda == [torch.device('cuda', 0)]
    assert not ctx.initialized


def test_more_processes_than_gpus_is_a_clear_error(fake_cuda, monkeypatch):
    """Found by an audit: torchrun --nproc_per_node 3 on a 2-GPU machine was "CUDA error: invalid device ordinal" as
    a traceback from torch.cuda.set_device."""
    monkeypatch.setenv('WORLD_SIZE', '3')
    monkeypatch.setenv('RANK', '2')
    monkeypatch.setenv('LOCAL_RANK', '2')
    with pytest.raises(ValueError, match=r"^LOCAL_RANK 2, but this machine shows 2 CUDA device\(s\): start at most "
                                         r"that many processes per node \(torchrun --nproc_per_node\), or check "
                                         r"CUDA_VISIBLE_DEVICES\.$"):
        distributed.init_distributed('cuda')
    assert fake_cuda == []  # refused before set_device


def test_named_gpu_is_kept(fake_cuda):
    assert distributed.init_distributed('cuda:1').device == torch.device('cuda', 1)


def test_ddp_process_group_outlasts_rank0_evaluation(fake_cuda, monkeypatch):
    # rank 0 evaluates alone while the others wait at a barrier; NCCL's default timeout (10 min) would abort them
    seen = {}
    monkeypatch.setattr(distributed.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(distributed.dist, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('LOCAL_RANK', '1')
    ctx = distributed.init_distributed('cuda')
    assert ctx.device == torch.device('cuda', 1) and seen['backend'] == 'nccl'
    assert seen['timeout'] >= timedelta(hours=1)


class _FakeCudaRng:
    """Per-GPU generator states of a machine with ``count`` GPUs, current device 0."""

    def __init__(self, count):
        self.states = [torch.full((8,), i, dtype=torch.uint8) for i in range(count)]

    def get_rng_state(self, device='cuda'):
        return self.states[0].clone()

    def set_rng_state(self, state, device='cuda'):
        self.states[0] = state.clone()

    def set_rng_state_all(self, states):
        for i, s in enumerate(states):
            self.states[i] = s.clone()  # IndexError past the GPUs there are, as torch's


def _patch_rng(monkeypatch, rng):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    for name in ('get_rng_state', 'set_rng_state', 'set_rng_state_all'):
        monkeypatch.setattr(torch.cuda, name, getattr(rng, name))


def test_rng_state_resumes_on_fewer_gpus(monkeypatch):
    # a checkpoint written on an 8-GPU machine, resumed with one GPU visible
    _patch_rng(monkeypatch, _FakeCudaRng(8))
    state = checkpoint.get_rng_state()
    assert torch.equal(state['cuda'], torch.zeros(8, dtype=torch.uint8))  # this process's GPU only
    one = _FakeCudaRng(1)
    _patch_rng(monkeypatch, one)
    checkpoint.set_rng_state(state)
    assert torch.equal(one.states[0], state['cuda'])


def test_rng_state_of_older_checkpoints_still_loads(monkeypatch):
    # before 2026-11-25 the state was one tensor per GPU visible when it was written
    older = [torch.full((8,), 7 + i, dtype=torch.uint8) for i in range(4)]
    state = dict(checkpoint.get_rng_state(), cuda=older)
    one = _FakeCudaRng(1)
    _patch_rng(monkeypatch, one)
    checkpoint.set_rng_state(state)  # IndexError before
    assert torch.equal(one.states[0], older[0])


@pytest.mark.parametrize('current,expected', [(0, 0), (1, 1), (2, None)])
def test_older_rng_state_list_restores_the_current_gpus_entry(monkeypatch, current, expected):
    """A list-format state (one per GPU) restores the entry of the GPU this process uses, none past the list."""
    older = [torch.full((8,), 20 + i, dtype=torch.uint8) for i in range(2)]
    state = dict(checkpoint.get_rng_state(), cuda=older)
    _patch_rng(monkeypatch, _FakeCudaRng(3))
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: current)
    set_states = []
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, device='cuda': set_states.append(s.clone()))
    checkpoint.set_rng_state(state)
    if expected is None:
        assert set_states == []
    else:
        assert len(set_states) == 1 and torch.equal(set_states[0], older[expected])
