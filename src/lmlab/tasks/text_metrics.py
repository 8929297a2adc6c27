"""Corpus-level translation metrics (sacrebleu) and exact match, over decoded strings."""

from __future__ import annotations

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


def gather_strings(values: list[str]) -> list[str]:
    """Every rank's strings, in rank order: corpus-level scores need the whole corpus."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in (part or [])]
