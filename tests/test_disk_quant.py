"""Quantized cold KV on the disk tier: the page codec against `kv_quant`'s reference and its error bound, the disk
tier storing and checking encoded pages, and LeoAM reading int8 / int4 units from disk close to exact attention."""

import pytest
import torch

from localkv.errors import UserError
from localkv.kernels import dequantize_page_ref, quantize_page_ref
from localkv.offload import make_cache
from localkv.offload.disk import DiskTier
from localkv.offload.disk_codec import UNIT, QuantizedPages
from localkv.offload.pages import PageGeometry

from test_leoam import OPTS, V, _budgets, _run


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")


@pytest.mark.parametrize("bits", [8, 4])
def test_codec_matches_kivi_and_reads_single_units(bits):
    """A page's encoding decodes to the KIVI reference (keys per channel over the page, values per token), within
    half a step of the original; one (head, unit)'s codes alone, with their scales, decode to the same unit."""
    g = PageGeometry(1, 3, 32, 64, torch.bfloat16)
    codec = QuantizedPages(g)
    page = (torch.randn(g.page_shape) * torch.rand(1, 3, 1, 32) * 4).to(torch.bfloat16)
    codes, meta = codec.encode(page, bits)
    assert codes.numel() == codec.page_bytes(bits) <= codec.slot_bytes and codec.page_bytes(bits) < g.page_bytes
    got = codec.decode(codes, meta, bits, torch.float32)
    for part, (kind, group) in enumerate((("key", g.page_tokens), ("value", g.head_dim))):
        packed, scale, zero = quantize_page_ref(page[part], kind=kind, bits=bits, group=group,
                                                scale_dtype=torch.float16)
        ref = dequantize_page_ref(packed, scale, zero, kind=kind, bits=bits, group=group, dtype=torch.float32)
        torch.testing.assert_close(got[part], ref)
        step = scale.float().repeat_interleave(group, 1 if kind == "key" else 2)[:, :g.page_tokens]
        assert ((got[part] - page[part].float()).abs() <= step / 2 + 1e-2 * step + 1e-6).all()
    h, u = int(torch.randint(0, 3, ())), int(torch.randint(0, 4, ()))
    for part in (0, 1):
        a, n = codec.span(part, h, u, bits)
        scales = codec.units_meta(meta, part, torch.tensor([h]), torch.tensor([u]))
        unit = codec.decode_units(codes[a:a + n][None], scales, part, bits, torch.float32)[0]
        torch.testing.assert_close(unit, got[part, h, u * UNIT:(u + 1) * UNIT], rtol=0, atol=0)


def test_disk_tier_stores_encoded_pages_and_checks_them(tmp_path):
    g = PageGeometry(2, 2, 16, 32, torch.bfloat16)
    codec = QuantizedPages(g)
    disk = DiskTier(g, tmp_path, codec=codec)
    pages = [torch.randn(g.page_shape).to(torch.bfloat16) for _ in range(2)]
    slots = [disk.write(0, p, bits) for p, bits in zip(pages, (8, 4))]
    assert disk.used_bytes == codec.page_bytes(8) + codec.page_bytes(4)
    assert disk.meta[0].shape[1:] == codec.encode(pages[0])[1].shape
    for p, s, bits in zip(pages, slots, (8, 4)):
        out = torch.empty(g.page_shape, dtype=torch.bfloat16)
        disk.read_into(0, s, out, verify=True)
        torch.testing.assert_close(out, codec.decode(*codec.encode(p, bits), bits, torch.bfloat16), rtol=0, atol=0)
    with open(disk.path(0), "r+b") as f:
        f.seek(slots[1] * disk.slot_bytes + 10)
        f.write(b"\xff\xfe")
    with pytest.raises(UserError, match="corrupt"):
        disk.read_into(0, slots[1], torch.empty(g.page_shape, dtype=torch.bfloat16))


@pytest.mark.parametrize("disk_quant", ["int8", "mixed", "int4", "alternating"])
def test_leoam_over_quantized_disk_pages_stays_near_exact(tiny, tmp_path, disk_quant):
    """Full budget, most pages on disk: every unit read from disk is dequantized, so the logits move from exact by
    the quantization's error only: close at int8, further at int4; "mixed" stores some pages at each (and
    "alternating" every other page at int4, so each step reads both kinds)."""
    model, args = tiny
    ids = torch.randint(0, V, (400,))
    caches = [make_cache("exact", args, 1024),
              make_cache("leoam", args, 1024, budgets=_budgets(args, tmp_path, 0, 2), budget=1.0, **OPTS),
              make_cache("leoam", args, 1024, budgets=_budgets(args, tmp_path, 0, 2), budget=1.0,
                         disk_quant="mixed" if disk_quant == "alternating" else disk_quant, **OPTS)]
    if disk_quant == "alternating":
        caches[2].store.disk_bits = lambda layer, page: 4 if page % 2 else 8
    with torch.no_grad():
        ref, plain, quant = (torch.log_softmax(_run(model, c, ids, [0, 300], 400), -1) for c in caches)
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
    kl = (ref.exp() * (ref - quant)).sum(-1)
    assert 0 < kl.mean() < {"int8": 3e-4, "mixed": 1e-2, "int4": 5e-2, "alternating": 5e-2}[disk_quant]
    s = caches[2].stats()
    disk_quant = "mixed" if disk_quant == "alternating" else disk_quant
    assert s["disk_quant"] == disk_quant and s["disk_tokens"] > 200 and s["moved_bytes_per_token"]["disk_read"] > 0
    assert s["disk_bytes"] < caches[1].stats()["disk_bytes"] * (0.7 if disk_quant != "int4" else 0.5)
    assert (0 < s["disk_pages_int4"] < 1) if disk_quant == "mixed" else s["disk_pages_int4"] == (disk_quant == "int4")


def test_the_plan_counts_quantized_disk_pages(tmp_path):
    from localkv.bench.shapes import shape_args
    from localkv.offload.planner import make_plan

    args = shape_args("llama3-8b")
    plans = [make_plan(args, 1 << 20, policy="leoam", device="cpu", kv_dtype=torch.bfloat16, gpu_mem=10 << 30,
                       cpu_mem=60 << 30, disk=tmp_path, disk_mem=80 << 30, options=options)
             for options in ({}, {"disk_quant": "int8"})]
    plain, quant = plans
    assert plain.disk.tokens == quant.disk.tokens > 0 and "disk_quant" not in plain.policy_options
    tight = make_plan(args, 1 << 20, policy="leoam", device="cpu", kv_dtype=torch.bfloat16, gpu_mem=10 << 30,
                      cpu_mem=60 << 30, disk=tmp_path, disk_mem=40 << 30)   # bf16 pages would need 58 GB there
    assert tight.policy_options["disk_quant"] == "mixed" and tight.disk.bytes <= 40 << 30
    assert any("quantized" in note for note in tight.notes)
    assert quant.disk.bytes / plain.disk.bytes == pytest.approx(QuantizedPages(
        PageGeometry(1, 8, 128, 256, torch.bfloat16)).page_bytes(8) / (2 * 8 * 256 * 128 * 2), rel=1e-3)


def test_a_unit_of_an_8b_page_is_one_block_at_int8():
    """Llama-3.1-8B's geometry (D = 128, bf16): a unit's K and V codes are one aligned 4 KB block at int8 (two
    blocks in bf16), half a block at int4."""
    from localkv.offload.pages import DISK_ALIGN

    codec = QuantizedPages(PageGeometry(1, 8, 128, 256, torch.bfloat16))
    h, u = int(torch.randint(0, 8, ())), int(torch.randint(0, 16, ()))
    k0, kn = codec.span(0, h, u, 8)
    v0, vn = codec.span(1, h, u, 8)
    assert k0 % DISK_ALIGN == 0 and v0 + vn == k0 + DISK_ALIGN and kn == vn == DISK_ALIGN // 2
    assert codec.span(1, h, u, 4)[0] + codec.span(1, h, u, 4)[1] - codec.span(0, h, u, 4)[0] == DISK_ALIGN // 2
    bf16 = 2 * 8 * 256 * 128 * 2
    assert codec.page_bytes(8) == bf16 // 2 and codec.page_bytes(4) == bf16 // 4
    assert codec.meta_bytes() / bf16 == pytest.approx(0.0117, abs=1e-4)
