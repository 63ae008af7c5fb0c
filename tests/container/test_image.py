"""The CPU image (`make image`) run as SageMaker runs it: `docker run IMAGE serve`.
Opt-in by marker (`make image-test`): needs dockerd and the sagellm:cpu image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import requests
from openai import OpenAI

from conftest import ImageServer, docker

pytestmark = pytest.mark.container
IMAGE = os.environ.get("SAGELLM_TEST_IMAGE", "sagellm:cpu")
CUSTOM = '''
import json
def input_fn(input_data, content_type):
    return {"messages": [{"role": "user", "content": json.loads(input_data)["question"]}],
            "max_tokens": 16, "temperature": 0}
def output_fn(prediction, accept):
    return json.dumps({"answer": prediction["choices"][0]["message"]["content"]}), "application/json"
'''


class Container(ImageServer):
    def __init__(self, *run_args: str, port: int = 8080):
        super().__init__(IMAGE, *run_args, port=port, wait=False)


@pytest.fixture(scope="module")
def container():
    c = Container()
    c.wait_ready()
    yield c
    c.stop()


def test_serve_answers_every_client_shape(container):
    client = OpenAI(base_url=container.url + "/v1", api_key="x")
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi."}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    native = requests.post(container.url + "/invocations", timeout=60,
                           json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}).json()
    assert native[0]["generated_text"].startswith("The capital of France is")


def test_sigterm_stops_quickly_and_cleanly():
    c = Container()
    c.wait_ready()
    elapsed, code = c.stop()
    assert code == 0 and elapsed < 5  # no 10 s kill


def test_model_mounted_at_opt_ml_model_with_custom_handlers_and_bind_port(tmp_path):
    from sagellm.model.bundled import bundled_model_dir

    model = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), model)
    (model / "code").mkdir()
    (model / "code" / "inference.py").write_text(CUSTOM)
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    c = Container("-e", "SAGEMAKER_BIND_TO_PORT=9090", "-v", f"{model}:/opt/ml/model:ro", port=9090)
    try:
        c.wait_ready()
        r = requests.post(c.url + "/invocations", json={"question": "What is the capital of France?"}, timeout=60)
        assert r.status_code == 200 and set(r.json()) == {"answer"}
        assert "(sagemaker, /opt/ml/model)" in c.log()
    finally:
        c.stop()


def test_a_model_that_fails_to_load_exits_non_zero_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    out = docker("run", "--rm", "-v", f"{tmp_path}:/opt/ml/model:ro", IMAGE, "serve", timeout=120)
    assert out.returncode != 0
    assert "start-up failed: could not load the model from /opt/ml/model" in out.stdout + out.stderr
