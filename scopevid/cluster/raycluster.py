"""Small Ray cluster utilities for launch.sh, tests and benchmarks.

    python -m scopevid.cluster.raycluster ports 9              # nine free TCP ports on 127.0.0.1
    python -m scopevid.cluster.raycluster wait HOST:PORT --nodes 4 --timeout 300

`LocalHead` starts a real `ray start --head --block` on one machine with every port chosen free and
a private temp dir, in its own session, and stops exactly what it started (never `ray stop`, which
stops every Ray process of the machine, including other users' clusters).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_nodes(address: str, nodes: int, timeout: float = 300.0, quiet: bool = False) -> int:
    """Block until the cluster at address has `nodes` alive nodes; returns how many there are."""
    import ray

    deadline = time.monotonic() + timeout
    last_err = None
    while True:  # the GCS may not answer yet
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except Exception as e:  # ConnectionError, RuntimeError, ... while the head starts
            last_err = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray cluster answered at {address} within {timeout:g} s ({last_err})") from None
            time.sleep(1.0)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                if not quiet:
                    print(f"ray cluster at {address}: {alive} node(s) alive", flush=True)
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray cluster at {address}: {alive} of {nodes} node(s) joined within {timeout:g} s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.getsid(int(p)) != sid:
                continue
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                out.append(int(p))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            pass
    return out


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (e.g. a private Ray temp dir)."""
    out = []
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    with open(f"/proc/{p}/stat") as f2:
                        if f2.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(p))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def kill_tree(text: str) -> int:
    """SIGKILL every live process whose command line mentions `text` (a job's private Ray temp dir: its
    head, raylet, GCS) and every descendant of them (Ray workers rename themselves, e.g.
    `ray::RankWorker`, so their command line no longer says whose they are). The tree is read before
    any kill, while the workers still have their raylet as parent. Returns how many were killed."""
    parent: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    victims = set(pids_mentioning(text))
    grew = True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in victims} - victims - {os.getpid()}
        victims |= more
        grew = bool(more)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(victims)


class LocalHead:
    """A single-node Ray cluster on 127.0.0.1 for tests: start(), .address, .dashboard, stop()."""

    def __init__(self, temp_dir: str | Path, *, num_cpus: int = 2, object_store_mb: int = 100,
                 env: dict | None = None, python_bin: str | None = None):
        self.temp_dir = Path(temp_dir)
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.env = dict(os.environ if env is None else env)
        bindir = python_bin or str(Path(sys.executable).parent)
        self.ray = str(Path(bindir) / "ray")
        self.proc: subprocess.Popen | None = None
        self.port = self.dashboard_port = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 90.0) -> "LocalHead":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        p = free_ports(10)
        self.port, self.dashboard_port = p[0], p[1]
        cmd = [
            self.ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={p[0]}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={p[1]}",
            f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
            f"--runtime-env-agent-port={p[4]}", f"--metrics-export-port={p[5]}", f"--object-manager-port={p[6]}",
            f"--node-manager-port={p[7]}", f"--ray-client-server-port={p[8]}", f"--num-cpus={self.num_cpus}",
            "--num-gpus=0", f"--object-store-memory={self.object_store_mb * 2**20}", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        self.log = open(self.temp_dir / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: "
                                   + (self.temp_dir / "ray-start.log").read_text(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ray head not ready within {timeout:g} s")
            time.sleep(0.3)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM `ray start --block` (it stops its children), then SIGKILL whatever of this cluster is
        left: its session, and any process naming its private temp dir (workers started by the raylet)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (session_pids(sid) or pids_mentioning(str(self.temp_dir))):
            time.sleep(0.2)
        for pid in set(session_pids(sid)) | set(pids_mentioning(str(self.temp_dir))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        self.proc = None

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def exec_worker(address: str, *, num_cpus: int | None = None, temp_dir: str | None = None,
                node_ip: str | None = None) -> None:
    """Replace this process by a Ray worker node joining `address`. Every port is chosen free on this
    node, so several jobs' Ray nodes can share a machine (Ray's defaults, e.g. 52365, would collide)."""
    p = free_ports(6, "0.0.0.0")
    ray = str(Path(sys.executable).parent / "ray")
    if not os.access(ray, os.X_OK):
        ray = "ray"
    cmd = [ray, "start", "--block", f"--address={address}", f"--dashboard-agent-listen-port={p[0]}",
           f"--dashboard-agent-grpc-port={p[1]}", f"--runtime-env-agent-port={p[2]}", f"--metrics-export-port={p[3]}",
           f"--object-manager-port={p[4]}", f"--node-manager-port={p[5]}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scopevid.cluster.raycluster")
    sub = p.add_subparsers(dest="cmd", required=True)
    ports = sub.add_parser("ports", help="print N free TCP ports")
    ports.add_argument("n", type=int)
    ports.add_argument("--host", default="127.0.0.1")
    worker = sub.add_parser("worker", help="exec `ray start --block --address=ADDRESS` with every port chosen free")
    worker.add_argument("address")
    worker.add_argument("--num-cpus", type=int)
    worker.add_argument("--temp-dir")
    worker.add_argument("--node-ip-address")
    kill = sub.add_parser("kill", help="SIGKILL the processes mentioning TEXT (a private Ray temp dir) and their descendants")
    kill.add_argument("text")
    wait = sub.add_parser("wait", help="wait until a Ray cluster has N alive nodes")
    wait.add_argument("address")
    wait.add_argument("--nodes", type=int, default=1)
    wait.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.cmd == "ports":
        print(" ".join(map(str, free_ports(args.n, args.host))))
        return 0
    if args.cmd == "kill":
        kill_tree(args.text)
        return 0
    if args.cmd == "worker":
        exec_worker(args.address, num_cpus=args.num_cpus, temp_dir=args.temp_dir, node_ip=args.node_ip_address)
    try:
        wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as e:
        print(f"raycluster wait: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
