"""Corpus-level translation metrics (sacrebleu) and exact match, over decoded strings."""

from __future__ import annotations

from typing import Any

import sacrebleu
import torch.distributed as dist


def normalise(text: str) -> str:
    """Whitespace-insensitive form for exact match (word tokenizers decode with spaces)."""
    return " ".join(text.split())


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """BLEU and chrF on 0-100 scales (sacrebleu defaults: 13a tokenisation, chrF n=6)."""
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0}
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def gather_objects(values: list[Any]) -> list[Any]:
    """Every rank's values, in rank order: corpus-level scores need the whole corpus, and each
    rank evaluated its own share of it (`lmlab.data.eval_sharding`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in (part or [])]


def accuracy_by_task(matches: list[tuple[str, bool]]) -> dict[str, float]:
    """Exact-match accuracy per named task, from (task, correct) pairs ("" = no task name)."""
    by_task: dict[str, list[bool]] = {}
    for task, ok in matches:
        if task:
            by_task.setdefault(task, []).append(ok)
    return {task: sum(oks) / len(oks) for task, oks in by_task.items()}
