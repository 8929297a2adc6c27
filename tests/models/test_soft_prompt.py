"""Where prompt tuning's virtual tokens go: before each row's first real token, masks widened to
match, outputs taken back to the input's positions."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.models.soft_prompt import prepend_soft_prompt, widen_mask


class _Prompt(nn.Module):
    n_virtual_tokens = 2

    def forward(self, batch_size: int) -> torch.Tensor:
        return torch.tensor([[-1.0], [-2.0]]).expand(batch_size, -1, -1)


class _Cache:
    def __init__(self, length: int):
        self.length = length


def test_prompt_goes_after_left_padding_and_before_the_text():
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 5.0], [0.0, 0.0, 6.0]])[..., None]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    out, widened, take = prepend_soft_prompt(_Prompt(), h, mask)
    assert out[..., 0].tolist() == [[-1, -2, 1, 2, 3], [0, -1, -2, 4, 5], [0, 0, -1, -2, 6]]
    assert widened.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert torch.equal(take(out), h)
    assert torch.equal(widen_mask(mask, 2), widened)


def test_right_padding_and_no_mask_put_the_prompt_first():
    h = torch.tensor([[7.0, 8.0, 0.0]])[..., None]
    out, widened, take = prepend_soft_prompt(_Prompt(), h, torch.tensor([[1, 1, 0]]))
    assert out[0, :, 0].tolist() == [-1, -2, 7, 8, 0] and widened.tolist() == [[1, 1, 1, 1, 0]]
    out, widened, take = prepend_soft_prompt(_Prompt(), h, None)
    assert out[0, :, 0].tolist() == [-1, -2, 7, 8, 0] and widened is None
    assert torch.equal(take(out), h)


def test_a_cache_that_holds_the_prompt_gets_only_the_wider_mask():
    h = torch.tensor([[9.0]])[..., None]
    out, widened, take = prepend_soft_prompt(_Prompt(), h, torch.tensor([[0, 1, 1]]), _Cache(4))
    assert torch.equal(out, h) and take is None
    assert widened.tolist() == [[0, 1, 1, 1, 1]]  # the prompt's place in the cache, as at prefill
