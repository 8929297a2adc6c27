"""The optimizers of conf/optimizer against independent references, with every schedule, and
through a save/load of their state."""

from __future__ import annotations

import io
import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lmlab.optim.adafactor import Adafactor
from lmlab.optim.lamb import lamb
from lmlab.tasks.base import split_weight_decay
from tests.conftest import CONF_DIR, compose_config

OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF_DIR / "scheduler").glob("*.yaml"))


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


# -- LAMB -----------------------------------------------------------------------------------------
def naive_lamb(w, m, v, g, lr, betas, eps, wd, decouple):
    """One LAMB step on one tensor, written from the paper (You et al. 2019, Algorithm 2) with
    φ(‖w‖) = min(‖w‖, 10) and without bias correction (the trust ratio cancels it)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if decouple:
        w = w * (1 - lr * wd)
    u = m / (v.sqrt() + eps)
    if not decouple:
        u = u + wd * w
    w_norm, u_norm = min(w.norm().item(), 10.0), u.norm().item()
    ratio = w_norm / (u_norm + eps) if w_norm > 0 and u_norm > 0 else 1.0
    return w - lr * ratio * u, m, v


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decouple", [True, False])
def test_lamb_matches_the_paper(foreach, decouple):
    torch.manual_seed(0)
    # a matrix, a zero-initialised bias (trust ratio 1) and a matrix with ‖w‖ > 10 (φ clips)
    init = [torch.randn(3, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
            torch.randn(8, 8, dtype=torch.float64) * 3]
    params = [nn.Parameter(t.clone()) for t in init]
    lr, betas, eps, wd = 0.05, (0.9, 0.99), 1e-6, 0.1
    opt = lamb([{"params": [params[0], params[2]], "weight_decay": wd}, {"params": [params[1]], "weight_decay": 0.0}],
               lr=lr, betas=betas, eps=eps, weight_decouple=decouple, foreach=foreach)
    ref = [(t.clone(), torch.zeros_like(t), torch.zeros_like(t)) for t in init]
    decays = [wd, 0.0, wd]
    for grads in _grads([t.shape for t in init], steps=4):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [naive_lamb(w, m, v, g, lr, betas, eps, d, decouple) for (w, m, v), g, d in zip(ref, grads, decays)]
    for p, (w, _, _) in zip(params, ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    assert params[2].detach().norm() > 10  # the clipped case really was exercised


# -- Adafactor ------------------------------------------------------------------------------------
def naive_adafactor(w, state, g, t, lr, beta2_decay, eps1, eps2, d, wd):
    """One Adafactor step, written from Shazeer & Stern (2018) as torch documents it: row and
    column *sums* of g² for matrices (the factored estimate R·C / ΣR), relative step size."""
    beta2_hat = 1 - t**beta2_decay
    rho = min(lr, 1 / math.sqrt(t))
    alpha = max(eps2, (w.pow(2).mean().sqrt()).item()) * rho
    w = w * (1 - lr * wd)
    if g.ndim > 1:
        state["R"] = beta2_hat * state["R"] + (1 - beta2_hat) * (g * g).sum(dim=1)
        state["C"] = beta2_hat * state["C"] + (1 - beta2_hat) * (g * g).sum(dim=0)
        V = torch.outer(state["R"], state["C"]) / max(state["R"].sum().item(), eps1)
    else:
        state["V"] = beta2_hat * state["V"] + (1 - beta2_hat) * g * g
        V = state["V"]
    U = g / torch.clamp(V.sqrt(), min=eps1)
    U = U / max(1.0, U.pow(2).mean().sqrt().item() / d)
    return w - alpha * U


@pytest.mark.parametrize("implementation", [Adafactor, torch.optim.Adafactor], ids=["lmlab", "torch"])
@pytest.mark.parametrize("foreach", [True, False])
def test_adafactor_matches_the_paper(foreach, implementation):
    torch.manual_seed(0)
    init = [torch.randn(5, 3, dtype=torch.float64) * 0.5, torch.randn(3, dtype=torch.float64) * 1e-4]
    params = [nn.Parameter(t.clone()) for t in init]
    lr, beta2_decay, eps2, d, wd = 0.3, -0.8, 1e-3, 1.0, 0.1
    opt = implementation(
        [{"params": [params[0]], "weight_decay": wd}, {"params": [params[1]], "weight_decay": 0.0}],
        lr=lr, beta2_decay=beta2_decay, eps=(None, eps2), d=d, foreach=foreach)
    eps1 = torch.finfo(torch.float64).eps
    ref = [init[0].clone(), init[1].clone()]
    states = [{"R": torch.zeros(5, dtype=torch.float64), "C": torch.zeros(3, dtype=torch.float64)},
              {"V": torch.zeros(3, dtype=torch.float64)}]
    for t, grads in enumerate(_grads([p.shape for p in init], steps=5), start=1):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [naive_adafactor(w, s, g, t, lr, beta2_decay, eps1, eps2, d, decay)
               for w, s, g, decay in zip(ref, states, grads, [wd, 0.0])]
    for p, w in zip(params, ref):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    # factored: a row and a column vector for the matrix, not a full second moment
    assert {k: tuple(v.shape) for k, v in opt.state[params[0]].items() if v.ndim} == {"row_var": (5, 1), "col_var": (1, 3)}


@pytest.mark.parametrize("foreach", [True, False])
def test_adafactor_agrees_with_torch_and_never_waits_for_the_device(foreach):
    # torch's state and update (checkpoints move between the two), with its per-tensor .item()
    # reads of the relative step and the clipping gone; a tensor skipping a step keeps its own
    # step count, as in torch.
    from tests.host_syncs import HostSyncs, host_step_counts

    torch.manual_seed(0)
    shapes = [(5, 3), (3,), (4, 6, 2), (7,)]
    init = [torch.randn(s) for s in shapes]
    ours, theirs = ([nn.Parameter(t.clone()) for t in init] for _ in range(2))
    opts = [cls([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=0.05, weight_decay=0.1,
                foreach=foreach, maximize=False)
            for cls, ps in ((Adafactor, ours), (torch.optim.Adafactor, theirs))]
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = None if step == 3 and p is params[3] else g.clone()
        with HostSyncs(lambda: host_step_counts(opts[:1])) as syncs:  # torch keeps the counts on the host
            opts[0].step()
        assert not syncs.found, syncs.report()
        opts[1].step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    mine, reference = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert all(mine[k].keys() == reference[k].keys() and torch.equal(mine[k]["step"], reference[k]["step"])
               for k in reference)
    assert mine[3]["step"].item() == 5


# -- AdamW8bit ------------------------------------------------------------------------------------
def test_adamw8bit_tracks_fp32_adamw():
    """Blockwise 8-bit moments change the trajectory only by quantisation error."""
    torch.manual_seed(0)
    init = torch.randn(64, 128) * 0.02
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    reference = torch.optim.AdamW([a], **kw)
    eight_bit = bnb.optim.AdamW8bit([b], **kw, min_8bit_size=4096)
    for (g,) in _grads([init.shape], steps=8):
        a.grad, b.grad = g.float(), g.float().clone()
        reference.step()
        eight_bit.step()
    state = eight_bit.state[b]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    moved_ref, moved_8 = a.detach() - init, b.detach() - init
    rel = (moved_8 - moved_ref).norm() / moved_ref.norm()
    assert rel < 0.02, f"8-bit AdamW drifted {rel:.3%} from fp32 AdamW"
    assert torch.nn.functional.cosine_similarity(moved_8.flatten(), moved_ref.flatten(), dim=0) > 0.999


# -- every optimizer with every schedule, through a checkpoint round trip ---------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(96, 64)  # 6,144 weights: 8-bit state in adamw8bit
        self.norm = nn.LayerNorm(64)

    def loss(self, x):
        return self.norm(self.proj(x)).pow(2).mean() + self.proj.weight.sum() * 1e-3


def _build(cfg):
    import hydra.utils

    model = Tiny()
    opt = hydra.utils.instantiate(cfg.optimizer)(split_weight_decay(model, 0.1))
    sched = hydra.utils.instantiate(cfg.scheduler)(opt, total_steps=12)
    return model, opt, sched


def _train(model, opt, sched, steps, start):
    for step in range(start, start + steps):
        x = torch.randn(4, 96, generator=torch.Generator().manual_seed(step))
        model.loss(x).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_with_schedule_resumes_bit_identically(optimizer, scheduler, tmp_path):
    overrides = [f"optimizer={optimizer}", f"scheduler={scheduler}", "scheduler.warmup_steps=3"]
    if scheduler == "noam":
        overrides.append("optimizer.lr=1.0")
    cfg = compose_config(overrides, tmp_path / "run", tmp_path / "cache", tiny=False)

    model, opt, sched = _build(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, sched, steps=6, start=0)
    lr_fn = sched.lr_lambdas[0]
    for group in opt.param_groups:  # the schedule drives this optimizer's lr
        assert float(group["lr"]) == pytest.approx(group["initial_lr"] * lr_fn(6))
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as a resumed run loads it
    resumed, opt2, sched2 = _build(cfg)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])

    _train(model, opt, sched, steps=6, start=6)
    _train(resumed, opt2, sched2, steps=6, start=6)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_shipped_settings_reduce_a_loss(optimizer, tmp_path):
    """Each conf/optimizer option, as shipped (its lr, with a short warmup), learns a regression."""
    import hydra.utils

    cfg = compose_config([f"optimizer={optimizer}", "scheduler=cosine", "scheduler.warmup_steps=5"],
                         tmp_path / "run", tmp_path / "cache", tiny=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :8] * 2) + x[:, 8:]  # learnable, not linear
    opt = hydra.utils.instantiate(cfg.optimizer)(split_weight_decay(model, 0.1))
    sched = hydra.utils.instantiate(cfg.scheduler)(opt, total_steps=60)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert losses[-1] < 0.7 * losses[0], losses[::10]
