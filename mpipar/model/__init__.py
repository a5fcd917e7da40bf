"""The model: its shape (config), its weights (checkpoint files or random), its math.

  config      ModelConfig from a Hugging Face config.json (both key styles) or a preset
  checkpoint  tensor names/shapes; CheckpointReader (safetensors, sliced reads); writer
  init        RandomWeights (deterministic per tensor name); open_model()
  layers      the math of one decoder block, every family (reference and parallel code share it)
"""

from .checkpoint import (
    CheckpointError,
    CheckpointReader,
    WeightSource,
    expected_shapes,
    save_checkpoint,
)
from .config import PRESETS, ConfigError, ModelConfig, get_preset, load_config
from .init import RandomWeights, open_model

__all__ = ["CheckpointError", "CheckpointReader", "ConfigError", "ModelConfig", "PRESETS",
           "RandomWeights", "WeightSource", "expected_shapes", "get_preset", "load_config",
           "open_model", "save_checkpoint"]
