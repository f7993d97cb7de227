"""krasserm's perceiver-io, early layout (`perceiver/model.py`, `perceiver/adapter.py`; commit 1e7069c), on this
package's core.

Porting code is a rewrite of the import prefix, `perceiver.` -> `perceiver_hf.perceiver.`:

```python
>>> from perceiver_hf.perceiver.adapter import ImageInputAdapter, ClassificationOutputAdapter
>>> from perceiver_hf.perceiver.model import PerceiverEncoder, PerceiverDecoder, PerceiverIO
```

The names, constructor arguments, defaults, return types (plain tensors) and mask semantics (`pad_mask`, True for
padding) are krasserm's. Inside, `PerceiverEncoder` and `PerceiverDecoder` translate their arguments into a
`PerceiverConfig` and are this package's encoder and decoder. Not mirrored: the PyTorch Lightning modules of
`perceiver.lightning` (`LitMaskedLanguageModel`, ...), which need pytorch-lightning; use `Trainer` or the
Accelerate scripts in `examples/` instead.
"""

# As krasserm's `perceiver/__init__.py`: all of `perceiver.adapter`, and the models.
from . import adapter
from .adapter import *  # noqa: F403
from .model import PerceiverDecoder, PerceiverEncoder, PerceiverIO, PerceiverMLM, TextMasking

__all__ = [*adapter.__all__, "PerceiverEncoder", "PerceiverDecoder", "PerceiverIO", "PerceiverMLM", "TextMasking"]
