"""SmolLM2 over the tiered store: exact against the in-memory path over a long multi-turn chat,
through truncate and save -> resume; and the faults a session must survive."""

import subprocess
import sys

import pytest
import torch

import localkv
from localkv.errors import UserError
from localkv.offload.store import Budgets
from localkv.runtime import Engine

pytestmark = pytest.mark.slow
PAGE_BYTES = 2 * 3 * 256 * 64 * 4  # SmolLM2-135M, fp32, 256-token pages, one layer


@pytest.fixture(scope="module")
def ref(smollm2_gguf):
    return localkv.load(smollm2_gguf, ctx="8K", device="cpu", dtype="fp32")


def tiered(llm, disk, gpu_pages=2, cpu_pages=3, disk_pages=None):
    """The same weights under the exact policy with tiny tier budgets: a few pages per layer on the
    "GPU" (here device memory), a few in CPU memory, the rest on disk."""
    L = llm.args.n_layers
    budgets = Budgets(gpu_pages * PAGE_BYTES * L, cpu_pages * PAGE_BYTES * L, disk,
                      None if disk_pages is None else disk_pages * PAGE_BYTES * L)
    return localkv.LLM(llm.loaded, Engine(llm.loaded, ctx_tokens=8192, budgets=budgets))


def words(n, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    vocab = ("river city music history science the of and in a to was is for with on as by light water "
             "stone mountain song book letter market winter summer garden king queen road bridge").split()
    return " ".join(vocab[i] for i in torch.randint(len(vocab), (n,), generator=g).tolist())


def test_long_multi_turn_chat_is_exact(ref, tmp_path):
    tier = tiered(ref, tmp_path / "kv")
    turns = [f"Read this and tell me the first word. {words(1300)}", f"And now this one. {words(1300)}"]
    chats = [ref.chat(), tier.chat()]
    for text in turns:
        replies = ["".join(e.text for e in c.send(text, max_tokens=16)) for c in chats]
        assert replies[0] == replies[1]
    a, b = chats[0].session, chats[1].session
    assert a.seq.ids == b.seq.ids and len(a.seq.ids) > 2500
    stats = b.seq.cache.stats()
    assert stats["disk_tokens"] > stats["cpu_tokens"] > 0 and stats["gpu_tokens"] > 0

    # Teacher-forced logits of one more chunk and a few decode steps, through both caches.
    more = ref.tokenizer.encode(words(300))
    with torch.inference_mode():
        for seq in (a.seq, b.seq):
            seq.logits = [ref.loaded.model(torch.tensor(more), seq.cache, all_logits=True)]
            seq.logits += [ref.loaded.model(torch.tensor([t]), seq.cache, decode=True) for t in more[:8]]
    for x, y in zip(a.seq.logits, b.seq.logits):
        assert ((x - y).abs().max() / x.abs().max()) < 1e-4
    n = len(a.seq.ids)
    for seq in (a.seq, b.seq):  # drop the teacher-forced tail again
        seq.cache.truncate(n)

    # After truncate (edit the last turn) both answer a new last turn identically.
    for c in chats:
        c.session.messages = c.messages[:2]
    replies = ["".join(e.text for e in c.send("Summarize it in five words.", max_tokens=16)) for c in chats]
    assert replies[0] == replies[1]

    # Save -> resume (both ways) and the next turn is still identical.
    chats[1].save(tmp_path / "session")
    resumed = tier.load_session(tmp_path / "session")
    assert resumed.messages == chats[1].messages and resumed.context_tokens == chats[1].context_tokens
    replies = ["".join(e.text for e in c.send("Thanks. One more word?", max_tokens=12)) for c in (chats[0], resumed)]
    assert replies[0] == replies[1]
    assert resumed.last.prompt_tokens < 40  # the history was read back, not prefilled again


def test_disk_full_during_prefill_keeps_the_last_consistent_turn(ref, tmp_path):
    tier = tiered(ref, tmp_path / "kv", gpu_pages=1, cpu_pages=1, disk_pages=4)
    chat = tier.chat()
    list(chat.send("Hello there, who are you?", max_tokens=8))
    chat.save(tmp_path / "s")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(UserError, match="disk"):
        list(chat.send(words(2500), max_tokens=8))
    assert chat.messages == before  # the failed turn left no trace
    list(chat.send("Still there?", max_tokens=4))  # and the chat goes on
    resumed = ref.load_session(tmp_path / "s")
    assert resumed.messages == before


def test_killed_during_save_leaves_the_previous_save(ref, tmp_path, smollm2_gguf):
    chat = ref.chat()
    list(chat.send("First turn.", max_tokens=6))
    chat.save(tmp_path / "s")
    saved = [dict(m) for m in chat.messages]
    # A second process loads the session, adds a turn and is killed (SIGKILL-like os._exit) in the middle
    # of saving it: after its pages are written, before the manifest is replaced.
    script = f"""
import os, localkv
import localkv.offload.session as s
llm = localkv.load({str(smollm2_gguf)!r}, ctx="8K", device="cpu", dtype="fp32", session={str(tmp_path / 's')!r})
chat = llm.chat()
list(chat.send("Second turn.", max_tokens=6))
real = os.replace
os.replace = lambda *a: os._exit(9)
chat.save({str(tmp_path / 's')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr
    resumed = ref.load_session(tmp_path / "s")
    assert resumed.messages == saved


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_page_file_is_refused_and_untouched(ref, tmp_path, damage):
    chat = ref.chat()
    list(chat.send("A turn to save.", max_tokens=6))
    chat.save(tmp_path / "s")
    gen = next((tmp_path / "s").glob("gen-*"))
    victim = gen / "layer_007.kv"
    data = bytearray(victim.read_bytes())
    if damage == "corrupt":
        data[1000] ^= 0xFF
    else:
        data = data[:len(data) // 2]
    victim.write_bytes(bytes(data))
    files = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="layer_007" if damage == "truncate" else "page 0 of layer 7"):
        ref.load_session(tmp_path / "s")
    assert files == {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}


def test_cli_context_past_every_tier_exits_2(capsys, tmp_path):
    from localkv.cli import main

    for cmd in ("plan", "run"):
        # 64M tokens of SmolLM2 KV (fp32) is about 3 TB: more than any disk here holds.
        code = main([cmd, "--ctx", "64M", "--gpu-mem", "1MB", "--cpu-mem", "1MB", "--disk", str(tmp_path),
                     *(["--prompt", "hi"] if cmd == "run" else [])])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "more than every tier" in err, err


def test_cli_unwritable_disk_exits_2_before_loading(capsys, tmp_path):
    from localkv.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "--disk", str(blocker / "kv"), "--prompt", "hi", "/does/not/matter.gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err  # checked before the (missing) model is even looked at
