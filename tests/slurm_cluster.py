"""A throw-away Slurm cluster on this machine, for tests that submit the real batch scripts.

One host plays every part: ``munged`` (authentication), ``slurmctld`` (controller) and one
``slurmd -N NAME`` per compute node, each node on its own port. All state (config, spool,
logs, munge key and socket) lives under one temporary directory, so nothing in /etc is
read or written; clients find the cluster through ``SLURM_CONF``.

What the nodes advertise is a stand-in for a GPU node: ``cpus`` CPUs (more than the
machine has; ``SlurmdParameters=config_overrides`` lets slurmd accept that) and
``Gres=gpu:N`` from a gres.conf whose "devices" are links to /dev/null (22.05 drops a GPU
without ``File=``), so a batch script that asks for ``--gpus-per-node=8`` is accepted
unchanged and then runs in CPU mode.

Details that matter with Debian's slurm-wlm 22.05 (measured, not guessed):
- ``SlurmdSpoolDir`` and ``TmpFS`` contain ``%n`` (one directory per node), or the
  second node's pmix/pmi2 step fails with "File exists".
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups needed.
- No accounting daemon; ``MpiDefault=none`` (the scripts name their plugin).
- ``MinJobAge=5`` makes ``sbatch --wait`` poll every 2 s (else after 2, 10, 42 s ...).
- ``FirstJobId`` is random: MPICH names its shared-memory segment after the PMI job name,
  "<job id>.<step>" under srun, and a segment left in /dev/shm by a killed job of an
  earlier cluster with the same ids made MPI_Init fail or hang.

Stopping is by pid: the daemons this module started, and every process whose
environment carries this cluster's marker (slurmstepd and job tasks, which slurmd
starts detached from itself), SIGTERM then SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "scontrol", "srun", "munge")
MARKER = "MPIPAR_TEST_SLURM_CLUSTER"


def missing_programs() -> list[str]:
    return [p for p in DAEMONS + CLIENTS
            if not (shutil.which(p) or os.path.exists(f"/usr/sbin/{p}"))]


def ensure_installed(timeout: float = 300) -> str | None:
    """None when Slurm and munge are here (installing them with apt-get if we are root
    on a Debian-like machine); otherwise the reason they are not."""
    if not missing_programs():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (f"Slurm not installed (missing {', '.join(missing_programs())}); "
                "install it with: apt-get install slurm-wlm munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "slurm-wlm", "munge"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                 timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"could not install Slurm ({' '.join(cmd)}): {e}"
        if out.returncode:
            return (f"could not install Slurm ({' '.join(cmd)} exit {out.returncode}): "
                    f"{out.stderr.strip()[-300:]}")
    left = missing_programs()
    return f"Slurm still missing after apt-get: {left}" if left else None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """``with SlurmCluster() as c: c.sbatch([...])``; every daemon stops on exit."""

    def __init__(self, nodes=("n1", "n2"), cpus: int = 64, gpus: int = 8,
                 base: str | None = None):
        self.nodes = tuple(nodes)
        self.cpus, self.gpus = cpus, gpus
        self.dir = tempfile.mkdtemp(prefix="mpipar-slurm-", dir=base)
        os.chmod(self.dir, 0o755)  # job tasks and munge clients reach the socket
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.host = socket.gethostname()
        self.procs: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------
    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "tmpfs", "log", "munge"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        for n in self.nodes:
            os.makedirs(os.path.join(d, "spool", n), exist_ok=True)
            os.makedirs(os.path.join(d, "tmpfs", n), exist_ok=True)
        os.chmod(os.path.join(d, "munge"), 0o700)
        key = os.path.join(d, "munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        lines = [
            "ClusterName=mpipartest",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"TmpFS={d}/tmpfs/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.%n.log",
            f"PlugStackConfig={d}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin", "MpiDefault=none",
            "SlurmdParameters=config_overrides", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "GresTypes=gpu", "InactiveLimit=0", "KillWait=5", "MessageTimeout=20",
            "MinJobAge=5",  # sbatch --wait polls every 2 s (sleeps grow while < age/2)
            f"FirstJobId={int.from_bytes(os.urandom(3), 'little') + 1000}",
            "SlurmctldDebug=info", "SlurmdDebug=info", "MailProg=/bin/true",
        ]
        for n, port in zip(self.nodes, node_ports, strict=True):
            lines.append(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 "
                         f"Port={port} CPUs={self.cpus} State=UNKNOWN"
                         + (f" Gres=gpu:{self.gpus}" if self.gpus else ""))
        lines.append(f"PartitionName=local Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        # Slurm 22.05 drops a GPU without File=, and wants a character device there:
        # links to /dev/null stand in for /dev/nvidia0..N-1 (no cgroup fences them).
        with open(os.path.join(d, "gres.conf"), "w") as f:
            f.write("AutoDetect=off\n")
            if self.gpus:
                os.makedirs(os.path.join(d, "dev"), exist_ok=True)
                for i in range(self.gpus):
                    os.symlink("/dev/null", os.path.join(d, "dev", f"gpu{i}"))
                for n in self.nodes:
                    f.write(f"NodeName={n} Name=gpu File={d}/dev/gpu[0-{self.gpus - 1}]\n")
        open(os.path.join(d, "plugstack.conf"), "w").close()

    @property
    def munge_socket(self) -> str:
        return os.path.join(self.dir, "munge.sock")

    def env(self, extra: dict | None = None) -> dict:
        """Environment for clients (sbatch, sinfo) and, through sbatch, for the job;
        a variable given as None in ``extra`` is left out."""
        from mpipar.launch import clean_env
        env = clean_env({"SLURM_CONF": self.conf, MARKER: self.dir, **(extra or {})})
        return {k: v for k, v in env.items() if v is not None}

    # -- start / stop --------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _wait(self, what: str, ok, timeout: float) -> None:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting "
                                       f"for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                           f"{self.logs()}")

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_config()
        d = self.dir
        self._spawn("munged", [_sbin("munged"), "-F", "-f",
                               f"--key-file={d}/munge/munge.key",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={d}/munge/munged.pid",
                               f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munge/munged.seed"])
        self._wait("munged", lambda: os.path.exists(self.munge_socket), timeout)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", self.conf])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", self.conf])
        self._wait("nodes to be idle", self._all_idle, timeout)
        return self

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=20)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60,
            env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=self.env(env), cwd=cwd)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n"
                               f"{out.stdout}{out.stderr}")
        return out

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """``sbatch --wait ARGS``: returns when the job ends, with the job's exit code."""
        return self.run(["sbatch", "--wait", *args], check=False, timeout=timeout,
                        env=env, cwd=cwd)

    def ours(self) -> list[int]:
        """Pids of live processes that belong to this cluster (daemons, steps, tasks)."""
        pids = {p.pid for p in self.procs.values() if p.poll() is None}
        needle = f"{MARKER}={self.dir}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.add(int(entry))
            except OSError:
                pass
        return sorted(pids)

    def stop(self, grace: float = 5) -> None:
        """Cancel jobs, then SIGTERM and (after ``grace`` s) SIGKILL every pid of ours."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        # Children before daemons: slurmd first, munged last (slurmctld talks to it).
        daemons = [p.pid for p in reversed(list(self.procs.values())) if p.poll() is None]
        order = [p for p in self.ours() if p not in daemons] + daemons
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            for pid in order:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            t_end = time.monotonic() + wait
            while time.monotonic() < t_end:
                for p in self.procs.values():
                    p.poll()
                if not self.ours():
                    return
                time.sleep(0.1)
            order = self.ours()

    def logs(self, tail: int = 3000) -> str:
        out = []
        for root, _, files in os.walk(os.path.join(self.dir, "log")):
            for name in sorted(files):
                with open(os.path.join(root, name), errors="replace") as f:
                    text = f.read()[-tail:]
                out.append(f"--- {name} ---\n{text}")
        return "\n".join(out)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
