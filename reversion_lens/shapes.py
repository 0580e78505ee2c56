"""One axis vocabulary for the whole package.

=========  ==============================================================
axis       meaning
=========  ==============================================================
prompt     one probe prompt (rows of a probe set)
batch      rows of one forward pass (a slice of the prompts)
pos        token position
layer      a layer index *covered by an object* (not always 0..n_layers-1)
d_model    residual-stream width
vocab      vocabulary size
=========  ==============================================================

Shapes appear in signatures as jaxtyping annotations, e.g. ``Float[Tensor, "layer d_model"]``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Tensor", "Float", "Int", "Bool", "LayerVectors", "Tokens", "Mask"]

LayerVectors = Float[Tensor, "layer d_model"]
Tokens = Int[Tensor, "prompt pos"]
Mask = Int[Tensor, "prompt pos"]
