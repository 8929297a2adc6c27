"""`peft=prefix|prompt` on `model=hf`: `peft`'s PrefixTuningConfig / PromptTuningConfig.

`get_peft_model` wraps the HF model (freezes it, builds peft's prompt encoder); the wrapped
model then replaces `HFBackbone.hf` inside a `PromptLearningLM`, which keeps lmlab's decoder
contract. `PeftModelForCausalLM.forward` cannot serve it directly: it injects the prompt on
every call (so a KV cache that already holds it would get it twice), drops `position_ids` for
prompt tuning (left padding would shift positions) and returns the virtual tokens' logits too.
So `PromptLearningLM` asks peft for the prompt (`get_prompt`) and feeds it itself, once per
sequence: prompt tuning prepends the embeddings (real positions shifted by P, states of the
virtual tokens cut from the output); prefix tuning starts the model's cache with peft's
prefix keys/values and, as peft does, offsets the real positions by P.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError


class PromptLearningLM(nn.Module):
    """Stands in for `HFBackbone.hf`: a `PeftModelForCausalLM` (`peft_model`) for prefix or
    prompt tuning, called like the HF model (`forward`) or its trunk (`base_model`)."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        config = peft_model.active_peft_config
        self.n_virtual_tokens = config.num_virtual_tokens
        self.is_prefix = config.peft_type.value == "PREFIX_TUNING"

    def get_input_embeddings(self) -> nn.Module:
        """The wrapped model's, as on the HF model it stands in for (`describe` reads it)."""
        return self.peft_model.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.peft_model.get_base_model().get_output_embeddings()

    @property
    def base_model(self) -> Any:
        """What `HFBackbone.hidden` calls: the same forward, returning `last_hidden_state`."""
        return partial(self.forward, hidden=True)

    def _prompt(self, batch_size: int) -> Any:
        """peft's prompt (or prefix keys/values) for a batch. peft keeps the virtual tokens'
        ids in a host tensor outside the module and copies it to the device at every call: a
        blocking copy, i.e. a GPU sync per step. Moved once instead."""
        adapter = self.peft_model.active_adapter
        device = self.peft_model.prompt_encoder[adapter].embedding.weight.device
        tokens = self.peft_model.prompt_tokens[adapter]
        if tokens.device != device:
            self.peft_model.prompt_tokens[adapter] = tokens.to(device)
        return self.peft_model.get_prompt(batch_size=batch_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Any = None,
                use_cache: bool | None = False, hidden: bool = False) -> SimpleNamespace:
        B, T = input_ids.shape
        P = self.n_virtual_tokens
        model = self.peft_model.get_base_model()
        first = past_key_values is None  # the prompt is not in the (absent or new) cache yet
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        inputs: dict[str, Any] = {}
        if self.is_prefix:
            inputs["input_ids"] = input_ids
            if first:
                past_key_values = self._prompt(B)
            if position_ids is not None:
                position_ids = position_ids + P
        else:
            embeds = model.get_input_embeddings()(input_ids)
            if first:
                prompt = self._prompt(B).to(embeds.dtype)
                embeds = torch.cat([prompt, embeds], dim=1)
            inputs["inputs_embeds"] = embeds
            if position_ids is not None:  # given with a mask: count real tokens, prompt first
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, -embeds.shape[1]:]
        target = model.base_model if hidden else model
        out = target(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, use_cache=use_cache)
        cut = P if (first and not self.is_prefix) else 0
        result = SimpleNamespace(past_key_values=out.past_key_values if use_cache else None)
        if hidden:
            result.last_hidden_state = out.last_hidden_state[:, cut:]
        else:
            result.logits = out.logits[:, cut:]
        return result


def wrap_hf_prompt_learning(backbone: nn.Module, strategy: Any) -> nn.Module:
    """Put peft's prefix or prompt tuning into an `HFBackbone` (see the module docstring)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    hf = backbone.hf
    if strategy.method == "prefix":
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=strategy.n_virtual_tokens,
            prefix_projection=strategy.reparameterize,
            encoder_hidden_size=strategy.hidden_size or hf.config.hidden_size,
        )
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM",
                                    num_virtual_tokens=strategy.n_virtual_tokens)
    try:
        peft_model = get_peft_model(hf, config)
    except (ValueError, KeyError, AttributeError) as err:
        raise ConfigError("peft.method", strategy.method,
                          reason=f"peft cannot apply it to model.hf_path={backbone.path} ({err})"
                          ) from None
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    with torch.no_grad():
        if strategy.method == "prompt":
            embeddings = hf.get_input_embeddings().weight
            encoder.embedding.weight.copy_(
                strategy.initial_prompt(embeddings, backbone.config.vocab_size))
        elif not strategy.reparameterize:
            # peft's nn.Embedding default is N(0, 1), far larger than a model's own keys.
            encoder.embedding.weight.normal_(0.0, strategy.init_std)
    backbone.hf = PromptLearningLM(peft_model)
    return backbone
