"""Per-tensor-loop baselines: the code paths of the seed implementations, re-written here op for
op so the benchmark times what users of those repositories run today.

- DavdaSAM   — davda54/sam `sam.py` (SAM, and ASAM with adaptive=True): per-tensor norms stacked
               into a global norm, a clone of every weight, the perturbation formed as a new
               tensor, restore by re-pointing `p.data` at the clone.
- SeedGSAM   — juntang-zhuang/GSAM `gsam/gsam.py`: grad clone, perturbation kept as `e_w`,
               per-tensor inner products summed on the host side of the graph, decomposition
               with four element-wise ops per tensor, restore by subtracting `e_w`.
- SeedGAM    — xxgege/GAM `gam/gam.py`: four gradient evaluations, clones of g0/g1/g2, `pro_m`,
               norms as Python sums of per-tensor `sum(g**2)`.
- SeedVaSSO  — BingcongLi/VaSSO `solver/vasso.py`: EMA of the gradient (mul_ + add_), its norm,
               perturbation kept as `e_w`, restore by subtraction.

Deliberately faithful, warts included (e.g. `1.0 * p.grad` copies, restore by subtraction):
the point is to time the seeds' per-tensor work. Distributed code paths are left out (the
benchmark runs one process). Each class follows its seed's calling convention; `bench/algos.py`
adapts them to one step protocol.
"""
from typing import Any, Callable, Optional

import torch

from sam_kernels import bn


class ConstantRho:
    """Stands in for the seeds' rho schedulers: `step()` returns a fixed value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def step(self) -> float:
        return self.value


class DavdaSAM(torch.optim.Optimizer):
    """davda54/sam: caller runs pass 1, then `step(closure)` = first_step, closure, second_step."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                factor = torch.pow(p, 2) if group["adaptive"] else 1.0
                p.add_(factor * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable) -> None:
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(device)
            for group in self.param_groups for p in group["params"] if p.grad is not None]),
            p=2)


class _SeedClosureOptimizer(torch.optim.Optimizer):
    """What GSAM's and GAM's seeds share: a base optimizer *instance*, a model whose BatchNorm
    statistics are frozen for the perturbed passes, and `step(closure)` where the closure
    returns `(outputs, loss)` and runs every forward/backward pass."""

    def __init__(self, params, base_optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 adaptive: bool, perturb_eps: float, **kwargs: Any) -> None:
        super().__init__(params, dict(adaptive=adaptive, **kwargs))
        self.model = model
        self.base_optimizer = base_optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.adaptive = adaptive
        self.perturb_eps = perturb_eps

    def _params_with_grad(self):
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]


class SeedGSAM(_SeedClosureOptimizer):
    """juntang-zhuang/GSAM (single process)."""

    def __init__(self, params, base_optimizer, model, gsam_alpha: float, rho_scheduler,
                 adaptive: bool = False, perturb_eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, model, adaptive, perturb_eps, **kwargs)
        self.rho_scheduler = rho_scheduler
        self.alpha = gsam_alpha
        self.update_rho_t()

    @torch.no_grad()
    def update_rho_t(self) -> float:
        self.rho_t = self.rho_scheduler.step()
        return self.rho_t

    @torch.no_grad()
    def perturb_weights(self, rho: float) -> None:
        grad_norm = self._grad_norm(weight_adaptive=self.adaptive)
        for group in self.param_groups:
            scale = rho / (grad_norm + self.perturb_eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_g"] = p.grad.data.clone()
                e_w = p.grad * scale.to(p)
                if self.adaptive:
                    e_w *= torch.pow(p, 2)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w

    @torch.no_grad()
    def unperturb(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.data.sub_(self.state[p]["e_w"])

    @torch.no_grad()
    def gradient_decompose(self, alpha: float) -> None:
        inner_prod = 0.0
        for p in self._params_with_grad():
            inner_prod += torch.sum(self.state[p]["old_g"] * p.grad.data)
        new_grad_norm = self._grad_norm()
        old_grad_norm = self._grad_norm(by="old_g")
        cosine = inner_prod / (new_grad_norm * old_grad_norm + self.perturb_eps)
        for p in self._params_with_grad():
            vertical = self.state[p]["old_g"] - cosine * old_grad_norm * p.grad.data / (
                new_grad_norm + self.perturb_eps)
            p.grad.data.add_(vertical, alpha=-alpha)

    @torch.no_grad()
    def _grad_norm(self, by: Optional[str] = None, weight_adaptive: bool = False) -> torch.Tensor:
        return torch.norm(torch.stack([
            ((torch.abs(p.data) if weight_adaptive else 1.0) *
             (self.state[p][by] if by else p.grad)).norm(p=2)
            for p in self._params_with_grad()]), p=2)

    @torch.no_grad()
    def step(self, closure: Callable):
        outputs, loss_value = closure()
        self.perturb_weights(rho=self.rho_t)
        bn.disable_running_stats(self.model)
        closure()
        self.gradient_decompose(self.alpha)
        self.unperturb()
        self.base_optimizer.step()
        bn.enable_running_stats(self.model)
        return outputs, loss_value


class SeedGAM(_SeedClosureOptimizer):
    """xxgege/GAM (single process): four gradient evaluations per step."""

    def __init__(self, params, base_optimizer, model, grad_rho_scheduler, grad_norm_rho_scheduler,
                 args, adaptive: bool = False, perturb_eps: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, model, adaptive, perturb_eps, **kwargs)
        self.grad_rho_scheduler = grad_rho_scheduler
        self.grad_norm_rho_scheduler = grad_norm_rho_scheduler
        self.args = args
        self.update_rho_t()

    @torch.no_grad()
    def update_rho_t(self) -> None:
        self.grad_rho = self.grad_rho_scheduler.step()
        self.grad_norm_rho = self.grad_norm_rho_scheduler.step()

    @torch.no_grad()
    def _perturb_along_grad(self, keep: str, accumulate: bool) -> None:
        scale = self.grad_rho / (self._grad_norm(weight_adaptive=self.adaptive) + self.perturb_eps)
        for p in self._params_with_grad():
            self.state[p][keep] = p.grad.data.clone()
            e_w = p.grad * scale.to(p)
            if self.adaptive:
                e_w *= torch.pow(p, 2)
            p.add_(e_w)
            if accumulate:
                self.state[p]["e_w_1_2"] += e_w
            else:
                self.state[p]["e_w_0"] = e_w

    @torch.no_grad()
    def grad_norm_ascent(self) -> None:
        for p in self._params_with_grad():
            self.state[p]["g_1"] = p.grad.data.clone()
            p.grad.data -= self.state[p]["g_0"]
        scale = self.grad_norm_rho / (self._grad_norm(weight_adaptive=self.adaptive) +
                                      self.perturb_eps)
        for p in self._params_with_grad():
            e_w = p.grad * scale.to(p)
            if self.adaptive:
                e_w *= torch.pow(p, 2)
            p.add_(e_w)
            self.state[p]["e_w_1_2"] = e_w

    @torch.no_grad()
    def unperturb(self, key: str) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if key in self.state[p].keys():
                    p.data.sub_(self.state[p][key])

    @torch.no_grad()
    def gradient_decompose(self) -> None:
        args = self.args
        inner_prod = 0.0
        for p in self._params_with_grad():
            state = self.state[p]
            state["pro_m"] = state["g_0"] + abs(args.grad_beta_2) * state["g_2"]
            p.grad.data = args.grad_beta_1 * state["g_1"] + \
                args.grad_beta_3 * p.grad.data.detach().clone()
            inner_prod += torch.sum(state["pro_m"] * p.grad.data)
        new_grad_norm = self._grad_norm()
        old_grad_norm = self._grad_norm(by="pro_m")
        cosine = inner_prod / (new_grad_norm * old_grad_norm + self.perturb_eps)
        for p in self._params_with_grad():
            vertical = self.state[p]["pro_m"] - cosine * old_grad_norm * p.grad.data / (
                new_grad_norm + self.perturb_eps)
            p.grad.data.add_(vertical, alpha=-args.grad_gamma)

    @torch.no_grad()
    def _grad_norm(self, weight_adaptive: bool = False, by: str = "grad") -> torch.Tensor:
        norm = 0.0
        for p in self._params_with_grad():
            g = p.grad.data if by == "grad" else self.state[p][by]
            norm += torch.sum((g * torch.abs(p.data)) ** 2) if weight_adaptive else \
                torch.sum(g ** 2)
        return torch.sqrt(norm)

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def step(self, closure: Callable):
        outputs, loss_value = closure()
        self._perturb_along_grad("g_0", accumulate=False)
        bn.disable_running_stats(self.model)
        closure()
        self.unperturb("e_w_0")
        self.grad_norm_ascent()
        closure()
        self._perturb_along_grad("g_2", accumulate=True)
        closure()
        self.gradient_decompose()
        self.unperturb("e_w_1_2")
        self.base_optimizer.step()
        bn.enable_running_stats(self.model)
        return outputs, loss_value


class SeedVaSSO(torch.optim.Optimizer):
    """BingcongLi/VaSSO: caller runs pass 1, then `step(closure)` = first_step(zero_grad=True),
    closure, second_step. The base optimizer is an instance."""

    def __init__(self, params, base_optimizer: torch.optim.Optimizer, rho: float,
                 theta: float) -> None:
        self.base_optimizer = base_optimizer
        self.rho, self.theta = rho, theta
        super().__init__(params, dict(rho=rho, theta=theta))
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group["rho"], group["theta"] = rho, theta

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "ema" not in self.state[p]:
                    self.state[p]["ema"] = p.grad.clone().detach()
                else:
                    self.state[p]["ema"].mul_(1 - group["theta"])
                    self.state[p]["ema"].add_(p.grad, alpha=group["theta"])
        avg_grad_norm = torch.norm(torch.stack([
            self.state[p]["ema"].norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (avg_grad_norm + 1e-7)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = self.state[p]["ema"] * scale
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable) -> None:
        self.first_step(True)
        with torch.enable_grad():
            closure()
        self.second_step()
