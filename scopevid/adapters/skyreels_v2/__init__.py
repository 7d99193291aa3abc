"""SkyReels-V2 diffusion forcing (diffusers' SkyReelsV2Transformer3DModel, AutoencoderKLWan, UMT5) from a
local diffusers-format checkpoint directory. See docs/skyreels_v2.md."""

from scopevid.adapters.skyreels_v2.adapter import SkyReelsV2Adapter
from scopevid.adapters.skyreels_v2.loader import check_checkpoint, load_checkpoint

__all__ = ["SkyReelsV2Adapter", "check_checkpoint", "load_checkpoint"]
