"""scopevid: long-video generation with autoregressive video diffusion, accelerated by SCOPE."""

__version__ = "0.1.0"
