"""Pipeline steps shared by the `tokenizers`-library kinds, built from the config's options.

Digit handling is a pre-tokenizer that isolates digit groups, so no learned token can hold more
digits than the rule allows and numbers are segmented the same way wherever they occur:
  split      every digit alone                          1234567 -> 1 2 3 4 5 6 7
  group_l2r  threes from the left (as written)          1234567 -> 123 456 7
  group_r2l  threes from the right (thousands, as read)  1234567 -> 1 234 567
"""

from __future__ import annotations

from tokenizers import Regex, normalizers, pre_tokenizers

from lmlab.tokenizers.config import TokenizerConfig

DIGIT_PATTERNS: dict[str, str] = {
    "split": r"\d",
    "group_l2r": r"\d{1,3}",
    # A group may start only where the digits after it come in whole threes.
    "group_r2l": r"\d{1,3}(?=(?:\d{3})*(?!\d))",
}
_NORMALIZERS = {
    "nfc": normalizers.NFC,
    "nfd": normalizers.NFD,
    "nfkc": normalizers.NFKC,
    "nfkd": normalizers.NFKD,
}


def normalizer_steps(config: TokenizerConfig) -> list[normalizers.Normalizer]:
    """Unicode normalisation then lowercasing, as the config asks (possibly none)."""
    steps = []
    form = config.effective_normalization
    if form != "none":
        steps.append(_NORMALIZERS[form]())
    if config.lowercase:
        steps.append(normalizers.Lowercase())
    return steps


def normalizer(
    config: TokenizerConfig, after: tuple[normalizers.Normalizer, ...] | list = ()
) -> normalizers.Normalizer | None:
    """The config's normalizer followed by `after`; None when there is nothing to do."""
    steps = [*normalizer_steps(config), *after]
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else normalizers.Sequence(steps)


def digit_splitter(config: TokenizerConfig) -> list[pre_tokenizers.PreTokenizer]:
    """A pre-tokenizer isolating digit groups, or nothing for `digits: keep`."""
    if config.digits == "keep":
        return []
    return [pre_tokenizers.Split(Regex(DIGIT_PATTERNS[config.digits]), behavior="isolated")]


def special_guard(specials: list[str]) -> list[pre_tokenizers.PreTokenizer]:
    """Cut a literal special-token string in text apart, so no learned piece can spell it.

    A Unigram vocabulary holds the specials as pieces its lattice can match, and BPE can learn
    "<eos>" as a merge from a corpus that contains it; either would turn text into a special id.
    Isolating the first character where the rest of a special follows changes nothing else.
    """
    alternatives = [_escape(s[0]) + "(?=" + _escape(s[1:]) + ")" for s in specials if len(s) > 1]
    if not alternatives:
        return []
    return [pre_tokenizers.Split(Regex("|".join(alternatives)), behavior="isolated")]


def _escape(text: str) -> str:
    # Only the metacharacters: Oniguruma gives some escaped letters and "<" a meaning.
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in text)


def sequence(steps: list[pre_tokenizers.PreTokenizer]) -> pre_tokenizers.PreTokenizer:
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
