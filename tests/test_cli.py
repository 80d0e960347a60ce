"""The command line as a person uses it: answers, info, and one clear line with exit 2 on bad input."""

import json
import subprocess
import sys

import pytest

from localkv.cli import main
from tiny import write_model


def run(capsys, *argv):
    capsys.readouterr()  # drop what setting the test up printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "tiny", "llama")


def test_prompt_on_embedded_default_names_paris(smollm2_gguf):
    # A real process, as a new user runs it (the model is already in the cache from the fixture).
    proc = subprocess.run([sys.executable, "-m", "localkv.cli", "run", "--prompt", "What is the capital of France?",
                           "--max-tokens", "24"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_prompt_from_stdin(tiny_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello from stdin"))
    code, out, _ = run(capsys, "run", str(tiny_dir), "--prompt", "-", "--max-tokens", "4", "--device", "cpu")
    assert code == 0 and out.endswith("\n")


def test_info(tiny_dir, capsys):
    code, out, _ = run(capsys, "info", str(tiny_dir))
    assert code == 0 and "llama" in out and "trained context" in out and "chat template" in out


def test_missing_path(capsys, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path / "nope"), "--prompt", "hi")
    assert_user_error(code, err, "nope")


def test_directory_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "run", str(tmp_path / "empty"), "--prompt", "hi")
    assert_user_error(code, err, "config.json")


def test_truncated_safetensors(capsys, tmp_path):
    path = write_model(tmp_path / "m", "qwen2", max_shard_size=None)
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    code, _, err = run(capsys, "run", str(path), "--prompt", "hi", "--device", "cpu")
    assert_user_error(code, err, "model.safetensors")


def test_unsupported_gguf_architecture(capsys, make_gguf):
    path, _ = make_gguf("phi.gguf", arch="phi3")
    code, _, err = run(capsys, "run", str(path), "--prompt", "hi")
    assert_user_error(code, err, "phi3", "not supported")


def test_unsupported_gguf_tensor_type(capsys, make_gguf):
    import gguf
    import numpy as np

    # A Q8_K tensor: a llama.cpp type (for intermediate results) the gguf package cannot dequantize.
    qtype = gguf.GGMLQuantizationType.Q8_K
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((4, 256 // block * type_size), dtype=np.uint8)
    path, _ = make_gguf("iq2.gguf", extra_tensors={"blk.9.attn_q.weight": (raw, qtype)})
    code, _, err = run(capsys, "run", str(path), "--prompt", "hi")
    assert_user_error(code, err, "Q8_K")


def test_prompt_longer_than_ctx(capsys, tiny_dir):
    code, _, err = run(capsys, "run", str(tiny_dir), "--ctx", "64", "--prompt", "word " * 200, "--device", "cpu")
    assert_user_error(code, err, "context of 64")


def test_chat_template_that_raises(capsys, tmp_path):
    path = write_model(tmp_path / "m", "llama")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('System role not supported') }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "run", str(path), "--prompt", "hi", "--device", "cpu")
    assert_user_error(code, err, "System role not supported")


@pytest.mark.parametrize("argv,words", [
    (["run", "--ctx", "lots", "--prompt", "x"], ["lots"]),
    (["run", "--max-tokens", "0", "--prompt", "x"], ["--max-tokens"]),
])
def test_bad_flags(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *words)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_device(capsys, tiny_dir, command):
    code, _, err = run(capsys, command, str(tiny_dir), "--device", "banana")
    assert_user_error(code, err, "unknown device", "banana")
    if not __import__("torch").cuda.is_available():
        code, _, err = run(capsys, command, str(tiny_dir), "--device", "cuda")
        assert_user_error(code, err, "cuda", "no CUDA GPU")


def test_plan_that_refuses_leaves_no_disk_directory(capsys, tiny_dir, tmp_path):
    """A context past every tier is refused before anything is made: the --disk directory is not created."""
    target = tmp_path / "new" / "kv"
    code, _, err = run(capsys, "plan", str(tiny_dir), "--ctx", "100000M", "--gpu-mem", "1MB", "--cpu-mem", "1MB",
                       "--disk", str(target), "--device", "cpu")
    assert_user_error(code, err, "every tier")
    assert not (tmp_path / "new").exists()
    code, out, _ = run(capsys, "plan", str(tiny_dir), "--ctx", "4K", "--disk", str(target), "--device", "cpu")
    assert code == 0 and str(target) in out and not (tmp_path / "new").exists()   # planning makes nothing either
