"""The Starlette app behind `digitwatch serve`, and the uvicorn server that runs it.

Starlette rather than FastAPI: every body here is an image or the pipeline's own record,
so FastAPI's request models and OpenAPI layer would have nothing to validate, and its
`/docs` page loads Swagger UI from a CDN these machines cannot reach.

One request's images are answered by `Pipeline.run` in a single thread, the way
`digitwatch predict` answers a chunk, in the calling process (the page needs the 28x28
image the model saw, which would stay in a worker process with `workers.py`). Requests queue
for that thread; the event loop keeps reading and writing HTTP meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import os
import signal
import socket
import stat
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
)
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from digitwatch import review, status
from digitwatch.classify import load_weights
from digitwatch.codec import UNSUPPORTED, Limits, encode_png, image_format
from digitwatch.errors import ConfigError, DigitwatchError
from digitwatch.metrics import Metrics
from digitwatch.pipeline import Input, Pipeline, Result, read_file
from digitwatch.sdnotify import Notifier
from digitwatch.settings import Settings
from digitwatch.watch import Ignore

log = structlog.get_logger()

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_HEADER = "x-digitwatch-token"
BODIES_AT_ONCE = 4
# Room for the multipart boundaries and part headers around files within the size limit.
_MULTIPART_SLACK = 64 * 1024
_CONTENT_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WebP": "image/webp",
    "TIFF": "image/tiff",
}
# No inline script or style anywhere: the pages' code is in static/*.js and *.css.
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        b"form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class HTTPProblem(Exception):
    """An answer other than 200, with its status code and one line for the client."""

    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.body = {"error": message, **extra}


def _problem(_: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # Starlette's own: no such route, a wrong method
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    assert isinstance(exc, HTTPProblem)
    return JSONResponse(exc.body, status_code=exc.code)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8080` -> `::1`."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Guard:
    """Cross-site and rebinding checks on every request, security headers on every answer.

    A write from a browser carries an Origin: one that is not this server's own is
    refused, so another site cannot make a visitor's browser post here. While the server
    is bound to loopback, a Host that is not a loopback name is refused too, so a DNS
    rebinding page (its own name resolving to 127.0.0.1) cannot read the queue.
    """

    def __init__(self, app: ASGIApp, *, loopback_only: bool, requests: Counter) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.requests = requests

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        refused = None
        if self.loopback_only and not _is_loopback(_host_name(host)):
            refused = (421, "this server answers only to a loopback host name")
        elif scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                refused = (403, f"cross-site request from {origin} refused")
        route = _route_label(scope["path"])
        code = 500

        async def send_with_headers(message: Any) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await send(message)

        try:
            if refused is not None:
                response = JSONResponse({"error": refused[1]}, status_code=refused[0])
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            self.requests.labels(route, str(code)).inc()


_ROUTES = frozenset(
    ("/", "/review", "/status", "/metrics", "/healthz", "/readyz")
    + ("/v1/predict", "/v1/status", "/v1/review")
)


def _route_label(path: str) -> str:
    """A bounded label for the request counter: the route, never the raw path."""
    if path in _ROUTES:
        return path
    for prefix in ("/v1/review/", "/static/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


class Predictor:
    """The pipeline `predict` uses, in one thread that requests queue for."""

    def __init__(self, settings: Settings) -> None:
        weights = load_weights(settings.weights)
        self.model_id = weights.model_id
        self.pipeline = Pipeline(
            weights,
            limits=Limits(settings.max_pixels, settings.max_file_bytes, settings.max_decode_bytes),
            uncertain_below=settings.uncertain_below,
        )
        # The first answer pays for the decoders' and numpy's first-call setup (~45 ms
        # here): pay it now, before the server says it is ready.
        blank = np.full((28, 28), 255, np.uint8)
        self.pipeline.run([Input("warm-up", data=encode_png(blank))])
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="digitwatch-predict")
        self._waiting: dict[int, tuple[int, float]] = {}  # request -> (images, since)

    async def run(self, inputs: list[Input]) -> list[Result]:
        key = id(inputs)
        self._waiting[key] = (len(inputs), time.monotonic())
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._thread, self.pipeline.run, inputs)
        finally:
            del self._waiting[key]

    def waiting(self) -> tuple[int, float]:
        """Images received and not yet answered, and how long the oldest has waited."""
        now = time.monotonic()
        entries = list(self._waiting.values())
        oldest = max((now - since for _, since in entries), default=0.0)
        return sum(n for n, _ in entries), oldest

    def close(self) -> None:
        self._thread.shutdown(wait=True)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    too_large = HTTPProblem(413, f"request body over the {limit} byte limit (--max-file-mb)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large  # before reading a byte of it
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _base_name(name: str) -> str:
    """A client's file name as the record's `input`: only its last part, never a path."""
    return name.replace("\\", "/").rsplit("/", 1)[-1] or "upload"


async def _uploads(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in the request: the raw body, or multipart `file` parts."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        body = await _read_body(request, settings.max_file_bytes)
        return [(_base_name(request.query_params.get("name", "upload")), body)]
    body = await _read_body(request, settings.max_file_bytes + _MULTIPART_SLACK)

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, once(), max_files=settings.batch_size, max_fields=8, max_part_size=4096
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise HTTPProblem(400, f"bad multipart body: {e.message}") from None
    try:
        out = []
        for part in form.getlist("file"):
            if not isinstance(part, UploadFile):
                raise HTTPProblem(400, "the multipart field `file` must be a file")
            out.append((_base_name(part.filename or "upload"), await part.read()))
    finally:
        await form.close()
    if not out:
        raise HTTPProblem(400, "no multipart field named `file`")
    return out


def _seen_png(result: Result) -> str | None:
    if result.image is None:
        return None
    return "data:image/png;base64," + base64.b64encode(encode_png(result.image)).decode()


class Service:
    """What the routes share: settings, the predictor, metrics and the folders."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.predictor = Predictor(settings)
        self.metrics = Metrics(model=self.predictor.model_id, workers=1)
        self.requests = Counter(
            "digitwatch_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "code"],
            registry=self.metrics.registry,
        )
        self.review_dir = settings.review_path.resolve()
        # Requests past this many wait before their body is read: one thread answers them
        # anyway, and each may hold --max-file-mb of body (memory: docs/serve.md).
        self._bodies = asyncio.Semaphore(BODIES_AT_ONCE)

    # -- prediction ---------------------------------------------------------------

    async def predict(self, request: Request) -> Response:
        started = time.time()
        async with self._bodies:
            return await self._predict(request, started)

    async def _predict(self, request: Request, started: float) -> Response:
        uploads = await _uploads(request, self.settings)
        for name, data in uploads:
            if len(data) > self.settings.max_file_bytes:
                raise HTTPProblem(
                    413, f"over the {self.settings.max_file_bytes} byte limit", input=name
                )
            if not data:
                raise HTTPProblem(400, "empty body: send an image", input=name)
            if image_format(data) is None:
                raise HTTPProblem(415, UNSUPPORTED, input=name)
        results = await self.predictor.run([Input(name, data=data) for name, data in uploads])
        records = [r.record for r in results]
        self.metrics.committed(records, [started] * len(records))
        with_seen = request.query_params.get("seen") in ("1", "true", "yes")
        out = []
        for r in results:
            d = r.record.to_dict()
            if with_seen:
                d["seen_png"] = _seen_png(r)
            out.append(d)
        log.info(
            "predicted",
            images=len(out),
            statuses=[d["status"] for d in out],
            ms=round((time.time() - started) * 1000, 2),
        )
        return JSONResponse(out[0] if len(out) == 1 else out)

    # -- review queue -------------------------------------------------------------

    def _item(self, item_id: str) -> review.Item:
        """The queued item `item_id` names, which is always a folder directly inside the
        review folder: any other id (`..`, `decided`, a hidden or half-built item, a
        symbolic link out of the folder, a NUL byte) is no item at all."""
        missing = HTTPProblem(404, f"no review item {item_id!r}")
        if (
            not item_id
            or item_id.startswith(".")
            or item_id == review.DECIDED
            or any(c in item_id for c in "/\\\x00")
            or len(item_id.encode("utf-8", "surrogateescape")) > 255
        ):
            raise missing
        folder = self.review_dir / item_id
        try:
            st = folder.lstat()
        except OSError:
            if (self.review_dir / review.DECIDED / item_id).is_dir():
                raise HTTPProblem(409, f"review item {item_id} is decided already") from None
            raise missing from None
        if not stat.S_ISDIR(st.st_mode) or folder.resolve().parent != self.review_dir:
            raise missing
        found = review.item(self.review_dir, item_id)
        if found is None:
            raise missing
        return found

    def review_list(self, _: Request) -> Response:
        out = []
        for item in review.items(self.review_dir):
            url = "/v1/review/" + quote(item.id, safe="")
            seen = (item.folder / review.SEEN).is_file()
            out.append(
                {
                    "id": item.id,
                    "record": item.record,
                    "input_url": url + "/input",
                    "seen_url": url + "/seen.png" if seen else None,
                }
            )
        return JSONResponse({"items": out, "decisions": bool(self.settings.token)})

    def review_file(self, request: Request) -> Response:
        item = self._item(request.path_params["item_id"])
        which = request.path_params["which"]
        if which == "input":
            try:
                path = item.image
            except StopIteration:
                raise HTTPProblem(404, "the item has no input file") from None
        elif which == "seen.png":
            path = item.folder / review.SEEN
        else:
            raise HTTPProblem(404, f"no {which!r} in a review item")
        data, error = read_file(str(path), self.settings.max_file_bytes)  # never a symlink
        if data is None:
            raise HTTPProblem(404, f"cannot read {which}: {error}")
        ctype = _CONTENT_TYPES.get(image_format(data) or "", "application/octet-stream")
        return Response(data, media_type=ctype)

    async def review_decide(self, request: Request) -> Response:
        token = self.settings.token
        if not token:
            raise HTTPProblem(403, "review decisions are off: start serve with --token")
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPProblem(401, f"a wrong or missing {TOKEN_HEADER} header")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPProblem(415, "send the decision as application/json")
        try:
            body = json.loads(await _read_body(request, 4096))
            action = body["action"]
            digit = body.get("digit")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HTTPProblem(400, 'send {"action": "accept|correct|reject", "digit": D}') from None
        if action not in ("accept", "correct", "reject"):
            raise HTTPProblem(400, f"unknown action {action!r}")
        if action == "correct" and not (isinstance(digit, int) and 0 <= digit <= 9):
            raise HTTPProblem(400, "correct needs a digit from 0 to 9")
        item = self._item(request.path_params["item_id"])
        human = digit if action == "correct" else None

        def decide() -> tuple[review.Item, int | None]:
            return review.decide(self.review_dir, item.id, human, accept=action == "accept")

        loop = asyncio.get_running_loop()
        try:
            decided, human = await loop.run_in_executor(None, decide)
        except review.ReviewError as e:
            raise HTTPProblem(409, str(e)) from None
        except OSError as e:  # decided by someone else meanwhile, or the folder is read-only
            raise HTTPProblem(409, f"cannot record the decision: {e.strerror or e}") from None
        log.info("reviewed", item=item.id, action=action, human_digit=human)
        return JSONResponse(
            {"id": decided.id, "input": decided.record.get("input"), "human_digit": human}
        )

    # -- operations ---------------------------------------------------------------

    def status_dict(self) -> dict[str, Any]:
        s = self.settings
        try:
            inbox, outbox = s.inbox.resolve(), s.outbox.resolve()
            st = status.collect(inbox, outbox, recursive=s.recursive, ignore=Ignore(s.ignore))
        except DigitwatchError as e:
            raise HTTPProblem(503, str(e)) from None
        return st.to_dict() | {"review_queue": len(review.items(self.review_dir))}

    def status_json(self, _: Request) -> Response:
        return JSONResponse(self.status_dict())

    def status_page(self, request: Request) -> Response:
        # A browser asks for HTML; curl and scrapers (Accept: */* or JSON) get the JSON.
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(STATIC / "status.html")
        return self.status_json(request)

    def metrics_text(self, _: Request) -> Response:
        waiting, oldest = self.predictor.waiting()
        self.metrics.queue(waiting, oldest, held=False)
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        s = self.settings
        checks = {"weights": f"loaded: {self.predictor.model_id}"}
        ok = True
        for role, folder, write in (
            ("inbox", s.inbox, False),
            ("outbox", s.outbox, False),
            ("review", self.review_dir, True),
        ):
            path = folder.resolve()
            if not path.is_dir():
                if role == "review" and os.access(path.parent, os.W_OK | os.X_OK):
                    checks[role] = f"{path}: empty (made by the first doubtful answer)"
                    continue
                checks[role] = f"{path}: missing"
                ok = False
            elif not os.access(path, (os.W_OK if write else os.R_OK) | os.X_OK):
                checks[role] = f"{path}: not {'writable' if write else 'readable'}"
                ok = False
            else:
                checks[role] = f"{path}: {'writable' if write else 'readable'}"
        return ok, checks

    def readyz(self, _: Request) -> Response:
        ok, checks = self.readiness()
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


def _page(name: str) -> Callable[[Request], Response]:
    def endpoint(_: Request) -> Response:
        return FileResponse(STATIC / name)

    return endpoint


def _healthz(_: Request) -> Response:
    return PlainTextResponse("ok\n")


def create_app(settings: Settings) -> ASGIApp:
    """The whole web service for `settings`: loads the weights (WeightsError if bad)."""
    svc = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            svc.predictor.close()

    app = Starlette(
        routes=[
            Route("/", _page("index.html")),
            Route("/review", _page("review.html")),
            Route("/status", svc.status_page),
            Route("/metrics", svc.metrics_text),
            Route("/healthz", _healthz),
            Route("/readyz", svc.readyz),
            Route("/v1/predict", svc.predict, methods=["POST"]),
            Route("/v1/status", svc.status_json),
            Route("/v1/review", svc.review_list),
            Route("/v1/review/{item_id}", svc.review_decide, methods=["POST"]),
            Route("/v1/review/{item_id}/{which}", svc.review_file),
            Mount("/static", StaticFiles(directory=STATIC)),
        ],
        exception_handlers={HTTPProblem: _problem, HTTPException: _problem},
        lifespan=lifespan,
    )
    app.state.service = svc
    return Guard(app, loopback_only=_is_loopback(settings.host), requests=svc.requests)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


# The signals that stop `run` stop `serve` too (README: Signals).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class _Server(uvicorn.Server):
    """uvicorn's server, telling systemd READY=1 once it accepts connections."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier, url: str) -> None:
        super().__init__(config)
        self.notifier = notifier
        self.url = url

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own raises the signal again after its graceful stop, so the process
        # would end killed by SIGTERM; like `run`, a clean stop here exits 0.
        before = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("serving", url=self.url)
            self.notifier.ready(f"serving {self.url}")


def serve(settings: Settings) -> int:
    """Load the weights, listen, and answer until SIGTERM or SIGINT; 0 after a clean stop."""
    app = create_app(settings)  # bad weights fail here, before the port is taken
    sock = _listen(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # Each request may hold up to --max-file-mb of body; past this many at once,
        # uvicorn answers 503 rather than taking more memory.
        limit_concurrency=64,
        timeout_graceful_shutdown=5,
    )
    notifier = Notifier.from_environ()
    try:
        _Server(config, notifier, url).run(sockets=[sock])
    finally:
        notifier.stopping()
        notifier.close()
        sock.close()
    return 0
