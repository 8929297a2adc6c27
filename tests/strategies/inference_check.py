"""A test-only callback: fails the run when validation left any parameter an inference tensor
(made under `torch.inference_mode`), which a sharded model's next training use cannot take."""

from __future__ import annotations

import lightning as L


class NoInferenceParameters(L.Callback):
    def on_validation_end(self, trainer, pl_module):
        bad = [name for name, p in pl_module.named_parameters() if p.is_inference()]
        if bad:
            raise RuntimeError(f"inference tensors after validation: {bad[:3]}")
