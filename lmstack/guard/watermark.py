"""The generation watermark, as the guard names it: :mod:`lmstack.serve.watermark` (the green-list logits
processor lives with the engine that applies it; the server reads ``--watermark-key`` and the request's
``watermark`` extra without importing the guard layer). Everything here is that module's."""

from lmstack.serve.watermark import (Detection, EngineWatermark, WatermarkProcessor, check_params, detect,
                                     false_positive_rate, green_list, green_size, watermark_factory, z_score)

__all__ = ["Detection", "EngineWatermark", "WatermarkProcessor", "check_params", "detect", "false_positive_rate",
           "green_list", "green_size", "watermark_factory", "z_score"]
