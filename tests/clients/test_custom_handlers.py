"""A model's code/inference.py overrides SageMaker handler functions (as the SageMaker Hugging Face
inference toolkit allows): a custom payload shape in and out, through a real server."""

from __future__ import annotations

import textwrap

import pytest
import requests

from conftest import Server

USER_CODE = textwrap.dedent('''
    import json

    import inference  # sagellm's defaults, e.g. inference.sagellm_context()


    def model_fn(model_dir):
        return {"engine": inference.sagellm_context(), "system": "Answer in one short sentence."}


    def input_fn(input_data, content_type):
        payload = json.loads(input_data)
        if payload.get("question") == "explode":
            raise RuntimeError("boom")
        return payload


    def predict_fn(data, model):
        chat = {"messages": [{"role": "system", "content": model["system"]},
                             {"role": "user", "content": data["question"]}],
                "max_tokens": data.get("max_tokens", 16), "temperature": 0}
        return inference.predict_fn(chat, model["engine"])


    def output_fn(prediction, accept):
        return json.dumps({"answer": prediction["choices"][0]["message"]["content"],
                           "tokens": prediction["usage"]["completion_tokens"]}), "application/json"
''')


@pytest.fixture(scope="module")
def custom(tmp_path_factory, loaded_model):
    model_dir = tmp_path_factory.mktemp("opt-ml-model")
    for f in __import__("pathlib").Path(loaded_model.source.path).iterdir():
        (model_dir / f.name).symlink_to(f)
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(USER_CODE)
    srv = Server(env={"SM_MODEL_DIR": str(model_dir)})
    yield srv
    srv.stop()


def test_custom_payload_in_and_out(custom, server):
    r = requests.post(custom.url + "/invocations", json={"question": "What is the capital of France?"}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "system", "content": "Answer in one short sentence."},
                     {"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0}).json()
    assert out == {"answer": expected["choices"][0]["message"]["content"],
                   "tokens": expected["usage"]["completion_tokens"]}
    assert "custom handlers from" in custom.log() and "model_fn, input_fn, predict_fn, output_fn" in custom.log()


def test_an_error_in_user_code_is_a_json_error_without_traceback(custom):
    r = requests.post(custom.url + "/invocations", json={"question": "explode"}, timeout=60)
    assert r.status_code == 424
    assert "inference.py failed: RuntimeError: boom" in r.json()["error"]
    assert "Traceback" not in r.text
    assert requests.get(custom.url + "/ping", timeout=5).status_code == 200


def test_other_routes_are_unchanged(custom):
    r = requests.post(custom.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
                      timeout=60)
    assert r.status_code == 200 and "generated_text" in r.json()
