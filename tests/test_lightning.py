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
