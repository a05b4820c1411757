"""The deployment files validate against the schemas of the tools that read them, and agree with each other.

- `ray_cluster.yaml`: Ray's own launcher validation (`prepare_config` + `validate_config`, i.e. ray-schema.json);
- `infra/kuberay/*.yaml`: the openAPIV3Schema of KubeRay v1.7.0's CRDs (shipped under tests/infra/schemas/ with
  their source), strictly — a field the CRD does not define fails, as with `kubectl apply --validate=strict`
  (the API server would otherwise prune it silently) — and no field KubeRay marks deprecated;
- `infra/serve/config.yaml`: Serve's `ServeDeploySchema`, and the RayService's serveConfigV2 is the same config;
- `infra/aws/*.json`: the IAM policies the README tells you to attach cover what the launcher config needs.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).parent / "schemas" / "kuberay-v1.7.0"
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _yaml(path: str):
    return yaml.safe_load((REPO / path).read_text())


def _iam(name: str) -> dict:
    return json.loads((REPO / "infra" / "aws" / name).read_text())


# --- ray_cluster.yaml ----------------------------------------------------------------------------------------


def test_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_yaml("ray_cluster.yaml"))
    validate_config(config)  # raises on a schema violation
    assert set(config["available_node_types"]) == {"head", "gpu_workers"}


def test_cluster_nodes_boot_the_ubuntu_gpu_ami_with_a_matching_root_device():
    """The AMI is AWS's Ubuntu 22.04 Deep Learning Base AMI (SSM parameter), so `ubuntu` logs in, Docker and the
    NVIDIA driver are there, and the root volume mapping names the root device of Ubuntu AMIs, /dev/sda1."""
    config = _yaml("ray_cluster.yaml")
    assert config["auth"]["ssh_user"] == "ubuntu"
    for name, node in config["available_node_types"].items():
        nc = node["node_config"]
        assert nc["ImageId"] == f"resolve:ssm:{DLAMI_PARAMETER}", name
        assert [m["DeviceName"] for m in nc["BlockDeviceMappings"]] == ["/dev/sda1"], name


def test_cluster_pulls_its_image_after_a_registry_login():
    config = _yaml("ray_cluster.yaml")
    image = config["docker"]["image"]
    registry = image.split("/", 1)[0]
    assert "." in registry and image.rsplit(":", 1)[1] != "latest", image
    login = " ".join(config["initialization_commands"])
    assert "aws ecr get-login-password" in login and f"--password-stdin {registry}" in login


def test_head_policy_lets_the_autoscaler_start_workers_with_their_role():
    """The head has its own instance profile, so Ray does not attach its default role: the head's policy must
    carry the EC2 calls of Ray's AWS node provider and iam:PassRole of the workers' role."""
    config = _yaml("ray_cluster.yaml")
    head = _iam("head-policy.json")
    worker = _iam("worker-policy.json")
    allowed = {a for s in head["Statement"] if s["Effect"] == "Allow"
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:TerminateInstances",
            "ec2:DescribeInstanceTypes", "ssm:GetParameters", "iam:PassRole", "ecr:GetAuthorizationToken",
            "ecr:BatchGetImage", "s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= allowed
    worker_profile = config["available_node_types"]["gpu_workers"]["node_config"]["IamInstanceProfile"]["Arn"]
    head_profile = config["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"]
    assert worker_profile != head_profile
    (passrole,) = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole["Resource"].rsplit("/", 1)[1] == worker_profile.rsplit("/", 1)[1]  # role and profile share a name
    worker_actions = {a for s in worker["Statement"]
                      for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert not {a for a in worker_actions if a.startswith(("ec2:", "iam:"))}
    assert {"s3:GetObject", "s3:PutObject", "ecr:GetAuthorizationToken"} <= worker_actions
    assert _iam("ec2-trust-policy.json")["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


# --- KubeRay manifests ----------------------------------------------------------------------------------------


def _crd_schema(kind: str) -> dict:
    with gzip.open(SCHEMAS / f"{kind.lower()}.v1.schema.json.gz", "rt") as f:
        return json.load(f)


def _strict(schema):
    """The schema with unknown fields forbidden wherever the CRD lists an object's fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _errors(manifest: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_strict(_crd_schema(manifest["kind"])))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def _deprecated(manifest: dict) -> list[str]:
    paths = json.loads((SCHEMAS / "deprecated.json").read_text()).get(manifest["kind"], [])
    found = []
    for path in paths:
        node = manifest
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            found.append(path)
    return found


MANIFESTS = ["infra/kuberay/rayjob-index.yaml", "infra/kuberay/rayservice.yaml"]


@pytest.mark.parametrize("path", MANIFESTS)
def test_kuberay_manifest_matches_the_crd_schema(path):
    manifest = _yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert _errors(manifest) == []
    assert _deprecated(manifest) == []


def test_the_strict_crd_check_catches_unknown_and_deprecated_fields():
    """The validation is not vacuous: an unknown field, a wrong type and the deprecated RayService thresholds the
    old manifest carried are all reported."""
    manifest = _yaml("infra/kuberay/rayservice.yaml")
    bad = copy.deepcopy(manifest)
    bad["spec"]["serviceUnhealthySecondThreshold"] = 900
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["bogus"] = 1
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = _errors(bad)
    assert any("bogus" in e for e in errors) and any("four" in e for e in errors), errors
    assert _deprecated(bad) == ["spec.serviceUnhealthySecondThreshold"]


@pytest.mark.parametrize("path", MANIFESTS)
def test_kuberay_pods_use_a_registry_image_irsa_and_the_model_cache(path):
    """No static keys (IRSA service account), an image with a registry (not Docker Hub's `statekv`), and GPU pods
    that keep the model on the shared volume (HF_HOME) instead of downloading it on every new pod."""
    manifest = _yaml(path)
    spec = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pvc = _yaml("infra/kuberay/hf-cache-pvc.yaml")
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "statekv-s3"
        for c in pod["containers"]:
            registry = c["image"].split("/", 1)[0]
            assert "." in registry and not c["image"].endswith(":latest"), c["image"]
            assert "envFrom" not in c and not any(e["name"].startswith("AWS_") for e in c.get("env", []))
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert claims[mounts["/scratch/hf"]] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# --- Serve ----------------------------------------------------------------------------------------------------


def test_serve_config_passes_serves_schema_with_native_deployment_options():
    """Resources, request limits and autoscaling are Serve's `deployments:` options (updated in place), not
    application `args` (a change of which restarts every replica); the named deployment exists in the app."""
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serving.app import app_builder

    config = _yaml("infra/serve/config.yaml")
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert not {"num_gpus", "num_cpus", "max_ongoing_requests", "autoscaling"} & set(app["args"])
    (deployment,) = app["deployments"]
    assert {"autoscaling_config", "ray_actor_options", "max_ongoing_requests"} <= set(deployment)
    assert app["import_path"] == "pipelines.serving.app:app_builder"
    assert app_builder(dict(app["args"]))._bound_deployment.name == deployment["name"]


def test_rayservice_serves_the_same_config():
    service = _yaml("infra/kuberay/rayservice.yaml")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _yaml("infra/serve/config.yaml")


def test_rayservice_mounts_the_api_keys_where_the_service_reads_them():
    """The replicas (GPU workers) read `api_keys_file` from the mounted Secret: a whole-directory mount (not subPath,
    which Kubernetes never updates, so a rotation would not arrive), read-only; the keys never sit in the config."""
    import os

    service = _yaml("infra/kuberay/rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    keys_file = app["args"]["api_keys_file"]
    assert not {"no_auth"} & set(app["args"]) and "secret" not in str(app["args"]).replace("api_keys_file", "")
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        (mount,) = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
        assert mount["mountPath"] == os.path.dirname(keys_file) and mount.get("readOnly") and "subPath" not in mount
        assert secrets[mount["name"]] == "statekv-api-keys"
