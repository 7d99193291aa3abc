"""Prompt side of MAGI-1: T5-XXL embeddings and the special tokens the official pipeline prepends.

The official pipeline encodes the prompt with T5 v1.1 XXL (DeepFloyd/t5-v1_1-xxl weights, 800 tokens,
float32) and, per chunk, prepends learned special-token embeddings that ship as
`example/assets/special_tokens.npz` (`caption_token`, `logo_token`, `other_tokens[100]`, rounded to
float16 when loaded). With the example scripts' PAD_HQ=1 PAD_DURATION=1, chunk i of n attends
  [DURATION(min(n - i - 1, 7)), HQ, prompt tokens...][:800]
where DURATION(k) = other_tokens[7 + k] says how many chunks remain, HQ = other_tokens[1]. The other
keys map to other_tokens rows as below. Only the valid (unmasked) tokens matter: cross-attention reads
exactly those. A clean re-forward (and an empty prompt) attends the first 50 rows of the model's own
`null_caption_embedding` instead.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scopevid.adapters.hub import quiet_progress
from scopevid.errors import CheckpointError, ConfigError, load_reason

# rows of other_tokens (the official SPECIAL_TOKEN_DICT)
OTHER_ROW = {
    "TRANS_TOKEN": 0,
    "HQ_TOKEN": 1,
    "STATIC_FIRST_FRAMES_TOKEN": 2,
    "DYNAMIC_FIRST_FRAMES_TOKEN": 3,
    "BORDERNESS_TOKEN": 4,
    "THREE_D_MODEL_TOKEN": 15,
    "TWO_D_ANIME_TOKEN": 16,
}
DURATION_ROW0, DURATION_MAX = 7, 7  # DURATION_TOKEN_k (k+1 chunks remain, capped) = other_tokens[7 + k]
# the order the official get_special_token_keys() emits them in (each is prepended in turn)
ORDER = ("STATIC_FIRST_FRAMES_TOKEN", "DYNAMIC_FIRST_FRAMES_TOKEN", "BORDERNESS_TOKEN", "HQ_TOKEN",
         "THREE_D_MODEL_TOKEN", "TWO_D_ANIME_TOKEN", "DURATION_TOKEN")


@dataclass(frozen=True)
class Magi1Prompt:
    """An encoded prompt: the valid T5 token embeddings (float32) or None for the empty prompt."""

    tokens: torch.Tensor | None  # [L, caption_channels]
    text: str = ""


class SpecialTokens:
    def __init__(self, other: torch.Tensor):
        self.other = other  # [100, C] float32 holding float16-rounded values

    @classmethod
    def load(cls, path: str | Path, channels: int) -> "SpecialTokens":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"MAGI-1 special tokens not found: {path} (the official example/assets/special_tokens.npz; "
                f"set model.special_tokens to its path, or recipe.special_tokens: [] to prepend none)"
            )
        try:
            with np.load(path) as z:
                other = z["other_tokens"]
        except Exception as e:
            raise CheckpointError(f"{path}: not a special-token archive with `other_tokens` ({e})") from None
        if other.ndim != 2 or other.shape[1] != channels or other.shape[0] < DURATION_ROW0 + DURATION_MAX + 1:
            raise CheckpointError(f"{path}: other_tokens has shape {other.shape}, expected (>= 15, {channels})")
        return cls(torch.from_numpy(other.astype(np.float16)).float())

    @classmethod
    def on_meta(cls, channels: int) -> "SpecialTokens":
        """The official table's shape (100 rows) without its values: the planner and the dry run."""
        return cls(torch.zeros(100, channels, device="meta"))

    def prefix(self, keys: tuple[str, ...], remaining: int) -> torch.Tensor:
        """Tokens prepended to a chunk's caption, first token first. `remaining`: chunks after this one."""
        rows = []
        for key in ORDER:  # each key is prepended in turn, so the last one ends up first
            if key not in keys:
                continue
            if key == "DURATION_TOKEN":
                rows.append(DURATION_ROW0 + min(remaining, DURATION_MAX))
            else:
                rows.append(OTHER_ROW[key])
        return self.other[list(reversed(rows))] if rows else self.other[:0]


def chunk_caption(prompt: torch.Tensor, special: SpecialTokens | None, keys: tuple[str, ...], remaining: int,
                  max_length: int) -> torch.Tensor:
    """The valid cross-attention tokens of one chunk: special prefix + prompt, cut to max_length."""
    pre = special.prefix(keys, remaining) if (special is not None and keys) else prompt[:0]
    return torch.cat([pre.to(prompt.dtype), prompt], dim=0)[:max_length]


def clean_prompt(text: str) -> str:
    """A light version of the official caption cleaning (which runs the DeepFloyd-IF cleaner twice):
    URL-unquote, strip, lower-case, collapse whitespace. Identical for plain-text prompts."""
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    return re.sub(r"\s+", " ", text).strip()


class T5Encoder:
    """T5 v1.1 XXL encoder from a local Hugging Face directory (tokenizer + weights), float32 on CPU."""

    def __init__(self, path: str | Path, max_length: int, device: str = "cpu", weights=None):
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"T5 encoder directory not found: {path} (DeepFloyd/t5-v1_1-xxl: config.json, spiece.model, weights)")
        from scopevid.extras import require

        transformers = require("transformers", "magi1", f"model.text_encoder: {path} (MAGI-1's T5 encoder)")
        AutoTokenizer, T5EncoderModel = transformers.AutoTokenizer, transformers.T5EncoderModel
        try:
            with quiet_progress():
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])

            def skeleton():
                config = transformers.T5Config.from_pretrained(str(path), local_files_only=True)
                with torch.device("meta"):
                    return T5EncoderModel(config).float()

            def load():
                with quiet_progress():
                    return T5EncoderModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32).to(device)

            self.model = (weights.module("text_encoder", load, skeleton, files) if weights is not None else load()).eval()
        except CheckpointError:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, and torch.load's UnpicklingError
            raise CheckpointError(f"{path}: cannot load the T5 encoder ({load_reason(e)})") from None
        self.max_length, self.device = max_length, device

    @torch.no_grad()
    def __call__(self, text: str) -> torch.Tensor:
        tok = self.tokenizer([clean_prompt(text)], max_length=self.max_length, padding="max_length", truncation=True,
                             return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        out = self.model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        emb = out["last_hidden_state"][0].float().cpu()
        return emb[tok["attention_mask"][0].bool()]


class RandomText:
    """Deterministic stand-in for T5 (tests, smoke runs without the 19 GB encoder): a prompt's words
    map to fixed random vectors. Not a text model; it only exercises the conditioning path."""

    def __init__(self, channels: int, max_length: int):
        self.channels, self.max_length = channels, max_length

    def __call__(self, text: str) -> torch.Tensor:
        words = clean_prompt(text).split()[: self.max_length - 1] + ["</s>"]
        vecs = []
        for w in words:
            seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") % (2**63 - 1)
            vecs.append(torch.randn(self.channels, generator=torch.Generator().manual_seed(seed)) * 0.1)
        return torch.stack(vecs)


def make_text_encoder(spec, channels: int, max_length: int, weights=None):
    """model.text_encoder: 'random' or a path to a local T5 directory (read through `weights`, an
    adapters.weights.WeightSource, when given)."""
    if spec in (None, "random"):
        return RandomText(channels, max_length)
    if isinstance(spec, (str, Path)):
        return T5Encoder(spec, max_length, weights=weights)
    raise ConfigError(f"model.text_encoder: a path to a T5 directory or 'random', got {spec!r}")
