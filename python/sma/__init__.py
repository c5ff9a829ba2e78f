"""Reference SMA model (self-guided masked autoencoder) built on the sma_kernels ops.

Modules: :mod:`sma.model` (network), :mod:`sma.masking` (mask settings), :mod:`sma.data` (data
sets), :mod:`sma.train` (training loops), :mod:`sma.cli` (the ``sma`` command),
:mod:`sma.experiments` (guided vs random vs no pretraining).
"""

from .masking import MaskingConfig
from .model import ModelConfig, SMAPredictor, SMAPretrainer

__all__ = ["MaskingConfig", "ModelConfig", "SMAPredictor", "SMAPretrainer"]
