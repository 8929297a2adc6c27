"""NonFiniteGuard's check itself (end-to-end stop/skip runs: test_checkpointing.py)."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from lmlab.callbacks import NonFiniteError, NonFiniteGuard
from lmlab.errors import ConfigError


class _Trainer:
    def __init__(self):
        self.global_step = 0


def _optimizer(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-dtype", "mixed-dtypes"])
def test_every_nonfinite_value_is_caught(bad, mixed):
    poisoned = torch.tensor([1.0, bad, 3.0], dtype=torch.bfloat16 if mixed else torch.float32)
    with pytest.raises(NonFiniteError, match="step 0"):
        NonFiniteGuard().on_before_optimizer_step(_Trainer(), None, _optimizer(torch.ones(4, 2), poisoned))
    NonFiniteGuard().on_before_optimizer_step(_Trainer(), None, _optimizer(torch.ones(4, 2),
                                                                          torch.full((3,), 1e30)))


@pytest.mark.parametrize("per_tensor", [True, False], ids=["aminmax", "foreach-inf-norm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_both_checks_find_one_bad_element_anywhere(per_tensor, bad):
    # The CPU's per-tensor min/max and the accelerators' multi-tensor inf-norm, at positions in
    # the vectorised body and the scalar tail of each reduction, in every float dtype, against
    # the naive answer; huge finite values are not flagged.
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for n, at in [(1, 0), (33, 0), (33, 32), (4097, 2050), (4097, 4096)]:
            grads = [torch.ones(3, 5, dtype=dtype), torch.full((n,), 6e4 if dtype == torch.float16
                                                                else 1e30, dtype=dtype)]
            assert not NonFiniteGuard._nonfinite(grads, per_tensor), (dtype, n)
            grads[1][at] = bad
            expected = not all(torch.isfinite(g).all() for g in grads)
            assert bool(NonFiniteGuard._nonfinite(grads, per_tensor)) is expected is True, (dtype, n, at)
    empty = [torch.zeros(0), torch.ones(2)]
    assert not NonFiniteGuard._nonfinite(empty, per_tensor)


def test_deferred_check_names_the_first_bad_step():
    guard, trainer = NonFiniteGuard(check_every_n_steps=3), _Trainer()
    good, bad = _optimizer(torch.ones(3)), _optimizer(torch.tensor([float("nan")]))
    for step, opt in [(0, good), (1, bad)]:
        trainer.global_step = step
        guard.on_before_optimizer_step(trainer, None, opt)  # no host read, no error yet
    trainer.global_step = 2
    with pytest.raises(NonFiniteError, match="step 1;"):
        guard.on_before_optimizer_step(trainer, None, good)


def test_deferred_check_runs_at_the_end_of_training():
    guard, trainer = NonFiniteGuard(check_every_n_steps=50), _Trainer()
    guard.on_before_optimizer_step(trainer, None, _optimizer(torch.tensor([float("inf")])))
    with pytest.raises(NonFiniteError, match="step 0;"):
        guard.on_train_end(trainer, None)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "5"])
def test_bad_check_interval_is_a_config_error(value):
    with pytest.raises(ConfigError, match="check_every_n_steps"):
        NonFiniteGuard(check_every_n_steps=value)


class _Module:
    def __init__(self, device: str):
        self.device = torch.device(device)


def _adamw(fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], fused=fused)


def _fitting(*optimizers) -> _Trainer:
    trainer = _Trainer()
    trainer.optimizers = list(optimizers)
    return trainer


@pytest.mark.parametrize("device,policy,optimizer,expected", [
    ("cpu", "stop", None, 1), ("cuda", "stop", None, 25),
    ("cpu", "skip", "fused", 1), ("cuda", "skip", "fused", 25), ("cuda", "skip", "foreach", 1),
    ("cuda", "skip", None, 1)])
def test_default_interval_reads_every_step_only_where_it_is_free(device, policy, optimizer, expected):
    optimizers = [] if optimizer is None else [_adamw(optimizer == "fused")]
    guard = NonFiniteGuard(policy=policy)
    guard.on_fit_start(_fitting(*optimizers), _Module(device))
    assert guard.check_every_n_steps == expected
    explicit = NonFiniteGuard(check_every_n_steps=7)
    explicit.on_fit_start(_fitting(*optimizers), _Module(device))
    assert explicit.check_every_n_steps == 7


def test_skip_with_a_deferred_read_needs_an_optimizer_that_skips_on_the_device():
    # Checked on the run's optimizer factory before anything is built, naming the optimizer.
    guard = NonFiniteGuard(policy="skip", check_every_n_steps=5)
    with pytest.raises(ConfigError, match=r"check_every_n_steps.*5.*fused.*SGD cannot"):
        guard.check_optimizer(functools.partial(torch.optim.SGD, lr=0.1))
    guard.check_optimizer(functools.partial(torch.optim.AdamW, fused=True))
    NonFiniteGuard(policy="skip").check_optimizer(functools.partial(torch.optim.SGD, lr=0.1))
    guard.on_fit_start(_fitting(_adamw(fused=True)), _Module("cpu"))
    assert guard.check_every_n_steps == 5
    # What happens when the optimizer cannot skip the step over the run's parameters (FSDP2's
    # DTensors; simulated here with one that cannot at all): the host decides, every step.
    unflaggable = NonFiniteGuard(policy="skip", check_every_n_steps=5)
    unflaggable.on_fit_start(_fitting(_adamw(fused=False)), _Module("cpu"))
    assert unflaggable.check_every_n_steps == 1


def _train(guard, grads_per_step, module=None):
    """Steps of a fused AdamW through the guard's hooks, as Lightning calls them; returns the
    parameter, the optimizer and the host reads found while steps before the last ran."""
    from tests.host_syncs import HostSyncs

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    trainer = _fitting(optimizer)
    guard.on_fit_start(trainer, _Module("cpu"))
    reads = HostSyncs()
    for step, grad in enumerate(grads_per_step):
        trainer.global_step = step
        param.grad = torch.tensor(grad)
        last = step == len(grads_per_step) - 1
        with reads if not last else contextlib.nullcontext():
            guard.on_before_optimizer_step(trainer, module, optimizer)
        optimizer.step()
        guard.on_train_batch_end(trainer, module, None, None, step)
        optimizer.zero_grad(set_to_none=True)
    return param, optimizer, reads


def test_skip_on_the_device_drops_the_step_inside_the_fused_optimizer():
    nan = float("nan")
    good = [[0.1, -0.2, 0.3, 0.4], [0.5, 0.1, -0.1, 0.2]]
    logged = {}
    module = type("Module", (), {"log": lambda self, k, v: logged.update({k: v})})()
    guard = NonFiniteGuard(policy="skip", check_every_n_steps=3)
    param, optimizer, reads = _train(guard, [good[0], [nan, 1.0, 1.0, 1.0], good[1]], module)
    # The bad step changed nothing: parameters, moments and step count are those of a run
    # that never saw it.
    ref_param, ref_optimizer, _ = _train(NonFiniteGuard(policy="skip"), good)
    assert torch.equal(param, ref_param)
    state, ref_state = optimizer.state[param], ref_optimizer.state[ref_param]
    assert all(torch.equal(state[k], ref_state[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # Counted on the device, read once at the window's end (step 2), not in the steps before.
    assert not reads.found, reads.report()
    assert guard.skipped == 1 and logged == {"train/skipped_steps": 1.0}
    assert "found_inf" not in optimizer.__dict__  # the flag was for that step only


def test_skips_still_pending_are_counted_at_the_end_of_training(caplog):
    guard = NonFiniteGuard(policy="skip", check_every_n_steps=10)
    _train(guard, [[float("inf")] * 4, [1.0] * 4])
    assert guard.skipped == 0
    trainer = _Trainer()
    trainer.callback_metrics = {}
    guard.on_train_end(trainer, None)  # Lightning refuses `log` here: the record's metrics
    assert guard.skipped == 1 and "1 of steps 0-1 skipped" in caplog.text
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0


def test_a_momentum_sgd_first_step_is_decided_on_the_host():
    # Fused SGD creates its momentum buffers uninitialised and fills them on the first update:
    # a first step skipped on the device would leave them garbage. That one step is decided on
    # the host (gradients dropped), later ones on the device; the result equals a run that never
    # saw the bad steps.
    def train(grads):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(3))
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9, fused=True)
        guard = NonFiniteGuard(policy="skip", check_every_n_steps=4)
        trainer = _fitting(optimizer)
        module = type("Module", (), {"log": lambda self, k, v: None})()
        guard.on_fit_start(trainer, _Module("cpu"))
        for step, grad in enumerate(grads):
            trainer.global_step = step
            param.grad = torch.tensor(grad)
            guard.on_before_optimizer_step(trainer, module, optimizer)
            optimizer.step()
            guard.on_train_batch_end(trainer, module, None, None, step)
            optimizer.zero_grad(set_to_none=True)
        guard.on_train_end(None, None)
        return param, optimizer, guard

    nan = [float("nan")] * 3
    param, optimizer, guard = train([nan, [0.1, 0.2, 0.3], nan, [0.3, -0.1, 0.2]])
    ref, ref_optimizer, _ = train([[0.1, 0.2, 0.3], [0.3, -0.1, 0.2]])
    assert guard.skipped == 2
    assert torch.equal(param, ref)
    assert torch.equal(optimizer.state[param]["momentum_buffer"], ref_optimizer.state[ref]["momentum_buffer"])


class _ScaledTrainer(_Trainer):
    """A trainer whose precision plugin has a gradient scaler at `scale`."""

    def __init__(self, scale: float):
        super().__init__()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(torch.ones(()))  # creates the scale tensor, as the first backward does
        plugin = type("Plugin", (), {"scaler": scaler})()
        self.strategy = type("Strategy", (), {"precision_plugin": plugin})()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_scaler_overflows_are_left_to_the_scaler_until_its_scale_collapses(policy):
    guard = NonFiniteGuard(policy=policy)
    inf = _optimizer(torch.tensor([float("inf"), 1.0]))
    # 16-mixed: an overflow at a healthy scale is the scaler's to skip; the gradients stay.
    guard.on_before_optimizer_step(_ScaledTrainer(65536.0), None, inf)
    assert guard.skipped == 0 and inf.param_groups[0]["params"][0].grad is not None
    # Below the floor the scaled gradients are smaller than the real ones and still overflow.
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="step 0"):
            guard.on_before_optimizer_step(_ScaledTrainer(0.5), None, inf)
    else:
        logged = {}
        module = type("Module", (), {"log": lambda self, k, v: logged.update({k: v})})()
        guard.on_before_optimizer_step(_ScaledTrainer(0.5), module, inf)
        assert guard.skipped == 1 and logged == {"train/skipped_steps": 1.0}
        # The scaler skips the step itself; without gradients it would have no inf to see.
        assert inf.param_groups[0]["params"][0].grad is not None


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "adamw"])
def test_fp16_skip_policy_on_a_diverged_run_keeps_training(fused):
    # NaN weights at step 3: every later step overflows until the scale is below 1, then the
    # guard counts skips; the scaler skips the steps. fused=True is the default optimizer, which
    # Lightning does not unscale before the hook (dropping the gradients crashed the scaler).
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    class _Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                with torch.no_grad():
                    self.model.weight.fill_(float("nan"))
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused)

    guard = NonFiniteGuard(policy="skip")
    trainer = L.Trainer(max_steps=40, callbacks=[guard], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu",
                        plugins=[MixedPrecision("16-mixed", "cpu",
                                                scaler=torch.amp.GradScaler("cpu"))])
    trainer.fit(_Module(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(40, 8),
                                                                          batch_size=None))
    assert trainer.global_step == 40 and guard.skipped > 10


def test_fp16_run_with_routine_overflows_trains_to_the_end():
    # A scaler growing every step overflows every few steps, as GradScaler's growth does over a
    # long run; the scaler skips those steps itself and the guard must let the run go on.
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)

    class _Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    trainer = L.Trainer(max_steps=30, callbacks=[NonFiniteGuard()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu",
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(_Module(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(30, 8) * 10,
                                                                          batch_size=None))
    assert trainer.global_step == 30
    assert scaler.get_scale() < 65536.0 * 2 ** 30  # it did overflow and back off on the way
    assert torch.isfinite(model.weight).all()


class _DeepSpeedEngine:
    """What the guard reads of a DeepSpeed engine (an fp16 one cannot run on a CPU)."""

    def __init__(self, fp16: bool, scale: float):
        self.skipped_steps, self.fp16, self.scale = 0, fp16, scale
        self.optimizer = type("ZeroOptimizer", (), {"overflow": False})()  # DeepSpeed's own

    def fp16_enabled(self):
        return self.fp16

    def dynamic_loss_scale(self):
        return True

    def _get_optimizer_loss_scale(self):
        return self.scale


def _deepspeed_trainer(engine):
    from lmlab.strategies.deepspeed_cpu import LmlabDeepSpeedStrategy

    strategy = LmlabDeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})
    strategy.model = engine
    trainer = _Trainer()
    trainer.strategy = strategy
    return trainer


@pytest.mark.parametrize("fp16,scale,bad", [(True, 65536.0, False), (True, 1.0, True),
                                            (False, 1.0, True)],
                         ids=["fp16-routine-overflow", "fp16-at-min-scale", "bf16-or-fp32"])
def test_deepspeed_skips_are_read_from_the_engine(fp16, scale, bad):
    engine = _DeepSpeedEngine(fp16, scale)
    trainer = _deepspeed_trainer(engine)
    guard = NonFiniteGuard()
    # Gradients held by ZeRO: none in p.grad; the guard must not conclude "nothing to check".
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    for step in range(3):
        trainer.global_step = step
        guard.on_before_optimizer_step(trainer, None, optimizer)
        engine.skipped_steps += step == 1  # DeepSpeed's step() skipped step 1
        trainer.global_step = step + 1
        if bad and step == 1:
            with pytest.raises(NonFiniteError, match="step 1"):
                guard.on_train_batch_end(trainer, None, None, None, step)
            return
        guard.on_train_batch_end(trainer, None, None, None, step)
    assert not bad
