"""What the mirrors' tests share: the originals' attention, written out from their state dicts.

lucidrains' perceiver-pytorch and the multi-modality fork build `PreNorm(Attention)` alike; they differ in the
output projection's name (`to_out`; the fork's `to_out.0`, after its dropout) and lucidrains' inverted attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(sd, prefix, x, context, heads, mask=None, inverted=False, out_name="to_out"):
    """`PreNorm(Attention)` of lucidrains and of the fork (`out_name="to_out.0"`), written out."""
    x = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}norm.weight"], sd[f"{prefix}norm.bias"])
    if context is None:
        context = x
    else:
        context = F.layer_norm(
            context, context.shape[-1:], sd[f"{prefix}norm_context.weight"], sd[f"{prefix}norm_context.bias"]
        )
    q = x @ sd[f"{prefix}fn.to_q.weight"].T
    k, v = (context @ sd[f"{prefix}fn.to_kv.weight"].T).chunk(2, dim=-1)
    b, dim_head = q.shape[0], q.shape[-1] // heads
    q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    sim = q @ k.transpose(-1, -2) * dim_head**-0.5
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    if inverted:
        attn = sim.softmax(dim=-2)
        if mask is not None:
            attn = attn.masked_fill(~mask[:, None, None, :], 0.0)
        attn = attn / attn.sum(dim=-1, keepdim=True).clamp(min=1e-8)
    else:
        attn = sim.softmax(dim=-1)
    attended = (attn @ v).transpose(1, 2).reshape(b, -1, heads * dim_head)
    projection = f"{prefix}fn.{out_name}."
    return attended @ sd[projection + "weight"].T + sd[projection + "bias"]
