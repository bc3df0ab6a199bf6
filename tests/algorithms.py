"""The algorithm registry the feature matrix runs over: one line per algorithm (a new rule is
covered by adding its line)."""
import types

import torch

import sam_kernels as sk

#: name -> (class, hyper-parameters, buffers held between steps beyond the base optimizer's:
#: (with the pass-1 gradients taken over, with copies))
ALGORITHMS = {
    "SAM": (sk.SAM, dict(rho=0.1), 1),
    "ASAM": (sk.SAM, dict(rho=0.5, adaptive=True, eta=0.01), 1),
    "SAM-interval": (sk.SAM, dict(rho=0.1, interval=2), 1),
    "GSAM": (sk.GSAM, dict(alpha=0.3, rho=0.1), 1),
    "GAM": (sk.GAM, dict(grad_rho=0.05, grad_norm_rho=0.1), 2),
    "WSAM": (sk.WSAM, dict(rho=0.1, gamma=0.8), 1),
    "WSAM-coupled": (sk.WSAM, dict(rho=0.1, gamma=0.8, decouple=False), 1),
    "VaSSO": (sk.VaSSO, dict(rho=0.1, theta=0.4), 2),
    "VaSSORe": (sk.VaSSORe, dict(rho=0.1, theta=0.4, criterion="naive", k=2,
                                 warmup_steps=0), 2),
    "VaSSOReMu": (sk.VaSSOReMu, dict(rho=0.1, theta=0.4, criterion="naive", k=2,
                                     warmup_steps=0), 3),
    "LookSAM": (sk.LookSAM, dict(rho=0.1, k=2, alpha=0.5), 2),
    "FriendlySAM": (sk.FriendlySAM, dict(rho=0.1, sigma=0.5, lmbda=0.6), 2),
    "MomentumSAM": (sk.MomentumSAM, dict(rho=0.1), 1),
}


def make(name, params, **kw):
    cls, hyper, _ = ALGORITHMS[name]
    return cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, **{**hyper, **kw})


def params(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def loss_of(ps, x):
    """A smooth non-quadratic loss over the parameters (x: per-parameter data)."""
    return sum((torch.sin(p) * xi).sum() + 0.3 * (p ** 2).sum() + 0.1 * (p ** 3).sum()
               for p, xi in zip(ps, x))


def data(ps, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps] for _ in range(steps)]


def closure_for(opt, ps, x, log=None):
    def closure():
        opt.zero_grad()
        loss = loss_of(ps, x)
        loss.backward()
        if log is not None:
            log.append(1)
        return loss
    return closure


def held_buffers(opt):
    """Parameter-sized tensors the optimizer holds between steps beyond the base optimizer's
    state, found by walking the object (distinct storages, the parameters themselves and
    their gradients excluded), divided by the number of parameters."""
    skip = {id(p) for g in opt.param_groups for p in g["params"]}
    skip |= {id(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None}
    sizes = {p.numel() for g in opt.param_groups for p in g["params"]}
    seen, found = set(), []

    def walk(obj, depth=0):
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if torch.is_tensor(obj):
            if id(obj) not in skip and obj.numel() in sizes and obj.dim() > 0:
                found.append(obj.untyped_storage().data_ptr())
            return
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in list(obj):
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(
                obj, (torch.nn.Module, type, types.ModuleType, torch.optim.Optimizer)) \
                or obj is opt:
            for k, v in list(vars(obj).items()):
                if k not in ("base_optimizer", "param_groups", "model", "defaults",
                             "grad_scaler"):
                    walk(v, depth + 1)
    walk(opt)
    n = sum(len(g["params"]) for g in opt.param_groups)
    return len(set(found)) / n
