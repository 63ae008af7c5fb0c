"""gunicorn's thread worker with its own error answers in JSON: a request gunicorn refuses before
Flask sees it (a bad request line: 400, a URI over limit_request_line: 414, headers over
limit_request_fields / limit_request_field_size: 431, ...) gets TGI's error shape, or OpenAI's
under /v1/, instead of gunicorn's HTML page. gunicorn decides the status and logs; only the
page it writes is replaced."""

from __future__ import annotations

from gunicorn.util import write_nonblock
from gunicorn.workers.gthread import ThreadWorker

from sagellm.api.error_shapes import error_body
from sagellm.api.responses import json_text
from sagellm.errors import SagellmError


class _Page:
    """Stands in for the client socket while gunicorn writes its HTML page; keeps the status line."""

    def __init__(self):
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data


class JsonErrorWorker(ThreadWorker):
    def handle_error(self, req, client, addr, exc):
        page = _Page()
        super().handle_error(req, page, addr, exc)
        status_line = page.data.split(b"\r\n", 1)[0].decode("latin-1")  # HTTP/1.1 431 Request Header ...
        _, status, reason = (status_line.split(" ", 2) + ["", ""])[:3]
        if not status.isdigit():
            return  # gunicorn wrote nothing (it could not): neither do we
        err = SagellmError(str(exc) if 400 <= int(status) < 500 else "internal error")
        err.status = int(status)
        err.error_type = "validation" if err.status < 500 else "generation"
        err.openai_type = "invalid_request_error" if err.status < 500 else "server_error"
        path = getattr(req, "path", "") or ""
        body = json_text(error_body(err, "openai" if path.startswith("/v1/") else "tgi")).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            write_nonblock(client, head + body)
        except OSError:
            self.log.debug("Failed to send error message.")
