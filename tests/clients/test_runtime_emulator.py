"""The local SageMaker runtime emulator in front of a real server, driven by boto3 and the SDK's
LineIterator: sync and streaming invocations, and SageMaker's error mapping."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import botocore.exceptions
import pytest
from sagemaker.iterators import LineIterator

from conftest import free_port
from deploy.runtime_emulator import serve

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
        "temperature": 0}


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


def start(container: str) -> tuple[ThreadingHTTPServer, str]:
    port = free_port()
    emu = serve(container, port)
    threading.Thread(target=emu.serve_forever, daemon=True).start()
    return emu, f"http://127.0.0.1:{port}"


def runtime(url: str):
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x")


@pytest.fixture(scope="module")
def emulator(server):
    emu, url = start(server.url)
    yield runtime(url)
    emu.shutdown()


def invoke(client, body: dict) -> dict:
    resp = client.invoke_endpoint(EndpointName="sagellm", ContentType="application/json", Body=json.dumps(body))
    return json.loads(resp["Body"].read())


def stream_lines(client, body: dict) -> list[bytes]:
    resp = client.invoke_endpoint_with_response_stream(
        EndpointName="sagellm", ContentType="application/json", Body=json.dumps({**body, "stream": True}))
    return [line for line in LineIterator(resp["Body"]) if line]


def test_invoke_endpoint_answers_chat_and_native(emulator):
    chat = invoke(emulator, CHAT)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    native = invoke(emulator, {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}})
    assert isinstance(native, list) and native[0]["generated_text"].startswith("The capital of France is")


def test_streaming_through_the_emulator_equals_the_plain_answer(emulator):
    expected = invoke(emulator, CHAT)["choices"][0]["message"]["content"]
    lines = stream_lines(emulator, CHAT)
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[len(b"data:"):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected
    native = stream_lines(emulator, {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}})
    assert json.loads(native[-1][len(b"data:"):])["generated_text"]


def test_container_errors_become_model_error_with_the_original_status(emulator):
    with pytest.raises(emulator.exceptions.ModelError) as info:
        invoke(emulator, {"inputs": "hi", "parameters": {"top_p": 7}})
    err = info.value.response
    assert err["OriginalStatusCode"] == 422
    assert "top_p" in err["OriginalMessage"]
    with pytest.raises(emulator.exceptions.ModelError):  # validated before the stream opens
        stream_lines(emulator, {**CHAT, "temperature": -1})


def test_an_empty_body_is_a_validation_error(emulator):
    with pytest.raises(emulator.exceptions.ValidationError):
        emulator.invoke_endpoint(EndpointName="sagellm", ContentType="application/json", Body=b"")


class _BreaksMidStream(BaseHTTPRequestHandler):
    """A container that starts a chunked SSE answer and then drops the connection."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'data: {"token":{"id":1,"text":"a"}}\n\n'
        self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


def test_a_broken_container_stream_becomes_model_stream_error():
    broken = ThreadingHTTPServer(("127.0.0.1", free_port()), _BreaksMidStream)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    emu, url = start(f"http://127.0.0.1:{broken.server_address[1]}")
    try:
        with pytest.raises(botocore.exceptions.EventStreamError) as info:
            stream_lines(runtime(url), {"inputs": "hi"})
        assert info.value.response["Error"]["Code"] == "ModelStreamError"
    finally:
        emu.shutdown()
        broken.shutdown()


def test_sdk_predictor_predict_stream_works_locally(server):
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer
    from sagemaker.session import Session

    emu, url = start(server.url)
    try:
        boto = boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        session = Session(boto_session=boto, sagemaker_runtime_client=runtime(url))
        predictor = Predictor("sagellm", sagemaker_session=session, serializer=JSONSerializer(),
                              deserializer=JSONDeserializer())
        assert predictor.predict(CHAT)["choices"][0]["message"]["content"]
        lines = [line for line in predictor.predict_stream({**CHAT, "stream": True}, iterator=LineIterator)
                 if line]
        assert lines[-1] == b"data: [DONE]" and len(lines) > 3
    finally:
        emu.shutdown()


def test_deploy_cli_invokes_through_the_emulator(server, capsys, monkeypatch):
    from deploy import endpoint

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")  # signed but never checked
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    emu, url = start(server.url)
    try:
        args = ["--region", "us-east-1", "invoke", "--name", "sagellm", "--endpoint-url", url, "--body", json.dumps(CHAT)]
        assert endpoint.main(args) == 0
        assert json.loads(capsys.readouterr().out)["object"] == "chat.completion"
        assert endpoint.main(args + ["--stream"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == "data: [DONE]"
    finally:
        emu.shutdown()
