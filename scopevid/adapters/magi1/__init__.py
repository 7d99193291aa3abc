"""MAGI-1 (SandAI-org/MAGI-1): our PyTorch DiT reading the official checkpoints, the official chunk
pipeline's rules on the engine's chunk-causal plan, T5 captions with special tokens, the ViT VAE.

model.py (the DiT), checkpoint.py (checked loading of the sharded release), text.py (captions),
vae.py (decoder + tiled decoding), config.py (architecture presets, recipe), adapter.py (the protocol).
See docs/magi1.md.
"""

from scopevid.adapters.magi1.adapter import Magi1Adapter, build_model, expected_shapes
from scopevid.adapters.magi1.config import PRESETS, Magi1Arch, Magi1Recipe
from scopevid.adapters.magi1.model import Magi1DiT

__all__ = ["Magi1Adapter", "Magi1Arch", "Magi1DiT", "Magi1Recipe", "PRESETS", "build_model", "expected_shapes"]
