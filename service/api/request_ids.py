"""``X-Request-ID``: echoed when the client sends a sane one, generated otherwise."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def request_id(request: Request) -> str:
    sent = request.headers.get(REQUEST_ID_HEADER)
    return sent if sent and _REQUEST_ID_RE.match(sent) else uuid.uuid4().hex
