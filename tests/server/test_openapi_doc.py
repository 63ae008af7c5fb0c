"""The OpenAPI document describes every route the app serves and nothing else, at both paths, and
/docs renders it without loading anything from elsewhere (fake engine: HTTP behaviour only)."""

from __future__ import annotations

import re

from fakes import FakeRuntime

from sagellm.server.app import create_app
from sagellm.settings import Settings


def _app():
    settings = Settings.from_env({})
    app = create_app(settings, runtime=FakeRuntime(settings))
    app.testing = True
    return app


def test_every_route_is_described_and_nothing_else():
    app = _app()
    doc = app.test_client().get("/openapi.json").json
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert described == served - {("/ping", "post"), ("/", "get")}  # aliases of GET /ping and GET /health
    assert doc["openapi"].startswith("3.1") and doc == app.test_client().get("/api-doc/openapi.json").json
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "default" in op["responses"] and "200" in op["responses"]


def test_request_and_response_schemas_come_from_the_models():
    doc = _app().test_client().get("/openapi.json").json
    schemas = doc["components"]["schemas"]
    op = doc["paths"]["/v1/responses"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "input" in schemas["ResponsesRequest"]["required"]
    assert "max_tokens" in schemas["MessagesRequest"]["required"]
    assert set(schemas["ResponseObject"]["properties"]) >= {"id", "status", "output", "usage", "incomplete_details"}
    events = op["responses"]["200"]["content"]["text/event-stream"]["schema"]["anyOf"]
    assert {"$ref": "#/components/schemas/TextDeltaEvent"} in events


def test_docs_page_is_self_contained():
    r = _app().test_client().get("/docs")
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and r.mimetype == "text/html" and 'fetch("/openapi.json")' in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page), "the page loads something from elsewhere"
