"""What a run prints: the composed config as a tree, and the results as a table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

GROUP_ORDER = ("data", "tokenizer", "model", "task", "peft", "optimizer", "scheduler", "trainer",
               "callbacks", "logger", "paths")


def _add(tree: Tree, node: Any) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if isinstance(value, Mapping):
                _add(tree.add(f"[bold]{key}[/]"), value)
            else:
                tree.add(f"{key}: {value!r}")
    else:
        tree.add(repr(node))


@rank_zero_only
def print_config_tree(cfg: DictConfig) -> None:
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    root = Tree("[bold]config[/]")
    top = [k for k in container if not isinstance(container[k], Mapping)]
    groups = [k for k in GROUP_ORDER if k in container] + [
        k for k in container if isinstance(container[k], Mapping) and k not in GROUP_ORDER
    ]
    for key in groups:
        _add(root.add(f"[bold cyan]{key}[/]"), container[key])
    for key in top:
        root.add(f"[bold cyan]{key}[/]: {container[key]!r}")
    Console().print(root)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


@rank_zero_only
def print_results(metrics: Mapping[str, Any], params: Mapping[str, int], extra: Mapping[str, Any]) -> None:
    table = Table(title="results", show_lines=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key in sorted(metrics, key=lambda k: (k.split("/")[0] != "test", k)):
        if key.split("/")[0] in ("val", "test"):
            table.add_row(key, _fmt(metrics[key]))
    for key, value in params.items():
        table.add_row(f"params/{key}", f"{value:,}")
    for key, value in extra.items():
        table.add_row(key, _fmt(value))
    Console().print(table)
