"""The plain Accelerate loop (README, "Accelerate") with sam_kernels.integrations.accelerate:
`optimizer.step(closure)` through AcceleratedOptimizer in fp32, bf16 and with a GradScaler
(fp16's path), accumulation with accelerator.accumulate, against a hand-written loop of the
same optimizer over the same batches. The 2-process DDP run of this recipe is in
test_integration_transformers.py (test_ddp_two_processes_pass1_per_rank)."""
import contextlib

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

import sam_kernels  # noqa: E402
from sam_kernels.integrations.accelerate import (SAMAcceleratedOptimizer,  # noqa: E402
                                                 enable_sam_step, prepare)
from training_helpers import (ALGORITHMS, MLP, SCALE, InfInjector, loss_fn,  # noqa: E402
                              make_optimizer, scaler_cpu)

STEPS = 6
K = 2  # micro-batches per step


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def rows(n=STEPS * 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def fresh(dtype=torch.float64):
    torch.manual_seed(0)
    return MLP().to(dtype)


def accelerate_loop(accelerator, model, opt, data, micro_size):
    """The README recipe: k micro-batches kept per step, accelerator.accumulate decides when
    a step is due, the closure runs every kept micro-batch through accelerator.backward (which
    divides by k and scales the loss in fp16), all but the last without DDP sync."""
    loader = torch.utils.data.DataLoader(data, batch_size=micro_size, shuffle=False)
    model, opt, loader = prepare(accelerator, model, opt, loader)
    losses, micro = [], []
    for batch in loader:
        micro.append(batch)
        with accelerator.accumulate(model):
            if accelerator.sync_gradients:
                def closure():
                    opt.zero_grad()
                    total = 0.0
                    for j, (x, y) in enumerate(micro):
                        last = j == len(micro) - 1
                        with contextlib.nullcontext() if last else accelerator.no_sync(model):
                            loss = loss_fn(model, x, y)
                            accelerator.backward(loss)
                        total += loss.detach() / len(micro)
                    return total

                losses.append(float(opt.step(closure)))
                micro = []
    return losses, opt


def hand_loop(model, opt, data, batch_size, scaler=None, autocast=None):
    losses = []
    for x, y in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = loss_fn(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss.detach()
        losses.append(float(opt.step(closure)))
        if scaler is not None:
            scaler.update()
    return losses


def assert_weights(a, b, atol):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_accumulate_recipe_equals_double_batch(name):
    """fp32 path (float64 tensors): k=2 micro-batches of 4 per step equal batches of 8 for
    every algorithm, 1e-10; the loss returned is the pass-1 loss (VaSSORe: the loss at w+e)."""
    data = rows()
    model, reference = fresh(), fresh()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model)
    losses, prepared = accelerate_loop(accelerator, model, opt, data, micro_size=4)
    assert isinstance(prepared, SAMAcceleratedOptimizer) and prepared.optimizer is opt
    ref_opt = make_optimizer(name, reference.parameters(), torch.optim.SGD, lr=0.1,
                             momentum=0.9, model=reference)
    ref_losses = hand_loop(reference, ref_opt, data, batch_size=8)
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    assert_weights(model, reference, atol=1e-10)


def test_bf16_autocast():
    """mixed_precision='bf16': Accelerate's autocast, no scaler, float32 weights: equal to the
    hand loop under torch.autocast(bfloat16), 1e-5, finite."""
    data = rows(dtype=torch.float32)
    model, reference = fresh(torch.float32), fresh(torch.float32)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=1)
    assert accelerator.scaler is None
    opt = sam_kernels.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01)
    accelerate_loop(accelerator, model, opt, data, micro_size=8)
    ref_opt = sam_kernels.SAM(reference.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01)
    hand_loop(reference, ref_opt, data, batch_size=8, autocast=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_weights(model, reference, atol=1e-5)
    assert not torch.equal(model.fc1.weight, fresh(torch.float32).fc1.weight)


def scaled_accelerator():
    """The GradScaler path of mixed_precision='fp16'. Accelerate makes no scaler on a CPU
    (fp16 there silently runs in fp32), so the test gives the accelerator one; on a GPU
    Accelerator(mixed_precision='fp16') makes it."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    accelerator.scaler = scaler_cpu()
    return accelerator


@pytest.mark.parametrize("bad_pass", [0, 3], ids=["pass1-first-micro", "pass2-last-micro"])
@pytest.mark.parametrize("name", ["SAM", "VaSSO"])
def test_grad_scaler_through_accelerated_optimizer(name, bad_pass):
    """With a scaler, AcceleratedOptimizer.step would call GradScaler.step(optimizer, closure),
    which refuses a second pass; the helper's step uses the accelerator's scaler as the
    optimizer's grad_scaler: an inf in any micro-batch of either pass of step 2 skips that
    step exactly, accelerator.optimizer_step_was_skipped says so, the scale backs off once,
    and the weights equal the hand loop with SAM(grad_scaler=) that skips the same step."""
    data = rows()
    model, reference = fresh(), fresh()
    accelerator = scaled_accelerator()
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model)
    injector = InfInjector(model.fc1.weight)
    skipped = []
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    model, prepared, loader = prepare(accelerator, model, opt, loader)
    assert opt.grad_scaler is accelerator.scaler
    micro = []
    for batch in loader:
        micro.append(batch)
        with accelerator.accumulate(model):
            if accelerator.sync_gradients:
                injector.calls, injector.at = 0, (bad_pass if len(skipped) == 2 else None)

                def closure():
                    opt.zero_grad()
                    for x, y in micro:
                        accelerator.backward(loss_fn(model, x, y))

                prepared.step(closure)
                skipped.append(accelerator.optimizer_step_was_skipped)
                micro = []
    assert skipped == [False, False, True, False, False, False]
    assert accelerator.scaler.get_scale() == SCALE / 2

    # the hand loop over batches of 8 (mean loss), skipping the same step with its own scaler
    ref_scaler = scaler_cpu()
    ref_opt = make_optimizer(name, reference.parameters(), torch.optim.SGD, lr=0.1,
                             momentum=0.9, model=reference, grad_scaler=ref_scaler)
    ref_injector = InfInjector(reference.fc1.weight)
    for t, (x, y) in enumerate(torch.utils.data.DataLoader(data, batch_size=8)):
        # pass 1 = micro-batch backward calls 0, 1; pass 2 = 2, 3; the big batch: 0, 1
        ref_injector.calls, ref_injector.at = 0, (bad_pass // 2 if t == 2 else None)

        def closure():
            ref_opt.zero_grad()
            ref_scaler.scale(loss_fn(reference, x, y)).backward()

        ref_opt.step(closure)
        ref_scaler.update()
    assert_weights(model, reference, atol=1e-10)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plain_accelerated_optimizer_cannot_run_two_passes_with_a_scaler():
    """Why the helper exists: without it, GradScaler.step unscales once before the closure
    ran and steps once — it never runs the perturbed pass with its own unscale."""
    accelerator = scaled_accelerator()
    model = fresh()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model, plain = accelerator.prepare(model, opt)
    x, y = rows()[:8]

    def closure():
        plain.zero_grad()
        accelerator.backward(loss_fn(model, x, y))

    with pytest.raises(AssertionError, match="scale"):
        plain.step(closure)


def test_helper_rejects_what_it_cannot_drive():
    model = fresh()
    accelerator = Accelerator(cpu=True)
    sgd = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="needs a sam_kernels optimizer"):
        enable_sam_step(sgd)
    with pytest.raises(TypeError, match="accelerator.prepare"):
        enable_sam_step(sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1))
    AcceleratorState._reset_state(True)
    accelerator = scaled_accelerator()
    own = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=scaler_cpu())
    with pytest.raises(ValueError, match="its own GradScaler"):
        prepare(accelerator, own)
    assert own.grad_scaler is not accelerator.scaler
    # no closure: the optimizer's own message
    opt = prepare(accelerator, sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1))
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_backward_per_micro_batch_then_step_closure_is_refused():
    """The naive accelerate loop (backward on each micro-batch, then optimizer.step(closure)
    on the last) would take the accumulated gradients as pass 1 and run the later passes on one
    micro-batch: refused, nothing moves."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = fresh(torch.float32)
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    model, prepared = prepare(accelerator, model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps > 1"):
        for _ in range(2):
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model, x, y))
                prepared.step(lambda: loss_fn(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
