"""Adam, and the one-cycle schedule, without ``torch.optim``'s ``Optimizer`` class.

Why not ``torch.optim.Adam``: its ``Optimizer`` base imports ``torch._dynamo`` on first use
(``add_param_group`` and ``step`` are wrapped for the compiler). That import takes 1.5 s,
a tenth of ``tandem train`` on ML-100K, in every training process. The update here is
torch's own, the functional ``torch.optim.adam.adam`` that ``torch.optim.Adam.step`` calls,
and ``one_cycle`` is ``torch.optim.lr_scheduler.OneCycleLR``'s formula. The tests check
both against ``torch.optim`` step by step, for equality.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.adam import adam as adam_update

# Devices with a fused Adam kernel (torch's list for ``fused=True``).
FUSED_DEVICES = frozenset({"cpu", "cuda", "mps", "xpu"})


class Adam:
    """Adam (Kingma & Ba, 2015) with L2 weight decay added to the gradient, as
    ``torch.optim.Adam(params, lr, betas, eps, weight_decay, fused)``.

    ``lr`` and ``betas`` are plain attributes: a schedule sets them between steps.
    ``fused=True`` uses torch's fused kernel where every parameter's device has one.
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool = False,
    ):
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("Adam needs at least one parameter")
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.fused = fused and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in self.parameters)
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        # The step counts live where torch.optim.Adam keeps them: on the parameter's
        # device for the fused kernel, else a CPU scalar.
        self.step_counts = [
            torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu") for p in self.parameters
        ]

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        taken = [k for k, p in enumerate(self.parameters) if p.grad is not None]
        if not taken:
            return
        grads = [g for k in taken if (g := self.parameters[k].grad) is not None]
        adam_update(
            [self.parameters[k] for k in taken],
            grads,
            [self.exp_avgs[k] for k in taken],
            [self.exp_avg_sqs[k] for k in taken],
            [],
            [self.step_counts[k] for k in taken],
            fused=self.fused or None,
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
        )


def one_cycle(
    step: int,
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.3,
    momentum: tuple[float, float] = (0.85, 0.95),
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> tuple[float, float]:
    """The learning rate and Adam's beta1 for step ``step`` (0-based) of ``total_steps``.

    Smith & Topin's one cycle, as ``OneCycleLR`` with cosine annealing: the rate rises
    from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of the steps
    while beta1 falls from ``momentum[1]`` to ``momentum[0]``, then the rate anneals to
    ``max_lr / div_factor / final_div_factor`` while beta1 climbs back.
    """
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"step {step} is outside a schedule of {total_steps} steps")
    initial = max_lr / div_factor
    warm_end = float(pct_start * total_steps) - 1
    if step <= warm_end:
        pct = step / warm_end if warm_end > 0 else 1.0
        start_lr, end_lr, start_m, end_m = initial, max_lr, momentum[1], momentum[0]
    else:
        pct = (step - warm_end) / (total_steps - 1 - warm_end)
        start_lr, end_lr, start_m, end_m = max_lr, initial / final_div_factor, momentum[0], momentum[1]

    def cosine(start: float, end: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    return cosine(start_lr, end_lr), cosine(start_m, end_m)
