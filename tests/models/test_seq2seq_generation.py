"""generate_seq2seq: greedy vs full recomputation, beam 1 == greedy, beam finds the optimum."""

import itertools
import math

import pytest
import torch

from lmlab.models import EncoderDecoderModel, ModelConfig, generate_seq2seq

# Untied and a wider init: a tiny tied model at init mostly echoes its last input token, which
# would make every search strategy agree and the tests below vacuous.
TINY = dict(family="encoder_decoder", vocab_size=40, d_model=32, n_layers=2, n_heads=4,
            max_seq_len=32, tie_embeddings=False, init_std=0.1)
BOS, EOS, PAD = 1, 2, 0
PRESETS = {
    "transformer": dict(position="sinusoidal", norm_position="post", ffn="relu",
                        scale_embeddings=True),
    "t5": dict(position="relative", norm="rmsnorm", ffn="swiglu", bias=False,
               relative_buckets=8, relative_max_distance=16),
}


def _model(seed: int, preset: str) -> EncoderDecoderModel:
    torch.manual_seed(seed)
    return EncoderDecoderModel(ModelConfig(**TINY, **PRESETS[preset])).eval()


def _sources():
    src = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 0, 0, 0]])
    return src, (src != 0).long()


def _naive_greedy(model, src, src_mask, n):
    """Reference: re-run the whole model on the growing target at every step, no cache."""
    tgt = torch.full((src.shape[0], 1), BOS)
    for _ in range(n):
        logits = model(src, src_mask, tgt)[:, -1, : model.config.vocab_size]
        tgt = torch.cat([tgt, logits.argmax(-1, keepdim=True)], dim=1)
    return tgt[:, 1:]


@pytest.mark.parametrize("preset", ["transformer", "t5"])
def test_greedy_with_cache_equals_full_recomputation(preset):
    model = _model(0, preset)
    src, src_mask = _sources()
    out = generate_seq2seq(model, src, src_mask, 8, BOS, eos_id=None, pad_id=PAD)
    assert out.shape == (3, 8)
    with torch.no_grad():
        assert torch.equal(out, _naive_greedy(model, src, src_mask, 8))


@pytest.mark.parametrize("preset", ["transformer", "t5"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5])
def test_beam_size_one_equals_greedy(preset, length_penalty):
    for seed in range(3):
        model = _model(seed, preset)
        src, src_mask = _sources()
        free = generate_seq2seq(model, src, src_mask, 8, BOS, eos_id=None)
        eos = int(free[0, 2])  # a token greedy emits, so rows stop at different steps
        greedy = generate_seq2seq(model, src, src_mask, 8, BOS, eos, pad_id=PAD)
        beam = generate_seq2seq(model, src, src_mask, 8, BOS, eos, pad_id=PAD, num_beams=1,
                                length_penalty=length_penalty)
        assert torch.equal(greedy, beam)
        # pad after eos, and the width is the longest output
        row = greedy[0].tolist()
        assert eos in row and all(t == PAD for t in row[row.index(eos) + 1:])


def test_beam_search_batch_equals_one_sentence_at_a_time():
    model = _model(1, "t5")
    src, src_mask = _sources()
    eos = int(generate_seq2seq(model, src, src_mask, 6, BOS, eos_id=None)[1, 1])
    batched = generate_seq2seq(model, src, src_mask, 6, BOS, eos, num_beams=3)
    for i in range(3):
        n = int(src_mask[i].sum())
        alone = generate_seq2seq(model, src[i:i + 1, :n], None, 6, BOS, eos, num_beams=3)
        width = alone.shape[1]
        assert torch.equal(batched[i, :width], alone[0])
        assert torch.all(batched[i, width:] == PAD)


def _naive_beam(model, src, n, k, length_penalty, eos):
    """Reference beam search for one sentence: lists of hypotheses, the whole target re-run
    through the model for every step (no cache), HF's rules for finishing and stopping."""
    live, finished = [((), 0.0)], []
    for step in range(n):
        length = step + 1
        tgt = torch.tensor([(BOS,) + seq for seq, _ in live])
        logp = model(src.expand(len(live), -1), None, tgt)[:, -1, : model.config.vocab_size]
        logp = logp.float().log_softmax(-1)
        cands = sorted(((score + logp[i, tok].item(), seq + (tok,))
                        for i, (seq, score) in enumerate(live)
                        for tok in range(logp.shape[-1])), key=lambda c: -c[0])[: 2 * k]
        for rank, (score, seq) in enumerate(cands):
            if seq[-1] == eos and rank < k:
                finished.append((score / length**length_penalty, seq))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        live = [(seq, score) for score, seq in cands if seq[-1] != eos][:k]
        if len(finished) == k and live[0][1] / length**length_penalty <= finished[-1][0]:
            return max(finished)[1]
    finished += [(score / n**length_penalty, seq) for seq, score in live]
    return max(finished)[1]


@pytest.mark.parametrize("preset,length_penalty", [("transformer", 1.0), ("t5", 0.6),
                                                   ("t5", -1.0)])
def test_beam_search_equals_naive_reference(preset, length_penalty):
    for seed in range(3):
        model = _model(seed, preset)
        src, src_mask = _sources()
        eos = int(generate_seq2seq(model, src, src_mask, 6, BOS, eos_id=None)[0, 1])
        out = generate_seq2seq(model, src, src_mask, 6, BOS, eos, num_beams=3,
                               length_penalty=length_penalty)
        for i in range(3):
            n_src = int(src_mask[i].sum())
            with torch.no_grad():
                ref = _naive_beam(model, src[i:i + 1, :n_src], 6, 3, length_penalty, eos)
            assert out[i].tolist() == list(ref) + [PAD] * (out.shape[1] - len(ref))


class _PrefixCache:
    def __init__(self, batch_size: int):
        self.prefixes: list[tuple[int, ...]] = [()] * batch_size

    def reorder(self, index: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]


class _PrefixModel(torch.nn.Module):
    """A fake seq2seq model whose next-token distribution is a table keyed by the prefix.

    It keeps the decoded prefix of every row in its cache, so a beam search that forgets to
    reorder the cache reads the wrong rows' distributions.
    """

    V = 5  # 0 pad, 1 bos, 2 eos, 3 "A", 4 "B"

    def __init__(self, table: dict[tuple[int, ...], list[float]], default: list[float]):
        super().__init__()
        self.table, self.default = table, default

    def probs(self, prefix: tuple[int, ...]) -> list[float]:
        return self.table.get(prefix, self.default)

    def encode(self, src_ids, src_mask):
        return torch.zeros(src_ids.shape[0], 1, 1)

    def new_cache(self, batch_size, max_len):
        return _PrefixCache(batch_size)

    def decode(self, tgt_ids, memory, src_mask, cache):
        rows = []
        for i, token in enumerate(tgt_ids[:, -1].tolist()):
            if token != BOS:
                cache.prefixes[i] = cache.prefixes[i] + (token,)
            rows.append(self.probs(cache.prefixes[i]))
        return torch.tensor(rows).log()[:, None, :]

    def score(self, seq: tuple[int, ...], length_penalty: float) -> float:
        logp = sum(math.log(self.probs(seq[:t])[tok]) for t, tok in enumerate(seq))
        return logp / len(seq) ** length_penalty


def test_beam_search_finds_the_best_hypothesis_where_greedy_does_not():
    # Greedy takes "A" (0.5) and is then stuck in a flat distribution; "B" (0.4) is almost
    # surely followed by eos, which wins on the length-normalised score.
    model = _PrefixModel(
        table={(): [0.0, 0.0, 0.1, 0.5, 0.4], (4,): [0.0, 0.0, 0.9, 0.05, 0.05]},
        default=[0.0, 0.0, 0.32, 0.35, 0.33],
    )
    src = torch.tensor([[7, 8]])
    n, lp = 4, 1.0
    greedy = generate_seq2seq(model, src, None, n, BOS, EOS, vocab_size=5)
    beam = generate_seq2seq(model, src, None, n, BOS, EOS, num_beams=2, length_penalty=lp,
                            vocab_size=5)

    # Brute force over every finished or maximal-length hypothesis.
    candidates = []
    for length in range(1, n + 1):
        for body in itertools.product([3, 4], repeat=length - 1):
            candidates.append(body + (EOS,))
    candidates += list(itertools.product([3, 4], repeat=n))
    best = max(candidates, key=lambda seq: model.score(seq, lp))

    assert tuple(beam[0].tolist()) == best == (4, EOS)
    assert greedy[0, 0].item() == 3
    greedy_seq = tuple(t for t in greedy[0].tolist() if t != PAD)
    assert model.score(greedy_seq, lp) < model.score(best, lp)


def test_beam_search_length_penalty_prefers_longer_outputs():
    # eos right away is likelier in total, but per token the longer sequence is better.
    model = _PrefixModel(
        table={(): [0.0, 0.0, 0.6, 0.4, 0.0], (3,): [0.0, 0.0, 0.05, 0.95, 0.0],
               (3, 3): [0.0, 0.0, 0.95, 0.05, 0.0]},
        default=[0.0, 0.0, 0.5, 0.5, 0.0],
    )
    src = torch.tensor([[7]])
    short = generate_seq2seq(model, src, None, 4, BOS, EOS, num_beams=2, length_penalty=0.0,
                             vocab_size=5)
    long = generate_seq2seq(model, src, None, 4, BOS, EOS, num_beams=2, length_penalty=1.0,
                            vocab_size=5)
    assert short[0].tolist() == [EOS]
    assert long[0].tolist() == [3, 3, EOS]
