"""A small conv net with BatchNorm, its data, and an op counter: shared by the optimizer tests
that compare against per-tensor implementations (test_sam, test_vasso)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TinyNet(torch.nn.Module):
    """Conv (no bias: BatchNorm follows, a bias would get ~0 gradients) + BatchNorm + Linear,
    plus a parameter that never gets a gradient. Inputs are (batch, in_ch, size, size)."""

    def __init__(self, in_ch=3, channels=4, size=6, n_out=5):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_ch, channels, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.fc = torch.nn.Linear(channels * (size - 2) ** 2, n_out)
        self.unused = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_data(steps, dtype, device, batch=8, in_ch=3, size=6, n_out=5):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, in_ch, size, size, generator=g, dtype=dtype).to(device),
             torch.randint(0, n_out, (batch,), generator=g).to(device)) for _ in range(steps)]


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def params_of(*shapes, device="cpu", dtype=torch.float32):
    """Fresh random parameters of the given shapes."""
    return [torch.nn.Parameter(torch.randn(*s, device=device, dtype=dtype)) for s in shapes]


class OpCounter(TorchDispatchMode):
    """Records the name of every op dispatched while active (aten and our custom ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
