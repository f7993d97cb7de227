"""perceiver-hf: Perceiver and Perceiver IO as a Hugging Face `transformers` extension.

Importing the package registers `PerceiverConfig` (`model_type="perceiver_io"`) and the models with
the transformers Auto classes, and marks them for remote-code saving (`auto_map` plus the model code
beside the weights), so saved models also load with `trust_remote_code=True` where this package is
not installed.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import is_vision_available
from transformers.utils import logging as transformers_logging

from .adapters import (
    ClassificationOutputAdapter,
    ConvDownsample,
    ImageInputAdapter,
    InputAdapter,
    OutputAdapter,
    TextInputAdapter,
    TextOutputAdapter,
)
from .adapters_audio import AudioInputAdapter
from .adapters_flow import FlowInputAdapter
from .adapters_multimodal import AutoencodingOutputSpec, ModalitySpec, MultimodalInputAdapter
from .configuration_perceiver import PerceiverConfig
from .configuration_perceiver_ar import PerceiverARConfig
from .feature_extraction_perceiver import PerceiverFeatureExtractor
from .image_processing_perceiver import PerceiverImageProcessor
from .modeling_multimodal import (
    AutoModelForMultimodalClassification,
    PerceiverForAudioClassification,
    PerceiverForMultimodalClassification,
    PerceiverMultimodalClassifierOutput,
)
from .modeling_multimodal_autoencoding import (
    AutoModelForMultimodalAutoencoding,
    PerceiverForMultimodalAutoencoding,
    PerceiverMultimodalAutoencodingOutput,
)
from .modeling_optical_flow import AutoModelForOpticalFlow, PerceiverForOpticalFlow, PerceiverOpticalFlowOutput
from .modeling_perceiver import (
    PerceiverAttention,
    PerceiverClassifierOutput,
    PerceiverCrossAttentionLayer,
    PerceiverDecoder,
    PerceiverDecoderOutput,
    PerceiverEncoder,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverMaskedLMOutput,
    PerceiverMLP,
    PerceiverModel,
    PerceiverPreTrainedModel,
    PerceiverSelfAttentionLayer,
    input_adapter_from_config,
)
from .modeling_perceiver_ar import (
    PerceiverARForCausalLM,
    PerceiverARModel,
    PerceiverARModelOutput,
    PerceiverARPreTrainedModel,
)
from .pipeline_optical_flow import OpticalFlowPipeline
from .position_encoding import FourierPositionEncoding, LearnedPositionEncoding, fourier_features
from .processing_multimodal_autoencoding import PerceiverMultimodalAutoencodingProcessor
from .processing_optical_flow import PerceiverOpticalFlowProcessor, flow_to_color
from .processing_perceiver import PerceiverProcessor
from .tokenization_perceiver import train_wordpiece_tokenizer

__version__ = "0.1.0"

# (Auto class, model class): each model loads through its Auto class here and, via `auto_map`, with
# `trust_remote_code=True` elsewhere.
_AUTO_MODELS = [
    (AutoModel, PerceiverModel),
    (AutoModelForMaskedLM, PerceiverForMaskedLM),
    (AutoModelForSequenceClassification, PerceiverForSequenceClassification),
    (AutoModelForImageClassification, PerceiverForImageClassification),
    (AutoModelForAudioClassification, PerceiverForAudioClassification),
]

AutoConfig.register(PerceiverConfig.model_type, PerceiverConfig, exist_ok=True)
PerceiverConfig.register_for_auto_class()
for _auto_class, _model_class in _AUTO_MODELS:
    _auto_class.register(PerceiverConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
# transformers matches configs by class name, so its own Perceiver's processors (torchvision and PIL) are
# merged in for our `PerceiverConfig` unless both backends are ours; ours needs no torchvision. Looking
# them up makes transformers warn about its torchvision fallback, which concerns none of our classes.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    # Without Pillow, transformers' AutoImageProcessor is a placeholder that raises; ours works on arrays.
    if is_vision_available():
        AutoImageProcessor.register(
            PerceiverConfig,
            image_processor_classes={"pil": PerceiverImageProcessor, "torchvision": PerceiverImageProcessor},
            exist_ok=True,
        )
finally:
    transformers_logging.set_verbosity(_verbosity)
# Multimodal classification has no transformers Auto class: ours is built the same way. Its name goes into
# `auto_map` so the code is saved with the model (`register_for_auto_class` only accepts transformers' names).
AutoModelForMultimodalClassification.register(PerceiverConfig, PerceiverForMultimodalClassification, exist_ok=True)
PerceiverForMultimodalClassification._auto_class = AutoModelForMultimodalClassification.__name__
# Multimodal autoencoding: its own Auto class, built the same way (`AutoModel` keeps loading the bare encoder).
AutoModelForMultimodalAutoencoding.register(PerceiverConfig, PerceiverForMultimodalAutoencoding, exist_ok=True)
PerceiverForMultimodalAutoencoding._auto_class = AutoModelForMultimodalAutoencoding.__name__
# Optical flow has no transformers Auto class either: `AutoModelForOpticalFlow` is built the same way.
AutoModelForOpticalFlow.register(PerceiverConfig, PerceiverForOpticalFlow, exist_ok=True)
PerceiverForOpticalFlow._auto_class = AutoModelForOpticalFlow.__name__
PIPELINE_REGISTRY.register_pipeline(
    "optical-flow", pipeline_class=OpticalFlowPipeline, pt_model=AutoModelForOpticalFlow, type="image"
)
# Perceiver AR has its own config (`model_type="perceiver_ar"`) and loads through AutoModel / AutoModelForCausalLM.
AutoConfig.register(PerceiverARConfig.model_type, PerceiverARConfig, exist_ok=True)
PerceiverARConfig.register_for_auto_class()
for _auto_class, _model_class in ((AutoModel, PerceiverARModel), (AutoModelForCausalLM, PerceiverARForCausalLM)):
    _auto_class.register(PerceiverARConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)
AutoFeatureExtractor.register(PerceiverConfig, PerceiverFeatureExtractor, exist_ok=True)
AutoProcessor.register(PerceiverConfig, PerceiverProcessor, exist_ok=True)
# No `register_for_auto_class` for the image processor: with an `auto_map` in preprocessor_config.json,
# `pipeline("image-classification")` also looks for a remote "PerceiverVideoProcessor" and asks on the
# terminal whether to run custom code.

__all__ = [
    "PerceiverConfig",
    "PerceiverImageProcessor",
    "PerceiverFeatureExtractor",
    "PerceiverProcessor",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "PerceiverForAudioClassification",
    "PerceiverForMultimodalClassification",
    "PerceiverMultimodalClassifierOutput",
    "AutoModelForMultimodalClassification",
    "PerceiverForMultimodalAutoencoding",
    "PerceiverMultimodalAutoencodingOutput",
    "AutoModelForMultimodalAutoencoding",
    "AutoencodingOutputSpec",
    "PerceiverMultimodalAutoencodingProcessor",
    "PerceiverForOpticalFlow",
    "PerceiverOpticalFlowOutput",
    "AutoModelForOpticalFlow",
    "FlowInputAdapter",
    "PerceiverOpticalFlowProcessor",
    "OpticalFlowPipeline",
    "flow_to_color",
    "PerceiverARConfig",
    "PerceiverARPreTrainedModel",
    "PerceiverARModel",
    "PerceiverARModelOutput",
    "PerceiverARForCausalLM",
    "PerceiverEncoder",
    "PerceiverDecoder",
    "PerceiverDecoderOutput",
    "PerceiverMaskedLMOutput",
    "PerceiverClassifierOutput",
    "PerceiverAttention",
    "PerceiverMLP",
    "PerceiverCrossAttentionLayer",
    "PerceiverSelfAttentionLayer",
    "InputAdapter",
    "OutputAdapter",
    "TextInputAdapter",
    "ImageInputAdapter",
    "ConvDownsample",
    "AudioInputAdapter",
    "MultimodalInputAdapter",
    "ModalitySpec",
    "TextOutputAdapter",
    "ClassificationOutputAdapter",
    "FourierPositionEncoding",
    "LearnedPositionEncoding",
    "fourier_features",
    "input_adapter_from_config",
    "train_wordpiece_tokenizer",
]
