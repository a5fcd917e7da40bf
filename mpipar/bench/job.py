"""Start ``programs/serve.py`` under mpirun and wait until it serves (tests, benchmarks).

    with ServerJob(2, ["--model", DIR, "--tp", "2"]) as job:   # a free port, by itself
        urlopen(job.url + "/v1/models")
    job.returncode, job.stop_s                                  # after SIGTERM

The server is started with ``--port 0`` (unless the arguments name a port) and prints
the address rank 0 listens on; the job is ready when ``/health`` answers 200. Leaving
the block sends SIGTERM to mpirun (which forwards it to every rank) and waits; a job
that outlives ``stop_timeout`` is killed, and so is every process that carries the
job's marker variable (Hydra puts each rank in a process group of its own), so nothing
is ever left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

MARKER = "MPIPAR_SERVE_JOB"
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "programs",
                       "serve.py")
LISTENING = re.compile(r"listening on (http://\S+)")


class ServerError(RuntimeError):
    pass


class ServerJob:
    def __init__(self, n: int, args: list[str], env: dict | None = None,
                 start_timeout: float = 120, stop_timeout: float = 10):
        self.n, self.args = n, list(args)
        if "--port" not in self.args:
            self.args += ["--port", "0"]
        self.marker = uuid.uuid4().hex
        self.env = {**(env or {}), MARKER: self.marker}
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.url = self.returncode = self.stop_s = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="mpipar-serve-", suffix=".log")

    def output(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def start(self) -> ServerJob:
        from ..launch import start_mpi
        self.proc = start_mpi(self.n, [PROGRAM, *self.args], env=self.env,
                              stdout=self._log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        t_end = time.monotonic() + self.start_timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with {self.proc.returncode} before "
                                  f"it was ready:\n{self.output()[-4000:]}")
            if self.url is None:
                found = LISTENING.search(self.output())
                self.url = found.group(1) if found else None
            if self.url is not None and self.health() == 200:
                return self
            time.sleep(0.1)
        self.kill()
        raise ServerError(f"not ready after {self.start_timeout:.0f} s:\n"
                          f"{self.output()[-4000:]}")

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def stop(self, sig=signal.SIGTERM) -> int:
        """Signal mpirun; -> its exit code (the time it took: ``stop_s``)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = None
        self.stop_s = time.monotonic() - t0
        return self.returncode

    def pids(self) -> dict[int, int | None]:
        """pid -> world rank (None for mpirun and its proxies) of this job's live processes."""
        found, needle = {}, f"{MARKER}={self.marker}".encode()
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue  # exited, not yet reaped
            except OSError:
                continue
            if needle in env:
                rank = [v for v in env if v.startswith(b"PMI_RANK=")]
                found[int(entry)] = int(rank[0][9:]) if rank else None
        return found

    def kill(self) -> None:
        """SIGKILL mpirun and every process of the job."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *self.pids()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def __enter__(self) -> ServerJob:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()  # also ranks that outlived mpirun
