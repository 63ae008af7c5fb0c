#!/usr/bin/env python3
"""A local SageMaker runtime in front of a running sagellm container (or `make run`).

Serves the two sagemaker-runtime paths, so boto3's `invoke_endpoint` and
`invoke_endpoint_with_response_stream` (and the SDK's `Predictor.predict_stream()` with
`LineIterator`) work on your machine, token by token, with SageMaker's error mapping:

- container 4xx/5xx  -> `ModelError` (424) carrying `OriginalStatusCode` and `OriginalMessage`;
- a bad call (wrong path, no body, body over 6 MB) -> `ValidationError` (400);
- a container stream that breaks mid-way -> a `ModelStreamError` event, as SageMaker sends.

    python -m deploy.runtime_emulator --container http://127.0.0.1:8080 --port 8081
    boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8081", region_name="us-east-1",
                 aws_access_key_id="x", aws_secret_access_key="x")

Any endpoint name is accepted; signatures are not checked. Like SageMaker, each chunk the
container writes becomes one PayloadPart; clients must still re-split lines (LineIterator does).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_BODY = 6 * 1024 * 1024  # InvokeEndpoint's payload limit
_PATH = re.compile(r"^/endpoints/([^/]+)/(invocations|invocations-response-stream)$")
_FORWARDED = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return bytes([len(n)]) + n + bytes([7]) + len(v).to_bytes(2, "big") + v  # 7 = string


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message (the framing botocore's EventStreamBuffer decodes)."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    prelude = (16 + len(head) + len(payload)).to_bytes(4, "big") + len(head).to_bytes(4, "big")
    message = prelude + zlib.crc32(prelude).to_bytes(4, "big") + head + payload
    return message + zlib.crc32(message).to_bytes(4, "big")


def payload_part(data: bytes) -> bytes:
    return encode_event({":event-type": "PayloadPart", ":content-type": "application/octet-stream",
                         ":message-type": "event"}, data)


def stream_error(message: str) -> bytes:
    body = json.dumps({"Message": message, "ErrorCode": "StreamBroken"}).encode()
    return encode_event({":exception-type": "ModelStreamError", ":content-type": "application/json",
                         ":message-type": "exception"}, body)


def make_handler(container: str, timeout: float):
    target = urlsplit(container)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep test output quiet; errors still reach clients
            pass

        def _error(self, status: int, code: str, message: str, **extra) -> None:
            body = json.dumps({"message": message, "Message": message, **extra}).encode()
            self.send_response(status)
            self.send_header("x-amzn-ErrorType", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _model_error(self, status: int, text: str) -> None:
            self._error(424, "ModelError",
                        f'Received client error ({status}) from primary with message "{text}". '
                        "See the container log for more information.",
                        OriginalStatusCode=status, OriginalMessage=text,
                        LogStreamArn="arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/local")

        def do_POST(self):  # noqa: N802 (http.server's naming)
            match = _PATH.match(self.path.split("?")[0])
            if not match:
                return self._error(400, "ValidationError", f"unknown path {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(400, "ValidationError", f"body of {length} bytes exceeds {MAX_BODY} bytes")
            body = self.rfile.read(length)
            if not body:
                return self._error(400, "ValidationError", "1 validation error detected: Body must not be empty")
            headers = {h: self.headers[h] for h in _FORWARDED if self.headers.get(h)}
            conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=timeout)
            try:
                conn.request("POST", "/invocations", body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as exc:
                conn.close()
                return self._error(424, "ModelError", f"the container did not answer: {exc}",
                                   OriginalStatusCode=502, OriginalMessage=str(exc))
            try:
                if resp.status >= 400:
                    return self._model_error(resp.status, resp.read().decode("utf-8", "replace"))
                if match.group(2) == "invocations":
                    self._relay_whole(resp)
                else:
                    self._relay_stream(resp)
            finally:
                conn.close()

        def _relay_whole(self, resp) -> None:
            data = resp.read()
            self.send_response(200)
            self.send_header("Content-Type", resp.getheader("Content-Type") or "application/json")
            self.send_header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _relay_stream(self, resp) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.amazon.eventstream")
            self.send_header("X-Amzn-SageMaker-Content-Type", resp.getheader("Content-Type") or "")
            self.send_header("x-Amzn-Invoked-Production-Variant", "AllTraffic")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(event: bytes) -> None:
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()

            try:
                while True:
                    chunk = resp.read1(65536)  # what the container has written so far
                    if not chunk:
                        break
                    send(payload_part(chunk))
            except (http.client.HTTPException, OSError) as exc:
                send(stream_error(f"the container's response stream broke: {type(exc).__name__}"))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client closing its keep-alive connection is normal, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def serve(container: str, port: int, host: str = "127.0.0.1", timeout: float = 3600.0) -> ThreadingHTTPServer:
    server = _Server((host, port), make_handler(container, timeout))
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--container", default="http://127.0.0.1:8080", help="the container's base URL")
    ap.add_argument("--port", type=int, default=8081, help="port for the sagemaker-runtime API")
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args(argv)
    server = serve(a.container, a.port, a.host)
    print(f"sagemaker-runtime emulator on http://{a.host}:{a.port} -> {a.container}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
