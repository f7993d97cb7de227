"""perceiver-hf: Perceiver and Perceiver IO as a Hugging Face `transformers` extension.

Importing the package registers `PerceiverConfig` (`model_type="perceiver_io"`) and the models with
the transformers Auto classes, and marks them for remote-code saving (`auto_map` plus the model code
beside the weights), so saved models also load with `trust_remote_code=True` where this package is
not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .adapters import (
    ClassificationOutputAdapter,
    ImageInputAdapter,
    InputAdapter,
    OutputAdapter,
    TextInputAdapter,
    TextOutputAdapter,
)
from .configuration_perceiver import PerceiverConfig
from .modeling_perceiver import (
    PerceiverAttention,
    PerceiverCrossAttentionLayer,
    PerceiverDecoder,
    PerceiverDecoderOutput,
    PerceiverEncoder,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIO,
    PerceiverMLP,
    PerceiverModel,
    PerceiverPreTrainedModel,
    PerceiverSelfAttentionBlock,
    PerceiverSelfAttentionLayer,
    input_adapter_from_config,
)
from .position_encoding import FourierPositionEncoding, LearnedPositionEncoding, fourier_features
from .tokenization_perceiver import train_wordpiece_tokenizer

__version__ = "0.1.0"

# (Auto class, model class): each model loads through its Auto class here and, via `auto_map`, with
# `trust_remote_code=True` elsewhere.
_AUTO_MODELS = [
    (AutoModel, PerceiverModel),
    (AutoModelForMaskedLM, PerceiverForMaskedLM),
    (AutoModelForSequenceClassification, PerceiverForSequenceClassification),
    (AutoModelForImageClassification, PerceiverForImageClassification),
]

AutoConfig.register(PerceiverConfig.model_type, PerceiverConfig, exist_ok=True)
PerceiverConfig.register_for_auto_class()
for _auto_class, _model_class in _AUTO_MODELS:
    _auto_class.register(PerceiverConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [
    "PerceiverConfig",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "PerceiverIO",
    "PerceiverEncoder",
    "PerceiverDecoder",
    "PerceiverDecoderOutput",
    "PerceiverAttention",
    "PerceiverMLP",
    "PerceiverCrossAttentionLayer",
    "PerceiverSelfAttentionLayer",
    "PerceiverSelfAttentionBlock",
    "InputAdapter",
    "OutputAdapter",
    "TextInputAdapter",
    "ImageInputAdapter",
    "TextOutputAdapter",
    "ClassificationOutputAdapter",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_features",
    "input_adapter_from_config",
    "train_wordpiece_tokenizer",
]
