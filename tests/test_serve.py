"""`digitwatch serve` as a subprocess on loopback: the API, the review actions, operations."""

from __future__ import annotations

import base64
import csv
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from daemon_helpers import DaemonProcess, csv_rows, digit_png, drop, wait_for
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ServeProcess, multipart, request

from digitwatch import review
from digitwatch.results import Record
from digitwatch.settings import DEFAULT_WEIGHTS

TOKEN = "s3cret-test-token"
LIMIT_MB = 0.05  # 52,428 bytes: small enough to exceed cheaply


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("serve")
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    s = ServeProcess(inbox, outbox, "--token", TOKEN, "--max-file-mb", str(LIMIT_MB))
    try:
        yield s.wait_serving()
    finally:
        assert s.stop() == 0, s.log.read_text()


def _outbox(server: ServeProcess) -> Path:
    return Path(server.proc.args[server.proc.args.index("--outbox") + 1])  # type: ignore[union-attr]


def _json(status_headers_body: tuple[int, dict[str, str], bytes]) -> object:
    return json.loads(status_headers_body[2])


def _predict_cli(path: Path) -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    out = subprocess.run(
        [sys.executable, "-m", "digitwatch", "predict", str(path), "--format", "json"]
        + ["--weights", str(DEFAULT_WEIGHTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return list(json.loads(out.stdout))


def _without_timing(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != "elapsed_ms"}


def test_raw_body_answers_the_record_predict_prints(server: ServeProcess, tmp_path: Path) -> None:
    cases = {
        "seven.png": digit_png(1),
        "blank.png": digit_png(blank=True),  # decodes, holds no digit: 200 and no_digit
        "cut.png": digit_png(2)[:60],  # a PNG's magic, then cut short: 200 and an error record
        "big.png": digit_png(3, size=400),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code, headers, body = request(f"{server.url}/v1/predict?name={name}", data)
        assert code == 200, body
        assert headers["content-type"] == "application/json"
        (expected,) = _predict_cli(tmp_path / name)
        got = json.loads(body)
        assert isinstance(got, dict), "one image answers one object"
        assert _without_timing(got) == _without_timing(expected), name
    assert json.loads(request(f"{server.url}/v1/predict", cases["seven.png"])[2])["digit"] == 7


def test_multipart_files_answer_a_list_classified_in_one_batch(server: ServeProcess) -> None:
    def batches() -> tuple[float, float]:
        text = request(f"{server.url}/metrics")[2].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        by = {s.name: s.value for s in families["digitwatch_batch_size"].samples}
        return by["digitwatch_batch_size_count"], by["digitwatch_batch_size_sum"]

    before = batches()
    files = [("a.png", digit_png(1)), ("b.png", digit_png(blank=True)), ("c.png", digit_png(4))]
    body, ctype = multipart(files)
    code, _, answer = request(f"{server.url}/v1/predict", body, headers={"Content-Type": ctype})
    assert code == 200, answer
    records = json.loads(answer)
    assert [r["input"] for r in records] == ["a.png", "b.png", "c.png"]
    assert [r["status"] for r in records] == ["ok", "no_digit", "ok"]
    after = batches()
    assert after == (before[0] + 1, before[1] + 3), "three files, one batch"

    body, ctype = multipart(files[:1])
    one = json.loads(request(f"{server.url}/v1/predict", body, headers={"Content-Type": ctype})[2])
    assert isinstance(one, dict) and one["digit"] == 7
    # A path in the client's file name is only a label, cut to its last part.
    body, ctype = multipart([("../../etc/x.png", digit_png(1))])
    one = json.loads(request(f"{server.url}/v1/predict", body, headers={"Content-Type": ctype})[2])
    assert one["input"] == "x.png"
    body, ctype = multipart(files[:1], field="image")
    code, _, answer = request(f"{server.url}/v1/predict", body, headers={"Content-Type": ctype})
    assert code == 400 and b"`file`" in answer


def test_over_the_size_limit_is_413_before_the_body_is_read(server: ServeProcess) -> None:
    limit = int(LIMIT_MB * 1024 * 1024)
    big = digit_png(1) + b"\0" * limit  # a PNG's magic: only its size is wrong
    code, _, body = request(f"{server.url}/v1/predict", big)
    assert code == 413 and b"limit" in body
    parts, ctype = multipart([("a.png", digit_png(1)), ("big.png", big)])
    assert request(f"{server.url}/v1/predict", parts, headers={"Content-Type": ctype})[0] == 413

    # A client announcing 1 GB gets its 413 without sending a byte of it.
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()

    # Chunked, with no length to check first: refused once past the limit.
    def chunks() -> Iterator[bytes]:
        yield digit_png(1)
        for _ in range(limit // 4096 + 2):
            yield b"\0" * 4096

    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/v1/predict", body=chunks(), encode_chunked=True)
        assert conn.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the rest was still being sent
    conn.close()


def test_no_supported_image_format_is_415(server: ServeProcess) -> None:
    for data in (
        b"hello, not an image",
        b"%PDF-1.7\n",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ):
        code, _, body = request(f"{server.url}/v1/predict?name=x.png", data)
        assert code == 415, data
        assert json.loads(body) == {
            "error": "not an image in a supported format (PNG, JPEG, GIF, BMP, WebP, TIFF)",
            "input": "x.png",
        }
    parts, ctype = multipart([("good.png", digit_png(1)), ("bad.txt", b"plain text")])
    code, _, body = request(f"{server.url}/v1/predict", parts, headers={"Content-Type": ctype})
    assert code == 415 and json.loads(body)["input"] == "bad.txt"
    assert request(f"{server.url}/v1/predict", b"")[0] == 400


def test_seen_adds_the_28x28_image_the_model_saw(server: ServeProcess) -> None:
    record = _json(request(f"{server.url}/v1/predict?seen=1", digit_png(1)))
    assert isinstance(record, dict)
    url = str(record.pop("seen_png"))
    assert url.startswith("data:image/png;base64,")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), 0)
    assert img.shape == (28, 28) and img.max() > 0
    blank = _json(request(f"{server.url}/v1/predict?seen=1", digit_png(blank=True)))
    assert isinstance(blank, dict) and blank["seen_png"] is None


def _record(name: str, digit: int | None, conf: float | None) -> Record:
    status = "ok" if digit is not None else "no_digit"
    when = "2026-12-03T06:00:00+00:00"
    sha = "ab" * 32
    return Record(name, sha, status, digit, conf, True, None, None, "m", 28, 28, 1.0, when, when)


def _queue(server: ServeProcess, item_id: str, digit: int | None = 7) -> Path:
    folder = _outbox(server) / "review"
    src = folder.parent.parent / f"{item_id}.png"
    src.write_bytes(digit_png(1))
    seen = digit_png(1)
    assert review.add(folder, item_id, _record(f"{item_id}.png", digit, 0.5), src, seen)
    return folder


def _decide(
    server: ServeProcess, item_id: str, decision: dict[str, object], **headers: str
) -> tuple[int, dict[str, object]]:
    hdrs = {"Content-Type": "application/json", "X-Digitwatch-Token": TOKEN} | headers
    code, _, body = request(
        f"{server.url}/v1/review/{item_id}", json.dumps(decision).encode(), headers=hdrs
    )
    return code, json.loads(body)


def test_review_lists_serves_and_decides_through_the_queue_functions(
    server: ServeProcess,
) -> None:
    folder = _queue(server, "rv1")
    _queue(server, "rv2", digit=None)
    listing = _json(request(f"{server.url}/v1/review"))
    assert isinstance(listing, dict) and listing["decisions"] is True
    items = {i["id"]: i for i in listing["items"]}
    assert {"rv1", "rv2"} <= set(items)
    code, headers, data = request(server.url + items["rv1"]["input_url"])
    assert code == 200 and headers["content-type"] == "image/png" and data == digit_png(1)
    assert request(server.url + items["rv1"]["seen_url"])[0] == 200

    assert _decide(server, "rv1", {"action": "correct", "digit": 11})[0] == 400
    assert _decide(server, "rv2", {"action": "accept"})[0] == 409, "no digit to accept"
    code, answer = _decide(server, "rv1", {"action": "correct", "digit": 1})
    assert code == 200 and answer == {"id": "rv1", "input": "rv1.png", "human_digit": 1}
    code, answer = _decide(server, "rv2", {"action": "reject"})
    assert code == 200 and answer["human_digit"] is None
    assert not (folder / "rv1").exists() and (folder / review.DECIDED / "rv1").is_dir()
    with (folder / review.LABELS).open(newline="") as f:
        rows = {r["input"]: r for r in csv.DictReader(f)}
    assert rows["rv1.png"]["human_digit"] == "1" and rows["rv2.png"]["human_digit"] == "none"
    code, answer = _decide(server, "rv1", {"action": "accept"})
    assert code == 409 and "decided already" in str(answer["error"])
    listed = _json(request(f"{server.url}/v1/review"))
    assert isinstance(listed, dict) and not {"rv1", "rv2"} & {i["id"] for i in listed["items"]}


def test_decisions_need_the_token_in_a_header_and_a_same_site_origin(
    server: ServeProcess,
) -> None:
    folder = _queue(server, "tk1")
    labels = folder / review.LABELS
    before = labels.read_bytes() if labels.exists() else b""
    accept = {"action": "accept"}
    assert _decide(server, "tk1", accept, **{"X-Digitwatch-Token": ""})[0] == 401
    assert _decide(server, "tk1", accept, **{"X-Digitwatch-Token": TOKEN + "x"})[0] == 401
    # The token as a cookie is not the token.
    hdrs = {"Content-Type": "application/json", "Cookie": f"token={TOKEN}"}
    code, _, _ = request(f"{server.url}/v1/review/tk1", b'{"action": "accept"}', headers=hdrs)
    assert code == 401
    # A page on another site, even one that knows the token, is refused by its Origin.
    assert _decide(server, "tk1", accept, Origin="http://evil.example")[0] == 403
    assert _decide(server, "tk1", accept, Origin="null")[0] == 403
    # A form post cannot set application/json: refused.
    form = {"Content-Type": "application/x-www-form-urlencoded", "X-Digitwatch-Token": TOKEN}
    code, _, _ = request(f"{server.url}/v1/review/tk1", b"action=accept", headers=form)
    assert code == 415
    assert (folder / "tk1").is_dir() and (labels.read_bytes() if labels.exists() else b"") == before
    # A DNS-rebinding page reaches loopback under its own name: refused by the Host check.
    code, _, _ = request(f"{server.url}/v1/review", headers={"Host": "evil.example:8080"})
    assert code == 421
    own = urlsplit(server.url).netloc
    code, _ = _decide(server, "tk1", accept, Origin=f"http://{own}")
    assert code == 200


def test_hostile_item_ids_never_reach_outside_the_review_folder(
    server: ServeProcess, tmp_path: Path
) -> None:
    folder = _queue(server, "safe1")
    _queue(server, "decided-one")
    assert _decide(server, "decided-one", {"action": "accept"})[0] == 200
    # Outside the queue: an item-shaped folder that a link or a `..` would reach.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "record.json").write_text(_record("secret.png", 3, 0.5).to_json())
    (outside / "input.png").write_bytes(b"\x89PNG\r\n\x1a\nSECRET")
    (folder / "link").symlink_to(outside)
    (folder / ".new-half").mkdir()
    (folder / ".new-half" / "record.json").write_text(_record("half.png", 3, 0.5).to_json())
    rel = os.path.relpath(outside, folder)
    hostile = [
        "..",
        "%2e%2e",
        "..%2f..%2fetc",
        "%2e%2e%2f" + rel.replace("/", "%2f"),
        rel.replace("/", "%2f"),
        "link",
        ".new-half",
        "decided",
        "decided%2fdecided-one",
        "safe1%00",
        "%00",
        "x" * 300,
        "safe1%2f..%2f..%2finbox",
        "%5c..%5c..",
    ]
    labels_before = (folder / review.LABELS).read_bytes()
    for item_id in hostile:
        for which in ("input", "seen.png", "record.json", "..%2frecord.json"):
            code, _, body = request(f"{server.url}/v1/review/{item_id}/{which}")
            assert code in (404, 409), (item_id, which, code)
            assert b"SECRET" not in body
        code, answer = _decide(server, item_id, {"action": "correct", "digit": 3})
        assert code in (404, 405, 409), (item_id, code, answer)  # 405: a `/` made it a file route
    assert (folder / review.LABELS).read_bytes() == labels_before
    assert (outside / "record.json").exists() and (folder / ".new-half").is_dir()
    assert (folder / "safe1").is_dir() and (folder / "link").is_symlink()
    listed = _json(request(f"{server.url}/v1/review"))
    assert isinstance(listed, dict) and "safe1" in {i["id"] for i in listed["items"]}
    (folder / "link").unlink()


def test_status_metrics_health_and_readiness(server: ServeProcess) -> None:
    outbox = _outbox(server)
    inbox = outbox.parent / "inbox"
    code, headers, body = request(f"{server.url}/status")
    assert code == 200 and headers["content-type"] == "application/json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    cli = subprocess.run(
        [sys.executable, "-m", "digitwatch", "status", "--json"]
        + ["--inbox", str(inbox), "--outbox", str(outbox)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    page = json.loads(body)
    page.pop("review_queue")
    assert page == json.loads(cli.stdout)
    code, headers, body = request(f"{server.url}/status", headers={"Accept": "text/html"})
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b"/static/status.js" in body

    text = request(f"{server.url}/metrics")[2].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    images = {s.labels["status"]: s.value for s in families["digitwatch_images"].samples}
    request(f"{server.url}/v1/predict", digit_png(1))
    request(f"{server.url}/v1/predict", digit_png(blank=True))
    text = request(f"{server.url}/metrics")[2].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    after = {s.labels["status"]: s.value for s in families["digitwatch_images"].samples}
    assert after["ok"] == images["ok"] + 1 and after["no_digit"] == images["no_digit"] + 1
    http_requests = families["digitwatch_http_requests"].samples
    assert any(
        s.labels == {"route": "/v1/predict", "code": "200"} and s.value >= 2 for s in http_requests
    )

    assert request(f"{server.url}/healthz")[:1] == (200,)
    code, _, body = request(f"{server.url}/readyz")
    assert code == 200 and json.loads(body)["ready"] is True
    moved = outbox.with_name("outbox-away")
    outbox.rename(moved)
    try:
        code, _, body = request(f"{server.url}/readyz")
        assert code == 503 and "missing" in json.loads(body)["checks"]["outbox"]
        assert request(f"{server.url}/v1/status")[0] == 503
    finally:
        moved.rename(outbox)
    assert request(f"{server.url}/readyz")[0] == 200


def test_pages_are_served_from_the_package_with_no_inline_code(server: ServeProcess) -> None:
    for path, script in (("/", "predict.js"), ("/review", "review.js")):
        code, headers, body = request(server.url + path)
        assert code == 200 and f"/static/{script}".encode() in body
        assert b"<script>" not in body and b"http" not in body.split(b"<body>")[1], path
        assert "script-src 'self'" in headers["content-security-policy"]
        assert request(f"{server.url}/static/{script}")[0] == 200


def test_a_review_item_from_the_real_daemon_is_corrected_over_http(
    folders: tuple[Path, Path],
) -> None:
    inbox, outbox = folders
    daemon = DaemonProcess(inbox, outbox, "--uncertain-below", "1.0")
    web = ServeProcess(inbox, outbox, "--token", TOKEN)
    try:
        daemon.wait_ready()
        web.wait_serving()
        drop(inbox, "seven.png", digit_png(1))
        wait_for(lambda: len(review.items(outbox / "review")) == 1, 20, "a review item")
        listing = _json(request(f"{web.url}/v1/review"))
        assert isinstance(listing, dict)
        (item,) = listing["items"]
        assert item["record"]["input"] == "seven.png"
        code, _ = _decide(web, item["id"], {"action": "correct", "digit": 1})
        assert code == 200
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
        out = subprocess.run(
            [sys.executable, "-m", "digitwatch", "review", "--outbox", str(outbox)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        assert out.stdout.startswith("the review queue is empty")
        status = _json(request(f"{web.url}/v1/status"))
        assert isinstance(status, dict) and status["answered"]["ok"] == len(csv_rows(outbox)) == 1
        assert daemon.stop() == 0
        assert web.stop() == 0
    finally:
        daemon.close()
        web.close()


def test_decisions_are_off_without_a_token(folders: tuple[Path, Path]) -> None:
    inbox, outbox = folders
    web = ServeProcess(inbox, outbox).wait_serving()
    try:
        listing = _json(request(f"{web.url}/v1/review"))
        assert isinstance(listing, dict) and listing["decisions"] is False
        hdrs = {"Content-Type": "application/json", "X-Digitwatch-Token": ""}
        code, _, body = request(f"{web.url}/v1/review/x", b'{"action": "reject"}', headers=hdrs)
        assert code == 403 and b"--token" in body
        # SIGTERM: a clean stop, promptly.
        t0 = time.monotonic()
        web.proc.send_signal(signal.SIGTERM)
        assert web.proc.wait(10) == 0
        assert time.monotonic() - t0 < 6
    finally:
        web.close()


def test_bad_weights_and_a_taken_port_fail_in_one_line(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    inbox, outbox = folders
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    base = [sys.executable, "-m", "digitwatch", "serve", "--inbox", str(inbox)]
    base += ["--outbox", str(outbox)]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not weights")
    p = subprocess.run(
        [*base, "--weights", str(bad)], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode == 5 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [*base, "--port", str(port)], capture_output=True, text=True, env=env, timeout=60
        )
    assert p.returncode == 3, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"digitwatch: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
