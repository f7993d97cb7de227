"""lucidrains' `perceiver_pytorch` (perceiver-pytorch 0.9.0), run on this package's Perceiver blocks.

Porting code is a change of the import prefix, `perceiver_pytorch` -> `perceiver_hf.perceiver_pytorch`:

```python
>>> import torch
>>> from perceiver_hf.perceiver_pytorch import Perceiver
>>> model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=6, max_freq=10.0, depth=2, num_latents=16,
...                   latent_dim=32, latent_heads=2, cross_dim_head=8, latent_dim_head=8, num_classes=10)
>>> model(torch.randn(1, 8, 8, 3)).shape
torch.Size([1, 10])
```

Weights saved by the original load with `load_original_state_dict(model, torch.load(path))`.
"""

from ._translate import load_original_state_dict
from .perceiver_io import PerceiverIO, PerceiverLM
from .perceiver_pytorch import Perceiver

__all__ = ["Perceiver", "PerceiverIO", "PerceiverLM", "load_original_state_dict"]
