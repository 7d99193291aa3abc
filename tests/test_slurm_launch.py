"""`sbatch launch.sh CONFIG ...` to completion under a real single-node Slurm (Debian's slurm-wlm + munge).

The test brings up its own cluster in a temp dir (the recipe of docs/cluster.md), isolated from anything else
on the machine: its own munged on a private socket (AuthInfo=socket=...), slurmctld / slurmd on free
ports, SLURM_CONF pointing at the temp dir (never /etc/slurm). Everything it started is stopped by PID
in `finally`, and the Ray processes of the job are checked to be gone. Skipped, saying why, when the
Slurm or munge binaries are absent (scripts/install_system_deps.sh installs them) or not running as root
(slurmd must be root to start jobs as their users).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SLURM_BINS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def _skip_reason() -> str | None:
    missing = [b for b in (*SLURM_BINS, "munged", "munge") if _which(b) is None]
    if missing:
        return (f"Slurm/munge binaries absent ({', '.join(missing)}): "
                "run scripts/install_system_deps.sh (apt-get install slurm-wlm munge) as root")
    if os.geteuid() != 0:
        return "not root: slurmd must run as root to launch the batch job"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is stopped
    except FileNotFoundError:
        return False


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(proc.pid):
        time.sleep(0.1)
    if _alive(proc.pid):
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Slurm:
    """slurmctld + slurmd + munged in a temp dir; `sbatch`, `state`, `stop`."""

    def __init__(self, root: Path, nodes: int = 1):
        from scopevid.cluster.raycluster import free_ports

        self.root = root
        # one machine; nodes > 1 runs one slurmd per node name (NodeHostname=localhost, own port)
        self.names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        d = root
        for sub in ("spool/ctld", "spool/d", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # the munge user must reach its socket directory
        sock_dir, key_dir = d / "munge", d / "mkey"
        sock_dir.mkdir(mode=0o755)
        key_dir.mkdir(mode=0o700)
        shutil.chown(sock_dir, "munge", "munge")
        shutil.chown(key_dir, "munge", "munge")
        self.socket = sock_dir / "munge.sock"
        key = key_dir / "munge.key"
        if Path("/etc/munge/munge.key").is_file():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            key.write_bytes(os.urandom(128))
        os.chmod(key, 0o600)
        shutil.chown(key, "munge", "munge")
        self.key_dir = key_dir
        ctld_port, d_port, *node_ports = free_ports(2 + nodes)
        cpus = max(2, os.cpu_count() or 2)
        if nodes == 1:
            node_lines = [f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN"]
        else:
            node_lines = [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                          "RealMemory=1000 State=UNKNOWN" for n, p in zip(self.names, node_ports)]
            for n in self.names:
                (d / "spool" / f"d-{n}").mkdir(parents=True)
        per_node = "-%n" if nodes > 1 else ""
        self.conf = d / "slurm.conf"
        self.conf.write_text("\n".join([
            f"ClusterName=sv{os.getpid() % 100000}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "MailProg=/bin/true",
            f"StateSaveLocation={d}/spool/ctld",
            f"SlurmdSpoolDir={d}/spool/d{per_node}",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd{per_node}.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd{per_node}.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "MpiDefault=none",
            "ReturnToService=2",
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.logs.append(log)
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def start(self, timeout: float = 30.0) -> "Slurm":
        k = self.key_dir
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.socket}", f"--key-file={k}/munge.key",
                               f"--pid-file={self.socket.parent}/munged.pid", f"--log-file={k}/munged.log",
                               f"--seed-file={k}/munged.seed"], user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + timeout
        while subprocess.run([_which("munge"), "-n", "-S", str(self.socket)], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "munged did not start: " + self.log("munged")
            time.sleep(0.1)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        for n in self.names:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n])
        while self.run("sinfo", "-h", "-o", "%t %D").stdout.strip() != f"idle {len(self.names)}":
            assert time.monotonic() < deadline, "slurm not idle: " + self.log("slurmctld") + self.log(f"slurmd-{n}")
            time.sleep(0.2)
        return self

    def run(self, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=env or self.env, capture_output=True, text=True, timeout=30)

    def log(self, name: str) -> str:
        p = self.root / "log" / f"{name}.out"
        return f"\n--- {name} ---\n" + (p.read_text(errors="replace")[-2000:] if p.exists() else "(none)")

    def job(self, jid: str) -> dict:
        out = self.run("scontrol", "show", "job", jid, "-o").stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            _stop(p)
        for log in self.logs:
            log.close()


@pytest.fixture
def slurm(request):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="svslurm", dir="/tmp"))  # short: sockets and Ray's temp dir live here
    cluster = Slurm(root, nodes=getattr(request, "param", 1))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def submit(slurm: Slurm, tmp_path: Path, sbatch_args: list[str], driver_args: list[str], env_extra: dict,
           frames: int) -> tuple[str, Path]:
    """sbatch launch.sh with a tiny config; returns (job id, its log)."""
    cfg = write_tiny_config(tmp_path, frames=frames)
    env = {k: v for k, v in slurm.env.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(
        SCOPEVID_PYTHON=sys.executable,
        SCOPEVID_HEAD_IP="127.0.0.1",
        SCOPEVID_RAY_TMP=str(slurm.root / "ray"),
        SCOPEVID_OBJECT_STORE_BYTES=str(100 * 2**20),
        SCOPEVID_DIST_TIMEOUT="60",
        SCOPEVID_JOIN_TIMEOUT="90",
        **env_extra,
    )  # no RAY_AUTH_MODE: launch.sh's default, token auth with a per-job token
    log = slurm.root / "job.log"
    r = slurm.run("sbatch", "--parsable", *sbatch_args, f"--output={log}", f"--chdir={ROOT}", str(ROOT / "launch.sh"),
                  str(cfg), "--frames", str(frames), *driver_args, "--progress-every", "0.5", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0], log


def wait_ended(slurm: Slurm, jid: str, log: Path, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = slurm.job(jid).get("JobState", "?")
        if state in ENDED:
            return state
        assert time.monotonic() < deadline, f"job {jid} still {state} after {timeout:g} s" + _tail(log)
        time.sleep(0.3)


def submit_and_wait(slurm: Slurm, tmp_path: Path, sbatch_args: list[str], driver_args: list[str], env_extra: dict,
                    frames: int) -> tuple[str, Path]:
    """sbatch launch.sh with a tiny config, wait for the job to end, check it COMPLETED; returns its log."""
    jid, log = submit(slurm, tmp_path, sbatch_args, driver_args, env_extra, frames)
    try:
        state = wait_ended(slurm, jid, log)
        info = slurm.job(jid)
        assert state == "COMPLETED" and info.get("ExitCode") == "0:0", f"{state} {info.get('ExitCode')}" + _tail(log)
    finally:
        slurm.run("scancel", jid)
        leftovers = _reap(slurm.root / "ray")
    assert not leftovers, f"Ray processes of the job survived launch.sh's teardown: {leftovers}"
    text = log.read_text(errors="replace")
    assert "[scopevid driver] done:" in text and "tearing down" in text, _tail(log)
    return text, log


def check_outputs(out: Path, frames: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_reader(str(out / "video.mp4")) as rd:
        assert sum(1 for _ in rd) == frames
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "complete" and job["world_size"] == 2


def test_sbatch_launch_sh_runs_to_completion(slurm, tmp_path):
    out = tmp_path / "job"
    text, log = submit_and_wait(slurm, tmp_path, ["-N1", "-c2"], ["--world-size", "2", "--out", str(out)],
                                {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},  # one node: Ray's address stays 127.0.0.1
                                frames=16)
    assert "launch.sh: slurm, 1 node(s)" in text and "1 node(s) alive" in text, _tail(log)
    check_outputs(out, 16)


@pytest.mark.parametrize("slurm", [2], indirect=True)
def test_sbatch_two_nodes_head_and_srun_worker(slurm, tmp_path):
    """Two Slurm nodes on this machine (one slurmd each): the head on the first, a Ray worker node started
    by srun on the second; STRICT_SPREAD puts the two ranks on different Ray nodes."""
    out = tmp_path / "job"
    text, log = submit_and_wait(slurm, tmp_path, ["-N2", "-c1"],
                                ["--world-size", "2", "--placement", "STRICT_SPREAD", "--out", str(out)], {}, frames=12)
    assert "launch.sh: slurm, 2 node(s) [n1 n2]" in text and "2 node(s) alive" in text, _tail(log)
    check_outputs(out, 12)


def test_scancel_ends_the_job_within_seconds_with_one_line(slurm, tmp_path):
    """`scancel` of a running job: the driver stops its ranks, records the job as stopped and prints one
    line saying what is kept and how to resume; the job leaves squeue within 5 s, and nothing of its
    Ray cluster is left running."""
    out = tmp_path / "job"
    jid, log = submit(slurm, tmp_path, ["-N1", "-c2"], ["--world-size", "2", "--out", str(out)],
                      {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, frames=257)
    try:
        deadline = time.monotonic() + 180
        while not (out / "job.json").is_file() or json.loads((out / "job.json").read_text()).get("status") != "running" \
                or not (out / "steps.parquet").exists():
            assert time.monotonic() < deadline and slurm.job(jid).get("JobState") not in ENDED, _tail(log)
            time.sleep(0.2)
        time.sleep(1.0)  # a few iterations in
        t0 = time.monotonic()
        assert slurm.run("scancel", jid).returncode == 0
        while slurm.run("squeue", "-h", "-j", jid).stdout.strip():
            assert time.monotonic() - t0 < 30, "still in squeue after 30 s" + _tail(log)
            time.sleep(0.1)
        left = time.monotonic() - t0
    finally:
        slurm.run("scancel", jid)
        leftovers = _reap(slurm.root / "ray")
    print(f"scancel: the job left squeue after {left:.2f} s")
    assert left < 5.0, f"the cancelled job stayed in squeue for {left:.1f} s" + _tail(log)
    assert not leftovers, f"Ray processes of the job survived: {leftovers}"
    text = log.read_text(errors="replace")
    stops = [line for line in text.splitlines() if line.startswith("scopevid driver: ")]
    assert len(stops) == 1 and stops[0].startswith("scopevid driver: stopped: stopped by SIGTERM; Kept in "), _tail(log)
    assert f"Resume with: python -m scopevid.cluster.driver --resume {out}" in stops[0]
    assert "Traceback" not in text, _tail(log)
    job = json.loads((out / "job.json").read_text())
    assert (job["status"], job["error"]) == ("stopped", None) and job["stopped"].startswith("stopped by SIGTERM"), job


def test_a_cluster_too_small_for_the_job_is_one_line_with_the_fix(slurm, tmp_path):
    """sbatch's default of one CPU cannot hold two ranks of one CPU each: the job fails at once with the
    reason and the fix, instead of waiting for bundles that can never be placed."""
    out = tmp_path / "job"
    jid, log = submit(slurm, tmp_path, ["-N1", "-c1"], ["--world-size", "2", "--out", str(out)],
                      {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, frames=9)
    try:
        state = wait_ended(slurm, jid, log, timeout=120)
    finally:
        slurm.run("scancel", jid)
        leftovers = _reap(slurm.root / "ray")
    assert state == "FAILED" and not leftovers, state + _tail(log)
    errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("scopevid driver: ")]
    assert len(errors) == 1, _tail(log)
    assert errors[0].startswith("scopevid driver: error: placement: 2 ranks x 1 CPU need 2 CPU, and the Ray cluster has "
                                "1 CPU on 1 node(s) in all; submit with more CPUs (sbatch -c 2 ...)"), errors[0]
    assert "--cpus-per-rank 0.5" in errors[0]
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "failed" and job["error"] == errors[0].split("error: ", 1)[1], job


def _reap(ray_tmp: Path, wait: float = 15.0) -> list[int]:
    """Processes of this job's Ray cluster still alive after `wait` s (then killed: the test never
    leaves them behind)."""
    from scopevid.cluster.raycluster import pids_mentioning

    deadline = time.monotonic() + wait
    while pids_mentioning(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = pids_mentioning(str(ray_tmp))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _tail(path: Path) -> str:
    return "\n--- job log ---\n" + (path.read_text(errors="replace")[-3000:] if path.exists() else "(none)")
