"""`model=hf`: any local Hugging Face causal LM behind lmlab's decoder contract.

    backbone = HFBackbone(config)   # config.hf_path: a save_pretrained directory
    logits = backbone(input_ids, attention_mask=None, cache=None)   # like DecoderLM
    generate(backbone, prompt_ids, prompt_mask, ...)                # lmlab.models.generate

The HF model is `backbone.hf` (an `AutoModelForCausalLM`, loaded from local files only, never
with `trust_remote_code`), so its Linear layers keep their own names (`q_proj`, `up_proj`, ...)
and `peft` injects adapters into them like into lmlab's backbones. Token ids are lmlab's: with
a foreign tokenizer.json, `tokenizer=hf` shifts ids up by `id_offset` (lmlab's specials take
0..5), so the embedding and output rows are shifted the same way (vocab.py) and padded to
`pad_vocab_multiple`. Positions are counted over real tokens (left padding shifts nothing), as
in `DecoderLM`, and the KV cache (`new_cache`) wraps HF's own `past_key_values`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.models.config import ModelConfig
from lmlab.models.hf.files import TOKENIZER_FILE, model_directory, read_config
from lmlab.models.hf.vocab import LMLAB_SPECIALS, vocab_layout
from lmlab.precision import checkpoint_layer

_ATTN_IMPLS = {"sdpa": "sdpa", "eager": "eager"}


def lmlab_id_offset(directory: str | Path) -> int:
    """The id shift lmlab's `tokenizer=hf` applies to this directory's tokenizer.json (without
    extra `tokenizer.special_tokens`): 0 when ids 0..5 already are lmlab's specials, else 6."""
    path = Path(str(directory)) / TOKENIZER_FILE
    if not path.is_file():
        return 0
    from tokenizers import Tokenizer

    library = Tokenizer.from_file(str(path))
    found = tuple(library.id_to_token(i) for i in range(len(LMLAB_SPECIALS)))
    return 0 if found == LMLAB_SPECIALS else len(LMLAB_SPECIALS)


class HFCache:
    """`new_cache` for an HF model: its `past_key_values` plus lmlab's cache bookkeeping."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.past: Any = None  # a transformers Cache once the first forward has filled it

    def reset(self) -> None:
        self.length = 0
        self.past = None

    def advance(self, n: int) -> None:
        self.length += n

    def check_room(self, batch_size: int, n_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"cache was made for batch size {self.batch_size}, got {batch_size}")
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self.length} are filled "
                             f"and {n_new} more do not fit (make it with a larger max_len)")


class HFBackbone(nn.Module):
    """A local `AutoModelForCausalLM` with DecoderLM's interface (see the module docstring).

    path: the HF directory (default `config.hf_path`). id_offset: lmlab id - HF id (default
    `config.hf_id_offset`, else inferred from the directory's tokenizer.json as `tokenizer=hf`
    does). Built under `torch.device("meta")` (assemble's shape probe) it loads no weights.
    """

    def __init__(self, config: ModelConfig, path: str | Path | None = None,
                 id_offset: int | None = None):
        super().__init__()
        path = path if path is not None else getattr(config, "hf_path", None)
        if not path:
            raise ConfigError("model.hf_path", path, "a local Hugging Face model directory",
                              "model=hf wraps a saved model; name its directory")
        directory = model_directory(path, "model.hf_path")
        if id_offset is None:
            id_offset = getattr(config, "hf_id_offset", None)
        if id_offset is None:
            id_offset = lmlab_id_offset(directory)
        self.config = config
        self.path = directory
        self.id_offset = id_offset
        # from_pretrained returns eval mode; a fresh lmlab module trains (dropout on) until .eval().
        self.hf = _load_causal_lm(directory, config).train()
        self._checkpointing = bool(getattr(config, "activation_checkpointing", False))
        if self._checkpointing:  # HF's own; active in train mode only
            kwargs = {"use_reentrant": False}
            if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if "value" not in inspect.signature(self.hf._set_gradient_checkpointing).parameters:
                # The function HF's layers call: lmlab's re-enters the CPU bf16 emulation in the
                # recompute (`lmlab.precision.checkpoint_layer`), which HF's kwargs cannot say.
                self.hf._set_gradient_checkpointing(enable=True,
                                                    gradient_checkpointing_func=checkpoint_layer)
        # Heads built on top (classify's pooling head) read the width from the config.
        config.d_model = self.hf.get_input_embeddings().embedding_dim
        self._takes_positions = "position_ids" in inspect.signature(self.hf.forward).parameters
        self._place_vocabulary(directory)

    # ---- vocabulary ---------------------------------------------------------------------------

    def _place_vocabulary(self, directory: Path) -> None:
        """Shift the embedding/output rows by id_offset and pad them, when lmlab's ids need it."""
        embed = self.hf.get_input_embeddings()
        rows = embed.weight.shape[0]
        self.hf_rows = rows  # the HF vocabulary, before lmlab's shift and padding
        wanted = self.config.vocab_size or rows + self.id_offset
        if self.id_offset == 0 and wanted <= rows:
            if not self.config.vocab_size:
                self.config.vocab_size = rows
            return
        layout = vocab_layout(directory, read_config(directory, "model.hf_path"), rows,
                              self.id_offset, self.config.vocab_size or None,
                              self.config.pad_vocab_multiple)
        self.config.vocab_size = layout.vocab_size
        output = self.hf.get_output_embeddings()
        tied = output is not None and output.weight is embed.weight
        with torch.no_grad():
            embed.weight = nn.Parameter(layout.place(embed.weight.data))
            embed.num_embeddings = layout.padded
            if output is not None:
                output.weight = embed.weight if tied else nn.Parameter(layout.place(output.weight.data))
                if getattr(output, "bias", None) is not None:
                    output.bias = nn.Parameter(layout.place(output.bias.data))
                output.out_features = layout.padded
        self.hf.config.vocab_size = layout.padded

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the wrapped model (merge adapters first) as an HF directory in the HF model's own
        id space: the rows lmlab added (its specials, the padding) are left out, so the original
        tokenizer fits. The module itself is unchanged afterwards."""
        embed, output = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        start, end = self.id_offset, self.id_offset + self.hf_rows
        modules = [m for m in (embed, output) if m is not None]
        saved = [(m, m.weight, getattr(m, "bias", None)) for m in modules]
        vocab = self.hf.config.vocab_size
        try:
            for module, weight, bias in saved:
                module.weight = nn.Parameter(weight.data[start:end])
                if bias is not None:
                    module.bias = nn.Parameter(bias.data[start:end])
            self.hf.config.vocab_size = self.hf_rows
            self.hf.save_pretrained(str(directory))
        finally:
            for module, weight, bias in saved:
                module.weight = weight
                if bias is not None:
                    module.bias = bias
            self.hf.config.vocab_size = vocab
        return Path(str(directory))

    # ---- the decoder contract -----------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: HFCache | None = None) -> Tensor:
        """input_ids [B, T] -> logits [B, T, rows]; attention_mask [B, past + T], 1 = real."""
        out = self.hf(input_ids=input_ids, **self._inputs(input_ids, attention_mask, cache))
        self._advance(cache, out, input_ids.shape[1])
        return out.logits

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               cache: HFCache | None = None) -> Tensor:
        """Final-normed hidden states [B, T, d_model] (the output layer's input)."""
        out = self.hf.base_model(input_ids=input_ids,
                                 **self._inputs(input_ids, attention_mask, cache))
        self._advance(cache, out, input_ids.shape[1])
        return out.last_hidden_state

    def new_cache(self, batch_size: int, max_len: int, device: Any = None,
                  dtype: Any = None) -> HFCache:
        return HFCache(batch_size, max_len)

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None,
                cache: HFCache | None) -> dict[str, Any]:
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(B, T)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must have shape {(B, past + T)} (batch, cached + "
                             f"new tokens), got {tuple(attention_mask.shape)}")
        # In a training step (no cache of ours, gradients on) use_cache is left to the model's
        # config (True for HF's causal LMs, unless a checkpoint saved it off): called with
        # use_cache=False and no cache, transformers reads the positions to the host to look
        # for packed sequences, a GPU sync in every step; the cache it builds instead holds the
        # keys/values autograd keeps anyway. Off without gradients (evaluation, and a
        # distillation teacher, which then pays the read: a cache would keep every layer's
        # keys/values alive to the end of the forward) and under activation checkpointing
        # (transformers turns it off there itself, read included).
        training = torch.is_grad_enabled() and not self._checkpointing
        kwargs: dict[str, Any] = {"use_cache": True if cache is not None else (None if training else False)}
        if cache is not None and cache.past is not None:
            kwargs["past_key_values"] = cache.past
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.long()
            if self._takes_positions:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                kwargs["position_ids"] = positions[:, past:]
        return kwargs

    @staticmethod
    def _advance(cache: HFCache | None, out: Any, n: int) -> None:
        if cache is not None:
            cache.past = out.past_key_values
            cache.advance(n)

    # ---- what tasks and reports ask every backbone ---------------------------------------------

    def auxiliary_losses(self) -> dict[str, Tensor]:
        return {}

    def expert_load(self) -> Tensor | None:
        return None

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _load_causal_lm(directory: Path, config: ModelConfig) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        hf_config = AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                               trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise ConfigError("model.hf_path", str(directory),
                          reason=f"transformers cannot read its config.json ({err})") from None
    if hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError("model.hf_path", str(directory),
                          sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)[:20] + ["..."],
                          f"model_type={hf_config.model_type!r} has no causal-LM class in "
                          "transformers; model=hf wraps causal LMs (use init_from=hf:<dir> with "
                          "model=bert or model=t5 for BERT / T5)")
    attn = _ATTN_IMPLS.get(config.attn_impl, "sdpa")
    if torch.empty(0).device.type == "meta":  # assemble's shape probe: structure, no weights
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False,
            attn_implementation=attn, **{dtype_key: torch.float32})
    except OSError as err:  # no weights file
        raise ConfigError("model.hf_path", str(directory),
                          reason=f"transformers cannot load its weights ({err})") from None
