"""gemma4_fx: Inductor passes that rewrite Gemma-4 subgraphs into fused Triton kernels.

    torch.compile(model, backend=gemma4_fx.gemma4_backend)
"""

from .backend import GRAPH_PASSES, Gemma4Backend, gemma4_backend
from .generation import generate
from .inspection import inspect
from .multimodal import capture_data_dependent_ops
from .passes.pipeline import Gemma4Passes
from .patterns import PATTERNS
from .presets import PRESETS, build_model, multimodal_config, randomize_, text_config
from .report import Report

__all__ = ["GRAPH_PASSES", "Gemma4Backend", "Gemma4Passes", "PATTERNS", "PRESETS", "Report", "build_model",
           "capture_data_dependent_ops", "gemma4_backend", "generate", "inspect", "multimodal_config", "randomize_",
           "text_config"]
