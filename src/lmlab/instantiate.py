"""`hydra.utils.instantiate` with the field check lmlab promises: an unknown key in a config
node is a ConfigError naming `<group>.<key>` and the valid keys, before anything is built."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import hydra.utils
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError, LmlabError

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def accepted_keys(target: Any) -> set[str] | None:
    """Keyword names `target` accepts, or None when it takes **kwargs (anything goes)."""
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        if inspect.isclass(target):
            keys: set[str] = set()
            for cls in inspect.getmro(target):
                if "__init__" in vars(cls):
                    sig = inspect.signature(cls.__init__).parameters
                    keys |= {n for n, p in sig.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
                    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
                        return keys - {"self"}
        return None
    return {n for n in params if n != "self"}


def check_node(node: DictConfig | dict, group: str, provided: set[str] = frozenset()) -> Any:
    """Resolve `_target_` and check every key of `node` is a parameter of it."""
    target_path = node.get("_target_")
    if not target_path:
        raise ConfigError(f"{group}._target_", target_path, reason="this config node needs a _target_")
    try:
        target = hydra.utils.get_object(target_path)
    except Exception as err:  # hydra wraps import errors in several types
        raise ConfigError(f"{group}._target_", target_path, reason=f"cannot be imported ({err})") from None
    valid = accepted_keys(target)
    if valid is not None:
        for key in node:
            if key not in _HYDRA_KEYS and key not in valid:
                raise ConfigError(f"{group}.{key}", node[key], sorted(valid - provided), f"not a field of {target_path}")
    return target


def instantiate_checked(node: DictConfig | dict, group: str, **kwargs: Any) -> Any:
    check_node(node, group, provided=set(kwargs))
    if isinstance(node, dict):
        node = OmegaConf.create(node)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except LmlabError:
        raise
    except Exception as err:
        # Errors raised by our own constructors arrive wrapped by Hydra; unwrap them.
        cause = err.__cause__
        while cause is not None:
            if isinstance(cause, LmlabError):
                raise cause from None
            if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
                # A library refusing a value (e.g. Trainer(precision="fp7")): name the group.
                raise ConfigError(group, node.get("_target_"), reason=f"{type(cause).__name__}: {cause}") from None
            cause = cause.__cause__
        raise


def dataclass_from_config(cls: type, cfg: Mapping[str, Any], group: str, method: str) -> Any:
    """Build a method dataclass (a PEFT strategy, a compression) from its config node, naming an
    unknown field as `<group>.<field>`; `method` is the node's selector, not a field."""
    valid = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in cfg.items():
        if key == "method":
            continue
        if key not in valid:
            raise ConfigError(f"{group}.{key}", value, sorted(valid), f"{group}={method} has no such field")
        kwargs[key] = value
    return cls(**kwargs)
