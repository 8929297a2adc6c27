"""Find host-device synchronisations on a CPU: the ops that would make the host wait for a GPU.

On a GPU an op that reads a value to the host (`.item()`, `bool(t)`, `.tolist()`) or whose
output shape depends on the data (boolean indexing, `nonzero`, `bincount`, `unique`) blocks
the host until the device has computed everything queued before it. On a CPU nothing waits,
so these are invisible in timings here; `HostSyncs` records them by name instead, with the
Python frames that issued them, at the dispatcher (every aten op of forward and backward) and
at the Python methods that read tensors without dispatching an op on a CPU (`tolist`, `numpy`).
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value on the host, or size their output by the data.
SYNCING_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal",
    "aten::masked_select", "aten::bincount", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave",
})
# Ops that sync when indexed by a boolean mask (they compute its nonzero positions first).
MASK_INDEXED_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
READING_METHODS = ("tolist", "numpy")
# Ops that validate their input on the host only off CUDA (a GPU relies on device asserts):
# what they read here is no sync there.
CPU_ONLY_CHECKS = ("one_hot",)


def _caller(skip: int) -> str:
    """The innermost frames outside torch: where the sync is in lmlab (or Lightning)."""
    frames = [f for f in traceback.extract_stack()[:-skip]
              if "/torch/" not in f.filename and "host_syncs" not in f.filename]
    return " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-3:][::-1])


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as syncs: ...`, then `syncs.found` counts (op, where it was issued).

    `host_tensors`: a function giving the tensors that live on the host on a GPU run too
    (torch keeps an optimizer's step counts there unless it is fused or capturable), whose
    reads wait for nothing; asked at each read, as optimizers create their state lazily."""

    def __init__(self, host_tensors: Callable[[], Iterable[torch.Tensor]] = tuple):
        super().__init__()
        self.found: Counter[tuple[str, str]] = Counter()
        self.host_tensors = host_tensors
        self._originals = {}
        self._quiet = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self._quiet or (name == "aten::_local_scalar_dense"
                           and any(args[0] is t for t in self.host_tensors())):
            return func(*args, **(kwargs or {}))
        if name in SYNCING_OPS or (name in MASK_INDEXED_OPS and any(
                _is_mask(i) for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))):
            self.found[(name, _caller(2))] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in READING_METHODS:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original

            def reading(tensor, *args, _original=original, _method=method, **kwargs):
                self.found[(f"Tensor.{_method}", _caller(2))] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, reading)
        for name in CPU_ONLY_CHECKS:
            original = getattr(F, name)
            self._originals[name] = original

            def quiet(*args, _original=original, **kwargs):
                self._quiet += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._quiet -= 1

            setattr(F, name, quiet)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(F if name in CPU_ONLY_CHECKS else torch.Tensor, name, original)
        self._originals.clear()
        return super().__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{count}x {op} at {where}" for (op, where), count in self.found.most_common())


def host_step_counts(optimizers) -> list[torch.Tensor]:
    """The step counts torch's optimizers keep on the host (all but fused or capturable ones)."""
    counts = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue
            counts += [optimizer.state[p]["step"] for p in group["params"]
                       if isinstance(optimizer.state.get(p, {}).get("step"), torch.Tensor)]
    return counts


class StepSyncs(L.Callback):
    """Records the host syncs of training steps `first` .. `last - 1` of a run, from its own
    batch start to its own batch end: the forward, backward and optimizer step with every
    callback hook between them, and the batch-end hooks of the callbacks listed before it. Not
    seen: the batch-start hooks of the callbacks before it, the batch-end hooks of checkpoint
    callbacks (Lightning runs those last), and the batch's transfer (host-side work here). Add
    it with `+callbacks.step_syncs._target_=tests.host_syncs.StepSyncs` (last in the list); the
    instance is `StepSyncs.latest`."""

    latest: StepSyncs | None = None

    def __init__(self, first: int = 2, last: int = 5):
        self.first, self.last = first, last
        self.syncs = HostSyncs(lambda: host_step_counts(self._optimizers))
        self._optimizers = []
        self.watched = 0
        self._on = False
        StepSyncs.latest = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first <= trainer.global_step < self.last:
            self._optimizers = trainer.optimizers
            self.syncs.__enter__()
            self._on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._on:
            self.syncs.__exit__(None, None, None)
            self._on = False
            self.watched += 1

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._on:  # a step that raised: leave no mode or patched method behind
            self.syncs.__exit__(None, None, None)
            self._on = False


class CudaStepSyncs(StepSyncs):
    """On a GPU, the real thing: CUDA's sync debug mode warns at every synchronising call
    (device reads and pageable host-to-device copies included) during the watched steps;
    `found` counts (message, where) as `HostSyncs` does."""

    def __init__(self, first: int = 2, last: int = 5):
        super().__init__(first, last)
        self.found: Counter[tuple[str, str]] = Counter()
        self._catcher = None
        self._caught: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first <= trainer.global_step < self.last:
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._on:
            self._stop()
            self.watched += 1

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._on:
            self._stop()

    def _stop(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self._on = False
        for w in self._caught:
            # torch's one-time notice on first enabling the mode ("... is a prototype feature
            # and does not yet detect all synchronizing operations") names no sync.
            if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message):
                self.found[(str(w.message)[:80], f"{w.filename.split('/')[-1]}:{w.lineno}")] += 1
