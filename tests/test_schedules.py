"""Rollout plans (scheduler/schedules.py): diffusion forcing (SkyReels-V2) and chunk-causal (MAGI-1).

Property tests over random valid geometries, a cross-check against diffusers' own
`generate_timestep_matrix`, and a cross-check against MAGI-1's stage sequences
(`generate_sequences` in inference/pipeline/video_generate.py, restated below from its semantics).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scopevid.errors import ConfigError
from scopevid.scheduler.schedules import ChunkCausalPlan, DiffusionForcingPlan

PROPS = settings(max_examples=50, deadline=None)


# ----------------------------------------------------------------------------- strategies


@st.composite
def df_geometry(draw, max_blocks: int = 6, max_steps: int = 12):
    """(latent_frames, window, steps, ar_step, block, overlap): a valid diffusion forcing geometry."""
    block = draw(st.integers(1, 4))
    blocks_per_window = draw(st.integers(1, max_blocks))
    window = block * blocks_per_window
    steps = draw(st.integers(1, max_steps))
    ar_step = draw(st.integers(0, 7))
    overlap = block * draw(st.integers(0, blocks_per_window - 1))
    latent_frames = draw(st.integers(1, 4 * window + 3))
    return latent_frames, window, steps, ar_step, block, overlap


def _by_window(plan):
    groups = defaultdict(list)
    for it in plan.iterations():
        groups[it.window].append(it)
    return [groups[w] for w in sorted(groups)]


def _eq9_reference(masks, n, interval, mode):
    """Eq. 8-9 restated independently: e_bar_t = min(B, F) with no active slot, otherwise
    max(e_bar_{t-1}, 1 + last active); V_t = [max(e_bar - B, 0), e_bar), its start pulled down to the
    first active slot when B is shorter than the active span (paper) or equal to it (causal)."""
    b = n if interval is None else min(interval, n)
    e_bar, out = 0, []
    for m in masks:
        act = [j for j, a in enumerate(m) if a]
        if not act:
            e_bar = max(e_bar, b)
            out.append((max(e_bar - b, 0), e_bar))
            continue
        e_bar = max(e_bar, act[-1] + 1)
        out.append((act[0], e_bar) if mode == "causal" else (min(max(e_bar - b, 0), act[0]), e_bar))
    return out


# ----------------------------------------------------------------------------- diffusion forcing


@PROPS
@given(df_geometry())
@example((10, 4, 3, 1, 1, 1))
@example((25, 25, 5, 0, 1, 0))  # synchronous, one window
@example((60, 25, 7, 2, 5, 5))  # asynchronous, blocks of 5, overlap 5, a short last window
def test_df_windows_cover_the_video(geom):
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(latent, window, steps, ar_step=ar, block=block, overlap=overlap)
    ws = plan.windows()
    assert [w.index for w in ws] == list(range(len(ws)))
    assert ws[0].start == 0 and ws[0].prefix == 0
    assert ws[-1].start + ws[-1].length == latent
    new_frames = []
    for prev, w in zip([None] + ws[:-1], ws):
        assert w.length == min(window, latent - w.start)
        if prev is not None:
            assert w.start == prev.start + window - overlap
            assert w.prefix == overlap
            assert prev.start + prev.length == w.start + w.prefix  # the prefix is the previous window's tail
            assert w.length > w.prefix  # every window generates something new
        new_frames += range(w.start + w.prefix, w.start + w.length)
    assert new_frames == list(range(latent))  # every frame is generated exactly once, in order
    if latent > window:  # diffusers' window count for long videos
        assert len(ws) == 1 + (latent - window - 1) // (window - overlap) + 1
    else:
        assert len(ws) == 1


@PROPS
@given(df_geometry(), st.sampled_from(["off", "paper", "causal"]))
def test_df_every_frame_takes_every_step_once_in_order(geom, selective):
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(latent, window, steps, ar_step=ar, block=block, overlap=overlap, selective=selective)
    its = list(plan.iterations())
    assert plan.num_iterations() == len(its)
    assert [it.serial for it in its] == list(range(len(its)))
    done = steps + 1
    windows = plan.windows()
    for w, rows in zip(windows, _by_window(plan)):
        assert [it.index for it in rows] == list(range(len(rows)))
        assert all(it.start == w.start and it.prefix == w.prefix and it.num_steps == steps for it in rows)
        assert all(len(it.progress) == len(it.update) == w.length for it in rows)
        assert all(it.valid == (0, w.length) for it in rows)
        prev = [done] * w.prefix + [0] * (w.length - w.prefix)
        taken = defaultdict(list)  # slot -> progress values at which it advanced
        finished = defaultdict(int)
        for it in rows:
            for j, (u, m, p) in enumerate(zip(it.progress, it.update, prev)):
                if j < w.prefix:
                    assert u == done and not m, "a clean prefix frame must never move"
                    continue
                assert u in (p, p + 1), f"slot {j} jumped from {p} to {u}"
                assert m == (u == p + 1 and u <= steps), "update must be True exactly when a step is taken"
                if m:
                    taken[j].append(u)
            for j in it.finished():
                finished[j] += 1
                assert it.progress[j] == steps and it.update[j]
            prev = list(it.progress)
        for j in range(w.prefix, w.length):
            assert taken[j] == list(range(1, steps + 1)), f"window {w.index} slot {j}"
            assert finished[j] == 1
        assert all(u >= steps for u in prev)
        # the window ends on the first row at which every frame has taken its last step
        assert [it.is_last_in_window() for it in rows] == [False] * (len(rows) - 1) + [True]


@PROPS
@given(df_geometry())
def test_df_update_mask_is_eq8(geom):
    """m_{t,j} = 1[u_{t,j} != u_{t-1,j} and u_{t,j} != N], N the terminal index (T+1 here)."""
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(latent, window, steps, ar_step=ar, block=block, overlap=overlap)
    for w, rows in zip(plan.windows(), _by_window(plan)):
        prev = [steps + 1] * w.prefix + [0] * (w.length - w.prefix)
        for it in rows:
            assert list(it.update) == [(u != p) and (u != steps + 1) for u, p in zip(it.progress, prev)]
            # frames of one causal block share their state
            for j in range(w.length):
                assert it.progress[j] == it.progress[j - j % block]
            prev = list(it.progress)


@PROPS
@given(df_geometry(), st.sampled_from(["off", "paper", "causal"]), st.sampled_from([None, 1, 2, 3, 5, 8, 100]))
@example((50, 25, 10, 5, 5, 5), "paper", 5)  # B shorter than the active span
@example((50, 25, 10, 5, 5, 5), "paper", 15)
def test_df_compute_interval(geom, selective, interval):
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(
        latent, window, steps, ar_step=ar, block=block, overlap=overlap, selective=selective, interval=interval
    )
    for w, rows in zip(plan.windows(), _by_window(plan)):
        if selective == "off":
            assert all(it.compute == (0, w.length) for it in rows)
            continue
        expected = _eq9_reference([it.update for it in rows], w.length, interval, selective)
        assert [it.compute for it in rows] == expected
        last_hi = 0
        for it in rows:
            lo, hi = it.compute
            assert 0 <= lo < hi <= w.length
            assert all(lo <= j < hi for j in it.active), f"active frame left out: {it.active} vs {it.compute}"
            assert hi >= last_hi, "e_bar must be monotone within a window"
            last_hi = hi
            if selective == "causal":
                assert lo == it.active[0] and hi == it.active[-1] + 1
            # exactness: what the forward leaves out is clean (before) or not started (after)
            assert all(u == steps + 1 for u in it.progress[:lo])
            assert all(u == 0 for u in it.progress[hi:])
            assert it.context == range(w.start, w.start + lo)


@PROPS
@given(df_geometry())
def test_df_paper_interval_without_B_is_prefix_to_e_bar(geom):
    """With B = the window (the default), Eq. 9 reduces to [0, e_bar): selective 'paper' only trims the tail."""
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(latent, window, steps, ar_step=ar, block=block, overlap=overlap, selective="paper")
    for it in plan.iterations():
        assert it.compute[0] == 0 and it.compute[1] > max(it.active)


def test_df_small_staircase_by_hand():
    """4 frames, blocks of 1, T=3, ar_step=1: the diffusion forcing staircase written out."""
    plan = DiffusionForcingPlan(4, 4, 3, ar_step=1, block=1, selective="causal")
    rows = [(it.progress, it.update, it.compute) for it in plan.iterations()]
    T, F = True, False
    assert rows == [
        ((1, 0, 0, 0), (T, F, F, F), (0, 1)),
        ((2, 1, 0, 0), (T, T, F, F), (0, 2)),
        ((3, 2, 1, 0), (T, T, T, F), (0, 3)),
        ((4, 3, 2, 1), (F, T, T, T), (1, 4)),
        ((4, 4, 3, 2), (F, F, T, T), (2, 4)),
        ((4, 4, 4, 3), (F, F, F, T), (3, 4)),
    ]
    assert plan.num_iterations() == 6


# ----------------------------------------------------------------------------- diffusers cross-check


def _load_generate_timestep_matrix():
    """diffusers' SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix, unbound (it never uses
    `self`). Importing the pipeline module pulls in transformers (~9 s), so the method is compiled
    from the installed diffusers source on its own; the import is the fallback."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("diffusers is not installed")
    path = Path(spec.submodule_search_locations[0], "pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py")
    try:
        tree = ast.parse(path.read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SkyReelsV2DiffusionForcingPipeline")
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "generate_timestep_matrix")
        fn.decorator_list = []
        namespace = {"torch": torch, "math": math}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
        return namespace["generate_timestep_matrix"]
    except (OSError, SyntaxError, StopIteration, NameError):
        from diffusers import SkyReelsV2DiffusionForcingPipeline

        return SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix


@pytest.fixture(scope="module")
def diffusers_matrix():
    fn = _load_generate_timestep_matrix()

    def call(frames, steps, ar_step, pre_ready, block):
        template = torch.arange(steps, 0, -1, dtype=torch.int64) * (1000 // max(steps, 1))
        _, step_index, mask, valid = fn(
            None, frames, template, frames, ar_step=ar_step, num_pre_ready=pre_ready, causal_block_size=block
        )
        return step_index.tolist(), mask.tolist(), [tuple(v) for v in valid]

    return call


def _compare_with_diffusers(call, plan):
    compared = 0
    for w, rows in zip(plan.windows(), _by_window(plan)):
        if w.length % plan.block:  # diffusers floors to whole blocks; only compare what it can express
            continue
        index, mask, valid = call(w.length, plan.num_steps, plan.ar_step, w.prefix, plan.block)
        assert [list(it.progress) for it in rows] == index, f"progress != step_index in window {w.index}"
        assert [list(it.update) for it in rows] == mask, f"update != step_update_mask in window {w.index}"
        assert [it.valid for it in rows] == valid, f"valid != valid_interval in window {w.index}"
        compared += 1
    return compared


@PROPS
@given(df_geometry(max_blocks=5, max_steps=10))
@example((25, 25, 10, 0, 1, 0))  # synchronous
@example((25, 25, 10, 0, 5, 0))  # synchronous, blocks of 5
@example((65, 25, 10, 3, 5, 5))  # asynchronous with overlap prefix, three full windows
@example((45, 15, 12, 2, 3, 6))  # asynchronous, prefix of two blocks
def test_df_matches_diffusers(diffusers_matrix, geom):
    latent, window, steps, ar, block, overlap = geom
    plan = DiffusionForcingPlan(latent, window, steps, ar_step=ar, block=block, overlap=overlap)
    _compare_with_diffusers(diffusers_matrix, plan)


def test_df_matches_diffusers_with_prefix(diffusers_matrix):
    """Deterministic: windows after the first carry num_pre_ready = overlap, block > 1, sync and async."""
    for ar in (0, 1, 5):
        plan = DiffusionForcingPlan(65, 25, 12, ar_step=ar, block=5, overlap=10)
        assert [w.prefix for w in plan.windows()] == [0, 10, 10, 10]
        assert _compare_with_diffusers(diffusers_matrix, plan) == 4


# ----------------------------------------------------------------------------- the size


def test_df_skyreels_737_frames_plans_fast():
    """737 video frames = 185 latent frames; base 97 frames = 25 latent; overlap 17 frames = 5 latent."""
    plan = DiffusionForcingPlan(185, 25, 50, ar_step=5, block=5, overlap=5, selective="paper")
    t0 = time.perf_counter()
    its = list(plan.iterations())
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"planning took {elapsed:.3f} s"
    ws = plan.windows()
    assert len(ws) == 9 and ws[-1].start + ws[-1].length == 185
    # first window: 5 blocks, the last starts 4*5 iterations late; later windows: 4 new blocks
    assert len(its) == (50 + 4 * 5) + 8 * (50 + 3 * 5) == plan.num_iterations()


# ----------------------------------------------------------------------------- chunk-causal (MAGI-1)


def _magi_sequences(chunk_num, window_size):
    """MAGI-1's per-stage chunk range (generate_sequences with chunk_offset=0): at stage s the window
    holds chunks [max(0, s - W + 1), min(C, s + 1)); there are C + W - 1 stages."""
    stages = range(chunk_num + window_size - 1)
    return [(max(0, s - window_size + 1), min(chunk_num, s + 1)) for s in stages]


@st.composite
def magi_geometry(draw):
    chunk = draw(st.integers(1, 4))
    window_chunks = draw(st.integers(1, 5))
    steps_per_stage = draw(st.integers(1, 4))
    latent = draw(st.integers(1, 8 * chunk + 3))
    context_chunks = draw(st.integers(0, 5))
    return latent, chunk, window_chunks, steps_per_stage * window_chunks, context_chunks


@PROPS
@given(magi_geometry())
@example((24, 6, 4, 64, 4))  # the paper's MAGI-1 distill geometry, 4 chunks
@example((8, 6, 4, 8, 4))  # fewer chunks than the window, a partial last chunk
def test_chunk_causal_pipeline(geom):
    latent, chunk, wc, steps, ctx_chunks = geom
    plan = ChunkCausalPlan(latent, chunk, wc, steps, context_chunks=ctx_chunks)
    sps = plan.steps_per_stage
    n_chunks = -(-latent // chunk)
    its = list(plan.iterations())
    # MAGI-1: total forwards = steps_per_stage * (chunk_num + window_size - 1)
    assert len(its) == plan.num_iterations() == sps * (n_chunks + wc - 1)
    assert [it.index for it in its] == [it.serial for it in its] == list(range(len(its)))
    seqs = _magi_sequences(n_chunks, wc)
    steps_taken = defaultdict(list)
    for i, it in enumerate(its):
        n = len(it.progress)
        assert n == len(it.update) and it.valid == it.compute == (0, n) and it.num_steps == steps
        assert it.start % chunk == 0 and it.start + n <= latent
        first, last = it.start // chunk, -(-(it.start + n) // chunk)
        assert (first, last) == seqs[i // sps], f"iteration {i}: chunks [{first}, {last}) vs MAGI-1 {seqs[i // sps]}"
        assert last - first <= wc, "more chunks than the window holds"
        assert all(it.update), "every chunk in the window advances"
        for f, u in zip(it.frames, it.progress):
            c = f // chunk
            assert u == i - c * sps + 1, "chunk c starts steps_per_stage iterations after chunk c-1"
            steps_taken[f].append(u)
        # the window ends at a chunk boundary or the video's end
        assert (it.start + n) % chunk == 0 or it.start + n == latent
        # clean context from the KV cache: up to context_chunks finished chunks right before the window
        assert it.context_start == max(0, it.start - ctx_chunks * chunk)
        assert 0 <= it.context_start <= it.start and it.start - it.context_start <= ctx_chunks * chunk
        for f in it.context:
            assert i >= (f // chunk) * sps + steps, f"context frame {f} is not clean at iteration {i}"
    assert sorted(steps_taken) == list(range(latent))
    assert all(v == list(range(1, steps + 1)) for v in steps_taken.values()), "each chunk takes all T steps in order"
    first_iter = {c: min(i for i, it in enumerate(its) if it.start <= c * chunk < it.start + len(it.progress)) for c in range(n_chunks)}
    assert [first_iter[c] for c in range(n_chunks)] == [c * sps for c in range(n_chunks)]


def test_chunk_causal_paper_magi1_count():
    """240 frames -> 60 latent frames -> 10 chunks of 6; 64 steps, window 4: 16 * (10 + 3) forwards."""
    plan = ChunkCausalPlan(60, 6, 4, 64)
    assert plan.steps_per_stage == 16 and plan.num_chunks == 10
    assert plan.num_iterations() == 16 * 13 == sum(1 for _ in plan.iterations())


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(latent_frames=50, window=10, num_steps=10, block=3), "causal_block_size"),
        (dict(latent_frames=50, window=10, num_steps=10, overlap=10), "overlap_history"),
        (dict(latent_frames=50, window=10, num_steps=10, overlap=12), "overlap_history"),
        (dict(latent_frames=50, window=10, num_steps=10, overlap=-1), "overlap_history"),
        (dict(latent_frames=50, window=10, num_steps=10, block=5, overlap=3), "overlap_history"),
        (dict(latent_frames=50, window=10, num_steps=10, ar_step=-1), "ar_step"),
        (dict(latent_frames=50, window=10, num_steps=0), "steps"),
        (dict(latent_frames=0, window=10, num_steps=10), "frames"),
        (dict(latent_frames=50, window=0, num_steps=10), "window"),
        (dict(latent_frames=50, window=10, num_steps=10, block=0), "causal_block_size"),
        (dict(latent_frames=50, window=10, num_steps=10, selective="yes"), "selective"),
        (dict(latent_frames=50, window=10, num_steps=10, interval=0), "interval"),
    ],
)
def test_df_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DiffusionForcingPlan(**kwargs)
    assert str(e.value).startswith(field + ":"), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(latent_frames=24, chunk=6, window_chunks=4, num_steps=10), "steps"),
        (dict(latent_frames=24, chunk=6, window_chunks=4, num_steps=0), "steps"),
        (dict(latent_frames=24, chunk=0, window_chunks=4, num_steps=8), "chunk_width"),
        (dict(latent_frames=24, chunk=6, window_chunks=0, num_steps=8), "window_size"),
        (dict(latent_frames=0, chunk=6, window_chunks=4, num_steps=8), "frames"),
        (dict(latent_frames=24, chunk=6, window_chunks=4, num_steps=8, context_chunks=-1), "context_chunks"),
    ],
)
def test_chunk_causal_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ChunkCausalPlan(**kwargs)
    assert str(e.value).startswith(field + ":"), str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))
def test_chunk_causal_rows_equal_the_full_staircase(latent, chunk, wc, sps):
    """The chunk-causal plan computes each row in closed form over the window only (constant memory per
    row); it must equal the SkyReels-style staircase built over every chunk of the video."""
    from scopevid.scheduler.schedules import staircase, update_masks

    steps = wc * sps
    plan = ChunkCausalPlan(latent, chunk, wc, steps)
    rows = staircase(plan.num_chunks, steps, sps)
    masks = update_masks(rows, steps)
    its = list(plan.iterations())
    assert len(its) == len(rows) == plan.num_iterations()
    for it, row, mask in zip(its, rows, masks):
        act = [c for c, m in enumerate(mask) if m]
        lo, hi = act[0], act[-1] + 1
        n = min(hi * chunk, latent) - lo * chunk
        assert it.start == lo * chunk
        assert it.progress == tuple(u for u in row[lo:hi] for _ in range(chunk))[:n]
        assert it.update == tuple(m for m in mask[lo:hi] for _ in range(chunk))[:n]
