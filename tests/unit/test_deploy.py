"""deploy/endpoint.py against moto: every AWS call with the parameters SageMaker expects."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from deploy import endpoint

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
GPU = "ml.g4dn.12xlarge"  # moto's list of instance types predates g5


@pytest.fixture
def session(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.Session(region_name="us-east-1")


def test_push_creates_the_repository_and_pushes_with_docker(session):
    calls = []
    uri = endpoint.push(session, "sagellm:gpu", "sagellm", "v1", run=lambda cmd, **kw: calls.append((cmd, kw)))
    repo = session.client("ecr").describe_repositories(repositoryNames=["sagellm"])["repositories"][0]
    assert uri == f"{repo['repositoryUri']}:v1"
    login, tag, push = (c[0] for c in calls)
    assert login[:3] == ["docker", "login", "--username"] and "--password-stdin" in login
    assert calls[0][1]["input"]  # the password goes through stdin, never the command line
    assert tag == ["docker", "tag", "sagellm:gpu", uri] and push == ["docker", "push", uri]
    endpoint.push(session, "sagellm:gpu", "sagellm", "v2", run=lambda cmd, **kw: None)  # repository reused
    assert len(session.client("ecr").describe_repositories()["repositories"]) == 1


def test_deploy_creates_model_config_and_endpoint(session):
    out = endpoint.deploy(session, "my-llm", "123.dkr.ecr.us-east-1.amazonaws.com/sagellm:v1", ROLE,
                          instance_type=GPU, num_gpus=4, startup_timeout=900,
                          env={"HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct", "MESSAGES_API_ENABLED": "true"},
                          model_data="s3://bucket/model.tar.gz")
    sm = session.client("sagemaker")
    model = sm.describe_model(ModelName="my-llm")
    container = model["PrimaryContainer"]
    assert model["ExecutionRoleArn"] == ROLE
    assert container["Environment"] == {"SM_NUM_GPUS": "4", "HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct",
                                        "MESSAGES_API_ENABLED": "true"}
    assert container["ModelDataUrl"] == "s3://bucket/model.tar.gz"
    variant = sm.describe_endpoint_config(EndpointConfigName="my-llm")["ProductionVariants"][0]
    assert (variant["VariantName"], variant["InstanceType"], variant["InitialInstanceCount"]) == \
        ("AllTraffic", GPU, 1)
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    assert sm.describe_endpoint(EndpointName="my-llm")["EndpointArn"] == out["endpoint_arn"]
    with pytest.raises(ValueError, match="between 60 and 3600"):
        endpoint.deploy(session, "x", "img", ROLE, instance_type=GPU, startup_timeout=30)


def test_autoscaling_tracks_invocations_per_instance(session):
    endpoint.deploy(session, "my-llm", "img", ROLE, instance_type=GPU)
    out = endpoint.autoscale(session, "my-llm", min_capacity=1, max_capacity=3, target=8)
    aas = session.client("application-autoscaling")
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == \
        ("endpoint/my-llm/variant/AllTraffic", 1, 3)
    policy = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyARN"] == out["policy_arn"] and policy["PolicyType"] == "TargetTrackingScaling"
    assert config["TargetValue"] == 8
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"


def test_teardown_removes_everything_and_tolerates_missing_pieces(session):
    endpoint.deploy(session, "my-llm", "img", ROLE, instance_type=GPU)
    endpoint.autoscale(session, "my-llm")
    assert endpoint.teardown(session, "my-llm") == [
        "scaling policy", "scalable target", "endpoint", "endpoint config", "model"]
    sm = session.client("sagemaker")
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert endpoint.teardown(session, "my-llm") == []  # a second run finds nothing and does not fail


def test_cli_deploy_parses_env_pairs(session, capsys):
    assert endpoint.main(["--region", "us-east-1", "deploy", "--name", "cli-llm", "--image", "img", "--role", ROLE,
                          "--env", "HF_MODEL_ID=org/model", "--num-gpus", "2", "--instance-type", GPU]) == 0
    assert json.loads(capsys.readouterr().out)["endpoint"] == "cli-llm"
    env = session.client("sagemaker").describe_model(ModelName="cli-llm")["PrimaryContainer"]["Environment"]
    assert env == {"SM_NUM_GPUS": "2", "HF_MODEL_ID": "org/model"}
