"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy.

Lightning's `FSDPStrategy` (FSDP1) refuses CPU processes; `ModelParallelStrategy` runs FSDP2 on
CPU with gloo and on GPUs with NCCL alike. It leaves the sharding to the LightningModule's
`configure_model`; `LMTask.configure_model` hands the module to `FSDP2Strategy.shard_module`,
which shards every transformer block on its own (so only one block's full weights exist at a
time), then the root (embeddings, final norm, heads).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lmlab.errors import ConfigError

# Backbone methods besides forward that tasks and generation call.
FORWARD_METHODS = ("hidden", "encode", "decode", "mlm_logits")
# Methods of modules inside a block that are called outside the block's forward.
BLOCK_METHODS = ("project_memory",)
DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one.

    A backbone may say which they are (`fsdp_blocks()`); otherwise they are the entries of every
    `nn.ModuleList` attribute named `layers` (lmlab's decoder and stacks, HF models), outermost
    only. Expert lists (`experts`) stay inside their block's shard.
    """
    for sub in module.modules():
        if hasattr(sub, "fsdp_blocks"):
            return list(sub.fsdp_blocks())
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            if any(id(m) in seen for m in _ancestors(module, name)):
                continue
            seen.add(id(sub))
            blocks.extend(sub)
    return blocks


def _ancestors(root: nn.Module, name: str) -> list[nn.Module]:
    out, module = [], root
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        out.append(module)
    return out


class FSDP2Strategy(ModelParallelStrategy):
    """Pure data parallelism with sharded parameters, gradients and optimizer states.

    `param_dtype`/`reduce_dtype` are FSDP2's MixedPrecisionPolicy (weights are stored in fp32 and
    gathered in `param_dtype` for compute); `activation_checkpointing` recomputes each block's
    activations in backward; `reshard_after_forward` frees gathered weights after the forward
    (ZeRO-3-like; false keeps them to backward, ZeRO-2-like).
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ):
        # Every process is one data-parallel shard (no tensor parallelism).
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ConfigError(f"trainer.strategy.{name}", value, list(DTYPES), "FSDP2 mixed-precision dtype")
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = DTYPES[param_dtype]
        self.reduce_dtype = DTYPES[reduce_dtype]
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (it expects tensor
        # parallelism inside a node); here every process is a data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard_module(self, task: nn.Module) -> None:
        """fully_shard each transformer block, then the backbone (embeddings, final norm, LM head),
        then every other child of the task that holds parameters (task heads). Idempotent:
        validate/test call configure_model again."""
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import (
            FSDPModule,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        backbone = getattr(task, "backbone", task)
        if isinstance(backbone, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        for block in transformer_blocks(backbone):
            # Parts of a block called outside its forward (cross-attention's project_memory, run
            # once per sequence by the decoder stack) are units of their own with those methods
            # registered, so their weights are gathered for those calls too.
            for sub in block.modules():
                methods = [m for m in BLOCK_METHODS if sub is not block and callable(getattr(sub, m, None))]
                if methods:
                    fully_shard(sub, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
                    for name in methods:
                        register_fsdp_forward_method(sub, name)
            if self.activation_checkpointing:
                checkpoint(block)
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        # The backbone's own weights (embeddings, tied LM head) are used again right after its
        # forward (the head, generation steps, backward): keep them gathered until backward.
        fully_shard(backbone, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        # Tasks call the backbone through these methods too (classify: hidden; seq2seq: encode,
        # decode; mlm: mlm_logits); FSDP gathers parameters only around registered calls.
        for name in FORWARD_METHODS:
            if callable(getattr(backbone, name, None)):
                register_fsdp_forward_method(backbone, name)
        for child in task.children():
            if child is not backbone and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
