"""The chat app driven by Pilot on a tiny random model.

Replies go through ``SteppedChat``, which holds every event of the stream until the test releases it, so
mid-stream states (prefill progress, partial text, a cancel) are observed deterministically, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import localkv
from localkv.tui.app import LocalKVApp
from localkv.tui.screens.chat import ChatScreen
from localkv.tui.screens.commands import SESSIONS_LATER, parse_command, read_attachment, split_path
from localkv.tui.widgets import AssistantTurn, ChatLog, Meter, PromptInput, SidePanel, UserTurn
from localkv.tui.widgets.side_panel import MovedPerToken, tier_rows, traffic_lines
from localkv.errors import UserError

SIZE = (110, 40)
OPTIONS = dict(max_tokens=24)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import write_model

    return write_model(tmp_path_factory.mktemp("tui") / "tiny", "qwen2", seed=0)


@pytest.fixture
def llm(tiny_model_dir):
    # One intra-op thread: the tiny model's ops are too small to share, and two torch threads spinning
    # against the UI thread on a 2-core machine made each token ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield localkv.load(tiny_model_dir, ctx="4K", device="cpu", dtype="fp32")
    torch.set_num_threads(threads)


@pytest.fixture
def tiered_llm(tiny_model_dir, tmp_path):
    """The tiny model with budgets small enough that its KV spills from the "GPU" tier to CPU and disk."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield localkv.load(tiny_model_dir, ctx="4K", device="cpu", dtype="fp32", gpu_mem="64KB", cpu_mem="128KB",
                       disk=tmp_path / "kv")
    torch.set_num_threads(threads)


class SteppedChat:
    """A Chat whose replies wait for the test: each event of ``send`` needs one ``release``.

    Everything else is the wrapped Chat's. ``fail_after`` makes the stream raise after that many events
    (a model fault).
    """

    def __init__(self, chat, *, stepped: bool = True, fail_after: int | None = None):
        self._chat = chat
        self.stepped = stepped
        self.fail_after = fail_after
        self._permits = threading.Semaphore(0)
        self.taken = 0
        """Events let through so far."""

    def __getattr__(self, name):
        return getattr(self._chat, name)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def run_free(self) -> None:
        self.stepped = False
        self.release(1000)

    def send(self, text, **options):
        for i, event in enumerate(self._chat.send(text, **options)):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("simulated model fault")
            if self.stepped and not self._permits.acquire(timeout=20):
                raise TimeoutError("the test never released this event")
            self.taken += 1
            yield event


async def until(pilot, condition, what: str, timeout: float = 15.0) -> None:
    """Let the app run until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


async def step_until(pilot, chat: SteppedChat, condition, what: str, max_events: int = 20) -> None:
    """Release events one at a time until ``condition()`` holds (a token may carry no text yet)."""
    for _ in range(max_events):
        if condition():
            return
        taken = chat.taken
        chat.release(1)
        await until(pilot, lambda: chat.taken > taken, "the next event")
        await pilot.pause(0.05)
    await until(pilot, condition, what, timeout=2)


def run(coro) -> None:
    asyncio.run(coro)


async def send(app, pilot, text: str) -> None:
    app.screen.query_one(PromptInput).load_text(text)
    await pilot.press("enter")


def turns(app, kind):
    return list(app.screen.query(kind))


def notices(app) -> list[str]:
    return [str(getattr(w, "text", "") or w.render()) for w in app.screen.query(".notice")]


def panel_text(app, selector: str) -> str:
    widget = app.screen.query_one(SidePanel).query_one(selector)
    return widget.detail if isinstance(widget, Meter) else str(widget.render())


async def finished(app, pilot) -> None:
    await until(pilot, lambda: not app.screen.busy, "the reply to finish")


# -- streaming, cancel, side panel ---------------------------------------------------------------------------

def test_reply_streams_and_input_is_locked(llm):
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            prompt = app.screen.query_one(PromptInput)
            assert prompt.has_focus
            await send(app, pilot, "hello")
            await until(pilot, lambda: app.screen.busy, "the reply to start")
            assert prompt.read_only and prompt.text == ""
            await pilot.press("x")  # the box is locked while the model answers
            assert prompt.text == ""
            [user] = turns(app, UserTurn)
            assert user.text == "hello"
            [turn] = turns(app, AssistantTurn)
            await step_until(pilot, chat, lambda: turn.text, "the first text")
            partial = turn.text
            assert app.screen.busy  # mid-stream: text shown, reply not over
            chat.run_free()
            await finished(app, pilot)
            final = chat.messages[-1]
            assert final["role"] == "assistant" and final["content"] == turn.text
            assert turn.text.startswith(partial) and len(turn.text) > len(partial)
            assert "tokens at" in str(turn.query_one(".status").render())
            assert not prompt.read_only and prompt.has_focus

    run(go())


def test_side_panel_numbers_change_while_generating(llm, monkeypatch):
    from localkv.runtime import engine

    monkeypatch.setattr(engine, "STATS_INTERVAL_S", 0.0)   # stats with every token (by default: every 0.25 s)
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            assert panel_text(app, "#context") == f"0 / {llm.ctx_tokens:,}"
            assert "exact" in panel_text(app, "#model") and "tiny" in panel_text(app, "#model")
            await send(app, pilot, "hello")
            chat.release(2)  # prefill + one token
            await until(pilot, lambda: "1 tokens" in panel_text(app, "#decode"), "the first decode stats")
            context_1, kv_1 = panel_text(app, "#context"), panel_text(app, "#tier-kv")
            assert "tok/s" in panel_text(app, "#decode") and "tokens" in panel_text(app, "#prefill")
            chat.release(2)
            await until(pilot, lambda: "3 tokens" in panel_text(app, "#decode"), "two more tokens")
            assert panel_text(app, "#context") != context_1
            assert panel_text(app, "#tier-kv") != kv_1
            chat.run_free()
            await finished(app, pilot)
            assert panel_text(app, "#context") == f"{chat.context_tokens:,} / {llm.ctx_tokens:,}"
            assert "tok/s" in panel_text(app, "#last")

    run(go())


def test_escape_cancels_and_the_chat_goes_on(llm):
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, "hello")
            [turn] = turns(app, AssistantTurn)
            await step_until(pilot, chat, lambda: turn.text, "the first text")
            await pilot.press("escape")
            assert "stopping" in str(turn.query_one(".status").render())
            chat.run_free()
            await finished(app, pilot)
            assert "stopped" in str(turn.query_one(".status").render())
            assert chat.last.finish_reason == "cancelled"
            assert chat.messages[-1] == {"role": "assistant", "content": turn.text}  # the partial reply is kept
            n_tokens = chat.context_tokens
            await send(app, pilot, "and again")
            await finished(app, pilot)
            assert len(turns(app, AssistantTurn)) == 2
            assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
            assert chat.last.finish_reason != "cancelled" and chat.context_tokens > n_tokens

    run(go())


# -- /attach -------------------------------------------------------------------------------------------------

def test_attach_shows_prefill_progress_then_answers(llm, tmp_path):
    llm.engine.prefill_chunk = 32  # several progress events from a small file
    notes = tmp_path / "notes.txt"
    notes.write_text("Paris is the capital of France. The quick brown fox jumps over the lazy dog.\n" * 6)
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, f"/attach {notes} what is the capital?")
            await until(pilot, lambda: turns(app, AssistantTurn), "the reply turn")
            [user], [turn] = turns(app, UserTurn), turns(app, AssistantTurn)
            await until(pilot, lambda: "attached notes.txt" in user.text, "the attachment summary")
            assert "what is the capital?" in user.text
            chat.release(1)  # the first prefill chunk
            bar = app.screen.query_one("#prefill-bar")
            await until(pilot, lambda: bar.progress == 32, "the first prefill chunk")
            total = bar.total
            assert total > 3 * 32
            assert panel_text(app, "#prefill").startswith(f"32 / {int(total):,} tokens")
            assert "reading the prompt: 32 /" in str(turn.query_one(".status").render())
            chat.release(1)
            await until(pilot, lambda: bar.progress == 64, "the second prefill chunk")
            chat.run_free()
            await finished(app, pilot)
            assert bar.progress == total
            sent = chat.messages[-2]["content"]
            assert "## notes.txt" in sent and "Paris is the capital" in sent and sent.endswith("what is the capital?")
            assert chat.messages[-1]["role"] == "assistant"
            assert "tokens at" in str(turn.query_one(".status").render())

    run(go())


def test_escape_during_prefill(llm, tmp_path):
    llm.engine.prefill_chunk = 16
    notes = tmp_path / "notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog.\n" * 8)
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, f"/attach {notes}")
            chat.release(1)
            bar = app.screen.query_one("#prefill-bar")
            await until(pilot, lambda: bar.progress == 16, "the first prefill chunk")
            await pilot.press("escape")
            chat.run_free()
            await finished(app, pilot)
            [turn] = turns(app, AssistantTurn)
            assert turn.text == "" and "stopped" in str(turn.query_one(".status").render())
            assert chat.last.finish_reason == "cancelled" and bar.progress < bar.total
            await send(app, pilot, "hello")
            await finished(app, pilot)
            assert chat.last.finish_reason != "cancelled" and chat.messages[-1]["role"] == "assistant"

    run(go())


def test_errors_are_shown_and_the_app_keeps_running(llm, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    chat = SteppedChat(llm.chat(), stepped=False)

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            for arg, expected in ((f"{tmp_path}/missing.txt", "no such file"), (f"{tmp_path}/blob.bin", "binary"),
                                  (f"{tmp_path}/latin1.txt", "not UTF-8")):
                await send(app, pilot, f"/attach {arg}")
                await finished(app, pilot)
                assert expected in notices(app)[-1], notices(app)
                assert not turns(app, AssistantTurn)  # the empty reply turn is gone
                assert turns(app, UserTurn)[-1].has_class("-failed")
            assert chat.messages == []
            await send(app, pilot, "word " * 5000)  # more than the 4K context
            await finished(app, pilot)
            assert "context" in notices(app)[-1] and chat.messages == []
            chat.fail_after = 3
            await send(app, pilot, "hello")
            await finished(app, pilot)
            assert "internal fault: RuntimeError: simulated model fault" in notices(app)[-1]
            chat.fail_after = None
            await send(app, pilot, "hello again")
            await finished(app, pilot)
            assert chat.messages[-1]["role"] == "assistant"
            assert "tokens at" in str(turns(app, AssistantTurn)[-1].query_one(".status").render())

    run(go())


# -- commands and keys ---------------------------------------------------------------------------------------

class NoSessionChat(SteppedChat):
    """A Chat from before sessions on disk existed."""

    def __getattr__(self, name):
        if name == "save":
            raise AttributeError(name)
        return super().__getattr__(name)


def test_commands(llm, tmp_path):
    chat = NoSessionChat(llm.chat(), stepped=False)

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            log = app.screen.query_one(ChatLog)
            await send(app, pilot, "/help")
            await pilot.pause()
            assert "/attach PATH" in app.screen.query(".notice").last().source
            await send(app, pilot, "/system You are terse.")
            await pilot.pause()
            assert chat.messages == [{"role": "system", "content": "You are terse."}]
            await send(app, pilot, "hi")
            await finished(app, pilot)
            assert len(chat.messages) == 3
            await send(app, pilot, "/reset")
            await pilot.pause()
            assert chat.messages == [{"role": "system", "content": "You are terse."}]
            assert not turns(app, AssistantTurn) and chat.context_tokens == 0
            await send(app, pilot, f"/save {tmp_path}/session")
            await pilot.pause()
            assert notices(app)[-1] == SESSIONS_LATER
            await send(app, pilot, "/frobnicate")
            await pilot.pause()
            assert "unknown command /frobnicate" in notices(app)[-1]
            assert len(log.children) >= 3

    run(go())


def test_save_and_load_a_session(llm, tmp_path):
    chat = llm.chat()

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, "hello")
            await finished(app, pilot)
            messages, n_tokens = list(chat.messages), chat.context_tokens
            await send(app, pilot, f"/save {tmp_path}/s1")
            await until(pilot, lambda: "saved to" in notices(app)[-1], "the save")
            await send(app, pilot, "/reset")
            await until(pilot, lambda: not turns(app, UserTurn), "the reset")
            await send(app, pilot, f"/load {tmp_path}/s1")
            await until(pilot, lambda: "loaded from" in notices(app)[-1], "the load")
            loaded = app.screen.chat
            assert loaded is not chat and loaded.messages == messages and loaded.context_tokens == n_tokens
            assert [t.text for t in turns(app, UserTurn)] == ["hello"]
            assert turns(app, AssistantTurn)[0].text == messages[-1]["content"]
            assert panel_text(app, "#context") == f"{n_tokens:,} / {llm.ctx_tokens:,}"
            await send(app, pilot, "and on")
            await finished(app, pilot)
            assert loaded.messages[-1]["role"] == "assistant" and len(loaded.messages) == 4
            await send(app, pilot, f"/load {tmp_path}/nothing-here")
            await until(pilot, lambda: "error: /load" in notices(app)[-1], "the failed load")
            assert app.screen.chat is loaded

        resumed = LocalKVApp(llm, chat=llm.load_session(tmp_path / "s1"), options=OPTIONS)  # load(session=...)
        async with resumed.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert [t.text for t in turns(resumed, UserTurn)] == ["hello"] and turns(resumed, AssistantTurn)

    run(go())


def test_tiered_store_shows_tiers_and_traffic(tiered_llm):
    chat = SteppedChat(tiered_llm.chat(), stepped=False)

    async def go():
        app = LocalKVApp(tiered_llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, "hello " * 200)
            await finished(app, pilot)
            side = app.screen.query_one(SidePanel)
            assert [m.id for m in side.query(Meter)] == ["context", "tier-gpu", "tier-cpu", "tier-disk"]
            assert " / 64.0 KB" in panel_text(app, "#tier-gpu") and "tok" in panel_text(app, "#tier-disk")
            traffic = panel_text(app, "#traffic")
            assert "moved / token:" in traffic and "disk read:" in traffic, traffic

    run(go())


def test_q_types_in_the_box_and_quits_outside_it(llm):
    async def go():
        app = LocalKVApp(llm, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("q", "u", "i", "t", "ctrl+j", "q")
            assert app.screen.query_one(PromptInput).text == "quit\nq"
            assert app.is_running
            await pilot.press("escape")  # leaves the box
            await pilot.press("q")
            await pilot.pause()
        assert app.return_code == 0

    run(go())


def test_ctrl_c_quits_mid_reply(llm):
    chat = SteppedChat(llm.chat())

    async def go():
        app = LocalKVApp(llm, chat=chat, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            await send(app, pilot, "hello")
            chat.release(2)
            await until(pilot, lambda: app.screen.busy, "the reply")
            screen = app.screen
            assert isinstance(screen, ChatScreen)
            await pilot.press("ctrl+c")
            assert screen._cancel.is_set()
            chat.run_free()
        assert app.return_code == 0

    run(go())


# -- the pieces without the app ------------------------------------------------------------------------------

def test_command_parsing_and_attachment_reading(tmp_path):
    assert parse_command("hello") is None
    assert parse_command("/attach a.txt what?").arg == "a.txt what?"
    assert split_path('"my notes.txt" what is it') == ("my notes.txt", "what is it")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("print(1)\n")
    (tmp_path / "d" / "sub" / "b.md").write_text("# B\n")
    (tmp_path / "d" / "logo.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / "d" / ".hidden").write_text("secret")
    att = read_attachment(f"{tmp_path}/d summarize", max_chars=10_000)
    assert att.files == ["a.py", "sub/b.md"] and att.skipped == ["logo.png"]
    assert "## a.py\n\nprint(1)" in att.message and "## sub/b.md" in att.message
    assert att.message.endswith("summarize") and "secret" not in att.message
    with pytest.raises(UserError, match="more than the context"):
        read_attachment(f"{tmp_path}/d", max_chars=5)
    with pytest.raises(UserError, match="no text files"):
        (tmp_path / "empty").mkdir()
        read_attachment(f"{tmp_path}/empty", max_chars=5)


def test_tier_rows_show_whatever_the_store_reports():
    assert tier_rows({"tokens": 10, "capacity": 100, "device_bytes": 2048}) == [("KV", 0.1, "2.0 KB · 10 tok")]
    tiered = {"tokens": 100, "gpu_tokens": 25, "gpu_bytes": 1 << 20, "cpu_tokens": 75, "cpu_bytes": 3 << 20,
              "disk_tokens": 0, "disk_bytes": 0, "bytes_moved_per_token": {"cpu": 4096, "disk": 0},
              "hit_rate": 0.875, "acceptance_rate": 0.6, "pages_resident": 12, "gpu_budget": 4 << 20}
    rows = tier_rows(tiered)
    assert [r[0] for r in rows] == ["GPU", "CPU", "DISK"]
    assert rows[0] == ("GPU", 0.25, "1.0 MB / 4.0 MB · 25 tok") and rows[1][1] == 0.75  # budget; share of tokens
    lines = traffic_lines(tiered)
    assert "moved / token:" in lines and "  cpu: 4.0 KB" in lines
    assert "hit rate: 87.5%" in lines and "draft acceptance: 60.0%" in lines and "pages resident: 12" in lines
    assert traffic_lines({"bytes_moved_per_token": 1024}) == ["moved / token: 1.0 KB"]
    leoam = traffic_lines({"moved_bytes_per_token": {"cpu": 1024, "disk_read": 4096}, "disk_wait_ms_per_token": 1.5})
    assert leoam[:3] == ["chunks / token:", "  cpu: 1.0 KB", "  disk read: 4.0 KB"] and len(leoam) == 4
    rate = MovedPerToken()
    assert rate.update({"h2d": 100, "disk_read": 0}, 1) is None
    assert rate.update({"h2d": 500, "disk_read": 300}, 5) == {"h2d": 100, "disk_read": 75}
    assert traffic_lines({"moved_bytes": {}}, moved_per_token={"disk_read": 2048}) == [
        "moved / token:", "  disk read: 2.0 KB"]


def test_the_panel_switches_to_tiers_when_the_store_reports_them(llm):
    async def go():
        app = LocalKVApp(llm, options=OPTIONS)
        async with app.run_test(size=SIZE) as pilot:
            side = app.screen.query_one(SidePanel)
            assert [m.id for m in side.query(Meter)] == ["context", "tier-kv"]
            side.show_cache({"tokens": 8, "gpu_tokens": 8, "gpu_bytes": 4096, "cpu_tokens": 0, "cpu_bytes": 0,
                             "hit_rate": 0.5})
            await pilot.pause()
            assert [m.id for m in side.query(Meter)] == ["context", "tier-gpu", "tier-cpu"]
            assert "hit rate: 50.0%" in panel_text(app, "#traffic")
            side.show_cache({"tokens": "eight", "gpu_tokens": [1]})  # nonsense never raises
            await pilot.pause()
            assert "unreadable" in panel_text(app, "#traffic")

    run(go())
