"""Start an MPI job from Python (tests, benchmarks): the command and a clean environment.

A process that is itself an MPI rank carries its launcher's variables (PMI_*, HYDI_*,
OMPI_*, PMIX_*); a child mpirun that inherits them tries to join the parent job. They
are dropped here. The MPI launcher is ``$MPIPAR_MPIRUN`` or the ``mpirun`` beside the
running Python, then the one on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

_PARENT_JOB_PREFIXES = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCAL", "OMPI_COMM_",
                        "OMPI_MCA_ess", "OMPI_MCA_orte", "PRTE_", "MPIR_CVAR_CH4")


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PARENT_JOB_PREFIXES)}
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpirun_path() -> str:
    if os.environ.get("MPIPAR_MPIRUN"):
        return os.environ["MPIPAR_MPIRUN"]
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if os.path.exists(beside):
        return beside
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpirun found: install mpipar (it brings MPICH) or set "
                           "MPIPAR_MPIRUN")
    return found


def oversubscribe_flags() -> list[str]:
    """Open MPI refuses more ranks than cores without --oversubscribe; MPICH needs none."""
    out = subprocess.run([mpirun_path(), "--version"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).lower()
    return ["--oversubscribe"] if "open mpi" in text or "open-mpi" in text else []


def run_mpi(n: int, args: list[str], timeout: float = 300, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``mpirun -n N python ARGS...``; returns the CompletedProcess (text output)."""
    return subprocess.run(mpi_command(n, args), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env), cwd=cwd)


def mpi_command(n: int, args: list[str]) -> list[str]:
    return [mpirun_path(), *oversubscribe_flags(), "-n", str(n), sys.executable, *args]


def start_mpi(n: int, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """Start ``mpirun -n N python ARGS...`` without waiting (a server); in its own
    session, so the caller can end the whole job (os.killpg) whatever happens."""
    return subprocess.Popen(mpi_command(n, args), env=clean_env(env),
                            start_new_session=True, **popen)
