"""The parallel mesh: the one place that knows the rank layout (pure: no processes, no torch).

A job of `world` ranks is the product dp x cfg x ring x ulysses. Ranks are numbered outermost first:

    rank = ((d * cfg + c) * ring + r) * ulysses + u

    d  dp replica   which video of a batch the rank group makes (rank groups share nothing)
    c  CFG branch   0 cond, 1 uncond, when the two guidance branches run on two rank groups
    r  ring part    which part of the sequence a rank's queries belong to (K/V pass round the ring)
    u  Ulysses rank which heads a rank attends over, after the all-to-all

The groups of one rank (global ranks, in member order):

    video    same d              every rank of one video: control flags, decision digests, the writer
    sp       same d, c           the ranks of one forward (ring x ulysses), sp index s = r * ulysses + u
    cfg      same d, r, u        the ranks holding the other guidance branch of the same shard
    ulysses  same d, c, r        the ranks one all-to-all spans
    ring     same d, c, u        the ranks the K/V blocks pass round

Shards: a forward of n frames is padded at the end to n_pad = ceil(n / S) * S frames (S = ring x
ulysses); sp index s holds the contiguous slots [s * n_pad / S, (s + 1) * n_pad / S). The ring part
of ring index r is the union of its Ulysses group's shards: [r * U * per, (r + 1) * U * per).

`MeshLayout.resolve` is the one validation of a mesh, used by every entry point (generate on one
process or many, batch, plan, the Ray driver, bench): each bad value is one ConfigError line naming
the allowed values or the meshes that fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from scopevid.config import CFG_MODES, ParallelConfig
from scopevid.errors import ConfigError

AXES = ("dp", "cfg", "ring", "ulysses")  # outermost first: the rank order and the label order
GROUPS = ("video", "sp", "cfg", "ulysses", "ring")
BRANCHES = ("cond", "uncond")
PROPOSALS = 4  # meshes named in an error message


class Coords(NamedTuple):
    d: int
    c: int
    r: int
    u: int


def shard_layout(n: int, ranks: int, index: int) -> tuple[int, tuple[int, int]]:
    """(padded length, [lo, hi) of sequence rank `index`) for n frames over `ranks` sequence ranks."""
    per = -(-n // ranks) if n > 0 else 0
    return per * ranks, (index * per, (index + 1) * per)


@dataclass(frozen=True)
class MeshLayout:
    """A validated mesh (every axis set): the answer to every layout question, for any rank."""

    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    cfg_mode: str = "sequential"

    # --- construction and validation -------------------------------------------------------------
    @classmethod
    def resolve(cls, parallel: ParallelConfig, world: int, *, heads: tuple[int, ...] = (), guided: bool | None = None,
                batch: bool = False) -> "MeshLayout":
        """The mesh `parallel` asks for on `world` ranks (ulysses: what the other axes leave when unset),
        checked: every field in range, the product equal to the world, Ulysses dividing every head
        count in `heads`, cfg=2 only with two guidance branches (`guided`, when known), dp > 1 only in a
        batch. A ConfigError line otherwise, naming what fits."""
        parallel.check()
        if not batch and parallel.dp != 1:
            raise ConfigError("parallel.dp: rank groups for several videos at once are for batch jobs "
                              "(scopevid batch, python -m scopevid.cluster.driver --batch FILE --parallel dp=D ...); "
                              "one video uses dp=1")
        if guided is False and parallel.cfg == 2:
            raise ConfigError("parallel.cfg: 2 puts the two classifier-free guidance branches on two rank groups, and this "
                              "run has one branch (guidance <= 1, or a model without guidance); use cfg=1")
        if parallel.cfg == 2 and parallel.cfg_mode != "sequential":
            raise ConfigError(f"parallel.cfg_mode: {parallel.cfg_mode} runs both branches on one rank group; with cfg=2 "
                              "each group runs one branch: drop cfg_mode or use cfg=1")
        rest = parallel.dp * parallel.cfg * parallel.ring
        u = parallel.ulysses
        if u is None:
            u = world // rest if world % rest == 0 else 0
        fits = proposals(world, heads, guided is not False, batch)
        if u < 1 or rest * u != world:
            given = "*".join(str(getattr(parallel, a) if getattr(parallel, a) is not None else "?") for a in AXES)
            raise ConfigError(f"parallel: dp*cfg*ring*ulysses = {given} does not make the job's {world} rank(s); "
                              f"meshes that fit: {fits}")
        bad = [h for h in heads if h % u]
        if bad:
            raise ConfigError(f"parallel.ulysses: {u} ranks cannot split this model's {'/'.join(map(str, heads))} attention "
                              f"heads (Ulysses gives each rank whole heads; ring does not need it); meshes that fit "
                              f"{world} rank(s): {fits}")
        return cls(parallel.dp, parallel.cfg, parallel.ring, u, parallel.cfg_mode)

    @property
    def parallel(self) -> ParallelConfig:
        """This mesh as the config's `parallel:` section (ulysses filled in)."""
        return ParallelConfig(dp=self.dp, cfg=self.cfg, ulysses=self.ulysses, ring=self.ring, cfg_mode=self.cfg_mode)

    def group_mesh(self) -> "MeshLayout":
        """The mesh of one rank group (dp = 1): what one video's ranks run."""
        return replace(self, dp=1)

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.dp * self.cfg * self.ring * self.ulysses

    @property
    def seq(self) -> int:
        """Ranks one forward's sequence is split over (ring x ulysses)."""
        return self.ring * self.ulysses

    @property
    def video_world(self) -> int:
        """Ranks of one video (cfg x ring x ulysses)."""
        return self.cfg * self.seq

    @property
    def label(self) -> str:
        """The canonical name, what --parallel reads back: axes of size > 1 outermost first, e.g.
        'dp=2,cfg=2' or 'ring=2,ulysses=2'; '1' for one process."""
        parts = [f"{a}={getattr(self, a)}" for a in AXES if getattr(self, a) != 1]
        if self.cfg_mode != "sequential":
            parts.append(f"cfg_mode={self.cfg_mode}")
        return ",".join(parts) or "1"

    # --- one rank --------------------------------------------------------------------------------
    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is not in a mesh of {self.world}")
        rest, u = divmod(rank, self.ulysses)
        rest, r = divmod(rest, self.ring)
        d, c = divmod(rest, self.cfg)
        return Coords(d, c, r, u)

    def rank_of(self, d: int = 0, c: int = 0, r: int = 0, u: int = 0) -> int:
        return ((d * self.cfg + c) * self.ring + r) * self.ulysses + u

    def replica(self, rank: int) -> int:
        """Which dp replica (rank group of a batch) the rank belongs to."""
        return self.coords(rank).d

    def branch(self, rank: int) -> str | None:
        """The guidance branch the rank computes ('cond' / 'uncond'), None when its group runs both."""
        return BRANCHES[self.coords(rank).c] if self.cfg == 2 else None

    def video_rank(self, rank: int) -> int:
        """The rank's index among its video's ranks (0 writes the outputs)."""
        return rank - self.rank_of(self.coords(rank).d)

    def sp_rank(self, rank: int) -> int:
        """The rank's index among the ranks of its forward (its shard)."""
        x = self.coords(rank)
        return x.r * self.ulysses + x.u

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """The global ranks of `rank`'s group of `kind` (GROUPS), in member order."""
        d, c, r, u = self.coords(rank)
        C, R, U = range(self.cfg), range(self.ring), range(self.ulysses)
        if kind == "video":
            return tuple(self.rank_of(d, c2, r2, u2) for c2 in C for r2 in R for u2 in U)
        if kind == "sp":
            return tuple(self.rank_of(d, c, r2, u2) for r2 in R for u2 in U)
        if kind == "cfg":
            return tuple(self.rank_of(d, c2, r, u) for c2 in C)
        if kind == "ulysses":
            return tuple(self.rank_of(d, c, r, u2) for u2 in U)
        if kind == "ring":
            return tuple(self.rank_of(d, c, r2, u) for r2 in R)
        raise ValueError(f"unknown group kind {kind!r}; kinds: {', '.join(GROUPS)}")

    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of `kind`, each once, ordered by its first rank (the order new_group is called in)."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world):
            seen.setdefault(self.group(kind, rank), None)
        return sorted(seen, key=lambda g: g[0])

    def shard(self, n: int, rank: int) -> tuple[int, tuple[int, int]]:
        """(padded length, this rank's [lo, hi) slots) of a forward of n frames."""
        return shard_layout(n, self.seq, self.sp_rank(rank))

    def shard_owner(self, slot: int, n: int) -> int:
        """The sp index holding slot `slot` of a forward of n frames."""
        n_pad, _ = shard_layout(n, self.seq, 0)
        return slot // (n_pad // self.seq)

    def ring_part(self, n_pad: int, ring_index: int) -> tuple[int, int]:
        """[lo, hi) slots of a padded forward of n_pad frames whose queries ring index `ring_index`
        holds (its Ulysses group's shards, together)."""
        per = n_pad // self.seq
        return ring_index * self.ulysses * per, (ring_index + 1) * self.ulysses * per


def implied_world(p: ParallelConfig) -> int:
    """The ranks a mesh names when no job fixes them (scopevid plan, bench): ulysses unset is 1."""
    return p.dp * p.cfg * p.ring * (p.ulysses or 1)


def valid_meshes(world: int, heads: tuple[int, ...] = (), guided: bool = True, batch: bool = True) -> list[MeshLayout]:
    """Every mesh of `world` ranks this engine runs for a model with `heads` (query and K/V head
    counts): Ulysses dividing each, cfg=2 only when `guided`, dp > 1 only when `batch`."""
    out = []
    for dp in range(1, world + 1) if batch else (1,):
        for cfg in (1, 2) if guided else (1,):
            if world % (dp * cfg):
                continue
            seq = world // (dp * cfg)
            for u in range(1, seq + 1):
                if seq % u == 0 and all(h % u == 0 for h in heads):
                    out.append(MeshLayout(dp=dp, cfg=cfg, ring=seq // u, ulysses=u))
    return out


def _preference(m: MeshLayout, batch: bool) -> tuple:
    """Order of proposals: in a batch the most rank groups first (throughput), else none; then the
    CFG branches apart, then the most Ulysses (the least ring)."""
    return (-m.dp if batch else m.dp, -m.cfg, m.ring)


def proposals(world: int, heads: tuple[int, ...] = (), guided: bool = True, batch: bool = False) -> str:
    """A few meshes that fit `world` ranks, as text for an error message (or the world sizes that have one)."""
    fit = sorted(valid_meshes(world, heads, guided, batch), key=lambda m: _preference(m, batch))
    if fit:
        return ", ".join(m.label if m.label != "1" else "1 (one process)" for m in fit[:PROPOSALS])
    sizes = [w for w in range(1, 17) if valid_meshes(w, heads, guided, batch)]
    return f"none for {world} rank(s); use {', '.join(map(str, sizes))} rank(s)"


def parse(text: str) -> ParallelConfig:
    """`--parallel dp=1,cfg=2,ulysses=2` (or '1': one process) as a ParallelConfig; each key once,
    every field checked. One ConfigError line for anything else."""
    from scopevid.config import _build

    out: dict = {}
    text = str(text).strip()
    if text == "1":
        return ParallelConfig(ulysses=1)
    names = [*AXES, "cfg_mode"]
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if key not in names:
            raise ConfigError(f"--parallel: unknown key {key!r} in {part!r}; keys: {', '.join(names)} (e.g. cfg=2,ulysses=2)")
        if key in out:
            raise ConfigError(f"--parallel: {key} given twice ({text!r}); give each key once")
        if key == "cfg_mode":
            if not eq or not value:
                raise ConfigError(f"--parallel: {part!r} is not cfg_mode=MODE ({', '.join(CFG_MODES)})")
            out[key] = value
            continue
        try:
            out[key] = int(value) if eq else None
        except ValueError:
            out[key] = None
        if out[key] is None:
            raise ConfigError(f"--parallel: {part!r} is not KEY=INTEGER (e.g. cfg=2,ulysses=2)")
    p = _build(ParallelConfig, out, "parallel.")
    p.check()
    return p
