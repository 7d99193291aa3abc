"""One rank of a one-video Ray job (`RankWorker`, wrapped with ray.remote by cluster.video_job): it
joins the job's process group, runs the rank's rollout with a Checkpointer (resume, progress to the
board, stop requests) and reports its timings and peak memory."""

from __future__ import annotations

import os
import socket
import time


class RankWorker:
    """One rank: a Ray actor (the driver wraps this class with ray.remote)."""

    def __init__(self, rank: int, world: int, threads: int, device: str):
        import torch

        self.rank, self.world, self.device = rank, world, device
        torch.set_num_threads(max(1, int(threads)))
        self.threads = torch.get_num_threads()

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "threads": self.threads,
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def endpoint(self) -> tuple[str, int]:
        """Rank 0: the address the others reach it at and a port free right now."""
        import ray

        from scopevid.cluster.groups import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def run(self, cfg, out: str, master: tuple[str, int], *, resume: bool, checkpoint_every: int,
            checkpoint_seconds: float, dist_timeout_s: float, board=None) -> dict:
        import resource

        import torch

        import ray

        from scopevid.cluster.progress import Reporter, StopPoll
        from scopevid.cluster.worker import run_rank
        from scopevid.engine.checkpoint import Checkpointer

        t0 = time.perf_counter()
        reporter = Reporter(board.report.remote, cfg.frames) if (self.rank == 0 and board is not None) else None
        stop = None
        if board is not None:
            stop = StopPoll(board.stop_requested.remote,
                            lambda ref: ray.get(ref) if ray.wait([ref], timeout=0)[0] else None)
        ckpt = Checkpointer(out, resume=resume, every=checkpoint_every, min_seconds=checkpoint_seconds,
                            on_iteration=reporter, stop_requested=stop)
        # the driver prepared the output directory; the checkpointer owns it from here (overwrite=True)
        summary = run_rank(cfg, out, self.rank, self.world, master[0], int(master[1]),
                           local_rank=0 if self.device == "cuda" else self.rank,  # Ray shows a GPU actor its GPU as 0
                           timeout_s=dist_timeout_s, threads=self.threads, overwrite=True, progress=False,
                           checkpoint=ckpt)
        res = {
            "rank": self.rank,
            "pid": os.getpid(),
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "resumed_from": ckpt.restored_serial if resume else None,
            "checkpoints": ckpt.saves,
        }
        if torch.cuda.is_available() and self.device == "cuda":
            res["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        if self.rank == 0:
            res["summary"] = summary
        return res
