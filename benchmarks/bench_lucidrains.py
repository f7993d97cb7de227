"""lucidrains' `perceiver-pytorch`: `PerceiverLM` (Perceiver IO masked LM) and `Perceiver` (image classifier).

Its MLP is GEGLU with widening factor 4, fixed, so it is compared with our model in the "geglu"
architecture, which `bench_ours` builds as lucidrains' blocks (no q/k/v biases; a masked-LM decoder without
an MLP that queries with the embedded inputs; an image classifier that mean-pools the latents): both models
have the same parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from common import Architecture, Runner, Workload

NAME = "lucidrains"
PEER_OF = ("geglu",)
INSTALL = "pip install -c constraints.txt perceiver-pytorch==0.11.0"


def unavailable() -> str | None:
    try:
        import perceiver_pytorch  # noqa: F401
    except ImportError as error:
        return f"perceiver-pytorch is not importable ({error}); install: {INSTALL}"
    return None


def build(workload: Workload, arch: Architecture) -> Runner:
    if arch.mlp != "geglu" or arch.widening_factor != 4:
        raise ValueError(f"perceiver-pytorch has a GEGLU x4 MLP only, not {arch.mlp!r} x{arch.widening_factor}")
    head_channels = arch.d_latents // arch.num_heads
    common = dict(
        num_latents=arch.num_latents,
        latent_dim=arch.d_latents,
        cross_heads=arch.num_heads,
        latent_heads=arch.num_heads,
        cross_dim_head=head_channels,
        latent_dim_head=head_channels,
    )
    if workload.task == "mlm":
        from perceiver_pytorch import PerceiverLM

        model = PerceiverLM(
            dim=arch.d_model,
            num_tokens=arch.vocab_size,
            max_seq_len=workload.seq_len,
            depth=arch.num_self_attention_layers,
            **common,
        )

        def mlm_loss(batch):
            logits = model(batch["input_ids"])  # (B, N, V)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

        return Runner(
            model=model,
            train_loss=mlm_loss,
            infer=lambda batch: model(batch["input_ids"]),
            notes=["decodes every position"],
        )

    from perceiver_pytorch import Perceiver

    h, w, c = workload.image_shape
    model = Perceiver(
        num_freq_bands=workload.num_frequency_bands,
        max_freq=float(h),
        depth=1,
        input_channels=c,
        input_axis=2,
        num_classes=workload.num_classes,
        self_per_cross_attn=arch.num_self_attention_layers,
        **common,
    )
    return Runner(
        model=model,
        train_loss=lambda batch: F.cross_entropy(model(batch["images"]), batch["labels"]),
        infer=lambda batch: model(batch["images"]),
        notes=["mean-pools the latents (no decoder cross-attention)"],
    )
