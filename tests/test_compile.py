"""torch.compile: a compiled model trains with every optimizer, compiled step methods and a
compiled training-step function match eager bit for bit, and our primitives (custom ops with
fake implementations) cause no graph break: the only breaks are torch's own (backward,
Optimizer.zero_grad, the deliberate one in torch.optim's step).

Dynamo-level checks use backend="eager"/"aot_eager" (tracing, fake tensors and graph breaks
are the same as with inductor, without compiling C++); one test runs inductor end to end."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from training_helpers import (ALGORITHMS, MLP, BNNet, assert_same_tensors, loss_fn,
                              make_batches, make_closure, make_optimizer, passes_per_step)

STAGES = ("first_step", "second_step", "third_step", "fourth_step")
STEPS = 2  # VaSSORe: one step computing pass 1, one reusing
#: graph breaks torch makes on purpose (the message fragments dynamo reports)
TORCH_OWN_BREAKS = ("Tensor.backward", "Optimizer.zero_grad", "torch._dynamo.graph_break()")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no cache entries (and recompile budget) left by other tests
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks():
    return [reason for reason in counters["graph_break"]]


def assert_only_torch_breaks():
    for reason in graph_breaks():
        assert any(s in reason for s in TORCH_OWN_BREAKS), reason


def twins(name, model_cls):
    torch.manual_seed(0)
    models = [model_cls()]
    models.append(copy.deepcopy(models[0]))
    return models, [make_optimizer(name, m.parameters(), torch.optim.SGD, lr=0.1,
                                   momentum=0.9, model=m) for m in models]


def run_by_stages(opt, model, compiled):
    """A hand-written loop calling each stage method; compiled: every stage but the last with
    fullgraph=True (any graph break raises), the last (which calls the base optimizer, whose
    step graph-breaks on purpose) without."""
    stages = [getattr(opt, s) for s in STAGES[:passes_per_step(type(opt).__name__)]]
    if compiled:
        stages = [torch.compile(f, backend="eager", fullgraph=i < len(stages) - 1)
                  for i, f in enumerate(stages)]
    for x, y in make_batches(STEPS):
        opt.zero_grad()
        if getattr(opt, "needs_inner_pass", lambda: True)():
            loss_fn(model, x, y).backward()
        for i, stage in enumerate(stages):
            if i:
                opt.zero_grad()
                with opt.pass_context():
                    loss_fn(model, x, y).backward()
            stage()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_compiled_stage_methods_match_eager(name):
    """Also catches state a step keeps on the optimizer object that a compiled region would
    lose (see StepVar in optim/base.py)."""
    models, opts = twins(name, BNNet)
    for model, opt, compiled in zip(models, opts, (False, True)):
        run_by_stages(opt, model, compiled)
    assert_same_tensors(models[1].state_dict(), models[0].state_dict(), "model")
    assert_same_tensors(opts[1].state_dict(), opts[0].state_dict(), "optimizer")
    assert graph_breaks()  # the base optimizer's step did break (the check below is live)
    assert_only_torch_breaks()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_compiled_model_trains_with_every_optimizer(name):
    """torch.compile(model) handed to the optimizer as `model=` (BatchNorm freezing and the
    DDP lookup see through the wrapper): the same training as eager, bit for bit."""
    (eager_model, model), (eager_opt, _) = twins(name, BNNet)
    compiled = torch.compile(model, backend="aot_eager")
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=compiled)
    for x, y in make_batches(STEPS):
        eager_opt.step(make_closure(eager_opt, eager_model, x, y))
        opt.step(make_closure(opt, compiled, x, y))
    assert_same_tensors(model.state_dict(), eager_model.state_dict(), "model")


@pytest.mark.parametrize("name", [a for a in ("SAM", "GSAM") if a in ALGORITHMS])
def test_compiled_training_step_function_matches_eager(name):
    """A compiled function that runs a whole step(closure) on a compiled model."""
    (eager_model, model), (eager_opt, _) = twins(name, BNNet)
    compiled = torch.compile(model, backend="aot_eager")
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=compiled)

    def train_step(opt, model, x, y):
        return opt.step(make_closure(opt, model, x, y))

    compiled_step = torch.compile(train_step, backend="aot_eager")
    for x, y in make_batches(STEPS):
        expected = train_step(eager_opt, eager_model, x, y)
        assert_same_tensors(compiled_step(opt, compiled, x, y), expected, "loss")
    assert_same_tensors(model.state_dict(), eager_model.state_dict(), "model")
    assert any("Tensor.backward" in r for r in graph_breaks())
    assert_only_torch_breaks()


def test_inductor_end_to_end():
    """Inductor (C++ on CPU) for the model's forward/backward and for first_step, whose
    graph holds our custom ops; matches eager to float32 rounding."""
    (eager_model, model), (eager_opt, _) = twins("SAM", MLP)
    compiled = torch.compile(model)
    opt = make_optimizer("SAM", model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=compiled)
    first_step = torch.compile(opt.first_step, fullgraph=True)
    for x, y in make_batches(3):
        eager_opt.step(make_closure(eager_opt, eager_model, x, y))
        opt.zero_grad()
        loss_fn(compiled, x, y).backward()
        first_step()
        opt.zero_grad()
        loss_fn(compiled, x, y).backward()
        opt.second_step()
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.fc1.weight, MLP().fc1.weight)
