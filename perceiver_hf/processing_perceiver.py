"""`PerceiverProcessor`: one preprocessing object for images, audio and text.

It combines a `PerceiverImageProcessor`, a `PerceiverFeatureExtractor` and a tokenizer (any of them may be left
out, e.g. no tokenizer for an image + audio model), saves them together with `save_pretrained`, and loads them
with `PerceiverProcessor.from_pretrained` or `AutoProcessor.from_pretrained`.

Output names:

- without `modality_names` (a single-modality model): each sub-processor's usual names (`pixel_values`;
  `input_values` + `attention_mask`; `input_ids` + `attention_mask`), so `model(**processor(...))` works for the
  image, audio and text heads;
- with `modality_names` (a multimodal model): `{name: data, name + "_mask": mask}` with the model's modality names,
  e.g. `{"image": ..., "audio": ..., "audio_mask": ...}`, which `PerceiverForMultimodalClassification` takes as
  keywords.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_vision_available

from .adapters_multimodal import MASK_SUFFIX, validate_modalities
from .image_processing_perceiver import PerceiverImageProcessor

__all__ = ["PerceiverProcessor"]

MODALITY_KINDS = ("image", "audio", "text")
_SUB_PROCESSORS = ("image_processor", "feature_extractor", "tokenizer")


class _PresentSubProcessors:
    """`get_attributes()` that, called on an instance, lists only the sub-processors it has.

    `ProcessorMixin` saves, prints and lists the inputs of every sub-processor of `get_attributes()`; called on the
    class (as `from_pretrained` does) it still lists all three, and `_get_arguments_from_pretrained` below loads
    `None` for the ones saved as absent.
    """

    def __get__(self, instance: Any, owner: type) -> Any:
        def get_attributes() -> list[str]:
            if instance is None:
                return list(_SUB_PROCESSORS)
            return [name for name in _SUB_PROCESSORS if getattr(instance, name, None) is not None]

        return get_attributes


class PerceiverProcessor(ProcessorMixin):
    r"""Image processor, audio feature extractor and tokenizer of a Perceiver IO model, in one object.

    Args:
        image_processor (`PerceiverImageProcessor`, *optional*):
            Preprocesses `images`.
        feature_extractor (`PerceiverFeatureExtractor`, *optional*):
            Preprocesses `audio`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenizes `text`.
        modality_names (`dict[str, str]`, *optional*):
            For a multimodal model: the model's modality name of each kind, e.g. `{"image": "image", "audio":
            "audio"}`; the outputs are then keyed by these names (and `<name>_mask`). `None`: the sub-processors'
            usual output names.

    Example:

    ```python
    >>> processor = PerceiverProcessor(image_processor=image_processor, feature_extractor=feature_extractor,
    ...                                modality_names={"image": "image", "audio": "audio"})
    >>> batch = processor(images=digits, audio=clips, sampling_rate=8000, return_tensors="pt")
    >>> sorted(batch)  # ['audio', 'audio_mask', 'image']
    >>> model(**batch).logits
    ```
    """

    get_attributes = _PresentSubProcessors()

    def __init__(
        self,
        image_processor: Any = None,
        feature_extractor: Any = None,
        tokenizer: Any = None,
        modality_names: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        # ProcessorMixin.__init__ insists on every sub-processor; this processor needs at least one.
        self.chat_template = kwargs.pop("chat_template", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for PerceiverProcessor")
        given = {"image_processor": image_processor, "feature_extractor": feature_extractor, "tokenizer": tokenizer}
        if all(value is None for value in given.values()):
            raise ValueError("PerceiverProcessor needs at least one of image_processor, feature_extractor, tokenizer")
        for name, value in given.items():
            if value is not None:
                self.check_argument_for_proper_class(name, value)
            setattr(self, name, value)
        if modality_names is not None:
            modality_names = dict(modality_names)
            unknown = sorted(set(modality_names) - set(MODALITY_KINDS))
            if unknown:
                raise ValueError(f"modality_names keys {unknown} are not among {list(MODALITY_KINDS)}")
            names = list(modality_names.values())
            for name in names:
                if not isinstance(name, str) or not name.isidentifier() or name.endswith(MASK_SUFFIX):
                    raise ValueError(
                        f"modality_names value {name!r} must be an identifier not ending in {MASK_SUFFIX!r}"
                    )
            if len(set(names)) != len(names):
                raise ValueError(f"modality_names values must be distinct, got {modality_names}")
        self.modality_names = modality_names

    @classmethod
    def from_perceiver_config(cls, config: Any, **sub_processors: Any) -> PerceiverProcessor:
        """A processor for a multimodal `PerceiverConfig`: `modality_names` is taken from `config.modalities` (a token
        modality is the text, a 2-axis one the image, a 1-axis one the audio); `sub_processors` are passed on."""
        names: dict[str, str] = {}
        for spec in validate_modalities(config.modalities, config.num_cross_attention_layers):
            kind = "text" if spec.is_tokens else {1: "audio", 2: "image"}.get(spec.num_axes)
            if kind is None:
                continue
            if kind in names:
                raise ValueError(
                    f"config.modalities has several {kind} modalities ({names[kind]!r}, {spec.name!r}): give "
                    "modality_names explicitly"
                )
            names[kind] = spec.name
        return cls(modality_names=names, **sub_processors)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Tokenizers are saved in their own files, never in processor_config.json: record an absent one explicitly.
        if self.tokenizer is None:
            output["tokenizer"] = None
        return output

    @classmethod
    def _get_arguments_from_pretrained(
        cls, pretrained_model_name_or_path: Any, processor_dict: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Any]:
        """Load each sub-processor with its Auto class, or `None` where the saved processor had none."""
        processor_dict = processor_dict or {}
        loaders = {
            # Without Pillow transformers' AutoImageProcessor is a placeholder that raises; ours works on arrays.
            "image_processor": AutoImageProcessor if is_vision_available() else PerceiverImageProcessor,
            "feature_extractor": AutoFeatureExtractor,
            "tokenizer": AutoTokenizer,
        }
        args = []
        for name in _SUB_PROCESSORS:
            if name in processor_dict and processor_dict[name] is None:
                args.append(None)
            else:
                args.append(loaders[name].from_pretrained(pretrained_model_name_or_path, **kwargs))
        return args

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        # Without Pillow, transformers' top-level `ImageProcessingMixin` (which the base class checks against) is a
        # placeholder that raises; the class itself is importable.
        if argument_name == "image_processor" and not is_vision_available():
            if not isinstance(argument, ImageProcessingMixin):
                raise TypeError(
                    f"Received a {type(argument).__name__} for argument image_processor, but an "
                    "ImageProcessingMixin was expected."
                )
            return ImageProcessingMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    def _require(self, name: str, argument: str) -> Any:
        sub_processor = getattr(self, name)
        if sub_processor is None:
            raise ValueError(f"{argument} was given, but this PerceiverProcessor has no {name}")
        return sub_processor

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        audio: Any = None,
        *,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        images_kwargs: Mapping[str, Any] | None = None,
        audio_kwargs: Mapping[str, Any] | None = None,
        text_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess any of `images`, `audio` and `text` (one example each, or batches of equal size).

        Args:
            images: what the image processor takes (PIL images, arrays, tensors).
            text: a string or a list of strings.
            audio: a clip or a list of clips at `sampling_rate`.
            sampling_rate: the audio's sampling rate (checked by the feature extractor).
            return_tensors: `"pt"`, `"np"` or `None`.
            images_kwargs / audio_kwargs / text_kwargs: extra arguments of each sub-processor (text defaults to
                `padding=True, truncation=True`).
        """
        if kwargs:
            raise TypeError(
                f"unexpected arguments {sorted(kwargs)}; pass sub-processor options in images_kwargs, audio_kwargs "
                "or text_kwargs"
            )
        if images is None and text is None and audio is None:
            raise ValueError("give at least one of images, text and audio")
        outputs: dict[str, dict[str, Any]] = {}
        if images is not None:
            processed = self._require("image_processor", "images")(
                images, return_tensors=return_tensors, **dict(images_kwargs or {})
            )
            outputs["image"] = {"data": processed["pixel_values"], "standard": dict(processed)}
        if audio is not None:
            processed = self._require("feature_extractor", "audio")(
                audio, sampling_rate=sampling_rate, return_tensors=return_tensors, **dict(audio_kwargs or {})
            )
            outputs["audio"] = {
                "data": processed["input_values"],
                "mask": processed.get("attention_mask"),
                "standard": dict(processed),
            }
        if text is not None:
            options = {"padding": True, "truncation": True} | dict(text_kwargs or {})
            processed = self._require("tokenizer", "text")(text, return_tensors=return_tensors, **options)
            outputs["text"] = {
                "data": processed["input_ids"],
                "mask": processed.get("attention_mask"),
                "standard": dict(processed),
            }

        if self.modality_names is None:
            if "audio" in outputs and "text" in outputs:
                raise ValueError(
                    "audio and text both have an attention_mask: set modality_names to name the outputs per modality"
                )
            merged: dict[str, Any] = {}
            for output in outputs.values():
                merged.update(output["standard"])
            return BatchFeature(merged, tensor_type=return_tensors)

        data: dict[str, Any] = {}
        for kind, output in outputs.items():
            name = self.modality_names.get(kind)
            if name is None:
                raise ValueError(f"{kind} was given, but modality_names ({self.modality_names}) has no {kind!r} entry")
            data[name] = output["data"]
            if output.get("mask") is not None:
                data[name + MASK_SUFFIX] = output["mask"]
        return BatchFeature(data, tensor_type=return_tensors)
