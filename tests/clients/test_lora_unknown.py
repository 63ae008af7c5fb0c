"""An adapter the server has not loaded is a 404 naming it on every way of choosing one, never
the base model's answer."""

from __future__ import annotations

import pytest

from helpers import oai_error, post, tgi_error

NATIVE = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "adapter_id": "no-such-adapter"}}
HEADER = {"X-Amzn-SageMaker-Adapter-Identifier": "no-such-adapter"}


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/invocations"])
def test_unknown_adapter_id_is_404_naming_it(server, path):
    msg = tgi_error(post(server, path, NATIVE), 404)
    assert "no-such-adapter" in msg, msg


@pytest.mark.parametrize("body", [{"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
                                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}],
                         ids=["native", "chat"])
def test_unknown_adapter_header_on_invocations_is_404(server, body):
    r = post(server, "/invocations", body, headers=HEADER)
    msg = tgi_error(r, 404) if "inputs" in body else oai_error(r, 404)["message"]
    assert "no-such-adapter" in msg, msg

