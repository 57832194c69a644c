"""Serve an exported Pollen model: one-off recommendations from the command line, or an HTTP API.

    python -m client.serve recommend --model DIR --history id1,id2 --k 10 [--include-seen] [--table]
    python -m client.serve http --model DIR --host 127.0.0.1 --port 8000 [--threads N]

Bad input is the caller's mistake, never the server's: every rejection is a 4xx with a ``detail`` message.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from client.export import DuplicateItemError, ServedModel, UnknownItemError, load_model

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 1000


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
    item: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1, description="item text, encoded with the base model + LoRA adapter")


class ItemPage(BaseModel):
    offset: int
    limit: int
    total: int
    items: list[Item]


class Health(BaseModel):
    status: str
    num_items: int
    text: bool = Field(description="whether new items can be added by text")


class Error(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error} for code in (400, 404, 409, 413, 422)}


# -- app -----------------------------------------------------------------------------------------------
def make_app(model: ServedModel) -> FastAPI:
    """The HTTP API over one loaded model; sync routes run in FastAPI's thread pool, the model locks itself."""
    app = FastAPI(title="Pollen recommender", version=str(model.meta["format-version"]), responses=ERRORS)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValueError, _bad_value)

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", num_items=model.num_items, text=model.has_text)

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> RecommendResponse:
        return RecommendResponse(items=model.recommend(request.history, request.k, request.exclude_seen))

    @app.get("/items")
    def items(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_PAGE)) -> ItemPage:
        return ItemPage(offset=offset, limit=limit, total=model.num_items, items=model.items(offset, limit))

    @app.post("/items", status_code=201)
    def add_item(item: Item) -> Item:
        model.add_item(item.item, item.text)
        return item

    return app


def _bad_value(request: Request, error: Exception) -> JSONResponse:
    """The model's ValueErrors are the caller's input: unknown id 404, duplicate id 409, anything else 422."""
    status = 404 if isinstance(error, UnknownItemError) else 409 if isinstance(error, DuplicateItemError) else 422
    return JSONResponse({"detail": str(error)}, status_code=status)


def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """Malformed JSON is a 400 with the parser's message; a well-formed but invalid body keeps FastAPI's 422."""
    for problem in error.errors():
        if problem.get("type") == "json_invalid":
            reason = problem.get("ctx", {}).get("error", "")
            return JSONResponse({"detail": f"malformed JSON body: {reason}".rstrip(": ")}, status_code=400)
    return JSONResponse({"detail": _plain(error.errors())}, status_code=422)


def _plain(errors: Any) -> Any:
    """FastAPI's error list with the offending input dropped (it may be huge, and may not be JSON-serialisable)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


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
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


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


# -- command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = load_model(args.model)
        if args.command == "http":
            import uvicorn

            from common.runtime import configure_threads

            configure_threads(args.threads)
            uvicorn.run(make_app(model), host=args.host, port=args.port, log_level=args.log_level)
            return 0
        history = [item.strip() for item in args.history.split(",") if item.strip()]
        rows = model.recommend(history, args.k, exclude_seen=not args.include_seen)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_table(rows) if args.table else "\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.serve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("recommend", help="print the top-k items after a history (JSON lines)")
    rec.add_argument("--model", required=True, help="folder written by client.export.export_model")
    rec.add_argument("--history", required=True, help="comma-separated item ids, oldest first")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    rec.add_argument("--table", action="store_true", help="an aligned table instead of JSON lines")
    http = commands.add_parser("http", help="run the HTTP API (FastAPI + uvicorn)")
    http.add_argument("--model", required=True)
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    http.add_argument("--log-level", default="info", help="uvicorn's log level (warning: no line per request)")
    return parser


def _table(rows: list[dict[str, Any]]) -> str:
    width = max((len(r["item"]) for r in rows), default=4)
    lines = [f"{'rank':>4}  {'item':<{width}}  {'score':>9}  text"]
    lines += [f"{rank:>4}  {r['item']:<{width}}  {r['score']:>9.4f}  {r['text']}" for rank, r in enumerate(rows, 1)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
