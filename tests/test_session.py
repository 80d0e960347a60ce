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
from localkv.runtime.events import PrefillProgress

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
    # A second process resumes the session, adds a turn and is killed (SIGKILL-like os._exit) in the middle
    # of the save that follows the reply: after its pages are written, before the manifest is replaced.
    script = f"""
import os, localkv
llm = localkv.load({str(smollm2_gguf)!r}, ctx="8K", device="cpu", dtype="fp32", session={str(tmp_path / 's')!r})
chat = llm.chat()
os.replace = lambda *a: os._exit(9)
list(chat.send("Second turn.", max_tokens=6))
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
    victim = next((tmp_path / "s").glob("tail-*.kv"))   # a short chat: every layer's one page is its last
    page_bytes = victim.stat().st_size // ref.args.n_layers
    data = bytearray(victim.read_bytes())
    if damage == "corrupt":
        data[7 * page_bytes + 1000] ^= 0xFF
    else:
        data = data[:len(data) // 2]
    victim.write_bytes(bytes(data))
    files = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=victim.name if damage == "truncate" else "last page of layer 7"):
        ref.load_session(tmp_path / "s")
    assert files == {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}


def test_a_growing_conversation_saves_only_its_new_pages(ref, tmp_path):
    """Each save of a conversation that extends the saved one appends its new full pages to the same files and
    writes a new tail; the resumed session continues exactly as the live one."""
    chat = ref.chat()
    list(chat.send("Tell me about the sea. " * 40, max_tokens=4))
    chat.save(tmp_path / "s")
    gen = next((tmp_path / "s").glob("gen-*"))
    layer = gen / "layer_000.kv"
    before = layer.read_bytes()
    list(chat.send("And about the mountains, at length. " * 40, max_tokens=4))
    chat.save(tmp_path / "s")
    assert list((tmp_path / "s").glob("gen-*")) == [gen] and len(list((tmp_path / "s").glob("tail-*"))) == 1
    after = layer.read_bytes()
    assert len(after) > len(before) and after.startswith(before)
    resumed = ref.load_session(tmp_path / "s")
    params = dict(max_tokens=8)
    assert [e.text for e in resumed.send("Which is higher?", **params)] == [
        e.text for e in chat.send("Which is higher?", **params)]


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


def test_an_interrupted_prefill_resumes_from_its_checkpoint(ref, smollm2_gguf, tmp_path, monkeypatch):
    """A session that saves itself checkpoints a long prefill; killed after its first chunk, the session reloads
    with that chunk's KV and the message pending, and sending it again prefills only the rest and answers as a
    run that was never interrupted."""
    import localkv.runtime.chat as chat_module

    monkeypatch.setattr(chat_module, "CHECKPOINT_S", 0.0)
    text = "The lighthouse keeper counted ships every night. " * 60 + "What did the keeper count?"
    want = "".join(e.text for e in ref.chat().send(text, max_tokens=8))
    llm = localkv.load(smollm2_gguf, ctx="8K", device="cpu", dtype="fp32", session=tmp_path / "s")
    chat = llm.chat()
    events = chat.send(text, max_tokens=8)
    for event in events:
        if isinstance(event, PrefillProgress):
            break                      # the consumer goes away mid-prefill, as a killed process would
    events.close()
    assert chat.messages == []         # nothing half-done in the live conversation
    resumed = localkv.load(smollm2_gguf, ctx="8K", device="cpu", dtype="fp32", session=tmp_path / "s").chat()
    chunk = llm.engine.prefill_chunk
    assert resumed.session.pending == text and resumed.context_tokens == chunk and resumed.messages == []
    got = list(resumed.send(text, max_tokens=8))
    assert "".join(e.text for e in got) == want and want
    target = llm.engine.render([{"role": "user", "content": text}])
    assert got[-1].prompt_tokens == len(target) - chunk       # only what the checkpoint did not hold
    again = localkv.load(smollm2_gguf, ctx="8K", device="cpu", dtype="fp32", session=tmp_path / "s").chat()
    assert again.session.pending is None and again.messages == resumed.messages   # saved after the reply


def test_cli_prompt_with_a_session_keeps_the_document(smollm2_gguf, tmp_path, capsys):
    """`localkv run --session DIR --prompt ...` starts the session, then a second run over the same document
    resumes it: its KV is read back and only the new question is prefilled."""
    from localkv.cli import main
    from localkv.offload.session import read_manifest

    doc = "A short note on tides: the moon pulls the sea. " * 30
    base = [str(smollm2_gguf), "--ctx", "4K", "--device", "cpu", "--session", str(tmp_path / "s"),
            "--max-tokens", "4", "--no-tui"]
    assert main(["run", *base, "--prompt", doc]) == 0
    first = read_manifest(tmp_path / "s")
    assert first["tokens"] > 300 and len(first["messages"]) == 2
    assert main(["run", *base, "--prompt", "What pulls the sea?"]) == 0
    second = read_manifest(tmp_path / "s")
    assert second["ids"][:first["tokens"]] == first["ids"] and len(second["messages"]) == 4
    capsys.readouterr()
