"""A real `digitwatch serve` subprocess on a free loopback port, for the API and browser tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from daemon_helpers import wait_for

from digitwatch.settings import DEFAULT_WEIGHTS


class ServeProcess:
    """`python -m digitwatch serve --port 0`; `url` is read from its `serving` log line."""

    def __init__(self, inbox: Path, outbox: Path, *extra: str, log: Path | None = None) -> None:
        self.log = log or outbox.parent / f"serve-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "digitwatch", "serve", "--port", "0", "--inbox", str(inbox)]
        cmd += ["--outbox", str(outbox), "--weights", str(DEFAULT_WEIGHTS)]
        cmd += ["--log-format", "json", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
        env.pop("NOTIFY_SOCKET", None)
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.url = ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_serving(self, deadline: float = 20.0) -> ServeProcess:
        def serving() -> bool:
            return self.proc.poll() is not None or any(
                e.get("event") == "serving" for e in self.events()
            )

        wait_for(serving, deadline, "the server's `serving` line")
        assert self.proc.poll() is None, f"serve exited early:\n{self.log.read_text()}"
        self.url = next(e["url"] for e in self.events() if e.get("event") == "serving")
        return self

    def stop(self, deadline: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(deadline)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


def request(
    url: str,
    data: bytes | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one `field` part per file, and its content type."""
    boundary = "digitwatch-test-boundary-7d1f"
    out = b""
    for name, data in files:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"
