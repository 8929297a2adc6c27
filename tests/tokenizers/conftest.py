"""Real corpora shared by the tokenizer tests (read from ../shared/data, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = (Path(__file__).parents[2] / ".." / "shared" / "data").resolve()
# A GPT-2-style tokenizer.json (byte-level BPE, 400 tokens + "<|endoftext|>" last) made with
# the `tokenizers` library from 100 KB of tinyshakespeare: a file from "elsewhere" whose ids do
# not start with lmlab's specials.
HF_FIXTURE = Path(__file__).parent / "fixtures" / "gpt2_style" / "tokenizer.json"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
FLORES_DEV = DATA / "flores200_sample" / "dev"
# Latin plus eight non-Latin scripts, including ones without spaces (zho, jpn, tha) and
# right-to-left ones (arb, heb).
FLORES_LANGS = (
    "eng_Latn",
    "vie_Latn",
    "arb_Arab",
    "heb_Hebr",
    "hin_Deva",
    "rus_Cyrl",
    "zho_Hans",
    "jpn_Jpan",
    "tha_Thai",
    "kor_Hang",
)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first ~200 KB of tinyshakespeare, cut at a line end."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    return text[: text.rindex("\n") + 1]


@pytest.fixture(scope="session")
def flores() -> dict[str, list[str]]:
    """language -> the first 200 dev sentences."""
    return {
        lang: (FLORES_DEV / f"{lang}.dev").read_text(encoding="utf-8").splitlines()[:200]
        for lang in FLORES_LANGS
    }
