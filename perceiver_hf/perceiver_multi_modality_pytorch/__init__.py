"""The multi-modality fork of `perceiver_pytorch` (PyPI perceiver-multi-modality-pytorch 1.3.0), run on this
package's Perceiver blocks.

Porting code is a change of the import prefix, `perceiver_pytorch` -> `perceiver_hf.perceiver_multi_modality_pytorch`:

```python
>>> import torch
>>> from perceiver_hf.perceiver_multi_modality_pytorch.multi_modality_perceiver import (
...     InputModality, MultiModalityPerceiver)
>>> image = InputModality(name="image", input_channels=3, input_axis=2, num_freq_bands=6, max_freq=4.0)
>>> audio = InputModality(name="audio", input_channels=1, input_axis=1, num_freq_bands=6, max_freq=8.0)
>>> model = MultiModalityPerceiver(modalities=(image, audio), depth=2, num_latents=8, latent_dim=32,
...                                latent_heads=2, cross_dim_head=8, latent_dim_head=8, num_classes=5)
>>> model({"image": torch.rand(2, 8, 8, 3), "audio": torch.rand(2, 100, 1)}).shape
torch.Size([2, 5])
```

Modules: `modalities`, `multi_modality_perceiver`, `multi_modality_with_text_perceiver`, `perceiver_pytorch` (the
fork's own `Perceiver`, exported here as in the fork). Weights saved by the original load with
`load_original_state_dict(model, torch.load(path))`.
"""

from ..perceiver_pytorch._translate import load_original_state_dict
from .perceiver_pytorch import Perceiver

__all__ = ["Perceiver", "load_original_state_dict"]
