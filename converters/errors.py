"""Exceptions raised by the converters pipeline, each naming the input that was wrong."""

from __future__ import annotations


class ConverterError(Exception):
    """Base class of every error the converters package raises on purpose."""


class ModelInputError(ConverterError):
    """A model file is missing, corrupt or of a format we cannot read."""


class ConversionError(ConverterError):
    """TensorFlow Lite conversion or re-quantization of a model failed."""


class CalibrationError(ConversionError):
    """A recipe needs representative (calibration) data that is missing or unusable."""


class CompilerError(ConverterError):
    """An accelerator compiler (Vela, edgetpu_compiler) is missing or failed."""


class InspectError(ConverterError):
    """A .tflite flatbuffer could not be parsed."""


class GoldenMismatchError(ConverterError):
    """A model's outputs on its golden inputs differ from the stored ones beyond tolerance."""


class PruningError(ConverterError):
    """Magnitude pruning (--train) cannot run here (missing extra, unsupported model) or failed."""
