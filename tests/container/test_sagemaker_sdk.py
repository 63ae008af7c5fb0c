"""The image deployed with the real SageMaker SDK v2 in local mode (`instance_type="local"`):
docker-compose runs `docker run IMAGE serve` with the model artifacts at /opt/ml/model, and
`predictor.predict()` posts to /invocations. Nothing reaches AWS: fake credentials, a fixed
region, telemetry off, `code_location` set so no default bucket is looked up, and the image
tagged locally under the ECR URI the seed code asks for, so there is no ECR login or pull."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import docker, free_port

pytestmark = pytest.mark.container
IMAGE = os.environ.get("SAGELLM_TEST_IMAGE", "sagellm:cpu")
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
        "temperature": 0}


@pytest.fixture(scope="module")
def sdk_home(tmp_path_factory):
    """A HOME with the SDK's two config files: telemetry off, and a free serving port (local
    mode publishes 8080 otherwise, where `make run` may already be listening)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".sagemaker").mkdir()
    (home / ".sagemaker" / "config.yaml").write_text(
        f"local:\n  serving_port: {free_port()}\n  container_root: {home}\n")
    defaults = home / "sagemaker-defaults.yaml"
    defaults.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HOME": str(home), "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
                           "SAGEMAKER_USER_CONFIG_OVERRIDE": str(defaults)}.items():
            mp.setenv(key, value)
        yield home


@pytest.fixture(scope="module")
def model_data(tmp_path_factory):
    """The bundled model as SageMaker model artifacts (model_data="file://..."), readable by the
    image's non-root user."""
    from sagellm.model.bundled import bundled_model_dir

    folder = tmp_path_factory.mktemp("artifacts") / "model"
    shutil.copytree(bundled_model_dir(), folder)
    subprocess.run(["chmod", "-R", "a+rX", str(folder.parent)], check=True)
    return folder


def deploy(image_uri: str, env: dict[str, str], model_data) -> object:
    import boto3
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.huggingface import HuggingFaceModel
    from sagemaker.local import LocalSession
    from sagemaker.serializers import JSONSerializer

    session = LocalSession(boto_session=boto3.Session(region_name="us-east-1"))
    model = HuggingFaceModel(image_uri=image_uri, env=env, role="arn:aws:iam::111111111111:role/dummy",
                             sagemaker_session=session, model_data=f"file://{model_data}",
                             code_location="s3://local-dummy-bucket/code")
    # Local create_endpoint already blocks until /ping answers 200; wait=True would only add a
    # fixed 30 s sleep.
    return model.deploy(initial_instance_count=1, instance_type="local", serializer=JSONSerializer(),
                        deserializer=JSONDeserializer(), container_startup_health_check_timeout=300, wait=False)


def teardown(predictor) -> None:
    predictor.delete_model()  # first: it reads the endpoint config that delete_endpoint removes
    predictor.delete_endpoint()
    # docker-compose leaves the stopped container behind.
    leftovers = docker("ps", "-aq", "--filter", "network=sagemaker-local").stdout.split()
    if leftovers:
        docker("rm", "-f", *leftovers)


def test_messages_api_through_the_seed_image_uri(sdk_home, model_data):
    """The seed's own deploy code, unchanged: the TGI image URI (tagged locally to our image),
    MESSAGES_API_ENABLED, and predict() with a Messages dict."""
    from sagemaker.huggingface import get_huggingface_llm_image_uri

    uri = get_huggingface_llm_image_uri("huggingface", version="1.4.0")
    assert uri.startswith("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:")
    docker("tag", IMAGE, uri, check=True)
    predictor = deploy(uri, {"HF_MODEL_ID": "/opt/ml/model", "SM_NUM_GPUS": "1",
                             "MESSAGES_API_ENABLED": "true", "MAX_INPUT_LENGTH": "1024",
                             "MAX_TOTAL_TOKENS": "2048"}, model_data)
    try:
        reply = predictor.predict(CHAT)
        assert reply["object"] == "chat.completion"
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] <= 16
    finally:
        teardown(predictor)
        docker("rmi", uri)


def test_native_inputs_and_parameters(sdk_home, model_data):
    predictor = deploy(IMAGE, {"SM_NUM_GPUS": "1"}, model_data)
    try:
        reply = predictor.predict({"inputs": "The capital of France is",
                                   "parameters": {"max_new_tokens": 8, "do_sample": False, "details": True}})
        assert isinstance(reply, list) and reply[0]["generated_text"].startswith("The capital of France is")
        assert reply[0]["details"]["generated_tokens"] <= 8
    finally:
        teardown(predictor)
