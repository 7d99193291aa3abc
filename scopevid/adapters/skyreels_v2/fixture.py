"""A small random SkyReels-V2 diffusion forcing checkpoint in the released diffusers layout, written with
diffusers' and transformers' own classes (the hub is out of reach here): the tests' checkpoint and the
cold-start benchmark's. Not a video model: random weights of the real module tree, at a size of the caller's."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "</s>", "<unk>"] + "a red fox runs in the snow blue sky".split()


def build_checkpoint(path: str | Path, *, heads: int = 2, head_dim: int = 12, layers: int = 2, ffn: int = 32,
                     text_dim: int = 32, text_layers: int = 2, text_ff: int = 64, seed: int = 0) -> Path:
    """DIR/{transformer,vae,text_encoder,tokenizer,scheduler}/ as save_pretrained writes them."""
    from diffusers import (AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel,
                           UniPCMultistepScheduler)
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=text_dim, d_kv=8, d_ff=text_ff,
                                               num_layers=text_layers, num_heads=4, relative_attention_num_buckets=8,
                                               relative_attention_max_distance=16))
    scheduler = UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    SkyReelsV2DiffusionForcingPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                                       scheduler=scheduler).save_pretrained(path)
    return Path(path)
