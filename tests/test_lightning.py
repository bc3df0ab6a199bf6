"""The real lightning.Trainer on CPU: the optimizer and an LR scheduler come from
configure_optimizers, automatic optimization calls optimizer.step(closure) (our closure
contract), and the trained weights equal the same steps written by hand. Manual optimization
(the recipe in the README, "PyTorch Lightning") too."""
import pytest
import torch
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

from training_helpers import (ALGORITHMS, BNNet, loss_fn, make_batches, make_closure,
                              make_optimizer)

lightning = pytest.importorskip("lightning")
# lightning 2.6 on torch 2.13 warns about its own use of a deprecated torch pytree API
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")

STEPS = 5
LIGHTNING_ALGORITHMS = [a for a in ("SAM", "GSAM") if a in ALGORITHMS]


def build(name, model):
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model)
    return opt, StepLR(opt, step_size=2, gamma=0.5)


class AutoModule(lightning.LightningModule):
    def __init__(self, name):
        super().__init__()
        self.name = name
        torch.manual_seed(0)
        self.net = BNNet()

    def training_step(self, batch, batch_idx):
        return loss_fn(self.net, *batch)

    def configure_optimizers(self):
        opt, sched = build(self.name, self)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualModule(AutoModule):
    """Manual optimization: the step runs both passes itself; the LR scheduler is ours to
    step."""

    def __init__(self, name):
        super().__init__(name)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()

        def closure():
            opt.zero_grad()
            loss = loss_fn(self.net, *batch)
            self.manual_backward(loss)
            return loss

        loss = opt.step(closure=closure)
        self.lr_schedulers().step()
        return loss


def fit(module):
    batches = make_batches(STEPS)
    data = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                                enable_progress_bar=False, enable_checkpointing=False,
                                enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=len(batches[0][0]), shuffle=False))
    return module


def by_hand(name):
    torch.manual_seed(0)
    model = BNNet()
    opt, sched = build(name, model)
    for x, y in make_batches(STEPS):
        opt.step(make_closure(opt, model, x, y))
        sched.step()
    return model, opt


@pytest.mark.parametrize("module_cls", [AutoModule, ManualModule], ids=["automatic", "manual"])
@pytest.mark.parametrize("name", LIGHTNING_ALGORITHMS)
def test_trainer_matches_hand_written_loop(name, module_cls):
    trained = fit(module_cls(name))
    expected, opt = by_hand(name)
    for (k, a), b in zip(trained.net.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{k} differs")
    # every step ran both passes at w and w + e, BatchNorm statistics from the first only
    assert int(trained.net.bn.num_batches_tracked) == STEPS
    assert opt.param_groups[0]["lr"] == trained.optimizers().param_groups[0]["lr"] == 0.025


# ---------------------------------------------------------------------------- mixed precision
from sam_kernels.integrations.lightning import SAMMixedPrecision  # noqa: E402
from training_helpers import SCALE, InfInjector, scaler_cpu  # noqa: E402

BAD_STEP = 2


class InfModule(AutoModule):
    """AutoModule whose fc1 gradient is +inf in pass `bad_pass` of step BAD_STEP."""

    def __init__(self, name, bad_pass=None):
        super().__init__(name)
        self.injector = InfInjector(self.net.fc1.weight)
        self.bad_pass = bad_pass

    def on_train_batch_start(self, batch, batch_idx):
        self.injector.calls = 0
        self.injector.at = self.bad_pass if batch_idx == BAD_STEP else None


def fit_with(module, **trainer_kwargs):
    batches = make_batches(STEPS)
    data = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                                enable_progress_bar=False, enable_checkpointing=False,
                                enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, DataLoader(data, batch_size=len(batches[0][0]), shuffle=False))
    return trainer


def by_hand_amp(name, dtype, scaler=None, bad_pass=None):
    """The same steps by hand: autocast around the forward, the loss scaled, scaler.update()
    after each step, the LR scheduler stepped every step (Lightning does, skipped or not)."""
    torch.manual_seed(0)
    model = BNNet()
    injector = InfInjector(model.fc1.weight)
    opt = make_optimizer(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                         model=model, grad_scaler=scaler)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    for t, (x, y) in enumerate(make_batches(STEPS)):
        injector.calls, injector.at = 0, (bad_pass if t == BAD_STEP else None)

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
                loss = loss_fn(model, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        opt.step(closure)
        if scaler is not None:
            scaler.update()
        sched.step()
    return model


@pytest.mark.parametrize("bad_pass", [None, 0, 1], ids=["finite", "inf-pass1", "inf-pass2"])
@pytest.mark.parametrize("name", LIGHTNING_ALGORITHMS)
def test_16_mixed_automatic_optimization_runs_both_passes(name, bad_pass):
    """SAMMixedPrecision('16-mixed') with automatic optimization and the user's training_step
    unchanged: fp16 autocast, the loss scaled, both passes run and each is unscaled once; an
    inf in either pass of one step skips that update exactly and backs the scale off once;
    the weights equal the hand loop's (1e-5)."""
    plugin = SAMMixedPrecision("16-mixed", "cpu", scaler=scaler_cpu())
    module = InfModule(name, bad_pass)
    fit_with(module, plugins=[plugin])
    opt = module.optimizers().optimizer
    assert opt.grad_scaler is plugin.scaler
    assert plugin.scaler.get_scale() == (SCALE if bad_pass is None else SCALE / 2)
    expected = by_hand_amp(name, torch.float16, scaler_cpu(), bad_pass)
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    for (k, a), b in zip(module.net.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{k} differs")
    # BatchNorm counted the first pass of every step only
    assert int(module.net.bn.num_batches_tracked) == STEPS


@pytest.mark.parametrize("how", ["precision", "plugin"])
def test_bf16_mixed(how):
    """bf16-mixed needs no scaler: plain precision='bf16-mixed' and the plugin both give the
    hand loop under bf16 autocast."""
    kwargs = {"precision": "bf16-mixed"} if how == "precision" else \
        {"plugins": [SAMMixedPrecision("bf16-mixed", "cpu")]}
    module = AutoModule("SAM")
    fit_with(module, **kwargs)
    expected = by_hand_amp("SAM", torch.bfloat16)
    for (k, a), b in zip(module.net.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{k} differs")


def test_plugin_refuses_gradient_clip_val():
    with pytest.raises(ValueError, match="max_grad_norm"):
        fit_with(AutoModule("SAM"), plugins=[SAMMixedPrecision("16-mixed", "cpu")],
                 gradient_clip_val=1.0)


def test_lightning_16_mixed_without_the_plugin_cannot_step():
    """Why the plugin exists: Lightning's MixedPrecision runs the closure once and then calls
    scaler.step(optimizer) without it, which the optimizer refuses (a second pass is needed)."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    with pytest.raises(RuntimeError, match="needs a closure"):
        fit_with(AutoModule("SAM"), plugins=[MixedPrecision("16-mixed", "cpu",
                                                            scaler=scaler_cpu())])


def test_accumulate_grad_batches_is_refused_not_taken_as_pass_1(tmp_path):
    """Lightning's accumulation runs backward on the earlier micro-batches, then
    optimizer.step(closure) for the last one: those gradients are not a whole pass 1, so the
    seeds' contract must not take them as one. The first step refuses, naming the fix, and
    nothing moves."""
    torch.manual_seed(0)
    batches = make_batches(4)
    data = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]),
                                    torch.cat([y for _, y in batches])), batch_size=8)
    module = AutoModule("SAM")
    before = [p.detach().clone() for p in module.parameters()]
    trainer = lightning.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu",
                                default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        trainer.fit(module, data)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
