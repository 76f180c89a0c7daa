"""Read a classify request's images: size limit enforced while streaming, a deadline for the whole body,
and a client that leaves mid-body is a 499 (not a server error)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..errors import ServiceError

RAW_BODY_TYPES = ("image/", "application/octet-stream")
FILE_FIELD = "file"


@dataclass(frozen=True)
class ImagePart:
    filename: str | None
    data: bytes


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, "too_large", f"request body is over the limit of {limit} bytes")


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """``request.stream()`` that stops with 413 as soon as more than ``limit`` bytes arrive."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError as e:
            raise ServiceError(400, "bad_request", "Content-Length is not an integer") from e
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


async def read_images(request: Request, max_bytes: int, max_files: int, timeout_s: float) -> list[ImagePart]:
    """The images of a request: multipart ``file`` parts (order kept) or one raw image body.

    The whole body must arrive within ``timeout_s`` (408, connection closed): a slow upload holds an
    admitted request, and its memory, only that long.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_images(request, max_bytes, max_files)
    except TimeoutError as e:
        raise ServiceError(
            408,
            "timeout",
            f"the request body did not arrive within {timeout_s:g} s",
            headers={"Connection": "close"},
        ) from e
    except ClientDisconnect as e:
        raise ServiceError(499, "client_closed", "the client closed the connection while sending") from e


async def _read_images(request: Request, max_bytes: int, max_files: int) -> list[ImagePart]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, max_bytes, max_files)
    if not media_type.startswith(RAW_BODY_TYPES):
        raise ServiceError(
            415,
            "bad_image",
            f"unsupported Content-Type {media_type or '(none)'!r}: send multipart/form-data with a "
            f"'{FILE_FIELD}' part, or the raw image with an image/* Content-Type",
        )
    body = bytearray()
    async for chunk in limited_stream(request, max_bytes):
        body.extend(chunk)
    if not body:
        raise ServiceError(422, "bad_image", "empty body: no image bytes were sent")
    return [ImagePart(None, bytes(body))]


class _ClosingWatch:
    """Passes a multipart body through and notes whether its closing delimiter (``--boundary--``) went
    by. The parser drops a part it has not seen end, so a body cut short (a wrong Content-Length, a
    truncating proxy) would lose its last image without a word; an epilogue after the delimiter is fine."""

    def __init__(self, stream: AsyncIterator[bytes], content_type: str) -> None:
        self.stream = stream
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        self.closing = b"--" + boundary + b"--" if boundary else None
        self.closed = self.closing is None  # no boundary: the parser refuses the body itself
        self._tail = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            if not self.closed:
                assert self.closing is not None
                window = self._tail + chunk
                self.closed = self.closing in window
                self._tail = window[1 - len(self.closing) :]
            yield chunk


async def _read_multipart(request: Request, max_bytes: int, max_files: int) -> list[ImagePart]:
    body = _ClosingWatch(limited_stream(request, max_bytes), request.headers.get("content-type", ""))
    parser = MultiPartParser(request.headers, aiter(body), max_files=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ServiceError(422, "bad_request", f"malformed multipart body: {e.message}") from e
    try:
        if not body.closed:
            raise ServiceError(
                422,
                "bad_request",
                "malformed multipart body: it ends before its closing boundary (a Content-Length shorter "
                "than the body?)",
            )
        values = form.getlist(FILE_FIELD)
        if not values:
            raise ServiceError(422, "bad_request", f"multipart body has no '{FILE_FIELD}' part")
        parts = []
        for value in values:
            if not isinstance(value, UploadFile):
                raise ServiceError(
                    422, "bad_request", f"'{FILE_FIELD}' must be a file part, not a text field"
                )
            parts.append(ImagePart(value.filename, await value.read()))
        return parts
    finally:
        await form.close()
