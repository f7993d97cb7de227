"""lucidrains' `perceiver_pytorch.perceiver_io` (`PerceiverIO`, `PerceiverLM`), run on this package's blocks.

Mirrors perceiver-pytorch 0.9.0, lucidrains/perceiver-pytorch commit 96097c6a27cc64fc1f196d3a58d32b8a82f573e1.
Same constructor arguments (keyword-only), defaults, forward signatures and return values as there.
`PerceiverIO` is one cross-attention layer then `depth` self-attention layers (`PerceiverEncoder`; all `depth`
layers share one weight set with `weight_tie_layers=True`), and a decoder cross-attention from the `queries` to the
latents (`PerceiverCrossAttentionLayer`) without query residual, with a GEGLU feed-forward when `decoder_ff=True`,
then `to_logits` (a Linear, or nothing when `logits_dim=None`). Without `queries`, `forward` returns the latents.
`seq_dropout_prob` drops input positions in training as the original's `dropout_seq` (Perceiver AR).

Deliberate differences:

- the parameters are named as the core's (`to_kv` split into `k_proj` / `v_proj`); `load_original_state_dict`
  loads a state dict of the original;
- `depth=0` is not supported (the core's blocks have at least one layer);
- a `mask` that masks out every input of an example raises a `ValueError` (the original attends uniformly).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_perceiver import PerceiverCrossAttentionLayer
from ._translate import (
    FF_MULT,
    EncoderMirror,
    KeyMapEntry,
    attention_renames,
    build_config,
    build_encoder,
    feed_forward_renames,
    layer_settings,
)

__all__ = ["PerceiverIO", "PerceiverLM", "dropout_seq"]


def dropout_seq(
    seq: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Structured dropout (Perceiver AR): keep a random `1 - dropout` of the positions of `seq` `(B, N, C)` (at
    least one), preferring unmasked ones; returns the kept positions and their mask."""
    b, n = seq.shape[:2]
    device = seq.device
    logits = torch.randn(b, n, device=device)
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.finfo(logits.dtype).max)

    keep_prob = 1.0 - dropout
    num_keep = max(1, int(keep_prob * n))
    keep_indices = logits.topk(num_keep, dim=1).indices
    batch_indices = torch.arange(b, device=device)[:, None]
    seq = seq[batch_indices, keep_indices]

    if mask is not None:
        seq_counts = mask.sum(dim=-1)
        seq_keep_counts = torch.ceil(seq_counts * keep_prob).int()
        keep_mask = torch.arange(num_keep, device=device) < seq_keep_counts[:, None]
        mask = mask[batch_indices, keep_indices] & keep_mask
    return seq, mask


class PerceiverIO(EncoderMirror):
    """lucidrains' `PerceiverIO`: inputs `(B, N, dim)` -> latents `(B, num_latents, latent_dim)`, or, given
    `queries` `(B, Q, queries_dim)` or `(Q, queries_dim)`, the decoded queries `(B, Q, logits_dim or queries_dim)`.
    `mask` `(B, N)`: True for inputs to attend to."""

    def __init__(
        self,
        *,
        depth: int,
        dim: int,
        queries_dim: int,
        logits_dim: int | None = None,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        weight_tie_layers: bool = False,
        decoder_ff: bool = False,
        seq_dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        self.seq_dropout_prob = seq_dropout_prob
        # lucidrains' perceiver_io `cache_fn` has one cache: tied, all `depth` self-attention layers are one.
        self_sharing = [[0] * depth] if weight_tie_layers else [list(range(depth))]
        self.config = build_config(
            locals(),
            input_dim=dim,
            sharing=([0], self_sharing),
            **layer_settings("decoder", cross_heads, cross_dim_head),
            decoder_use_mlp=decoder_ff,
            decoder_use_query_residual=False,
        )
        self.encoder = build_encoder(self.config)

        self.decoder_cross_attn = PerceiverCrossAttentionLayer(
            self.config,
            cross_heads,
            queries_dim,
            latent_dim,
            qk_channels=cross_heads * cross_dim_head,
            v_channels=cross_heads * cross_dim_head,
            widening_factor=FF_MULT,
            use_query_residual=False,
            use_mlp=decoder_ff,
        )
        self.to_logits = nn.Linear(queries_dim, logits_dim) if logits_dim is not None else nn.Identity()

    @property
    def decoder_ff(self) -> nn.Module | None:
        """The decoder's feed-forward (`decoder_ff=True`), part of the decoder layer here."""
        return self.decoder_cross_attn.mlp

    def forward(
        self, data: torch.Tensor, mask: torch.Tensor | None = None, queries: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = data.shape[0]
        if self.training and self.seq_dropout_prob > 0.0:
            data, mask = dropout_seq(data, mask, self.seq_dropout_prob)

        x = self.encode(data, mask)  # (B, L, D)
        if queries is None:
            return x

        if queries.ndim == 2:
            queries = queries.expand(b, -1, -1)  # the same queries for every example
        latents, _ = self.decoder_cross_attn(queries, x)  # (B, Q, queries_dim)
        return self.to_logits(latents)

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        ff, latent = feed_forward_renames(), attention_renames(context=False)
        entries: list[KeyMapEntry] = [
            ("latents", "encoder.latent", None),
            ("cross_attend_blocks.0.", "encoder.cross_attention.0.", attention_renames(context=True)),
            ("cross_attend_blocks.1.", "encoder.cross_attention.0.", ff),
            ("decoder_cross_attn.", "decoder_cross_attn.", attention_renames(context=True)),
            ("decoder_ff.", "decoder_cross_attn.", ff),
            ("to_logits.", "to_logits.", None),
        ]
        for j, self_key in enumerate(self.encoder.self_attention_keys[0]):
            entries += [
                (f"layers.{j}.0.", f"encoder.self_attention.{self_key}.", latent),
                (f"layers.{j}.1.", f"encoder.self_attention.{self_key}.", ff),
            ]
        return entries


class PerceiverLM(nn.Module):
    """lucidrains' `PerceiverLM`: token ids `(B, N)` -> logits `(B, N, num_tokens)`. Token plus position embeddings
    are the inputs and, the same, the decoder's queries; other keyword arguments go to `PerceiverIO`."""

    def __init__(self, *, dim: int, num_tokens: int, max_seq_len: int, **kwargs) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.perceiver_io = PerceiverIO(dim=dim, queries_dim=dim, logits_dim=num_tokens, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[1]
        x = self.token_emb(x) + self.pos_emb(torch.arange(n, device=x.device))[None]  # (B, N, dim)
        return self.perceiver_io(x, mask=mask, queries=x)

    def original_key_map(self) -> list[KeyMapEntry]:
        """Where the original's parameters are in this model (see `load_original_state_dict`)."""
        entries: list[KeyMapEntry] = [("token_emb.", "token_emb.", None), ("pos_emb.", "pos_emb.", None)]
        for original, mirror, renames in self.perceiver_io.original_key_map():
            entries.append((f"perceiver_io.{original}", f"perceiver_io.{mirror}", renames))
        return entries
