"""localkv eval: fidelity rows from a text file, the exact policy against itself, options a sparse policy gets,
and the command's error paths."""

import json

import pytest

from localkv.cli import main
from localkv.offload.policies import base
from localkv.offload.policies.exact.device import DeviceExactKV
from tiny import write_model

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("eval") / "tiny", "llama", seed=0)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_exact_against_itself(capsys, tiny_dir, text_file, tmp_path):
    code, out, err = run(capsys, "eval", str(tiny_dir), "--text", str(text_file), "--ctx", "64,128",
                         "--continuation", "16", "--policy", "exact", "--json", str(tmp_path / "f.json"),
                         "--device", "cpu")
    assert code == 0, err
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["ctx"] for r in rows] == [64, 128]
    for r in rows:
        assert r["kl"] == pytest.approx(0, abs=1e-9) and r["top1"] == 1.0 and r["attention_recall"] == 1.0
    assert "KL(exact||policy)" in out and "exact" in out.splitlines()[-1]


class RecordingKV(DeviceExactKV):
    """Exact attention under another name, recording the options it was made with."""

    made: list[dict] = []

    def __init__(self, args, capacity, **options):
        super().__init__(args, capacity)
        self.options = options
        RecordingKV.made.append(options)

    def stats(self):
        recall = {"attention_recall": 0.75} if self.options.get("measure_recall") and "budget" in self.options else {}
        return {**super().stats(), **recall}


class FakePolicy(base.Policy):
    """A sparse policy known only to these tests: exact attention that records its options (``recording``), or
    plain exact attention that reports no recall."""

    name, sparse = "fake", True

    def __init__(self, recording: bool):
        self.recording = recording

    def parse(self, options):
        return options

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        return RecordingKV(args, capacity, **options) if self.recording else DeviceExactKV(args, capacity)


def _only_fake(monkeypatch, recording: bool) -> None:
    """The registry holds the reference and the fake policy only, for this test."""
    monkeypatch.setattr(base, "_REGISTRY", {base.REFERENCE: base.get(base.REFERENCE), "fake": FakePolicy(recording)})


def test_sparse_policy_gets_budget_and_measure_recall(capsys, monkeypatch, tiny_dir, text_file):
    _only_fake(monkeypatch, recording=True)
    RecordingKV.made.clear()
    code, out, err = run(capsys, "eval", str(tiny_dir), "--text", str(text_file), "--ctx", "64",
                         "--continuation", "8", "--budget", "1/8,32,default", "--device", "cpu",
                         "--policy-opt", "sink_tokens=16")  # default: the sparse ones
    assert code == 0, err
    assert RecordingKV.made == [{"sink_tokens": 16, "measure_recall": True, "budget": 0.125},
                                {"sink_tokens": 16, "measure_recall": True, "budget": 32},
                                {"sink_tokens": 16, "measure_recall": True}]
    lines = out.strip().splitlines()
    assert len(lines) == 4 and "1/8" in lines[1] and "0.750" in lines[1] and "32" in lines[2]
    # the fake reports no recall, no retrieval rate, no disk
    assert "default" in lines[3] and lines[3].split()[-3:] == ["n/a", "-", "0%"]


def test_recall_not_reported_prints_na(capsys, monkeypatch, tiny_dir, text_file):
    _only_fake(monkeypatch, recording=False)
    code, out, err = run(capsys, "eval", str(tiny_dir), "--text", str(text_file), "--ctx", "64",
                         "--continuation", "8", "--policy", "fake", "--budget", "", "--device", "cpu")
    assert code == 0, err
    assert out.strip().splitlines()[-1].split()[-3] == "n/a"


def test_missing_text_file(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "eval", str(tiny_dir), "--text", str(tmp_path / "nope.txt"), "--policy", "exact")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "nope.txt" in lines[0]


def test_text_shorter_than_ctx_and_continuation(capsys, tiny_dir, text_file):
    code, _, err = run(capsys, "eval", str(tiny_dir), "--text", str(text_file), "--ctx", "4K",
                       "--continuation", "128", "--policy", "exact", "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "shorter than" in lines[0] and "4K + 128" in lines[0]
