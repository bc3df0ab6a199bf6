"""BatchNorm running statistics during perturbed passes: sam_kernels.bn.disable_running_stats /
enable_running_stats are exact (also momentum=None cumulative averaging, num_batches_tracked,
SyncBatchNorm's single-process path, lazy modules), and every algorithm given `model=` lets only
the pass at w move them."""
import copy

import pytest
import torch

from sam_kernels import bn
from training_helpers import (ALGORITHMS, BNNet, loss_fn, make_batches, make_closure,
                              make_optimizer, manual_step)

MODULES = {
    "bn1d": lambda: torch.nn.BatchNorm1d(5),
    "bn1d_cumulative": lambda: torch.nn.BatchNorm1d(5, momentum=None),
    "bn2d": lambda: torch.nn.BatchNorm2d(5, momentum=0.3),
    "sync_bn": lambda: torch.nn.SyncBatchNorm(5),  # not distributed: F.batch_norm path
    "lazy_bn1d": lambda: torch.nn.LazyBatchNorm1d(momentum=None),
}


def batch(kind, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 5, 3, 3) if kind == "bn2d" else (6, 5)
    return torch.randn(*shape, generator=g) * 2 + 1


def buffers(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_disabled_pass_normalises_with_batch_stats_and_moves_nothing(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(MODULES[kind]()).train()
    model(batch(kind, 0))  # warm: running stats and (lazy) shapes exist, counter at 1
    twin = copy.deepcopy(model)
    before = buffers(model)
    x = batch(kind, 1)
    bn.disable_running_stats(model)
    out = model(x)
    bn.enable_running_stats(model)
    after = buffers(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} moved"
    # the output is the ordinary training-mode output (batch statistics)
    assert torch.equal(out, twin(x))
    # and running statistics carry on exactly as if the disabled pass never happened; with
    # momentum=None the cumulative average still divides by the right count
    y = batch(kind, 2)
    untouched = copy.deepcopy(twin)
    untouched.load_state_dict(before)
    model(y)
    untouched(y)
    for k, v in buffers(model).items():
        assert torch.equal(v, buffers(untouched)[k]), f"{k} differs after re-enabling"


def test_settings_restored_exactly_and_calls_are_idempotent():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4),
                                torch.nn.BatchNorm1d(4, track_running_stats=False),
                                torch.nn.Linear(4, 4))
    bn.disable_running_stats(model)
    bn.disable_running_stats(model)  # a second call keeps the first saved setting
    assert not model[0].track_running_stats and not model[1].track_running_stats
    bn.enable_running_stats(model)
    assert model[0].track_running_stats is True and model[1].track_running_stats is False
    bn.enable_running_stats(model)  # nothing left to restore: no change
    assert model[0].track_running_stats is True and model[1].track_running_stats is False


def test_eval_mode_uses_running_stats_either_way():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(5))
    model(batch("bn1d", 0))
    model.eval()
    x = batch("bn1d", 1)
    expected = model(x)
    bn.disable_running_stats(model)
    assert torch.equal(model(x), expected)
    bn.enable_running_stats(model)


def step_once(opt, model, x, y, api):
    if api == "closure":
        opt.step(make_closure(opt, model, x, y))
    else:
        manual_step(opt, lambda: loss_fn(model, x, y).backward())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("api", ["closure", "manual"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_only_the_pass_at_w_moves_running_stats(name, api, momentum):
    """After a step (every algorithm computes pass 1 at its first step) the running stats are
    exactly those of one forward pass at the starting weights; the perturbed passes add
    nothing, num_batches_tracked included."""
    torch.manual_seed(0)
    model = BNNet(momentum=momentum)
    reference = copy.deepcopy(model)
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    x, y = make_batches(1)[0]
    step_once(opt, model, x, y, api)
    reference(x)
    for (k, a), (_, b) in zip(model.bn.named_buffers(), reference.bn.named_buffers()):
        assert torch.equal(a, b), f"{k} differs"
    assert int(model.bn.num_batches_tracked) == 1
    assert model.bn.track_running_stats is True  # restored after the step


def test_without_model_the_perturbed_pass_is_not_frozen():
    """What `model=` buys: without it the pass at w + e updates the statistics too."""
    torch.manual_seed(0)
    model = BNNet()
    opt = make_optimizer("SAM", model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batches(1)[0]
    opt.step(make_closure(opt, model, x, y))
    assert int(model.bn.num_batches_tracked) == 2
