"""Stop (or skip the step) when the loss or the gradients stop being finite."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lmlab.callbacks.checkpointing import NonFiniteError, last_good_checkpoint
from lmlab.errors import ConfigError

log = logging.getLogger("lmlab")
POLICIES = ("stop", "skip")


class NonFiniteGuard(L.Callback):
    """Checks the gradients before each optimizer step.

    policy="stop": raise NonFiniteError naming the step and the last good checkpoint; nothing
    poisoned is saved. policy="skip": drop that step's gradients (the optimizer skips parameters
    whose grad is None) and go on; skipped steps are counted in `train/skipped_steps`.

    The check reduces each gradient to numbers that are non-finite exactly when one of its
    elements is (inf and NaN propagate) and reads the result once per step: the only
    host-device sync of a training step. On a GPU that is one multi-tensor max-abs norm
    (`torch._foreach_norm(grads, inf)`, one kernel launch for all gradients); on a CPU the
    per-tensor min and max (`torch.aminmax`), because the CPU inf-norm is a scalar loop: over
    the bench model's 16 M gradients 26 ms a step against 3.3 ms, 1.5 % of its 1.6 s step. With
    policy="stop", `check_every_n_steps` > 1 keeps the flag (and the first bad step) on the
    device and reads it every n steps and at the end of training, so a GPU never waits on it;
    the error still names the first bad step, but training runs on up to n - 1 steps past it
    (checkpoints still refuse non-finite weights). policy="skip" with n > 1 needs an optimizer
    that can skip a step on the device: torch's fused AdamW/Adam/SGD (`optimizer.fused: true`,
    the default) take the GradScaler's `found_inf` flag and leave parameters, moments and step
    count untouched where it is 1. The guard hands them its flag instead of dropping the
    gradients, counts the skipped steps on the device and reads the count every n steps (the
    warning and `train/skipped_steps` then cover those n steps; a window cut short by the end
    of training is read there, its total put into the run record). Other optimizers decide on
    the host, every step (`check_optimizer` refuses n > 1 for them before the run starts); so
    does a momentum SGD's first step where its buffers do not exist yet (`_momentum_unset`; the
    tasks create fused SGD's as zeros up front where that is exact, `lmlab.optim.momentum`).
    `check_every_n_steps=None` (the default) picks per device at fit start: 1 on a CPU, where
    the read costs nothing, `ACCELERATOR_CHECK_EVERY` on a GPU, where a read per step idles it
    while the host queues the next step (measured: 124M GPT-2 on an H100, see README), unless
    policy="skip" has no such optimizer (then 1).

    Under a gradient scaler (`trainer.precision=16-mixed`) an overflow is routine: the scaler
    finds the inf, skips that step itself and halves its scale (and doubles it again after 2000
    good steps, so overflows recur all run long). Such a step is the scaler's business, not a
    divergence: the guard acts only once the scale has fallen below `SCALER_FLOOR` (from 65536:
    17 more overflows than growths), where the scaled gradients are smaller than the real ones
    and still overflow, i.e. the gradients are non-finite by themselves.

    Under DeepSpeed's own optimizers (ZeRO stages 1-3, and its fp16/bf16 wrappers at stage 0)
    the gradients are not in `p.grad` (ZeRO reduces them into its own partitioned buffers) and
    the engine checks them itself: its `step()` skips a step whose gradients are non-finite and
    counts it in `engine.skipped_steps` (with its checks on, as by default: ZeRO's
    `compute_grad_norm`, bf16's `check_grad_overflow`). The guard reads that count around each
    step (a host integer DeepSpeed has already synchronised, so every step is
    checked whatever `check_every_n_steps` says): policy="stop" stops the run, policy="skip"
    counts the step DeepSpeed skipped. A run whose gradients stay non-finite would otherwise go
    on skipping every step to the end. With fp16 and a dynamic loss scale an overflow is
    routine, as above, unless the scale it was taken at is <= `SCALER_FLOOR` (DeepSpeed's
    default minimum scale is 1, where DeepSpeed raises its own error).
    """

    ACCELERATOR_CHECK_EVERY = 25
    SCALER_FLOOR = 1.0

    def __init__(self, policy: str = "stop", checkpoint_dir: str | None = None,
                 check_every_n_steps: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if check_every_n_steps is not None and (
                not isinstance(check_every_n_steps, int) or isinstance(check_every_n_steps, bool)
                or check_every_n_steps < 1):
            raise ConfigError("callbacks.nonfinite.check_every_n_steps", check_every_n_steps,
                              "null (1 on a CPU, 25 on a GPU) or an integer >= 1")
        self.policy = policy
        self.checkpoint_dir = checkpoint_dir
        self.requested_check_every = check_every_n_steps
        self.check_every_n_steps = check_every_n_steps or 1
        self.skipped = 0
        self._first_bad: torch.Tensor | None = None  # step of the first bad gradients, -1 = none
        # policy="skip" with n > 1: steps skipped on the device since the last read, the first
        # step of that window, and the optimizers holding this step's `found_inf` flag.
        self._pending_skips: torch.Tensor | None = None
        self._window: tuple[int, int] | None = None
        self._flagged: list[torch.optim.Optimizer] = []
        # DeepSpeed: (step, engine.skipped_steps before it, the fp16 loss scale it ran at or None)
        self._deepspeed_step: tuple[int, int, float | None] | None = None

    @staticmethod
    def _nonfinite(grads: list[torch.Tensor], per_tensor: bool | None = None) -> torch.Tensor:
        """A 0-d bool tensor on the gradients' device: any inf or NaN in any gradient.
        per_tensor: min and max of each tensor (the CPU's way; None = when all are on the CPU)
        or one multi-tensor inf-norm (an accelerator's)."""
        grads = [g for g in grads if g.numel()]  # neither reduction takes an empty tensor
        if not grads:
            return torch.tensor(False)
        if per_tensor is None:
            per_tensor = all(g.device.type == "cpu" for g in grads)
        if per_tensor:
            extremes = [x.float() for g in grads for x in torch.aminmax(g)]
            return ~torch.isfinite(torch.stack(extremes)).all()
        if len({(g.dtype, g.device) for g in grads}) == 1:
            norms = torch.stack(torch._foreach_norm(grads, float("inf")))
        else:
            norms = torch.stack([torch.linalg.vector_norm(g, float("inf")).float() for g in grads])
        return ~torch.isfinite(norms).all()

    def on_fit_start(self, trainer, pl_module) -> None:
        engine = _deepspeed_engine(trainer)
        if (self.policy == "skip" and engine is not None and not _deepspeed_checks_grads(engine)
                and engine.gradient_clipping()):
            # DeepSpeed's clipping indexes the gradients it finds: a step whose gradients the
            # guard dropped crashes it (IndexError in deepspeed.runtime.utils.clip_grad_norm_).
            raise ConfigError("callbacks.nonfinite.policy", "skip", ["stop"], (
                "DeepSpeed at ZeRO stage 0 in fp32 with gradient clipping (trainer.gradient_clip_val) "
                "cannot run a step without gradients; use policy=stop, ZeRO stage >= 1 (which skips "
                "non-finite steps itself), or no clipping"))
        on_device = all(skips_on_device(o) for o in getattr(trainer, "optimizers", None) or [None])
        if self.requested_check_every is None:
            on_cpu = pl_module.device.type == "cpu"
            self.check_every_n_steps = (1 if on_cpu or (self.policy == "skip" and not on_device)
                                        else self.ACCELERATOR_CHECK_EVERY)
        elif (self.policy == "skip" and self.requested_check_every > 1 and not on_device
              and not (engine is not None and _deepspeed_checks_grads(engine))):
            # `check_optimizer` refused the optimizers that never can before the run started;
            # this one can, but not over these parameters (FSDP2 shards).
            log.warning("callbacks.nonfinite.policy=skip: the run's optimizer cannot skip a step on "
                        "the device here (e.g. over FSDP2-sharded parameters); the guard decides on "
                        "the host every step")
            self.check_every_n_steps = 1

    def check_optimizer(self, optimizer_factory, strategy=None) -> None:
        """Before the run starts (`lmlab.train` calls it once the Trainer is built, before data
        or model): policy=skip with `check_every_n_steps` > 1 needs an optimizer that skips a
        step on the device (`skips_on_device`). `optimizer_factory` is the run's (already
        through `lmlab.optim.probe.check_optimizer`, which names a bad field), tried on a
        throwaway parameter. DeepSpeed strategies check the gradients themselves."""
        n = self.requested_check_every
        if self.policy != "skip" or n is None or n <= 1 or isinstance(strategy, DeepSpeedStrategy):
            return
        probe = optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        if not skips_on_device(probe):
            raise ConfigError("callbacks.nonfinite.check_every_n_steps", n, "null or 1", (
                "policy=skip reads the flag every step unless the optimizer skips a step on the "
                "device itself: torch's fused AdamW, Adam or SGD (optimizer.fused=true); "
                f"{type(probe).__name__} cannot"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None and _deepspeed_checks_grads(engine):
            self._deepspeed_step = (trainer.global_step, engine.skipped_steps, _deepspeed_scale(engine))
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        bad = self._nonfinite(grads)
        scale = _scaler_scale(trainer)
        if scale is not None:
            bad = bad & (scale.to(bad.device) < self.SCALER_FLOOR)
        step = trainer.global_step
        if self.check_every_n_steps > 1 and self.policy == "skip":
            if not _momentum_unset(optimizer):
                self._skip_on_device(step, pl_module, optimizer, bad, drop=scale is None)
                return
            # else decided on the host below, this once
        elif self.check_every_n_steps > 1:
            if self._first_bad is None:
                self._first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            # All on the device: no host read until `_check`.
            first = self._first_bad
            self._first_bad = torch.where(bad & (first < 0), first.new_full((), step), first)
            if (step + 1) % self.check_every_n_steps == 0:
                self._check()
            return
        if not bool(bad):
            return
        if self.policy == "skip":
            self.skipped += 1
            if scale is None:
                optimizer.zero_grad(set_to_none=True)
            # else the scaler skips the step itself (its gradients hold the inf): dropping them
            # would leave the scaler no inf check to update from (an assertion with a fused
            # optimizer, which it does not unscale before this hook).
            log.warning("non-finite gradients at step %d: step skipped (%d so far)", step, self.skipped)
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        self._stop(step)

    def _skip_on_device(self, step: int, pl_module, optimizer, bad: torch.Tensor, drop: bool) -> None:
        if drop:
            # The GradScaler's protocol: a fused optimizer's step skips the whole update where
            # `found_inf` is 1. (Under a scaler, the scaler sets it itself from the gradients.)
            optimizer.found_inf = bad.to(torch.float32)
            self._flagged.append(optimizer)
        self._pending_skips = bad.long() if self._pending_skips is None else self._pending_skips + bad
        self._window = (self._window[0] if self._window else step, step)
        if (step + 1) % self.check_every_n_steps == 0:
            self._report_skips(pl_module)

    def _report_skips(self, pl_module=None) -> None:
        """Read the device's count of skipped steps (one host read per window), warn, and log
        the total through `pl_module` (inside a training step; at the end of training the total
        goes into the run record from `on_train_end`)."""
        if self._pending_skips is None or self._window is None:
            return
        count, (first, last) = int(self._pending_skips), self._window
        self._pending_skips = self._window = None
        if not count:
            return
        self.skipped += count
        log.warning("non-finite gradients: %d of steps %d-%d skipped (%d so far)",
                    count, first, last, self.skipped)
        if pl_module is not None:
            pl_module.log("train/skipped_steps", float(self.skipped))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The flag was for the step just taken: a later step (or another fit of this optimizer)
        # must not read it.
        for optimizer in self._flagged:
            optimizer.__dict__.pop("found_inf", None)
        self._flagged.clear()
        if self._deepspeed_step is None:
            return
        step, skipped_before, scale = self._deepspeed_step
        self._deepspeed_step = None
        engine = _deepspeed_engine(trainer)
        if engine is None or engine.skipped_steps == skipped_before:
            return
        if scale is not None and scale > self.SCALER_FLOOR:
            return  # a routine fp16 overflow: DeepSpeed lowered its scale and goes on
        if self.policy == "stop":
            self._stop(step)
        self.skipped += 1
        log.warning("non-finite gradients at step %d: DeepSpeed skipped the step (%d so far)",
                    step, self.skipped)
        pl_module.log("train/skipped_steps", float(self.skipped))

    def _check(self) -> None:
        if self._first_bad is not None:
            first = int(self._first_bad)
            if first >= 0:
                self._stop(first)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report_skips()
        if self.skipped and trainer is not None:
            # Lightning refuses `log` here, and its results were reset before this hook: the
            # total goes straight into the metrics the run record is built from.
            trainer.callback_metrics["train/skipped_steps"] = torch.tensor(float(self.skipped))
        self._check()

    def on_validation_start(self, trainer, pl_module) -> None:
        # policy=stop: do not evaluate a poisoned model. Skips are left to their window's read
        # (logged then, inside a training step, so the logged total never goes stale).
        self._check()

    def _stop(self, step: int) -> None:
        good = last_good_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        raise NonFiniteError(
            f"non-finite loss or gradients at step {step}; last good checkpoint: {good or 'none saved yet'} "
            "(lower the learning rate, enable gradient clipping, or set callbacks.nonfinite.policy=skip)"
        )


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` flag (torch's fused AdamW, Adam and SGD
    set `_step_supports_amp_scaling`) over plain tensors (an FSDP2 shard's DTensor parameters
    would meet a plain flag in the fused kernel; those runs keep the host decision)."""
    return (bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and all(type(p.detach()) is torch.Tensor
                    for group in optimizer.param_groups for p in group["params"]))


def _momentum_unset(optimizer) -> bool:
    """A momentum SGD before its buffers exist: its fused step creates them uninitialised
    (`empty_like`) and fills them on the first update, so a first step skipped on the device
    would leave garbage momentum behind. That step is decided on the host instead (once)."""
    return (isinstance(optimizer, torch.optim.SGD)
            and any(group.get("momentum", 0) and p.grad is not None
                    and optimizer.state.get(p, {}).get("momentum_buffer") is None
                    for group in optimizer.param_groups for p in group["params"]))


def _scaler_scale(trainer) -> torch.Tensor | None:
    """The current scale of the run's gradient scaler as a 0-d tensor (no host read), or None
    when the run has no enabled scaler (fp32, bf16)."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # set by the first scale(); a tensor on the device
    if not isinstance(scale, torch.Tensor):
        return torch.tensor(float(scaler.get_scale()))
    return scale


def _deepspeed_engine(trainer):
    """The run's DeepSpeed engine, or None when the strategy is not DeepSpeed."""
    strategy = getattr(trainer, "strategy", None)
    return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None


def _deepspeed_checks_grads(engine) -> bool:
    """Whether DeepSpeed checks the gradients itself and skips non-finite steps: its optimizer
    has an `overflow` flag (the engine's own test for a skipped step). At ZeRO stage 0 in fp32
    it is the plain torch optimizer, and the gradients are in `p.grad`."""
    return hasattr(engine.optimizer, "overflow")


def _deepspeed_scale(engine) -> float | None:
    """The loss scale of a DeepSpeed fp16 run with a dynamic scale; None otherwise (bf16 and
    fp32 have none, and under a static scale an overflow is never routine)."""
    if not engine.fp16_enabled() or not engine.dynamic_loss_scale():
        return None
    scale = engine._get_optimizer_loss_scale()
    return None if scale is None else float(scale)
