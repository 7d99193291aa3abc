"""MAGI-1 adapter: faithfulness to the official repository, checkpoint errors, SCOPE on a tiny checkpoint.

The reference outputs in tests/fixtures/magi1/ were produced by SandAI-org/MAGI-1's own model and chunk
loop (a scratch copy with CPU stand-ins for its CUDA kernels) on the tiny checkpoints stored there; the
procedure is in tests/fixtures/magi1/README.md. Nothing here imports MAGI-1's code.
"""

from __future__ import annotations

import gzip
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from scopevid.adapters.base import Conditioning, Feature, ForwardSpec, local_attention
from scopevid.adapters.magi1 import PRESETS, Magi1Adapter, Magi1Arch, build_model, expected_shapes
from scopevid.adapters.magi1.config import read_official_config
from scopevid.adapters.magi1.text import Magi1Prompt
from scopevid.adapters.magi1.vae import Tiling, load_decoder, tiled_decode
from scopevid.config import load as load_config
from scopevid.engine.kvcache import KVCache
from scopevid.engine.rollout import Rollout, video_facts
from scopevid.engine.runner import generate, run_once
from scopevid.engine.sinks import FrameStore
from scopevid.errors import CheckpointError, ConfigError
from scopevid.scheduler import policies
from scopevid.scheduler.policies import Discrepancy, Mode, StepContext
from scopevid.scheduler.schedules import ChunkCausalPlan

FX = Path(__file__).parent / "fixtures" / "magi1"
ROOT = Path(__file__).resolve().parents[1]
CW = 2  # the fixture's chunk width (latent frames)
PLAN = dict(latent_frames=10, chunk=CW, window_chunks=4, num_steps=8, context_chunks=4)  # the official run's geometry


def fixture_spec(**over) -> dict:
    """model spec of the tiny 4.5B-style fixture checkpoint (official layout, official config JSON)."""
    return {"kind": "magi1", "arch": str(FX / "tiny_4.5B_style.json"), "weights": str(FX / "dit"),
            "special_tokens": str(FX / "special_tokens.npz"), "height": 64, "width": 64, **over}


def fixture_adapter(**over) -> Magi1Adapter:
    return Magi1Adapter.from_config(fixture_spec(**over))


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_file(str(FX / "reference.safetensors"))


@pytest.fixture(scope="module")
def adapter() -> Magi1Adapter:
    return fixture_adapter()


def official_prompt(ref) -> Conditioning:
    return Conditioning(cond=Magi1Prompt(ref["caption_tokens"]))


class ReplayNoise:
    """The official run's initial noise (torch.randn of the whole video, seed 1234), per frame."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise  # [C, T, H, W]

    def __call__(self, window, frames, shape):
        return torch.stack([self.noise[:, f] for f in frames])


def wave(shape, a, b) -> torch.Tensor:
    """The analytic inputs of the fixture generator: a * sin(b * i) over the flat index (float64 -> float32)."""
    n = int(np.prod(shape))
    return (a * torch.sin(torch.arange(n, dtype=torch.float64) * b)).float().reshape(shape)


# ----------------------------------------------------------------------------- checkpoint layout
@pytest.mark.parametrize("release,preset", [("4.5B_distill", "4.5B"), ("24B_distill", "24B")])
def test_names_and_shapes_equal_the_official_model(release, preset):
    """Every tensor name and shape of the released architectures, as the official VideoDiTModel lists them."""
    with gzip.open(FX / "official_shapes.json.gz", "rt") as f:
        official = json.load(f)[release]
    arch = Magi1Arch.from_dict(official["model_config"])  # the official model_config block reads as is
    assert arch == PRESETS[preset]
    ours = expected_shapes(arch)
    assert list(ours) == [n for n, _ in official["tensors"]]
    assert ours == {n: tuple(s) for n, s in official["tensors"]}


def test_official_config_json_gives_arch_and_recipe(adapter):
    arch, flat = read_official_config(FX / "tiny_4.5B_style.json")
    assert arch.num_query_groups == 2 and arch.caption_channels == 8
    r = adapter.recipe
    assert (r.chunk_width, r.window_size, r.noise2clean_kvrange, r.clean_chunk_kvrange, r.clean_t) == (2, 4, (5, 4, 3, 2), 1, 0.9999)


# ----------------------------------------------------------------------------- faithfulness
def test_chunk_pipeline_reproduces_the_official_loop(adapter, ref):
    """Our engine (ChunkCausalPlan + Rollout + adapter, Original policy) from the official noise and prompt
    ends at the official clean latents: 5 chunks, 16 forwards with clean re-forwards, kv ranges by
    stage, distill blending (including its t = 0.3 edge), duration and HQ tokens."""
    plan = ChunkCausalPlan(**PLAN)
    r = Rollout(adapter, plan, policies.Original(), official_prompt(ref), seed=0, noise=ReplayNoise(ref["noise"]))
    out = dict(r.run())
    ours = torch.stack([out[f] for f in range(10)], dim=1)
    assert torch.equal(adapter._t_table, ref["t_schedule"])  # the shifted t grid, bit for bit
    torch.testing.assert_close(ours, ref["final_latents"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("probe", [1, 8, 11])
def test_single_forwards_reproduce_the_official_model(adapter, ref, probe):
    """One official forward at a time, from its recorded inputs: 1 = first chunk alone; 8 = clean
    re-forward of chunk 0 + 4 noisy chunks + distill blend; 11 = 3 noisy chunks over cached context."""
    meta = json.loads(_probe_meta())[f"probe{probe}"]
    p, n, extra = meta["slice_point"], meta["denoising_range_num"], meta["fwd_extra"]
    x, t, want = ref[f"probe{probe}.x"], ref[f"probe{probe}.t"], ref[f"probe{probe}.out"]
    clean = adapter.prepare(video_facts(ChunkCausalPlan(**PLAN))).clean
    cond, kv = official_prompt(ref), KVCache()
    final = ref["final_latents"]
    for c in range(p):  # the cached context: each finished chunk's clean forward, alone
        frames = [c * CW + j for j in range(CW)]
        spec = ForwardSpec(frames=frames, store=frozenset(frames), kv=kv, sigmas=(clean,) * CW)
        adapter.velocity(final[:, frames].permute(1, 0, 2, 3), torch.full((CW,), clean), cond, spec, local_attention)
    frames = list(range(p * CW, (p + n) * CW))
    sig = [1.0 - float(tc) for tc in t for _ in range(CW)]
    if extra:
        sig[:CW] = [clean] * CW
    spec = ForwardSpec(frames=frames, context=list(range(max(0, p - 4) * CW, p * CW)),
                       store=frozenset(frames[:CW]) if extra else frozenset(), kv=kv, sigmas=tuple(sig))
    v = adapter.velocity(x.permute(1, 0, 2, 3), torch.tensor(sig), cond, spec)
    noisy = slice(CW if extra else 0, None)
    torch.testing.assert_close(-v[noisy], want.permute(1, 0, 2, 3)[noisy], atol=2e-5, rtol=1e-5)


def _probe_meta() -> str:
    from safetensors import safe_open

    with safe_open(str(FX / "reference.safetensors"), framework="pt") as f:
        return f.metadata()["probes"]


def test_24B_style_forward_reproduces_the_official_model():
    """SwiGLU MLP, half-channel VAE input (16 -> 32), x_rescale 0.1, 4 heads on 1 K/V group, per-chunk
    captions of different lengths, chunk-causal ranges: one forward of the official model."""
    arch, _ = read_official_config(FX / "tiny_24B_style.json")
    model = build_model(arch, str(FX / "dit24"), torch.float32).eval()
    x = wave((1, 16, 4, 8, 8), 1.0, 0.37)[0].permute(1, 0, 2, 3)
    y = wave((2, 1, 16, 8), 1.0, 0.61)
    spec = ForwardSpec(frames=[0, 1, 2, 3], key_ranges=((0, 2), (0, 2), (0, 4), (0, 4)))
    with torch.no_grad():
        out = model(x, torch.tensor([0.3, 0.3, 0.1, 0.1]), [y[0, 0, :7], y[1, 0, :3]], torch.tensor([0, 0, 1, 1]), spec,
                    positions=torch.arange(4.0), step_size=8 / 4 * 2)
    want = load_file(str(FX / "reference_24B_style.safetensors"))["out"]
    torch.testing.assert_close(out, want.permute(1, 0, 2, 3), atol=2e-5, rtol=1e-5)


def test_vae_tiled_decode_reproduces_the_official_decoder():
    """The ViT decoder and the official per-chunk tiling (2 x 2 spatial tiles blended over 64 px, 2
    temporal tiles of 3 latents) on a tiny random VAE in the official folder layout."""
    dec = load_decoder(FX / "vae")
    z = wave((1, 4, 6, 28, 28), 0.2, 0.29)
    with torch.no_grad():
        px = tiled_decode(dec, z / 0.18215, Tiling(sample_t=12))[0].permute(1, 0, 2, 3)  # [(t), c, h, w] as upstream
    want = load_file(str(FX / "reference_vae.safetensors"))
    assert list(px.shape) == want["shape"].tolist()
    torch.testing.assert_close(px.flatten()[want["idx"].long()], want["sample"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(px.mean(dim=(1, 2, 3)), want["frame_mean"], atol=2e-6, rtol=1e-5)


def test_adapter_decodes_a_chunk_to_pixels(ref):
    ad = fixture_adapter(vae=str(FX / "vae"))
    px = ad.decode(ref["final_latents"][:, :CW].permute(1, 0, 2, 3))
    assert px.shape == (CW * 4, 64, 64, 3) and 0.0 <= float(px.min()) and float(px.max()) <= 1.0


# ----------------------------------------------------------------------------- errors
def _copy_ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(FX / "dit", d)
    return d / "inference_weight.distill"


def _rewrite(d: Path, fn) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(d / shard))
        fn(state, index)
        save_file(state, str(d / shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_wrong_shape_names_the_first_mismatched_tensor(tmp_path):
    d = _copy_ckpt(tmp_path)
    bad = "videodit_blocks.layers.1.self_attention.linear_qkv.k.weight"

    def fn(state, index):
        if bad in state:
            state[bad] = state[bad][:16]

    _rewrite(d, fn)
    with pytest.raises(CheckpointError, match=rf"{bad}.*shape \(16, 64\).*expects \(32, 64\)"):
        fixture_adapter(weights=str(d.parent))


def test_missing_tensor_is_named(tmp_path):
    d = _copy_ckpt(tmp_path)
    gone = "videodit_blocks.layers.0.mlp.linear_fc2.weight"

    def fn(state, index):
        state.pop(gone, None)
        index["weight_map"].pop(gone, None)

    _rewrite(d, fn)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{gone}'"):
        fixture_adapter(weights=str(d.parent))


def test_other_checkpoint_problems_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        fixture_adapter(weights=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no MAGI-1 DiT weights"):
        fixture_adapter(weights=str(tmp_path / "empty"))
    d = _copy_ckpt(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        fixture_adapter(weights=str(d.parent))
    with pytest.raises(CheckpointError, match=r"'x_embedder.weight' has shape \(64, 4, 1, 2, 2\), the tiny_24B_style.json architecture expects \(32, 32, 1, 2, 2\)"):
        # the 4.5B-style weights read as a 24B-style architecture: the first tensor already differs
        Magi1Adapter.from_config({**fixture_spec(), "arch": str(FX / "tiny_24B_style.json")})


def _hf_snapshot(tmp_path, entry: str | None = None) -> Path:
    """The fixture's DiT as a Hugging Face cache snapshot (every file a link into blobs/); `entry`
    replaces the first weight_map entry of the index."""
    from conftest import hf_cache_snapshot

    def edit(name: str, data: bytes) -> bytes:
        if entry is None or not name.endswith(".index.json"):
            return data
        index = json.loads(data)
        index["weight_map"][next(iter(index["weight_map"]))] = entry
        return json.dumps(index).encode()

    repo = tmp_path / "hub" / "models--sand-ai--MAGI-1-tiny"
    return hf_cache_snapshot(FX / "dit" / "inference_weight.distill", repo, "inference_weight.distill", edit)


def test_weights_in_a_hugging_face_cache_snapshot_load_and_run(tmp_path):
    """A snapshot's files are links to ../../../blobs/<hash>, outside the snapshot once resolved: the
    containment check judges the path as laid out, so they load (they used to be refused as outside
    the checkpoint), the same tensors as the plain copy, and `generate` runs on them."""
    from conftest import write_magi_fixture_config

    from scopevid import cli

    snap = _hf_snapshot(tmp_path)
    shard = snap / "inference_weight.distill" / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and snap not in shard.resolve().parents  # the layout this test is about
    linked, plain = fixture_adapter(weights=str(snap)), fixture_adapter()
    for (name, a), (_, b) in zip(linked.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
    raw = yaml.safe_load(write_magi_fixture_config(tmp_path, frames=8).read_text())
    raw["model"]["weights"] = str(snap)
    raw["policy"] = "original"
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["generate", "--config", str(tmp_path / "hf.yaml"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0


@pytest.mark.parametrize("entry", ["../../etc/passwd", "../../../blobs/x", "/etc/passwd"])
def test_a_snapshot_index_still_cannot_name_files_outside_it(tmp_path, entry):
    snap = _hf_snapshot(tmp_path, entry)
    with pytest.raises(CheckpointError, match=rf"shard '{entry}' points outside the checkpoint directory"):
        fixture_adapter(weights=str(snap))


def test_a_t5_file_that_pickles_objects_is_one_short_line(tmp_path):
    """transformers reads pytorch_model.bin with torch.load(weights_only=True); a file that pickles an
    object used to end in a traceback of torch's advice to retry with weights_only=False."""
    import argparse

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config

    d = tmp_path / "t5"
    T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "fox": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    torch.save({"shared.weight": torch.zeros(8, 8), "note": argparse.Namespace(x=1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        fixture_adapter(text_encoder=str(d))
    assert str(e.value) == (f"{d}: cannot load the T5 encoder (not a plain tensor checkpoint: it pickles an object of class "
                            "argparse.Namespace (not unpickled, as that could run code))")


def test_the_fixture_stays_far_below_the_velocity_bound(tmp_path):
    """The fixture's velocities (peak |v| ~3.6) pass a bound 50x tighter than the default."""
    cfg = load_config(_yaml(tmp_path, frames=16, policy="original", stability={"max_velocity": 20.0}))
    assert generate(cfg, tmp_path / "out", progress=False)["frames"] == 16


def test_decoding_without_vae_weights_says_what_is_missing(adapter, tmp_path, ref):
    with pytest.raises(CheckpointError, match="no weights configured"):
        adapter.decode(ref["final_latents"][:, :CW].permute(1, 0, 2, 3))
    with pytest.raises(CheckpointError, match="no weights configured"):
        adapter.stream_decoder()  # asked for before a rollout: the run fails before its work
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        fixture_adapter(vae=str(tmp_path / "vae"))  # at load, not at the first decode
    import shutil

    shutil.copy(FX / "vae" / "config.json", tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors"):
        fixture_adapter(vae=str(tmp_path / "vae"))


def test_model_spec_is_typed_and_strict():
    with pytest.raises(ConfigError, match=r"^model.vea: unknown field for magi1; allowed: kind, arch, weights"):
        fixture_adapter(vea="x")
    with pytest.raises(ConfigError, match=r"^model.height: Input should be a multiple of 16 \(got 100\)"):
        fixture_adapter(height=100)
    with pytest.raises(ConfigError, match=r"^model.height: Input should be a valid integer \(got '480'\)"):
        fixture_adapter(height="480")
    with pytest.raises(ConfigError, match=r"^model.host_feature: Input should be 'embed' or 'modulated'"):
        fixture_adapter(host_feature="modulate")
    spec = fixture_spec()
    del spec["weights"]
    with pytest.raises(ConfigError, match=r"^model.weights: required: a MAGI-1 checkpoint directory"):
        Magi1Adapter.from_config(spec)


def test_missing_special_tokens_file_and_text_encoder_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="special tokens not found"):
        fixture_adapter(special_tokens=str(tmp_path / "special_tokens.npz"))
    with pytest.raises(CheckpointError, match="T5 encoder directory not found"):
        fixture_adapter(text_encoder=str(tmp_path / "t5-v1_1-xxl"))


# ----------------------------------------------------------------------------- sharded forward
class _TwoShards:
    """Two threads standing in for two ranks: attention gathers every shard's q/k/v (an in-process
    all-to-all), runs local_attention on the whole sequence, and returns this shard's rows."""

    def __init__(self, world: int = 2):
        self.world, self.box = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def attention(self, rank: int):
        def attn(q, k, v, layer, spec):
            self.box[rank] = (q, k, v)
            self.barrier.wait()
            full = [torch.cat([b[i] for b in self.box], dim=1) for i in range(3)]
            lo = sum(b[0].shape[1] for b in self.box[:rank])
            self.barrier.wait()
            return local_attention(*full, layer, spec)[:, lo : lo + q.shape[1]]

        return attn


@pytest.mark.parametrize("probe", [8, 11])
def test_sharded_forward_equals_the_whole_forward(ref, probe):
    """Frames split over 2 shards (a chunk may straddle them), attention through a stand-in all-to-all:
    the adapter uses only `attention`, spec.shard and spec.sigmas, so the result equals one process."""
    meta = json.loads(_probe_meta())[f"probe{probe}"]
    p, n, extra = meta["slice_point"], meta["denoising_range_num"], meta["fwd_extra"]
    x = ref[f"probe{probe}.x"].permute(1, 0, 2, 3)
    frames = list(range(p * CW, (p + n) * CW))
    adapters = [fixture_adapter() for _ in range(2)]
    for ad in adapters:
        clean = ad.prepare(video_facts(ChunkCausalPlan(**PLAN))).clean
    sig = [1.0 - float(tc) for tc in ref[f"probe{probe}.t"] for _ in range(CW)]
    if extra:
        sig[:CW] = [clean] * CW

    def spec_for(ad, kv, shard):
        fill = [c * CW + j for c in range(p) for j in range(CW)]
        for c in range(p):
            fr = fill[c * CW : (c + 1) * CW]
            ad.velocity(ref["final_latents"][:, fr].permute(1, 0, 2, 3), torch.full((CW,), clean),
                        official_prompt(ref), ForwardSpec(frames=fr, store=frozenset(fr), kv=kv, sigmas=(clean,) * CW), local_attention)
        return ForwardSpec(frames=frames, context=list(range(max(0, p - 4) * CW, p * CW)), kv=kv, shard=shard,
                           store=frozenset(frames[:CW]) if extra else frozenset(), sigmas=tuple(sig))

    whole = adapters[0].velocity(x, torch.tensor(sig), official_prompt(ref), spec_for(adapters[0], KVCache(), None))
    half = len(frames) // 2
    shards, outs, errors = _TwoShards(), [None, None], []

    def run(rank):
        try:
            lo, hi = (0, half) if rank == 0 else (half, len(frames))
            spec = spec_for(adapters[rank], KVCache(), (lo, hi))
            outs[rank] = adapters[rank].velocity(x[lo:hi], torch.tensor(sig[lo:hi]), official_prompt(ref), spec,
                                                 shards.attention(rank))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            shards.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    torch.testing.assert_close(torch.cat(outs)[CW if extra else 0 :], whole[CW if extra else 0 :], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SCOPE on MAGI-1
def _yaml(tmp_path, **over) -> Path:
    cfg = {
        "model": {**fixture_spec(), "vae": str(FX / "vae")},
        "prompt": "a red fox runs through fresh snow",
        "guidance": 1.0,
        "frames": 48,  # 12 latent frames = 6 chunks of 2
        "fps": 24,
        "seed": 0,
        "schedule": {"kind": "chunk_causal", "steps": 16, "chunk_width": CW, "window_size": 4, "context_chunks": 4},
        "policy": "scope-fast",
        "policy_presets": str(ROOT / "configs" / "policies" / "magi1.yaml"),
        # the per-chunk presets carry MAGI-1's chunk width (6); the fixture's chunks are 2 frames
        "policies": {"scope-chunk-fast": {"kind": "scope_chunk", "tau_c": 0.03, "tau_p": 0.08, "decay": 0.75, "horizon": 5,
                                          "warmup": 2, "chunk": CW, "predictor": "taylor2"}},
    }
    cfg.update(over)
    path = tmp_path / "magi1_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scope_summary_has_speedup_and_quality(tmp_path):
    """`scopevid generate --compare` on the tiny checkpoint: SCOPE's decisions, speedup and PSNR/SSIM."""
    cfg = load_config(_yaml(tmp_path))
    summary = generate(cfg, tmp_path / "out", compare=True, progress=False)
    counts = summary["counts"]
    assert counts["cache"] + counts["predict"] > 0 and counts["recompute"] > 0
    assert summary["original"]["counts"]["recompute"] == summary["iterations"] == 16 + 5 * 4
    assert summary["speedup_forwards"] > 1.0 and summary["speedup_flops"] > 1.0 and "speedup_wall" in summary
    assert summary["frames_compared"] == 48 and summary["psnr"] > 20.0 and 0.5 < summary["ssim"] <= 1.0
    assert pq.read_table(tmp_path / "out" / "steps.parquet").num_rows == summary["iterations"]
    assert (tmp_path / "out" / "video.mp4").is_file()


@pytest.mark.parametrize("policy", ["scope-fast", "scope-chunk-fast"])
def test_clean_reforwards_are_never_skipped(tmp_path, policy):
    """Under SCOPE (per iteration and per chunk), every finished chunk but the last is re-forwarded clean
    exactly once and before any forward reads its K/V, as in the Original run: skipping iterations only
    defers the K/V fill to the next forward, which is exact (a clean chunk attends only itself)."""
    cfg = load_config(_yaml(tmp_path, policy=policy))
    ad = fixture_adapter(vae=str(FX / "vae"))
    cleaned, orig_velocity = [], ad.velocity

    def spy(x, sigma, cond, spec, attention=local_attention, hooks=None):
        if spec.store:
            cleaned.append(sorted(spec.store))
        return orig_velocity(x, sigma, cond, spec, attention, hooks)

    ad.velocity = spy
    ref_store = FrameStore(tmp_path / "ref")
    base = run_once(cfg, ad, "original", frames_to=ref_store)
    base_cleaned, cleaned[:] = list(cleaned), []
    res = run_once(cfg, ad, policy, reference=ref_store, keep_records=True)
    chunks = [[c * CW + j for j in range(CW)] for c in range(5)]  # 6 chunks: all but the last are context
    assert base_cleaned == chunks
    assert sorted(f for fr in cleaned for f in fr) == [f for c in chunks for f in c]
    modes = [r.mode for r in res.records]  # run with keep_records
    assert {"cache", "predict"} & set(modes), modes
    assert res.summary["flops"] < base.summary["flops"] and res.summary["psnr"] > 20.0


def test_scope_chunk_policy_takes_the_most_conservative_chunk():
    pol = policies.build({"kind": "scope_chunk", "tau_c": 0.03, "tau_p": 0.08, "decay": 0.75, "horizon": 5, "warmup": 2,
                          "chunk": 6}, "scope-chunk")
    assert pol.chunk_sums and pol.chunk == 6

    def ctx(i):
        return StepContext(serial=i, index=i, window=0, num_steps=64, cache_ready=True, history=3, min_step=5, max_step=40)

    def disc(per):
        return Discrepancy(sum(n for _, n, _ in per), sum(d for _, _, d in per), tuple(per))

    two = [(0, 0.01, 1.0), (1, 0.05, 1.0)]  # chunk 0 would cache, chunk 1 would predict
    assert pol.decide(ctx(0), disc([(0, 0.0, 1.0)])).reason == "warmup"  # the rollout's first iterations
    pol.record(Mode.RECOMPUTE)
    d = pol.decide(ctx(5), disc(two))  # chunk 1's first scored iteration: its warmup
    assert (d.mode, d.reason) == (Mode.RECOMPUTE, "chunk-warmup:1")
    pol.record(d.mode)
    d = pol.decide(ctx(6), disc(two))
    assert (d.mode, d.reason) == (Mode.PREDICT, "below-tau_p:chunk1") and d.r == pytest.approx(0.05)
    pol.record(d.mode)
    assert pol.r == {0: pytest.approx(0.0075), 1: pytest.approx(0.0375)}  # lambda 0.75 after Predict
    d = pol.decide(ctx(7), disc(two))  # chunk 1 reaches 0.0875 >= tau_p
    assert (d.mode, d.reason) == (Mode.RECOMPUTE, "above-tau_p:chunk1")


# ----------------------------------------------------------------------------- baselines' hooks
def test_forward_hooks_are_exact(adapter, ref):
    """Recording hooks leave the MAGI-1 forward bit-identical, and each reuse rule reproduces it from
    what it recorded at the same input (self+cross attention projection and MLP, through the gates and
    post-norms)."""
    from scopevid.adapters.base import ForwardHooks
    from scopevid.engine import reuse

    sig = adapter.prepare(video_facts(ChunkCausalPlan(**PLAN))).sigmas
    cond = official_prompt(ref)
    x = ref["noise"][:, :4].permute(1, 0, 2, 3)
    s = torch.tensor([sig[1], sig[1], sig[2], sig[2]], dtype=torch.float32)
    spec = ForwardSpec(frames=[0, 1, 2, 3], sigmas=tuple(s.tolist()))

    def vel(hooks=None):
        return adapter.velocity(x, s, cond, spec, local_attention, hooks)

    plain = vel()
    assert torch.equal(vel(ForwardHooks()), plain)
    store: dict = {}
    assert torch.equal(vel(reuse.ResidualHooks(store, reuse=False)), plain)
    assert set(store) == {("cond", f) for f in range(4)}
    torch.testing.assert_close(vel(reuse.ResidualHooks(store, reuse=True)), plain, rtol=1e-5, atol=1e-5)
    for level in ("modules", "stack"):
        store = {}
        assert torch.equal(vel(reuse.TaylorHooks(store, 2, order=1, forecast=False, level=level)), plain)
        torch.testing.assert_close(vel(reuse.TaylorHooks(store, 2, order=1, forecast=True, level=level)), plain, rtol=1e-5, atol=1e-5)
    for which in ("front", "rear"):
        store = {}
        vel(reuse.DeltaHooks(store, 0.5, None))
        skip = reuse.DeltaHooks(store, 0.5, which)
        torch.testing.assert_close(vel(skip), plain, rtol=1e-5, atol=1e-5)
        assert skip.blocks_run == adapter.arch.num_layers // 2 and adapter.flops(4, 0, blocks=1) < adapter.flops(4, 0)
    assert adapter.named_feature(Feature.EMBED, x, s, cond, spec).shape == (4, 16, 64)
    assert adapter.named_feature(Feature.TEMB, x, s, cond, spec).shape[0] == 4
    with pytest.raises(ConfigError, match="temb_mod"):
        adapter.named_feature(Feature.TEMB_MOD, x, s, cond, spec)


def test_shipped_baseline_presets_fit_the_adapter(adapter):
    from scopevid.engine import reuse

    presets = yaml.safe_load((ROOT / "configs" / "policies" / "magi1.yaml").read_text())
    names = [n for n, sp in presets.items() if sp["kind"] in ("teacache", "taylorseer", "flowcache", "deltadit")]
    assert {"flowcache-slow", "flowcache-fast", "taylorseer-slow", "deltadit"} <= set(names)
    for name in names:
        assert reuse.for_policy(policies.build(presets[name], name), adapter, ChunkCausalPlan(**PLAN)) is not None


BASELINES = {
    "teacache": {"kind": "teacache", "thresh": 0.3, "ret_steps": 2, "feature": "temb", "coefficients": [1.0, 0.0]},
    "taylorseer": {"kind": "taylorseer", "interval": 2, "order": 1, "first_enhance": 1},
    "deltadit": {"kind": "deltadit", "interval": 2, "fraction": 0.5, "boundary": 0.5, "warmup": 1},
    "flowcache": {"kind": "flowcache", "thresh": 0.3, "ret_steps": 2, "last_step": True, "feature": "embed", "coefficients": [1.0, 0.0]},
    "flowcache-never": {"kind": "flowcache", "thresh": 0.0, "ret_steps": 0, "feature": "embed", "coefficients": [1.0, 0.0]},
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_run_on_magi1(tmp_path, name):
    """The paper's baselines in the same harness on a MAGI-1 checkpoint: fewer FLOPs than Original and
    a bounded error, or, for a FlowCache that never skips, Original's video (its K/V view of earlier
    chunks, clean re-forwards included, is exact)."""
    cfg = load_config(_yaml(tmp_path, policy=name, policies={name: BASELINES[name]}))
    ad = fixture_adapter(vae=str(FX / "vae"))
    ref_store = FrameStore(tmp_path / "ref")
    base = run_once(cfg, ad, "original", frames_to=ref_store).summary
    res = run_once(cfg, ad, name, reference=ref_store).summary
    assert sum(res["counts"].values()) == base["iterations"]
    if name == "flowcache-never":
        assert res["counts"]["recompute"] == base["iterations"] and res["psnr"] > 60.0
        return
    assert res["flops"] < base["flops"] and res["counts"]["recompute"] < base["iterations"]
    assert res["psnr"] > 15.0 and res["frames_compared"] == 48


# ----------------------------------------------------------------------------- configs
def test_paper_config_validates_and_points_at_the_release(tmp_path):
    cfg = load_config(ROOT / "configs" / "magi1_4.5b_distill.yaml")
    s = cfg.schedule
    assert (cfg.frames, s.steps, s.chunk_width, s.window_size) == (240, 64, 6, 4)
    assert cfg.model["height"] == cfg.model["width"] == 480 and cfg.model["arch"] == "4.5B"
    for name, (tc, tp) in {"scope-fast": (0.03, 0.08), "scope-slow": (0.02, 0.05)}.items():
        spec = cfg.policy_spec(name)
        assert (spec["tau_c"], spec["tau_p"], spec["decay"], spec["horizon"], spec["predictor"]) == (tc, tp, 0.75, 5, "taylor2")
    with pytest.raises(CheckpointError, match="MAGI-1 VAE: downloads/vae/config.json is missing"):
        Magi1Adapter.from_config(cfg.model)  # the small VAE is checked first: a missing one never waits for a 24B load
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Magi1Adapter.from_config({**cfg.model, "vae": str(FX / "vae"), "weights": str(tmp_path / "MAGI-1" / "4.5B_distill")})


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="model.host_feature"):
        fixture_adapter(host_feature="temb")
    with pytest.raises(ConfigError, match="model.recipe.distill"):
        fixture_adapter(recipe={"distill": False})
    with pytest.raises(ConfigError, match="guidance"):
        fixture_adapter().encode_prompt("a fox", None, 5.0)
    with pytest.raises(ConfigError, match="12 selects MAGI-1's shortcut"):
        fixture_adapter().prepare(video_facts(ChunkCausalPlan(latent_frames=12, chunk=2, window_chunks=4, num_steps=12)))
    with pytest.raises(ConfigError, match="model.height: Input should be a multiple of 16"):
        fixture_adapter(height=72)
    ad = fixture_adapter()
    with pytest.raises(ConfigError, match="chunk_width"):
        ad.prepare(video_facts(ChunkCausalPlan(latent_frames=12, chunk=6, window_chunks=4, num_steps=8)))


def test_host_features(adapter, ref):
    """'embed': the patch-embedded latents; 'modulated': scaled by (1 + layer-0 attention gate of t)."""
    sig = adapter.prepare(video_facts(ChunkCausalPlan(**PLAN))).sigmas
    x = ref["noise"][:, :2].permute(1, 0, 2, 3)
    spec = ForwardSpec(frames=[0, 1])
    sigma = torch.tensor(sig[3:5])
    emb = adapter.host_feature(x, sigma, official_prompt(ref), spec)
    assert emb.shape == (2, 16, 64)
    mod = fixture_adapter(host_feature="modulated")
    mod.prepare(video_facts(ChunkCausalPlan(**PLAN)))
    m = mod.host_feature(x, sigma, official_prompt(ref), spec)
    assert m.shape == emb.shape and not torch.allclose(m, emb)
