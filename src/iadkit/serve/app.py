"""The HTTP API and the page: FastAPI over one or more `Predictor`s.

Endpoints (all answers JSON except the page):

- ``GET /``: the page (``static/index.html`` with ``app.js`` and ``style.css``; no build step,
  nothing loaded from another host, so it works offline).
- ``GET /health``: liveness, served model names and the upload limits.
- ``GET /models`` and ``GET /models/{name}``: method, versions, threshold, input size.
- ``POST /predict?model=NAME`` (or ``POST /models/{name}/predict``): one or several images as
  ``multipart/form-data``; per image the file name, score, verdict, threshold and two PNGs as
  data URLs (the image as the model saw it, and the heat-map overlay); an image the model
  scores NaN or infinite comes back with ``score``/``verdict`` null and an ``error``.
- ``PUT /models/{name}/threshold`` with ``{"value": <finite number>}``: moves the operating
  point for this process (the model file is left unchanged).

Errors are ``{"detail": "<what is wrong and what to do>"}`` with 404 (unknown model), 413
(request, file or file count over the limits), 415 (not multipart, or a file that is not an
image type), 422 (no file, an image that does not decode, a threshold that is not a finite
number). Files are decoded in memory; no part of a request is ever used as a path: models
come only from the files named at start, and the page is served from memory.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import iadkit
from iadkit.data.io import DEFAULT_MAX_PIXELS, read_image_bytes
from iadkit.errors import IadkitError, ImageReadError
from iadkit.serve.backend import Predictor

ACCEPTED_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "image/webp": "WebP",
}
GENERIC_TYPES = {"", "application/octet-stream"}
MAX_FILENAME_CHARS = 255


@dataclass(frozen=True)
class Limits:
    """Upload limits. Over them the server answers 413 before decoding anything.

    Parameters
    ----------
    max_request_bytes
        Largest request body (all files together); checked on the Content-Length header and
        again while the body streams in, so a client that lies about it is cut off too.
    max_file_bytes
        Largest single file.
    max_files
        Most files in one request.
    max_pixels
        Largest decoded image (height x width): a guard against decompression bombs.
    max_decoded_bytes
        Largest total of decoded pixel data in one request: a few small, highly compressed
        files can decode to gigabytes, which the byte limits above do not see.
    """

    max_request_bytes: int = 64 * 1024 * 1024
    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = 1024 * 1024 * 1024


class ThresholdBody(BaseModel):
    """``{"value": <finite number>}``; strings, booleans, null, NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid")
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413, whether or not they announce their size."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {_mb(self.limit)}; send fewer or smaller images per request"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, {"detail": message})
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"detail": message})


def create_app(predictors: Sequence[Predictor], *, limits: Limits | None = None) -> FastAPI:
    """The server for these models (served under their `name`s).

    Parameters
    ----------
    predictors
        Loaded models (see `iadkit.serve.backend.load_predictor`); names must be distinct.
    limits
        Upload limits; `Limits()` by default.
    """
    limits = limits or Limits()
    models: dict[str, Predictor] = {}
    for p in predictors:
        if p.name in models:
            raise ValueError(f"two models are named {p.name!r}; give NAME=PATH to tell them apart")
        models[p.name] = p
    if not models:
        raise ValueError("no model to serve")
    pages = _load_static()

    app = FastAPI(
        title="iadkit serve",
        version=iadkit.__version__,
        docs_url=None,  # the Swagger page loads its scripts from a CDN: not offline
        redoc_url=None,
    )
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_request_bytes)
    app.state.models = models
    app.state.limits = limits

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only location and message go back: the offending input may be NaN, which JSON cannot carry.
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
                continue
            where = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def get_model(name: str) -> Predictor:
        try:
            return models[name]
        except KeyError:
            raise HTTPException(404, f"no model named {name!r}; served: {', '.join(models)}") from None

    # -- page -------------------------------------------------------------------------------
    def static(name: str, media_type: str) -> Response:
        return Response(
            pages[name],
            media_type=media_type,
            headers={
                "Cache-Control": "no-cache",
                # Everything from this server only: a CDN reference would fail loudly, not silently work online.
                "Content-Security-Policy": (
                    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
                    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
                ),
            },
        )

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return static("index.html", "text/html; charset=utf-8")

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return static("app.js", "text/javascript; charset=utf-8")

    @app.get("/style.css", include_in_schema=False)
    def stylesheet() -> Response:
        return static("style.css", "text/css; charset=utf-8")

    # -- API --------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "iadkit_version": iadkit.__version__,
            "models": list(models),
            "limits": asdict(limits),
        }

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        return [describe(p) for p in models.values()]

    @app.get("/models/{name}")
    def one_model(name: str) -> dict[str, Any]:
        return describe(get_model(name))

    @app.put("/models/{name}/threshold")
    def put_threshold(name: str, body: ThresholdBody) -> dict[str, Any]:
        predictor = get_model(name)
        predictor.set_threshold(body.value)
        return {**describe(predictor), "note": "in force for this server process; the model file is unchanged"}

    async def predict_with(predictor: Predictor, request: Request) -> dict[str, Any]:
        uploads = await _read_uploads(request, limits)
        images = await run_in_threadpool(_decode_all, uploads, limits)
        try:
            results = await run_in_threadpool(predictor.predict, images, [name for name, _ in uploads])
        except IadkitError as exc:  # e.g. a grayscale image for a colour model
            raise HTTPException(422, str(exc)) from None
        return {
            "model": predictor.name,
            "method": predictor.method,
            "input_size": list(predictor.input_size),
            "threshold": predictor.threshold if not results else results[0].threshold,
            "results": [
                {
                    "filename": filename,
                    # a NaN or infinite score has no verdict: JSON cannot carry it, `error` says why
                    "score": r.score if r.error is None else None,
                    "anomalous": r.anomalous,
                    "verdict": None if r.anomalous is None else ("anomalous" if r.anomalous else "good"),
                    "threshold": r.threshold,
                    "error": r.error,
                    "image": _data_url(r.image_png),
                    "overlay": _data_url(r.overlay_png),
                }
                for (filename, _), r in zip(uploads, results)
            ],
        }

    @app.post("/predict")
    async def predict(request: Request, model: str | None = None) -> dict[str, Any]:
        if model is None:
            if len(models) > 1:
                raise HTTPException(422, f"several models are served ({', '.join(models)}): name one with ?model=NAME")
            model = next(iter(models))
        return await predict_with(get_model(model), request)

    @app.post("/models/{name}/predict")
    async def predict_named(name: str, request: Request) -> dict[str, Any]:
        return await predict_with(get_model(name), request)

    return app


def describe(p: Predictor) -> dict[str, Any]:
    """What `GET /models` says about one model."""
    h, w = p.input_size
    rng = p.map_range
    return {
        "name": p.name,
        "method": p.method,
        "runtime": p.runtime,
        "iadkit_version": iadkit.__version__,
        "model_iadkit_version": p.model_version,
        "threshold": p.threshold,
        "threshold_rule": p.threshold_rule,
        "input_size": [h, w],
        "map_range": None if rng is None else [rng[0], rng[1]],
    }


async def _read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part, after the content-type and size checks."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(
            415,
            f"expected multipart/form-data with image files (got {content_type or 'no content type'}); "
            "e.g. curl -F files=@part.png http://HOST:PORT/predict",
        )
    try:
        form = await request.form(max_files=limits.max_files, max_fields=16)
    except StarletteHTTPException as exc:
        if exc.status_code == 400 and "too many files" in str(exc.detail).lower():
            raise HTTPException(
                413, f"more than {limits.max_files} files in one request; send them in batches"
            ) from None
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from None
    try:
        uploads: list[tuple[str, bytes]] = []
        for _, value in form.multi_items():
            if isinstance(value, str):  # a plain form field: not an image
                continue
            filename = (value.filename or f"file{len(uploads) + 1}")[:MAX_FILENAME_CHARS]
            declared = (value.content_type or "").split(";")[0].strip().lower()
            kind = declared
            if kind in GENERIC_TYPES:  # scripts often send no type: judge by the file name
                kind = (mimetypes.guess_type(filename)[0] or "").lower()
            if kind not in ACCEPTED_TYPES:
                accepted = ", ".join(sorted(set(ACCEPTED_TYPES.values())))
                stated = f"content type {declared or 'none'}"
                if kind != declared:
                    stated += f" and name suggesting {kind or 'no image type'}"
                raise HTTPException(415, f"{filename}: {stated}: not an accepted image type ({accepted})")
            if value.size is not None and value.size > limits.max_file_bytes:
                raise HTTPException(
                    413, f"{filename}: {_mb(value.size)} is over the per-file limit of {_mb(limits.max_file_bytes)}"
                )
            data = await value.read()
            if len(data) > limits.max_file_bytes:
                raise HTTPException(
                    413, f"{filename}: {_mb(len(data))} is over the per-file limit of {_mb(limits.max_file_bytes)}"
                )
            uploads.append((filename, data))
    finally:
        await form.close()
    if not uploads:
        raise HTTPException(
            422, "no image in the request: send one or more files as multipart/form-data (field 'files')"
        )
    return uploads


def _decode_all(uploads: list[tuple[str, bytes]], limits: Limits) -> list[Any]:
    images, decoded = [], 0
    for filename, data in uploads:
        try:
            image = read_image_bytes(data, filename, max_pixels=limits.max_pixels)
        except ImageReadError as exc:
            raise HTTPException(422, str(exc)) from None
        decoded += image.nbytes
        if decoded > limits.max_decoded_bytes:
            raise HTTPException(
                413,
                f"{filename}: the images of this request decode to more than {_mb(limits.max_decoded_bytes)} "
                "of pixels; send fewer or smaller images per request",
            )
        images.append(image)
    return images


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n} bytes"


async def _send_json(send: Send, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _load_static() -> dict[str, bytes]:
    folder = resources.files("iadkit.serve") / "static"
    return {name: (folder / name).read_bytes() for name in ("index.html", "app.js", "style.css")}


def run(
    predictors: Sequence[Predictor], *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None
) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(predictors, limits=limits), host=host, port=port, log_level="info")
