"""Weights read once per node: one rank of each node loads every network, the others receive its tensors.

Cold start of a multi-GPU job is dominated by every rank reading the same checkpoint at once (N ranks, N
copies through one node's filesystem client: SkyReels-V2 users report 15-20 minutes before the first step).
Here the node's first rank (its leader) runs the adapter's loader; the node's other ranks build the same
module tree on the meta device and receive every parameter and buffer by broadcast over the node's process
group (gloo on CPU; nccl between the GPUs of a node, which is NVLink where there is one). The followers end
with the leader's tensors, dtypes and ties exactly, whatever the loader did, and read no weight file.

Which ranks share a node: ParallelState.node (cluster.groups.node_group: the host name, unless SCOPEVID_NODE
says otherwise). The leader's failure to load (a missing file, a damaged checkpoint) reaches its followers
as the same one-line error instead of a wait for the collective timeout.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from scopevid import errors
from scopevid.adapters.weights import WeightStats
from scopevid.cluster.groups import Group


class NodeShared:
    """adapters.weights.WeightSource for one rank of a node group (`group`: the ranks of this node, its
    leader rank 0). A node of one rank reads the files itself."""

    def __init__(self, group: Group):
        self.group = group
        self.leader = group.rank == 0
        self.stats = WeightStats()

    def module(self, name, load, skeleton, files):
        t0 = time.perf_counter()
        try:
            if self.group.world == 1:
                return self._read(load, files)
            return self._lead(name, load, files) if self.leader else self._follow(name, skeleton)
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def _read(self, load, files):
        m = load()
        self.stats.files_read += len(files)
        self.stats.bytes_read += sum(Path(f).stat().st_size for f in files)
        return m

    def _lead(self, name, load, files):
        import torch.distributed as dist

        try:
            m = self._read(load, files)
        except Exception as e:  # the followers are waiting for the header: tell them, then fail here too
            kind = type(e).__name__ if isinstance(e, errors.ScopevidError) else "CheckpointError"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self._announce(("error", kind, first if isinstance(e, errors.ScopevidError) else f"{name}: the node's first rank "
                            f"could not load it ({type(e).__name__}: {first})"))
            raise
        tensors = _tensors(m)
        self._announce(("ok", [(n, kind, tuple(t.shape), t.dtype, t.device.type) for n, kind, t in tensors]))
        with self.group.collective(f"broadcast of the {name} weights to this node's ranks"):
            for _, _, t in tensors:
                buf = t.detach().to(self.group.device).contiguous()
                dist.broadcast(buf, self.group.global_rank(0), group=self.group.pg)
        return m

    def _follow(self, name, skeleton):
        import torch.distributed as dist

        head = self._announce(None)
        if head[0] == "error":
            cls = getattr(errors, head[1], errors.ScopevidError)
            raise cls(head[2])
        m = skeleton()
        slots = _slots(m)
        with self.group.collective(f"receiving the {name} weights from this node's first rank"):
            for n, kind, shape, dtype, where in head[1]:
                buf = torch.empty(shape, dtype=dtype, device=self.group.device)
                dist.broadcast(buf, self.group.global_rank(0), group=self.group.pg)
                t = buf if where != "cpu" else buf.cpu()
                self.stats.bytes_received += t.numel() * t.element_size()
                _place(slots, n, kind, t, name)
        left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
        if left:
            raise errors.CheckpointError(f"{name}: {left[0]} was not received from this node's first rank "
                                         "(the loaded module and its skeleton differ)")
        return m

    def _announce(self, head):
        """The leader's header (ok + tensor list, or its error) to every rank of the node."""
        from scopevid.cluster import consensus

        return consensus.gather_objects(self.group, head, "weights header from this node's first rank")[0]


def _tensors(m: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """Every distinct parameter and buffer, in module order (a tied tensor once, under its first name)."""
    return [(n, "param", p) for n, p in m.named_parameters()] + [(n, "buffer", b) for n, b in m.named_buffers()]


def _slots(m: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Module, str]]]:
    """name -> every (module, attribute) holding that tensor in the skeleton: ties share one entry."""
    by_id: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for _, mod in m.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for leaf, t in store.items():
                if t is not None:
                    by_id.setdefault(id(t), []).append((mod, leaf))
    named = {n: id(t) for n, t in [*m.named_parameters(), *m.named_buffers()]}
    return {n: by_id[i] for n, i in named.items()}


def _place(slots, name: str, kind: str, t: torch.Tensor, what: str) -> None:
    if name not in slots:
        raise errors.CheckpointError(f"{what}: the first rank's {name} has no place in this rank's module tree")
    value = torch.nn.Parameter(t, requires_grad=False) if kind == "param" else t
    for mod, leaf in slots[name]:
        (mod._parameters if kind == "param" else mod._buffers)[leaf] = value
