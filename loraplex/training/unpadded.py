"""Training forward without padding: every token-wise operation runs on the batch's real tokens only.

A right-padded batch (B, L) holding T real tokens is run as one row of T tokens (sequence after
sequence, positions restarting at 0 for each), so the linear layers, norms, MLPs and adapters do
T rows of work instead of B·L (on the default task ~7 % of the tokens are padding). Only attention
needs the sequences apart: `attention` (registered with transformers' `AttentionInterface`) scatters
q, k, v back to (B, heads, L, head_dim), runs causal scaled-dot-product attention there, and gathers
the real tokens again. With right padding the causal mask alone is exact: a real query never sees a
later (padding) key.

Used by `completion_loss` when the batch is right-padded, the model is a transformers model whose
layers call the attention interface, and every adapter is token-wise (an adapter mixing neighbouring
tokens, such as Conv-LoRA's token grid, needs the (B, L) layout). A model whose attention does not go
through the interface is detected on the first batch (the function is never called) and keeps the
padded forward from then on.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

NAME = "loraplex_unpadded"
_UNSUPPORTED = "_loraplex_unpadded_unsupported"


class Unsupported(RuntimeError):
    """The model's attention asks for something this path does not do (soft-capping, ...)."""


class Layout:
    """Where the T real tokens of a right-padded (B, L) batch sit: `index[t]` = b·L + j."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        self.batch, self.length = attention_mask.shape
        real = attention_mask.bool()
        self.index = real.flatten().nonzero().squeeze(1)
        self.positions = real.long().cumsum(1).sub(1)[real]      # 0, 1, ... within each sequence
        self.calls = 0

    @staticmethod
    def right_padded(attention_mask: torch.Tensor) -> bool:
        lengths = attention_mask.sum(1, keepdim=True)
        steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return bool(torch.equal(attention_mask.bool(), steps[None, :] < lengths))

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows (in the T real tokens) of the padded positions where `positions` (B, L) is True (all real)."""
        row_of = torch.full((self.batch * self.length,), -1, dtype=torch.long, device=self.index.device)
        row_of[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        return row_of[positions.flatten().nonzero().squeeze(1)]

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(1, heads, T, d) -> (B, heads, L, d), zeros at the padding."""
        heads, d = t.shape[1], t.shape[3]
        out = t.new_zeros(self.batch * self.length, heads, d)
        out = out.index_copy(0, self.index, t[0].transpose(0, 1))
        return out.view(self.batch, self.length, heads, d).transpose(1, 2)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads, d) -> (1, T, heads, d)."""
        return t.reshape(self.batch * self.length, *t.shape[2:]).index_select(0, self.index).unsqueeze(0)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              loraplex_layout: Layout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention of each sequence on its own; inputs (1, heads, T, d), output (1, T, heads, d)."""
    layout = loraplex_layout
    if layout is None:
        raise Unsupported("the unpadded attention was called without the batch layout")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise Unsupported("attention soft-capping / sinks are not supported by the unpadded path")
    layout.calls += 1
    q, k, v = layout.pad(query), layout.pad(key), layout.pad(value)
    if k.shape[1] != q.shape[1]:           # grouped-query attention: each key/value head serves a group
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and window < layout.length:
        steps = torch.arange(layout.length, device=q.device)
        gap = steps[:, None] - steps[None, :]
        mask = (gap >= 0) & (gap < window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
    return layout.unpad(out.transpose(1, 2)), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:       # transformers without pluggable attention: the padded forward only
        return False
    AttentionInterface.register(NAME, attention)
    return True


AVAILABLE = _register()


def usable(hf_model: nn.Module, attention_mask: torch.Tensor) -> bool:
    config = getattr(hf_model, "config", None)
    if not AVAILABLE or config is None or getattr(hf_model, _UNSUPPORTED, False):
        return False
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "_attn_implementation"):
        return False
    if any(getattr(m, "token_wise", True) is False for m in hf_model.modules()):
        return False
    return Layout.right_padded(attention_mask)


@contextmanager
def _attention_implementation(config, name: str):
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def hidden_states(hf_model: nn.Module, body: nn.Module, batch: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, Layout] | None:
    """The body's last hidden states of the real tokens, (T, d), and their layout; None when this
    model or batch needs the padded forward (the caller then runs it)."""
    if not usable(hf_model, batch["attention_mask"]):
        return None
    layout = Layout(batch["attention_mask"])
    ids = batch["input_ids"].flatten().index_select(0, layout.index)[None]
    try:
        with _attention_implementation(hf_model.config, NAME):
            out = body(input_ids=ids, position_ids=layout.positions[None], loraplex_layout=layout)
    except Unsupported:
        setattr(hf_model, _UNSUPPORTED, True)
        return None
    if layout.calls == 0:     # the layers did not use the attention interface: the sequences were not kept apart
        setattr(hf_model, _UNSUPPORTED, True)
        return None
    return out.last_hidden_state[0], layout
