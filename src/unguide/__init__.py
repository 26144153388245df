"""unguide: controlled concept erasure for text-to-image diffusion models (LoRA adapter + UnGuidance)."""
from .errors import UnguideError
from .models.loading import ModelBundle, load_model
from .guidance.config import GuidanceConfig
from .generation.pipeline import UnGuideOutput, UnGuidePipeline

__version__ = "0.1.0"
__all__ = ["UnguideError", "ModelBundle", "load_model", "UnGuidePipeline", "UnGuideOutput", "GuidanceConfig", "__version__"]
