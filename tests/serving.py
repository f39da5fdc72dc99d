"""Test helpers: a fake tokenizer and a gRPC server running in a background thread."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace


class ByteTokenizer:
    """Test fake: printable ASCII <-> ids 3..95 of the tiny models' vocabulary."""

    chat_template = "fake"
    eos_token_id = 2

    def __call__(self, text):
        return SimpleNamespace(input_ids=[3 + (ord(c) - 32) % 93 for c in text])

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return self("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>").input_ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 3) % 93) for i in ids if i >= 3)


def slow_drafter(step_s: float):
    """A drafter that drafts nothing and takes `step_s` doing it: every decoding step of a request lasts at
    least that long, so tests that must catch a request mid-decoding (cancel, deadline, overload) do not
    depend on how fast this machine decodes. Output: plain decoding's."""
    from workers.drafters import EMPTY_DRAFT, Drafter, DraftSession

    class Session(DraftSession):
        def propose(self, k):
            time.sleep(step_s)
            return EMPTY_DRAFT

    class SlowDrafter(Drafter):
        name = f"slow-{step_s}s"

        def start(self, prompt_ids, params, generator):
            return Session(prompt_ids)

    return SlowDrafter()


@contextlib.contextmanager
def serve_in_thread(built, host: str = "127.0.0.1"):
    """Run orchestrator.edge.server.start_server(built) on its own event loop; yields address, service."""
    from orchestrator.edge.server import start_server

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def serve():
        asyncio.set_event_loop(loop)
        try:
            box["server"], box["port"], box["service"] = loop.run_until_complete(start_server(built, host, 0))
        except BaseException as exc:      # surface start-up errors in the test, not in this thread
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(60), "server did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield SimpleNamespace(address=f"{host}:{box['port']}", built=built, service=box["service"])
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(None), loop).result(30)
        box["service"].close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
