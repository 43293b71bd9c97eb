"""engine.models.adam against torch.optim: the same parameters after every step.

The module exists to keep torch.optim's Optimizer (and the torch._dynamo import it
pulls in) out of training; these tests hold it to torch's own Adam and OneCycleLR.
"""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from engine.models.adam import Adam, one_cycle  # noqa: E402


def _parameters(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]


def _loss(params, step: int):
    # A different target each step, and the second parameter skipped on odd steps: a
    # parameter without a gradient must keep its state and step count unchanged.
    target = torch.sin(torch.arange(15.0).reshape(5, 3) + step)
    loss = ((params[0] - target) ** 2).sum()
    if step % 2 == 0:
        loss = loss + (params[1] ** 4).sum()
    return loss


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("schedule", [False, True])
def test_adam_matches_torch_optim_adam_step_by_step(fused, schedule):
    ours, reference = _parameters(0), _parameters(0)
    settings = {"lr": 0.05, "weight_decay": 0.01}
    optimizer = Adam(ours, fused=fused, **settings)
    torch_optimizer = torch.optim.Adam(reference, fused=fused, **settings)
    total = 40
    if schedule:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, max_lr=0.05, total_steps=total, pct_start=0.25)
    for step in range(total if schedule else 12):
        if schedule:
            optimizer.lr, beta1 = one_cycle(step, total, 0.05, pct_start=0.25)
            optimizer.betas = (beta1, optimizer.betas[1])
        for params, opt in ((ours, optimizer), (reference, torch_optimizer)):
            opt.zero_grad()
            _loss(params, step).backward()
            opt.step()
        if schedule:
            scheduler.step()
        for mine, theirs in zip(ours, reference, strict=True):
            assert torch.equal(mine, theirs), f"step {step}"
    assert float(optimizer.step_counts[0]) == (total if schedule else 12)
    assert float(optimizer.step_counts[1]) == (total // 2 if schedule else 6)


def test_one_cycle_matches_one_cycle_lr_at_every_step():
    param = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.Adam([param], lr=0.01)
    total = 37
    scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, max_lr=0.01, total_steps=total, pct_start=0.25)
    for step in range(total):
        lr, beta1 = one_cycle(step, total, 0.01, pct_start=0.25)
        group = torch_optimizer.param_groups[0]
        assert lr == pytest.approx(group["lr"], rel=1e-12), step
        assert beta1 == pytest.approx(group["betas"][0], rel=1e-12), step
        torch_optimizer.step()
        scheduler.step()
    # Hand-computed ends: max_lr / 25 at the start, max_lr / 25 / 1e4 at the last step.
    assert one_cycle(0, total, 0.01, pct_start=0.25) == pytest.approx((0.0004, 0.95))
    assert one_cycle(total - 1, total, 0.01, pct_start=0.25) == pytest.approx((4e-8, 0.95))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one parameter"):
        Adam([], lr=0.1)
    with pytest.raises(ValueError, match="invalid Adam settings"):
        Adam(_parameters(0), lr=-1.0)
    with pytest.raises(ValueError, match="outside a schedule"):
        one_cycle(11, 10, 0.1)


def test_training_does_not_import_the_compiler(tmp_path):
    # The point of the module: torch.optim's Optimizer imports torch._dynamo (1.5 s).
    code = (
        "import sys\n"
        "from engine.data.synthetic import make_synthetic\n"
        "from engine.models.cf import train_cf\n"
        "from engine.models.towers import train_two_tower\n"
        "ds = make_synthetic(n_users=60, n_items=40, n_ratings=1000, seed=0)\n"
        "train_cf(ds, solver='adam', epochs=1, progress=False)\n"
        "train_two_tower(ds, epochs=2, progress=False)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
