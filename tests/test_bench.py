"""localkv bench: the CPU smoke run end to end, the floor arithmetic, the PNG writer, and bad input."""

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from localkv.bench.ceilings import Ceilings
from localkv.bench.floor import decode_floor_s
from localkv.bench.font import text_mask
from localkv.bench.plot import line_plot, nice_step
from localkv.bench.png import encode_png
from localkv.bench.shapes import SHAPES
from localkv.cli import main
from localkv.errors import UserError
from localkv.units import parse_budget


def read_png(data: bytes) -> np.ndarray:
    """Decode what encode_png writes (RGB, 8 bits, filter 0), checking every chunk's CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    assert list(chunks)[-1] == b"IEND"
    w, h, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()  # filter type 0 on every scanline
    return raw[:, 1:].reshape(h, w, 3)


def assert_user_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


# -- the smoke run CI does ----------------------------------------------------------------------------------
def test_smoke_smollm2_shape_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "localkv.cli", "bench", "--shape", "smollm2-135m", "--ctx", "2K",
                           "--policy", "exact", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "exact" in proc.stdout.strip().splitlines()[-1]  # the table comes last
    result = json.loads(out.read_text())
    assert {"meta", "ceilings", "rows"} <= result.keys()
    assert result["meta"]["weights_bytes"] > 0 and result["meta"]["steps"] == 32
    c = result["ceilings"]
    assert c["host_memcpy_GBps"] > 0 and c["hbm_copy_GBps"] is None and c["h2d_pinned_GBps"] is None
    (row,) = result["rows"]
    assert row["ctx"] == 2048 and row["kv"] == "prefill" and row["steps"] >= 32
    for key in ("prefill_tok_s", "decode_ms_median", "decode_ms_p90", "floor_ms", "ratio"):
        assert row[key] > 0, key
    assert row["decode_ms_p90"] >= row["decode_ms_median"]
    assert row["ratio"] == pytest.approx(row["decode_ms_median"] / row["floor_ms"])
    assert 0 < row["weights_floor_ms"] < row["floor_ms"]   # the weights alone, without the KV
    assert row["ratio_weights"] == pytest.approx(row["decode_ms_median"] / row["weights_floor_ms"])
    assert row["peak_bytes"]["gpu"] > 0 and row["tier_tokens"]["gpu"] >= 2048
    assert "hit_rate" in row and "moved_bytes_per_token" in row
    image = read_png((tmp_path / "r.png").read_bytes())  # the plot lands next to the JSON
    assert image.shape == (480, 800, 3)
    assert (image != 255).any(axis=2).sum() > 1000  # axes, labels and the line were drawn


def test_tiers_disk_and_peer_in_process(tmp_path, monkeypatch, capsys):
    # A tiny shape over the GPU-tier budget and the disk, KV synthesized, transformers alongside: every path, fast.
    monkeypatch.setitem(SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256))
    code = main(["bench", "--shape", "tiny", "--ctx", "1K,4K", "--synthetic-kv", "--gpu-mem", "256KB", "--disk",
                 str(tmp_path / "kv"), "--steps", "4", "--warmup", "1", "--peer", "hf", "--plot", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "synthesized" in out and "prefill not measured" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["ceilings"]["disk_read_GBps"] > 0
    rows = {(r["label"], r["ctx"]): r for r in result["rows"]}
    exact = rows[("exact", 4096)]
    assert exact["prefill_tok_s"] is None and exact["kv"] == "synthesized"
    assert exact["tier_tokens"]["disk"] > 0 and exact["peak_bytes"]["disk"] > 0
    assert exact["moved_bytes_per_token"]["disk_read"] > 0
    assert exact["floor_ms"] > 0 and exact["ratio"] == pytest.approx(exact["decode_ms_median"] / exact["floor_ms"])
    assert rows[("hf full", 4096)]["decode_ms_median"] > 0
    assert rows[("hf offloaded", 4096)]["error"].startswith("n/a")
    assert read_png((tmp_path / "p.png").read_bytes()).shape == (480, 800, 3)


def test_each_policy_runs_under_its_own_plan(tmp_path, monkeypatch, capsys):
    """A ShadowKV row is planned as `localkv.load` plans ShadowKV (its index counted), not with exact's plan."""
    from localkv.bench import runner

    monkeypatch.setitem(SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256))
    planned = []
    make_plan = runner.make_plan
    monkeypatch.setattr(runner, "make_plan", lambda *a, **kw: planned.append(kw["policy"]) or make_plan(*a, **kw))
    code = main(["bench", "--shape", "tiny", "--ctx", "2K", "--synthetic-kv", "--policy", "shadowkv,exact",
                 "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert sorted(planned) == ["exact", "shadowkv"]
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["meta"]["tiers"]) == {"2048 exact", "2048 shadowkv"}
    assert [r["label"] for r in result["rows"]] == ["shadowkv", "exact"]
    assert all(r["ratio_weights"] > 0 for r in result["rows"])


def test_policy_options_reach_the_plan_and_the_rows(tmp_path, monkeypatch, capsys):
    """``--policy-opt exact_keys=false``: the ShadowKV rows store values only, synthesized into the tiers, and are
    planned at half the KV bytes per token; exact's rows take no options."""
    from localkv.bench import runner

    monkeypatch.setitem(SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256))
    planned = {}
    make_plan = runner.make_plan
    monkeypatch.setattr(runner, "make_plan", lambda *a, **kw: planned.setdefault(kw["policy"], make_plan(*a, **kw)))
    code = main(["bench", "--shape", "tiny", "--ctx", "2K", "--synthetic-kv", "--policy", "shadowkv,exact",
                 "--policy-opt", "exact_keys=false", "--budget", "1/8", "--gpu-mem", "3.5MB", "--disk",
                 str(tmp_path / "kv"), "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert 2 * planned["shadowkv"].kv_bytes_per_token == planned["exact"].kv_bytes_per_token
    sparse, exact = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert sparse["label"] == "shadowkv exact_keys=False budget=1/8" and exact["label"] == "exact"
    assert sparse["options"] == {"exact_keys": False, "budget": 0.125} and exact["options"] == {}
    stats = sparse["stats"]
    assert stats["exact_keys"] is False and stats["basis_fixed"] and stats["disk_tokens"] > 0
    assert sparse["decode_ms_median"] > 0


def test_a_failing_policy_is_a_failed_row_not_a_lost_run(tmp_path, monkeypatch, capsys):
    from localkv.offload.policies import base

    class Broken(base.Policy):
        name = "broken"

        def make(self, *args, **kwargs):
            raise RuntimeError("no such kernel")

    monkeypatch.setitem(SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256))
    monkeypatch.setitem(base._REGISTRY, "broken", Broken())
    code = main(["bench", "--shape", "tiny", "--ctx", "256", "--policy", "broken,exact", "--steps", "2",
                 "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0 and "no such kernel" in err
    broken, exact = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert broken["error"] == "failed: RuntimeError" and exact["decode_ms_median"] > 0


@pytest.mark.parametrize("argv,words", [
    (["--shape", "gpt5"], ["gpt5", "llama3-8b"]),
    (["--shape", "smollm2-135m", "--ctx", "1M"], ["1M", "every tier"]),
    (["--shape", "smollm2-135m", "--disk", "/proc/no/such/dir"], ["--disk", "not writable"]),
    (["--shape", "smollm2-135m", "--policy", "magic"], ["magic"]),
    (["--shape", "smollm2-135m", "--peer", "vllm"], ["vllm"]),
    (["smollm2-135m", "--shape", "smollm2-135m"], ["--shape"]),
    (["--shape", "smollm2-135m", "--policy", "shadowkv", "--policy-opt", "exact_keys"], ["--policy-opt", "KEY=VALUE"]),
    (["--shape", "smollm2-135m", "--policy", "shadowkv", "--policy-opt", "exact_key=0"], ["exact_key"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, words):
    code = main(["bench", *argv, "--json", str(tmp_path / "r.json")])
    assert_user_error(code, capsys.readouterr().err, *words)


# -- the floor ----------------------------------------------------------------------------------------------
def test_floor_adds_each_tier_at_its_link():
    gpu = Ceilings(host_memcpy=20e9, hbm_copy=2000e9, h2d_pinned=50e9, disk_read=2e9)
    # 16 GB of weights and 4 GB of resident KV from HBM, 25 GB over PCIe, 1 GB from disk.
    got = decode_floor_s(16e9, {"gpu": 4e9, "cpu": 25e9, "disk": 1e9}, gpu)
    assert got == pytest.approx(20e9 / 2000e9 + 25e9 / 50e9 + 1e9 / 2e9)
    assert decode_floor_s(16e9, {}, gpu) == pytest.approx(16e9 / 2000e9)
    cpu = Ceilings(host_memcpy=20e9)  # one memory: weights and KV at the host's rate
    assert decode_floor_s(0.5e9, {"gpu": 0.1e9}, cpu) == pytest.approx(0.6e9 / 20e9)
    assert decode_floor_s(0.5e9, {"disk": 1e9}, cpu) is None  # KV on a disk whose speed was not measured


# -- the picture --------------------------------------------------------------------------------------------
def test_png_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_png(encode_png(pixels)), pixels)
    with pytest.raises(ValueError):
        encode_png(pixels.astype(np.float32))


def test_font_and_plot():
    assert text_mask("32K", scale=2).shape == (10, 24)
    assert text_mask("a").tolist() == text_mask("A").tolist()
    assert nice_step(3400) == 1000 and nice_step(0.9) == 0.2
    series = {"exact": [(32768, 101.0), (131072, 343.0)], "hf offloaded": [(32768, 935.0)]}
    image = line_plot(series, width=640, height=400, title="decode", xlabel="context", ylabel="ms/token")
    assert image.shape == (400, 640, 3)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # one colour per series


def test_parse_budget():
    assert parse_budget("1/16") == 1 / 16 and parse_budget("0.05") == 0.05
    assert parse_budget("2K") == 2048 and isinstance(parse_budget("2048"), int)
    for bad in ("1/0", "2.5", "lots", "0"):
        with pytest.raises(UserError):
            parse_budget(bad)
