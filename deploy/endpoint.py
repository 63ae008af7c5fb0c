#!/usr/bin/env python3
"""Deploy sagellm to a SageMaker real-time endpoint, and take it down again.

    python -m deploy.endpoint push      --image sagellm:gpu --repository sagellm [--tag latest]
    python -m deploy.endpoint deploy    --name my-llm --image <ecr uri> --role <arn> \\
                                        [--instance-type ml.g5.2xlarge] [--num-gpus 1] \\
                                        [--startup-timeout 600] [--env HF_MODEL_ID=...] [--model-data s3://...]
    python -m deploy.endpoint autoscale --name my-llm [--min 1] [--max 4] [--target 5]
    python -m deploy.endpoint invoke    --name my-llm --body '{"messages": [...]}' [--stream]
    python -m deploy.endpoint teardown  --name my-llm

Each command prints what it created. `--endpoint-url` on `invoke` points at the local runtime
emulator (deploy/runtime_emulator.py) instead of AWS.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys

import boto3

VARIANT = "AllTraffic"


def _resource_id(name: str) -> str:
    return f"endpoint/{name}/variant/{VARIANT}"


def push(session: boto3.Session, image: str, repository: str, tag: str = "latest", run=subprocess.run) -> str:
    """Create the ECR repository if needed, log docker in, tag and push; returns the image URI."""
    ecr = session.client("ecr")
    try:
        repo = ecr.describe_repositories(repositoryNames=[repository])["repositories"][0]
    except ecr.exceptions.RepositoryNotFoundException:
        repo = ecr.create_repository(repositoryName=repository,
                                     imageScanningConfiguration={"scanOnPush": True})["repository"]
    auth = ecr.get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(auth["authorizationToken"]).decode().split(":", 1)
    registry = auth["proxyEndpoint"].removeprefix("https://")
    uri = f"{repo['repositoryUri']}:{tag}"
    run(["docker", "login", "--username", user, "--password-stdin", registry], input=password.encode(), check=True)
    run(["docker", "tag", image, uri], check=True)
    run(["docker", "push", uri], check=True)
    return uri


def container_env(num_gpus: int, extra: dict[str, str]) -> dict[str, str]:
    """SageMaker wants strings; the values are JSON-encoded as the SDK does (sagellm parses both)."""
    env = {"SM_NUM_GPUS": json.dumps(num_gpus)}
    env.update(extra)
    return env


def deploy(session: boto3.Session, name: str, image: str, role: str, instance_type: str = "ml.g5.2xlarge",
           num_gpus: int = 1, startup_timeout: int = 600, env: dict[str, str] | None = None,
           model_data: str | None = None, instance_count: int = 1) -> dict:
    if not 60 <= startup_timeout <= 3600:
        raise ValueError("--startup-timeout must be between 60 and 3600 seconds (SageMaker's range)")
    sm = session.client("sagemaker")
    container = {"Image": image, "Environment": container_env(num_gpus, env or {})}
    if model_data:
        container["ModelDataUrl"] = model_data
    sm.create_model(ModelName=name, ExecutionRoleArn=role, PrimaryContainer=container)
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[{
        "VariantName": VARIANT, "ModelName": name, "InstanceType": instance_type,
        "InitialInstanceCount": instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout,
    }])
    arn = sm.create_endpoint(EndpointName=name, EndpointConfigName=name)["EndpointArn"]
    return {"model": name, "endpoint_config": name, "endpoint": name, "endpoint_arn": arn}


def autoscale(session: boto3.Session, name: str, min_capacity: int = 1, max_capacity: int = 4,
              target: float = 5.0) -> dict:
    """Target tracking on invocations per instance (per minute)."""
    aas = session.client("application-autoscaling")
    rid = _resource_id(name)
    aas.register_scalable_target(ServiceNamespace="sagemaker", ResourceId=rid,
                                 ScalableDimension="sagemaker:variant:DesiredInstanceCount",
                                 MinCapacity=min_capacity, MaxCapacity=max_capacity)
    policy = aas.put_scaling_policy(
        PolicyName=f"{name}-invocations", ServiceNamespace="sagemaker", ResourceId=rid,
        ScalableDimension="sagemaker:variant:DesiredInstanceCount", PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": 300, "ScaleOutCooldown": 60,
        })
    return {"resource_id": rid, "policy_arn": policy["PolicyARN"]}


def invoke(session: boto3.Session, name: str, body: dict, stream: bool = False, endpoint_url: str | None = None):
    """The reply as a dict (sync), or an iterator of SSE lines (stream)."""
    rt = session.client("sagemaker-runtime", endpoint_url=endpoint_url)
    if not stream:
        resp = rt.invoke_endpoint(EndpointName=name, ContentType="application/json", Body=json.dumps(body))
        return json.loads(resp["Body"].read())
    from sagemaker.iterators import LineIterator

    resp = rt.invoke_endpoint_with_response_stream(EndpointName=name, ContentType="application/json",
                                                   Body=json.dumps({**body, "stream": True}))
    return (line for line in LineIterator(resp["Body"]) if line)


def teardown(session: boto3.Session, name: str) -> list[str]:
    """Delete whatever of the endpoint's pieces exists; returns what was deleted."""
    done = []
    aas, sm = session.client("application-autoscaling"), session.client("sagemaker")
    rid = _resource_id(name)
    steps = [
        ("scaling policy", lambda: aas.delete_scaling_policy(
            PolicyName=f"{name}-invocations", ServiceNamespace="sagemaker", ResourceId=rid,
            ScalableDimension="sagemaker:variant:DesiredInstanceCount")),
        ("scalable target", lambda: aas.deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension="sagemaker:variant:DesiredInstanceCount")),
        ("endpoint", lambda: sm.delete_endpoint(EndpointName=name)),
        ("endpoint config", lambda: sm.delete_endpoint_config(EndpointConfigName=name)),
        ("model", lambda: sm.delete_model(ModelName=name)),
    ]
    for what, call in steps:
        try:
            call()
            done.append(what)
        except Exception as exc:  # already gone (or never made): say so and go on
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            print(f"skip {what}: {code}", file=sys.stderr)
    return done


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--region", default=None)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="push a local image to ECR")
    p.add_argument("--image", required=True)
    p.add_argument("--repository", default="sagellm")
    p.add_argument("--tag", default="latest")
    p = sub.add_parser("deploy", help="create the model, endpoint config and endpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--instance-type", default="ml.g5.2xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--num-gpus", type=int, default=1, help="SM_NUM_GPUS (tensor-parallel degree)")
    p.add_argument("--startup-timeout", type=int, default=600, help="container_startup_health_check_timeout")
    p.add_argument("--model-data", default=None, help="s3:// model artifacts (mounted at /opt/ml/model)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the container (repeat)")
    p = sub.add_parser("autoscale", help="target-tracking autoscaling on invocations per instance")
    p.add_argument("--name", required=True)
    p.add_argument("--min", type=int, default=1)
    p.add_argument("--max", type=int, default=4)
    p.add_argument("--target", type=float, default=5.0)
    p = sub.add_parser("invoke", help="call the endpoint (sync or streaming)")
    p.add_argument("--name", required=True)
    p.add_argument("--body", required=True, help="JSON request body")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--endpoint-url", default=None, help="e.g. the local runtime emulator")
    p = sub.add_parser("teardown", help="delete autoscaling, endpoint, config and model")
    p.add_argument("--name", required=True)
    a = ap.parse_args(argv)
    session = boto3.Session(region_name=a.region)
    if a.command == "push":
        print(push(session, a.image, a.repository, a.tag))
    elif a.command == "deploy":
        print(json.dumps(deploy(session, a.name, a.image, a.role, a.instance_type, a.num_gpus, a.startup_timeout,
                                _env_pairs(a.env), a.model_data, a.instance_count)))
    elif a.command == "autoscale":
        print(json.dumps(autoscale(session, a.name, a.min, a.max, a.target)))
    elif a.command == "invoke":
        result = invoke(session, a.name, json.loads(a.body), a.stream, a.endpoint_url)
        if a.stream:
            for line in result:
                print(line.decode(), flush=True)
        else:
            print(json.dumps(result))
    else:
        print(json.dumps(teardown(session, a.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
