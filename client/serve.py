"""Serve an exported Pollen model: one-off recommendations from the command line, or an HTTP API.

    python -m client.serve recommend --model DIR --history id1,id2 --k 10 [--include-seen] [--table]
    python -m client.serve http --model DIR --host 127.0.0.1 --port 8000 [--token T | env POLLEN_SERVE_TOKEN]
        [--journal FILE] [--threads N] [--batch-max 64] [--batch-wait-ms 1] [--read-timeout 10] [--keep-alive 5]

Concurrent /recommend requests are micro-batched: a short queue feeds one scoring thread that scores whatever
has arrived (up to --batch-max, waiting at most --batch-wait-ms for more while requests keep coming) in one pass
and hands each request exactly the list ``ServedModel.recommend`` gives it alone. The event loop parses HTTP on
one core while torch scores on another.

Items added with POST /items are appended to a journal next to the model (fsync'd before the 201) and replayed
at the next start. With a token, POST /items needs ``Authorization: Bearer <token>``. A request must arrive
whole within --read-timeout seconds; an idle keep-alive connection is closed after --keep-alive seconds.

Every error, whatever its source, is one JSON shape: {"status": 422, "error": "Unprocessable Content",
"detail": "<one line>"}. Bad input is the caller's mistake, never the server's: it is a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import hmac
import http
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from client.export import MAX_ID_CHARS, DuplicateItemError, ServedModel, UnknownItemError, load_model

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 1000
TOKEN_ENV = "POLLEN_SERVE_TOKEN"
JOURNAL_SUFFIX = ".added-items.jsonl"


# -- schema --------------------------------------------------------------------------------------------
class RecommendRequest(BaseModel):
    history: list[str] = Field(min_length=1, description="item ids the user interacted with, oldest first")
    k: int = Field(10, ge=1, description="how many items to return (at most the catalogue size)")
    exclude_seen: bool = Field(True, description="leave out items already in the history")


class ScoredItem(BaseModel):
    item: str
    text: str
    score: float = Field(description="user state . item vector; higher is better")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]


class Item(BaseModel):
    item: str = Field(min_length=1, max_length=MAX_ID_CHARS,
                      description="printable, no leading/trailing whitespace, at most 256 characters")
    text: str = Field(min_length=1, description="item text, encoded with the base model + LoRA adapter")


class ItemPage(BaseModel):
    offset: int
    limit: int
    total: int
    items: list[Item]


class Scoring(BaseModel):
    passes: int = Field(description="scoring passes since the start")
    requests: int = Field(description="/recommend requests those passes scored (requests / passes = mean batch)")
    seconds: float = Field(description="time the scoring thread spent scoring")


class Health(BaseModel):
    status: str
    num_items: int
    text: bool = Field(description="whether new items can be added by text")
    scoring: Scoring


class Error(BaseModel):
    status: int = Field(description="the HTTP status code, repeated")
    error: str = Field(description="the status's reason phrase")
    detail: str = Field(description="what was wrong, in one line")


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error}
                                           for code in (400, 401, 404, 408, 409, 413, 422, 503)}


def error_body(status: int, detail: str) -> bytes:
    """The one error shape, as bytes (also written raw by the protocol layer, outside FastAPI)."""
    detail = " ".join(str(detail).split())  # one line, whatever the source said
    return json.dumps({"status": status, "error": http.HTTPStatus(status).phrase, "detail": detail}).encode()


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, detail), status_code=status, media_type="application/json", headers=headers)


# -- micro-batching ------------------------------------------------------------------------------------
class ServerBusy(Exception):
    """More requests waiting than the queue holds: 503, try again."""


class Batcher:
    """One scoring thread fed by a short queue: concurrent requests are scored in one ``recommend_many`` pass.

    The thread takes everything waiting (at most ``max_batch``); when the previous pass held more than one
    request (there is concurrent load), it first waits up to ``max_wait`` seconds for the batch to fill. A
    lone request is never delayed. Torch releases the GIL while it computes, so HTTP parsing on the event loop
    and scoring run on two cores.
    """

    def __init__(self, model: ServedModel, max_batch: int = 64, max_wait: float = 0.001, max_queue: int = 1024):
        self.model = model
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._pending: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_size = 0
        self.passes = 0
        self.scored = 0
        self.seconds = 0.0

    async def recommend(self, history: list[str], k: int, exclude_seen: bool) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._ready:
            if self._thread is None:
                self._start()
            if len(self._pending) >= self.max_queue:
                raise ServerBusy(f"{len(self._pending)} requests already waiting; retry shortly")
            self._pending.append(((history, k, exclude_seen), future, loop))
            self._ready.notify()
        return await future

    def _start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pollen-scorer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _take(self) -> list | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:
                return None
            if self.max_wait > 0 and self._last_size > 1:
                deadline = time.monotonic() + self.max_wait
                while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._ready.wait(left)
            return [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self._last_size = len(batch)
            start = time.perf_counter()
            try:
                results = self.model.recommend_many([request for request, _, _ in batch])
            except Exception as error:  # a bug, not bad input: every request of the pass gets it (a 500)
                results = [error] * len(batch)
            self.seconds += time.perf_counter() - start
            self.passes += 1
            self.scored += len(batch)
            by_loop: dict[Any, list] = {}
            for (_, future, loop), result in zip(batch, results):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, done in by_loop.items():  # one wake-up of the event loop per pass
                try:
                    loop.call_soon_threadsafe(_deliver, done)
                except RuntimeError:  # that loop has closed (a test client went away)
                    pass


def _deliver(done: list) -> None:
    for future, result in done:
        if future.cancelled():  # the client went away
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


# -- the journal of added items ------------------------------------------------------------------------
class ItemJournal:
    """Append-only JSON lines of items added at run time: {"item", "text", "vector", "model"}, one per line.

    Each line is written with one write() on an O_APPEND descriptor and fsync'd before the item is served, so
    a crash leaves at most an incomplete last line, of an item never acknowledged; the next start drops it
    (with a warning). ``vector`` is what was served; it is reused at replay when ``model`` (a fingerprint of
    the adapter and head files) still matches, else the text is encoded again with the current model.
    """

    def __init__(self, path: str | Path, model: ServedModel):
        self.path = Path(path)
        self.model = model
        self.fingerprint = model_fingerprint(model.folder)
        self._lock = threading.Lock()

    @staticmethod
    def default_path(model_folder: str | Path) -> Path:
        """Beside the model folder, not in it: a re-export replaces the folder whole and would drop it."""
        folder = Path(model_folder).resolve()
        return folder.with_name(folder.name + JOURNAL_SUFFIX)

    def replay(self, warn=lambda message: print(message, file=sys.stderr)) -> int:
        """Add the journal's items to the model (in journal order); how many were added."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        complete, newline, torn = data.rpartition(b"\n")
        if torn:
            warn(f"warning: {self.path}: dropped an incomplete last line ({len(torn)} bytes): a write interrupted "
                 f"by a crash, never acknowledged to the client")
            with self.path.open("r+b") as f:
                f.truncate(len(complete) + len(newline))
                os.fsync(f.fileno())
        entries = [self._parse(line, number) for number, line in enumerate(complete.split(b"\n"), 1) if complete]
        known = [e for e in entries if self.model.knows(e[0])]
        if known:
            warn(f"warning: {self.path}: {len(known)} journalled item(s) are now in the model's own catalogue "
                 f"(e.g. {known[0][0]!r}); the model's version is kept")
        entries = [e for e in entries if not self.model.knows(e[0])]
        if not entries:
            return 0
        stale = [i for i, e in enumerate(entries) if e[3] != self.fingerprint or e[2] is None]
        import torch

        vectors = [torch.tensor(e[2], dtype=torch.float32) if e[2] is not None else None for e in entries]
        if stale:
            warn(f"{self.path}: encoding {len(stale)} journalled item text(s) with this model "
                 f"(they were added to another export of it)")
            fresh = self.model.text_item_vectors([entries[i][1] for i in stale])
            for row, i in enumerate(stale):
                vectors[i] = fresh[row]
        try:
            self.model.add_items([(e[0], e[1]) for e in entries], torch.stack(vectors))
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from None
        return len(entries)

    def _parse(self, line: bytes, number: int) -> tuple[str, str, list[float] | None, str | None]:
        where = f"{self.path}, line {number}"
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{where}: not a JSON object ({error})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("item"), str) \
                or not isinstance(entry.get("text"), str):
            raise ValueError(f"{where}: expected an object with string 'item' and 'text'")
        vector = entry.get("vector")
        width = self.model.config.model.hidden_size
        if vector is not None and (not isinstance(vector, list) or len(vector) != width
                                   or not all(isinstance(v, (int, float)) for v in vector)):
            raise ValueError(f"{where}: 'vector' must be a list of {width} numbers")
        return entry["item"], entry["text"], vector, entry.get("model")

    def append(self, items: list[tuple[str, str]], vectors) -> None:
        """Write the items durably (one write, then fsync); on any failure the journal is left as it was."""
        lines = b"".join(json.dumps({"item": item, "text": text, "vector": vector, "model": self.fingerprint},
                                    ensure_ascii=False).encode() + b"\n"
                         for (item, text), vector in zip(items, vectors.tolist()))
        with self._lock:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = os.write(fd, lines)
                    if written != len(lines):
                        raise OSError(f"short write ({written} of {len(lines)} bytes)")
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
            if created:  # the new file's name must survive a crash too
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    def check_writable(self) -> None:
        """Fail at start, not at the first POST /items, when the journal cannot be written."""
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path}: the journal's folder does not exist")
        target = self.path if self.path.exists() else self.path.parent
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{self.path}: the item journal is not writable (give --journal PATH)")


def model_fingerprint(folder: Path) -> str:
    """sha256 of the files a new item's vector depends on (the head, the adapter): tells exports apart."""
    digest = hashlib.sha256()
    for name in ("head.safetensors", "adapter/adapter_model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- app -----------------------------------------------------------------------------------------------
def make_app(model: ServedModel, token: str | None = None, journal: ItemJournal | None = None,
             batch_max: int = 64, batch_wait: float = 0.001) -> FastAPI:
    """The HTTP API over one loaded model.

    ``token``: POST /items needs ``Authorization: Bearer <token>`` (None = open). ``journal``: where added items
    are made durable (None = in memory only, for tests and library use; the command line always gives one).
    """
    batcher = Batcher(model, max_batch=batch_max, max_wait=batch_wait)

    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="Pollen recommender", version=str(model.meta["format-version"]), responses=ERRORS,
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValueError, _bad_value)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ServerBusy, lambda request, error: error_response(503, str(error)))
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(RecommendRoute, batcher=batcher, limit=MAX_BODY_BYTES)  # added last: outermost

    def authorised(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "this route needs the header 'Authorization: Bearer <token>' with the "
                                     "server's token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", num_items=model.num_items, text=model.has_text,
                      scoring=Scoring(passes=batcher.passes, requests=batcher.scored,
                                      seconds=round(batcher.seconds, 6)))

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> Response:  # served by RecommendRoute; declared for /docs
        rows = await batcher.recommend(request.history, request.k, request.exclude_seen)
        return Response(json.dumps({"items": rows}, ensure_ascii=False).encode(), media_type="application/json")

    @app.get("/items")
    def items(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_PAGE)) -> ItemPage:
        return ItemPage(offset=offset, limit=limit, total=model.num_items, items=model.items(offset, limit))

    @app.post("/items", status_code=201, dependencies=[Depends(authorised)])
    def add_item(item: Item) -> Item:
        model.add_items([(item.item, item.text)], commit=journal.append if journal is not None else None)
        return item

    return app


def _bad_value(request: Request, error: Exception) -> Response:
    """The model's ValueErrors are the caller's input: unknown id 404, duplicate id 409, anything else 422."""
    return error_response(_status_of(error), str(error))


def _invalid_request(request: Request, error: RequestValidationError) -> Response:
    return error_response(*_invalid(error.errors()))


def _invalid(problems: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """Malformed JSON is a 400 with the parser's message; a well-formed but invalid body a 422, in one line."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = problem.get("ctx", {}).get("error", "")
            return 400, f"malformed JSON body: {reason}".rstrip(": ")
    lines = []
    for problem in problems:
        where = ".".join(str(part) for part in (*prefix, *problem.get("loc", ())))
        message = problem.get("msg", "invalid")
        if problem.get("type") in ("model_type", "model_attributes_type", "dict_type"):
            message = "the body must be a JSON object"
        lines.append(f"{where}: {message}" if where else message)
    return 422, "; ".join(lines)


def _status_of(error: ValueError) -> int:
    return 404 if isinstance(error, UnknownItemError) else 409 if isinstance(error, DuplicateItemError) else 422


def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (unknown route 404, wrong method 405, ...) and ours, in the one shape."""
    return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))


def _server_error(request: Request, error: Exception) -> Response:
    return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")


class RecommendRoute:
    """POST /recommend straight from ASGI, outermost: the hot path skips FastAPI's per-request routing,
    middleware and dependency solving (they took about half of the event loop's time per request). Same
    schema (``RecommendRequest``, validated by pydantic), same body limit, same error shape and statuses as
    the FastAPI route, which stays declared for /docs and the OpenAPI schema."""

    def __init__(self, app: Any, batcher: Batcher, limit: int):
        self.app = app
        self.batcher = batcher
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/recommend" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            answer = await self._answer(scope, receive)
        except Exception as error:  # a bug: logged, and answered in the one shape
            logging.getLogger("uvicorn.error").exception("POST /recommend failed")
            answer = 500, error_body(500, f"internal error ({type(error).__name__}); the server log has the details")
        if answer is None:
            return  # the client went away
        status, body = answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: dict, receive: Any) -> tuple[int, bytes] | None:
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            return 400, error_body(400, "invalid Content-Length header")
        if int(declared) > self.limit:
            return 413, error_body(413, f"request body over {self.limit // 1024} KiB")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return 413, error_body(413, f"request body over {self.limit // 1024} KiB")
        try:
            request = RecommendRequest.model_validate_json(body)
        except ValidationError as error:
            status, detail = _invalid(error.errors(), prefix=("body",))
            return status, error_body(status, detail)
        try:
            rows = await self.batcher.recommend(request.history, request.k, request.exclude_seen)
        except ServerBusy as error:
            return 503, error_body(503, str(error))
        except ValueError as error:
            status = _status_of(error)
            return status, error_body(status, str(error))
        return 200, json.dumps({"items": rows}, ensure_ascii=False).encode()


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``limit`` bytes with 413, declared or streamed (chunked)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            return await self._reject(scope, receive, send, 400, "invalid Content-Length header")
        if int(declared) > self.limit:
            return await self._reject(scope, receive, send, 413, self._too_large())
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._reject(scope, receive, send, 413, self._too_large())
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return f"request body over {self.limit // 1024} KiB"

    @staticmethod
    async def _reject(scope: dict, receive: Any, send: Any, status: int, detail: str) -> None:
        await error_response(status, detail)(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that hands the already-read body over once, then defers to the server (disconnects)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# -- the HTTP protocol: read timeout, and the error shape for requests that never reach the app ---------
def timed_protocol(read_timeout: float) -> type:
    """uvicorn's httptools protocol, plus: a request (headers and body) must arrive whole within
    ``read_timeout`` seconds of its first byte, or of the connection's start; else 408 and the connection
    closes. uvicorn's own keep-alive timeout covers only the idle time between requests, so without this a
    half-sent request holds its connection forever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self) -> None:
            if self._read_deadline is None:
                self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                self._write_error(408, f"the request did not arrive whole within {read_timeout:g} s")
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._write_error(400, msg)
            self.transport.close()

        def _write_error(self, status: int, detail: str) -> None:
            body = error_body(status, detail)
            head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            self.transport.write(head + body)

    return TimedHttpToolsProtocol


# -- command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "http":
            return _serve(args)
        model = load_model(args.model)
        history = [item.strip() for item in args.history.split(",") if item.strip()]
        rows = model.recommend(history, args.k, exclude_seen=not args.include_seen)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_table(rows) if args.table else "\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    return 0


def _serve(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if token is not None and (len(token) < 8 or not token.isascii() or not token.isprintable() or " " in token):
        raise ValueError(f"the token (--token or {TOKEN_ENV}) must be at least 8 visible ASCII characters, "
                         "no spaces")
    for name in ("read_timeout", "keep_alive", "batch_wait_ms"):
        if getattr(args, name) < 0 or (name != "batch_wait_ms" and getattr(args, name) == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.batch_max < 1:
        raise ValueError(f"--batch-max must be >= 1, got {args.batch_max}")
    model = load_model(args.model)
    journal = ItemJournal(args.journal or ItemJournal.default_path(args.model), model)
    journal.check_writable()
    replayed = journal.replay()
    if replayed:
        print(f"{journal.path}: {replayed} added item(s) restored", file=sys.stderr)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: no token: anyone who reaches {args.host}:{args.port} can add items "
              f"(set {TOKEN_ENV})", file=sys.stderr)
    import uvicorn

    from common.runtime import configure_threads

    configure_threads(args.threads)
    app = make_app(model, token, journal, batch_max=args.batch_max, batch_wait=args.batch_wait_ms / 1000)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http=timed_protocol(args.read_timeout),
                timeout_keep_alive=args.keep_alive)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.serve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("recommend", help="print the top-k items after a history (JSON lines)")
    rec.add_argument("--model", required=True, help="folder written by client.export.export_model")
    rec.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    rec.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    rec.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    rec.add_argument("--table", action="store_true", help="an aligned table instead of JSON lines")
    web = commands.add_parser("http", help="run the HTTP API (FastAPI + uvicorn)")
    web.add_argument("--model", required=True, help="folder written by client.export.export_model")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this host only; 0.0.0.0 for all interfaces)")
    web.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    web.add_argument("--token", default=None,
                     help=f"bearer token POST /items requires (default: env {TOKEN_ENV}; unset = no token). "
                          f"Prefer the environment variable: a command line is visible to other users (ps)")
    web.add_argument("--journal", default="",
                     help=f"append-only file of items added at run time (default: beside the model folder, "
                          f"<model>{JOURNAL_SUFFIX})")
    web.add_argument("--threads", type=int, default=1, help="torch threads for scoring (0 = all cores); the "
                     "event loop takes another core, so 1 suits a 2-core host")
    web.add_argument("--batch-max", type=int, default=64, help="most requests scored in one pass (default 64)")
    web.add_argument("--batch-wait-ms", type=float, default=1.0,
                     help="under concurrent load, how long a pass may wait for more requests (default 1 ms)")
    web.add_argument("--read-timeout", type=float, default=10.0,
                     help="seconds a request may take to arrive whole (default 10); then 408 and close")
    web.add_argument("--keep-alive", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open (default 5)")
    web.add_argument("--log-level", default="info", help="uvicorn's log level (warning: no line per request)")
    return parser


def _table(rows: list[dict[str, Any]]) -> str:
    width = max((len(r["item"]) for r in rows), default=4)
    lines = [f"{'rank':>4}  {'item':<{width}}  {'score':>9}  text"]
    lines += [f"{rank:>4}  {r['item']:<{width}}  {r['score']:>9.4f}  {r['text']}" for rank, r in enumerate(rows, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
