"""A batch of sequences decoding together: one left-padded KV cache plus its attention mask.

Sequences join (after their own prefill) and leave (when finished) between decode steps, so the
linear layers see M = number of active sequences. transformers' DynamicCache stores per layer a
[batch, heads, length, head_dim] key and value tensor; joining left-pads the shorter side with
masked-out zeros, leaving selects rows and drops columns that are padding for every row left."""

from __future__ import annotations

import torch


def kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, for the DynamicCache of transformers 5 (`layers`) and of 4.x."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def set_kv_tensors(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kv]
        cache.value_cache[:] = [v for _, v in kv]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    pad = length - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    """The KV cache and the [batch, length] attention mask (1 = a real token) of the active rows."""

    def __init__(self):
        self.cache = None
        self.mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def join(self, cache, length: int) -> None:
        """Appends one prefilled sequence (its own cache, `length` real tokens) as the last row."""
        mask = torch.ones(1, length, dtype=torch.long)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        total = max(int(self.mask.shape[1]), length)
        joined = [(torch.cat([_left_pad(k0, total, -2), _left_pad(k1, total, -2)]),
                   torch.cat([_left_pad(v0, total, -2), _left_pad(v1, total, -2)]))
                  for (k0, v0), (k1, v1) in zip(kv_tensors(self.cache), kv_tensors(cache), strict=True)]
        set_kv_tensors(self.cache, joined)
        self.mask = torch.cat([_left_pad(self.mask, total, 1), _left_pad(mask, total, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (in that order); trims leading columns that no remaining row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        kv = [(k.index_select(0, index.to(k.device))[:, :, start:], v.index_select(0, index.to(v.device))[:, :, start:])
              for k, v in kv_tensors(self.cache)]
        set_kv_tensors(self.cache, kv)
        self.mask = mask[:, start:]

    def step_mask(self) -> torch.Tensor:
        """The mask for one more token per row (what the model's attention sees at this step)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, 1)], dim=1)
        return self.mask
