"""Gradient accumulation over k micro-batches in every pass equals one big batch with a
mean-reduced loss: with step(closure) (the closure loops over the micro-batches) and with a
hand-written first_step/second_step loop, for every algorithm."""
import pytest
import torch

from training_helpers import (ALGORITHMS, MLP, assert_same_tensors, loss_fn, make_batches,
                              make_optimizer, manual_step, scaler_cpu)

K = 3  # micro-batches per batch of 12


def accumulate(model, x, y, k, scaler=None):
    """Forward+backward over k equal micro-batches, each loss divided by k: .grad ends up as
    the gradient of the mean loss over the whole batch."""
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        loss = loss_fn(model, xs, ys) / k
        (scaler.scale(loss) if scaler is not None else loss).backward()


def train(name, batches, k, api, scaler=None):
    torch.manual_seed(0)
    model = MLP().double()
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model, grad_scaler=scaler)
    for x, y in batches:
        if api == "closure":
            def closure():
                opt.zero_grad()
                accumulate(model, x, y, k, scaler)
            opt.step(closure)
        else:
            manual_step(opt, lambda: accumulate(model, x, y, k, scaler))
        if scaler is not None:
            scaler.update()
    return model


@pytest.mark.parametrize("api", ["closure", "manual"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_micro_batches_equal_one_big_batch(name, api):
    batches = make_batches(4, dtype=torch.float64)
    big = train(name, batches, 1, api)
    micro = train(name, batches, K, api)
    for a, b in zip(micro.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert not torch.equal(big.fc1.weight, MLP().double().fc1.weight)  # it trained


def test_accumulation_with_grad_scaler_unscales_the_sum_once():
    """Scaled micro-batch losses accumulate into one scaled gradient per pass, unscaled once:
    bit-identical to the same accumulation without scaling."""
    batches = make_batches(3, dtype=torch.float64)
    plain = train("SAM", batches, K, "closure")
    scaled = train("SAM", batches, K, "closure", scaler=scaler_cpu())
    assert_same_tensors(list(scaled.parameters()), list(plain.parameters()), "weights")
