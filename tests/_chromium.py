"""Drive headless Chromium over the DevTools pipe, in real time, for the HTML view's tests.

`--dump-dom --virtual-time-budget` is not enough: virtual time runs out in a
few real milliseconds while treescope decompresses its parts off the main
thread, so on a loaded CI machine the page was dumped still "(Loading...)".
Here the test asks the page itself, through `Runtime.evaluate`, and waits on a
real-time deadline for the answer.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path


class ChromiumError(RuntimeError):
    """Chromium exited, or did not answer before the deadline."""


class _Pipe:
    """The DevTools protocol over `--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4."""

    def __init__(self, to_chromium: int, from_chromium: int, process: subprocess.Popen):
        self._to, self._from, self._process = to_chromium, from_chromium, process
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    def call(self, method: str, deadline: float, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(deadline)
            if "method" in reply:
                self._events.append(reply)
                continue
            if reply.get("id") != self._next_id:
                continue  # a reply meant for nobody
            if "error" in reply:
                raise ChromiumError(f"{method}: {reply['error']}")
            return reply["result"]

    def wait_for(self, event: str, deadline: float, session: str) -> dict:
        """Returns the first `event` for `session`, kept or still to come."""
        while True:
            for index, message in enumerate(self._events):
                if message["method"] == event and message.get("sessionId") == session:
                    return self._events.pop(index)
            message = self._read(deadline)
            if "method" in message:
                self._events.append(message)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError("chromium did not answer before the deadline")
            ready, _, _ = select.select([self._from], [], [], min(left, 1.0))
            if not ready:
                if self._process.poll() is not None:
                    raise ChromiumError(f"chromium exited with {self._process.returncode}")
                continue
            chunk = os.read(self._from, 1 << 16)
            if not chunk:
                raise ChromiumError(f"chromium closed the pipe (exit {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)


def evaluate_in_page(
    chromium: str, page: Path, expression: str, profile: Path, timeout: float = 120.0
):
    """Opens `page` in headless Chromium and returns the value `expression` (maybe a promise) yields."""
    deadline = time.monotonic() + timeout
    to_read, to_write = os.pipe()  # we write commands, chromium reads them on fd 3
    from_read, from_write = os.pipe()  # chromium writes replies on fd 4, we read them
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,4000",
        "--remote-debugging-pipe",
        "about:blank",
    ]
    log_path = profile.with_name(profile.name + ".log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    # Bash (dash takes no fd above 9) puts the two pipe ends on the fds Chromium expects, with no preexec_fn.
    process = subprocess.Popen(
        ["bash", "-c", f'exec "$0" "$@" 3<&{to_read} 4>&{from_write}', chromium, *flags],
        pass_fds=(to_read, from_write),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    os.close(to_read)
    os.close(from_write)
    try:
        pipe = _Pipe(to_write, from_read, process)
        target = pipe.call("Target.createTarget", deadline, url="about:blank")["targetId"]
        attached = pipe.call("Target.attachToTarget", deadline, targetId=target, flatten=True)
        session = attached["sessionId"]
        # Navigate only once attached, so the load event cannot be missed and the
        # expression runs in the page's own context, not in about:blank's.
        pipe.call("Page.enable", deadline, session)
        pipe.call("Page.navigate", deadline, session, url=page.as_uri())
        pipe.wait_for("Page.loadEventFired", deadline, session)
        reply = pipe.call(
            "Runtime.evaluate",
            deadline,
            session,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in reply:
            raise ChromiumError(f"the page's script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")
    except ChromiumError as error:
        process.kill()
        process.wait(timeout=30)
        stderr = log_path.read_text(errors="replace")
        raise ChromiumError(f"{error}; stderr: {stderr[-2000:]}") from None
    finally:
        os.close(to_write)
        os.close(from_read)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()
