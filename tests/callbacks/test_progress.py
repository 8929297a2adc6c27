"""The progress bar shows the training loss without Lightning turning it into a number (a
host-device sync on a GPU) after every batch."""

from __future__ import annotations

import lightning as L
import torch

from lmlab.callbacks import ProgressBar


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.pbar_during_training: list[set[str]] = []

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.pbar_during_training.append(set(self.trainer.progress_bar_metrics))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_reads_the_training_loss_itself(tmp_path):
    bar = ProgressBar(refresh_rate=2)
    module = _Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=2)
    trainer = L.Trainer(max_steps=6, callbacks=[bar], logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, data)
    # Lightning converts progress-bar metrics to numbers after every batch; the loss is not one.
    assert all("train/loss" not in names for names in module.pbar_during_training)
    shown = bar.get_metrics(trainer, module)
    assert shown["train/loss"] == float(trainer.callback_metrics["train/loss"])
