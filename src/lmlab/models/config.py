"""`ModelConfig`: the one serialisable description of every backbone architecture.

Every field is a knob a researcher may override from the command line
(`model.n_kv_heads=2 model.position=alibi`), so `validate()` checks each one and names the
field, the value and what would be valid before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError, check_choice

FAMILIES = ("decoder", "encoder", "encoder_decoder")
FFNS = ("relu", "gelu", "swiglu", "moe", "none")
EXPERT_FFNS = ("relu", "gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
NORM_POSITIONS = ("pre", "post")
ATTN_IMPLS = ("sdpa", "eager")
MIXERS = ("attention", "mamba")
# One letter per layer in `layer_pattern`.
LAYER_LETTERS = {"A": "attention", "M": "mamba"}
ROUTERS = ("topk", "expert_choice")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
# torch.compile's modes; the two named here capture the step in CUDA graphs (on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# Fields that change how a run computes, never a tensor's shape or an id's meaning: a run may set
# them differently from the checkpoint it resumes, the base it starts from (`init_from`) or the
# adapter it loads (`peft_from`). Those checks add their own extras to this one list.
RUNTIME_FIELDS = ("dropout", "attn_impl", "activation_checkpointing", "compile", "compile_mode")

# SwiGLU's hidden size is rounded up to this so its matmuls tile well on accelerators.
_SWIGLU_MULTIPLE = 64


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `model.d_model=true` is a typo, not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """Architecture of a backbone. `vocab_size` comes from the tokenizer, set before building."""

    family: str = "decoder"
    vocab_size: int = 0
    pad_vocab_multiple: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    ffn: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    attn_impl: str = "sdpa"
    init_std: float = 0.02
    # Recompute each layer's activations in backward instead of keeping them (training only).
    activation_checkpointing: bool = False
    # torch.compile the backbone's training forward (the task does it; evaluation stays eager).
    compile: bool = False
    # torch.compile's `mode=` for it: CUDA graphs take the per-kernel launch cost off the host.
    compile_mode: str = "default"
    # Mixture of experts, Mamba / hybrid mixers, attention and RoPE variants (issue 3, A2).
    expert_ffn: str = "gelu"
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    router: str = "topk"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    moe_every: int = 1
    mixer: str = "attention"
    layer_pattern: str | None = None
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    ssm_chunk_size: int = 16
    sliding_window: int | None = None
    global_tokens: int = 0
    qk_norm: bool = False
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    original_max_seq_len: int | None = None
    # Encoder / encoder-decoder families (issue 3, A1).
    norm_position: str = "pre"
    n_decoder_layers: int | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    mlm_head: bool = True
    scale_embeddings: bool = False
    # model=hf: wrap a local Hugging Face causal LM instead of building an lmlab backbone
    hf_path: str | None = None
    hf_id_offset: int | None = None

    # ---- resolved sizes -------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn_kind == "swiglu":
            # 8/3 * d keeps SwiGLU's three matrices at the parameter count of a 4*d MLP.
            raw = int(8 * self.d_model / 3)
            return math.ceil(raw / _SWIGLU_MULTIPLE) * _SWIGLU_MULTIPLE
        return 4 * self.d_model

    @property
    def ffn_kind(self) -> str:
        """The dense FFN of every layer, and of every expert when `ffn == "moe"`; "none" for
        blocks that are a token mixer only (the original Mamba stack)."""
        return self.expert_ffn if self.ffn == "moe" else self.ffn

    def is_moe_layer(self, layer_index: int) -> bool:
        """Every `moe_every`-th layer (the last of each group of moe_every) routes to experts."""
        return self.ffn == "moe" and (layer_index + 1) % self.moe_every == 0

    @property
    def layer_mixers(self) -> list[str]:
        """Token mixer of each layer: `layer_pattern` repeated over the depth, else `mixer`."""
        if self.layer_pattern is None:
            return [self.mixer] * self.n_layers
        repeats = self.n_layers // len(self.layer_pattern)
        return [LAYER_LETTERS[letter] for letter in self.layer_pattern * repeats]

    @property
    def d_inner(self) -> int:
        """Width of a Mamba layer's expanded stream."""
        return self.expand * self.d_model

    @property
    def ssm_dt_rank(self) -> int:
        # Mamba's default: the step size is predicted through a d_model/16 bottleneck.
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    # ---- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `ConfigError` for the first field that cannot work.

        `vocab_size=0` passes (it means "not yet set from the tokenizer", so a run can validate
        its model config before training a tokenizer); `build_backbone` rejects it.
        """
        check_choice("model.family", self.family, FAMILIES)
        check_choice("model.ffn", self.ffn, FFNS)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.position", self.position, POSITIONS)
        check_choice("model.attn_impl", self.attn_impl, ATTN_IMPLS)
        check_choice("model.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.hf_path is not None and not Path(self.hf_path).is_dir():
            raise ConfigError("model.hf_path", self.hf_path, "a local Hugging Face model directory",
                              "no such directory (nothing is downloaded)")

        if not _is_int(self.vocab_size) or self.vocab_size < 0:
            raise ConfigError("model.vocab_size", self.vocab_size, "an integer >= 0",
                              "must be the tokenizer's vocabulary size")
        for name in ("pad_vocab_multiple", "d_model", "n_layers", "n_heads", "max_seq_len"):
            self._check_positive_int(name)
        for name in ("n_kv_heads", "d_ff"):
            if getattr(self, name) is not None:
                self._check_positive_int(name)
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"model.{name}", value, "a number > 0", "must be positive")
        for name in ("bias", "tie_embeddings", "activation_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}", getattr(self, name), [True, False],
                                  "must be a boolean")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", self.dropout, "a number in [0, 1)",
                              "is a probability of dropping, 1 would drop everything")

        if self.d_model % self.n_heads != 0:
            raise ConfigError("model.n_heads", self.n_heads, _divisors(self.d_model),
                              f"does not divide model.d_model={self.d_model}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError("model.n_kv_heads", self.n_kv_heads, _divisors(self.n_heads),
                              f"does not divide model.n_heads={self.n_heads} "
                              "(each key/value head serves a whole group of query heads)")
        if self.position == "rope" and self.head_dim % 2 != 0:
            even = [h for h in _divisors(self.d_model) if (self.d_model // h) % 2 == 0]
            raise ConfigError("model.n_heads", self.n_heads, even,
                              f"rope rotates pairs of dimensions, so head_dim = "
                              f"d_model/n_heads = {self.head_dim} must be even")
        self._validate_family_fields()
        self._validate_moe_fields()
        self._validate_mixer_fields()

    def _validate_family_fields(self) -> None:
        """The fields of the encoder / encoder-decoder families and of relative positions."""
        check_choice("model.norm_position", self.norm_position, NORM_POSITIONS)
        if self.norm_position == "post" and self.family == "decoder":
            raise ConfigError("model.norm_position", self.norm_position, ["pre"],
                              "decoders are built pre-LN; post-LN is for the encoder and "
                              "encoder_decoder families")
        if self.n_decoder_layers is not None:
            self._check_positive_int("n_decoder_layers")
        for name in ("mlm_head", "scale_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}", getattr(self, name), [True, False],
                                  "must be a boolean")
        # T5's bucketing gives half the buckets to each direction (bidirectional) and half of
        # those to exact distances, so fewer than 4 leaves no exact bucket and divides by 0.
        if not _is_int(self.relative_buckets) or self.relative_buckets < 4:
            raise ConfigError("model.relative_buckets", self.relative_buckets, "an integer >= 4",
                              "T5 relative position buckets: half per direction, half of "
                              "those for exact distances")
        exact = self.relative_buckets // 2
        if not _is_int(self.relative_max_distance) or self.relative_max_distance <= exact:
            raise ConfigError("model.relative_max_distance", self.relative_max_distance,
                              f"an integer > {exact}",
                              f"the logarithmic buckets start after relative_buckets/2 = {exact} "
                              "exact distances and must end further away")

    def _validate_moe_fields(self) -> None:
        check_choice("model.expert_ffn", self.expert_ffn, EXPERT_FFNS)
        check_choice("model.router", self.router, ROUTERS)
        for name in ("n_experts", "top_k", "moe_every"):
            self._check_positive_int(name)
        if self.top_k > self.n_experts:
            raise ConfigError("model.top_k", self.top_k, list(range(1, self.n_experts + 1)),
                              f"each token picks top_k of model.n_experts={self.n_experts} experts")
        if self.capacity_factor is not None and (
                not _is_number(self.capacity_factor) or self.capacity_factor <= 0):
            raise ConfigError("model.capacity_factor", self.capacity_factor,
                              "null (dropless) or a number > 0",
                              "expert capacity = capacity_factor * top_k * tokens / n_experts")
        for name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"model.{name}", value, "a number >= 0",
                                  "weights a loss added to the objective")
        if self.ffn == "none" and self.family != "decoder":
            raise ConfigError("model.ffn", self.ffn, [f for f in FFNS if f != "none"],
                              f"blocks without an FFN exist only in the decoder family, not "
                              f"model.family={self.family}")
        if self.ffn == "moe" and self.moe_every > self.n_layers:
            raise ConfigError("model.moe_every", self.moe_every,
                              f"an integer in 1..model.n_layers={self.n_layers}",
                              "every moe_every-th layer is MoE, so no layer would be")

    def _validate_mixer_fields(self) -> None:
        """Mamba / hybrid mixers, sliding-window attention, QK-norm and RoPE scaling."""
        check_choice("model.mixer", self.mixer, MIXERS)
        pattern = self.layer_pattern
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern or any(
                    letter not in LAYER_LETTERS for letter in pattern):
                raise ConfigError("model.layer_pattern", pattern,
                                  f"letters {', '.join(LAYER_LETTERS)} "
                                  f"({', '.join(f'{k}={v}' for k, v in LAYER_LETTERS.items())})",
                                  "one letter per layer names its token mixer")
            if self.n_layers % len(pattern) != 0:
                raise ConfigError("model.layer_pattern", pattern,
                                  f"a pattern whose length divides model.n_layers={self.n_layers}",
                                  "the pattern is repeated over the depth")
        if self.family != "decoder" and "mamba" in self.layer_mixers:
            field = "model.mixer" if pattern is None else "model.layer_pattern"
            raise ConfigError(field, self.mixer if pattern is None else pattern, ["attention"],
                              f"Mamba layers are causal and exist only in the decoder family, "
                              f"not model.family={self.family}")
        for name in ("d_state", "d_conv", "expand", "ssm_chunk_size"):
            self._check_positive_int(name)
        if self.dt_rank is not None:
            self._check_positive_int("dt_rank")
        if self.sliding_window is not None:
            self._check_positive_int("sliding_window")
        if not _is_int(self.global_tokens) or self.global_tokens < 0:
            raise ConfigError("model.global_tokens", self.global_tokens, "an integer >= 0",
                              "number of leading positions that attend and are attended globally")
        if self.global_tokens > 0 and self.sliding_window is None:
            raise ConfigError("model.global_tokens", self.global_tokens, [0],
                              "global tokens only mean something with model.sliding_window set")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError("model.qk_norm", self.qk_norm, [True, False], "must be a boolean")
        check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none" and self.position != "rope":
            raise ConfigError("model.rope_scaling", self.rope_scaling, ["none"],
                              f"scales rotary embeddings, but model.position={self.position}")
        if not _is_number(self.rope_scaling_factor) or self.rope_scaling_factor < 1:
            raise ConfigError("model.rope_scaling_factor", self.rope_scaling_factor,
                              "a number >= 1", "how many times the trained context to reach")
        if self.original_max_seq_len is not None:
            self._check_positive_int("original_max_seq_len")

    def _check_positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"model.{name}", value, "an integer > 0", "must be a positive int")

    # ---- (de)serialisation ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain dict or an OmegaConf node; an unknown key is a `ConfigError`."""
        d = _to_plain_dict(d)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise ConfigError(f"model.{key}", d[key], known, "unknown model field")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _to_plain_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but the model zoo works without Hydra.
        return dict(d)
    if isinstance(d, DictConfig):
        return OmegaConf.to_container(d, resolve=True)  # type: ignore[return-value]
    return dict(d)
