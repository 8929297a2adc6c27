"""`peft=prompt`: learned soft-prompt embeddings prepended to the input (Lester et al., 2021).

The backbone is frozen; only `backbone.soft_prompt.embedding` [n_virtual_tokens, d_model]
trains. How the model feeds it (decoder: in front of the tokens, real positions shifted by P;
encoder: in front of the input, its states dropped from the output; encoder-decoder: in front
of the source only) is `lmlab.models.soft_prompt`. Initialisation (`init`): `vocab` copies the
embeddings of randomly drawn ordinary tokens (what Lester et al. found to work best), `text`
those of `init_text` (repeated to length), `random` draws N(0, init_std). `model=hf` goes
through `peft`'s PromptTuningConfig (`hf_prompt.py`) with the same initialisations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.peft.base import PeftStrategy
from lmlab.peft.prefix import is_hf

PROMPT_INITS = ("vocab", "text", "random")


class SoftPrompt(nn.Module):
    """The `soft_prompt` a backbone feeds in front of its input: `forward(B) -> [B, P, d]`."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())
        self.n_virtual_tokens = init.shape[0]

    def forward(self, batch_size: int) -> Tensor:
        return self.embedding[None].expand(batch_size, -1, -1)


@dataclass
class PromptTuning(PeftStrategy):
    method = "prompt"
    can_merge = False
    cannot_merge_reason = ("prompt tuning prepends learned embeddings to the input, an extra input "
                           "rather than a weight update, so it cannot be folded into the weights")

    n_virtual_tokens: int = 10  # soft-prompt length P
    init: str = "vocab"  # vocab | text | random
    init_text: str | None = None  # init=text: the text whose token embeddings start the prompt
    init_std: float = 0.02  # init=random: std of the normal init

    def __post_init__(self) -> None:
        self._tokenizer: Any = None
        if not isinstance(self.n_virtual_tokens, int) or self.n_virtual_tokens < 1:
            raise ConfigError("peft.n_virtual_tokens", self.n_virtual_tokens, "an integer >= 1")
        if self.init not in PROMPT_INITS:
            raise ConfigError("peft.init", self.init, list(PROMPT_INITS))
        if self.init == "text" and not (self.init_text or "").strip():
            raise ConfigError("peft.init_text", self.init_text, "a non-empty text",
                              "peft.init=text starts the prompt from this text's token embeddings")
        if self.init_std <= 0:
            raise ConfigError("peft.init_std", self.init_std, "a positive number")

    @property
    def extra_positions(self) -> int:
        """Positions the prompt adds in front of every (source) sequence."""
        return self.n_virtual_tokens

    def check_lengths(self, needed: int, model_cfg: Any) -> None:
        """Before compute: the prompt's positions plus the data's longest sequence must fit a
        learned position table (other position kinds have no limit)."""
        limit = model_cfg.max_seq_len
        if model_cfg.position == "learned" and needed + self.n_virtual_tokens > limit:
            raise ConfigError(
                "peft.n_virtual_tokens", self.n_virtual_tokens, f"an integer <= {limit - needed}",
                f"{self.n_virtual_tokens} virtual tokens in front of sequences of {needed} tokens "
                f"exceed model.max_seq_len={limit} with model.position=learned; lower "
                "peft.n_virtual_tokens or data.seq_len, or raise model.max_seq_len")

    def use_tokenizer(self, tokenizer: Any) -> None:
        """The run's tokenizer, which `init=text` needs to turn `init_text` into ids."""
        self._tokenizer = tokenizer

    def apply(self, backbone: nn.Module) -> nn.Module:
        if is_hf(backbone):
            from lmlab.peft.hf_prompt import wrap_hf_prompt_learning

            return wrap_hf_prompt_learning(backbone, self)
        backbone.requires_grad_(False)
        backbone.soft_prompt = SoftPrompt(self.initial_prompt(backbone.embed_tokens.weight,
                                                              backbone.config.vocab_size))
        return backbone

    def initial_prompt(self, embeddings: Tensor, vocab_size: int) -> Tensor:
        """[P, d] start values, from the (padded) token embedding matrix [rows, d]."""
        P = self.n_virtual_tokens
        if self.init == "random":
            return torch.randn(P, embeddings.shape[1], device=embeddings.device) * self.init_std
        if self.init == "text":
            ids = self._text_ids()
            ids = (ids * -(-P // len(ids)))[:P]
        else:
            first = self._tokenizer.num_special_tokens if self._tokenizer is not None else 6
            first = min(first, vocab_size - 1)  # a tiny vocabulary may hold specials only
            ordinary = vocab_size - first
            draw = torch.randperm(ordinary) if ordinary >= P else torch.randint(ordinary, (P,))
            ids = (draw[:P] + first).tolist()
        return embeddings.detach()[torch.tensor(ids, device=embeddings.device)].float()

    def _text_ids(self) -> list[int]:
        if self._tokenizer is None:
            raise ConfigError("peft.init", self.init, ["vocab", "random"],
                              "init=text needs the run's tokenizer (call use_tokenizer first)")
        ids = self._tokenizer.encode(self.init_text)
        if not ids:
            raise ConfigError("peft.init_text", self.init_text, "a text with at least one token")
        return ids

    def merge(self, backbone: nn.Module) -> nn.Module:
        raise ConfigError("peft.method", self.method, ["lora", "dora", "ia3"], self.cannot_merge_reason)
