"""The manifests in cluster/, checked offline the way kubeconform does: every KubeRay object against the
KubeRay operator's own CRD schema (../shared/data/kuberay, made strict: no unknown fields), every pod
template and core object against the Kubernetes schemas of kubernetes-validate, the VM cluster against
Ray's cluster-launcher schema; then what they say against the project: the Ray version constraints.txt
pins, the images each stage's config names, the pipeline's own CLI and config loader, and the Serve
application that the RayService's import path and arguments build."""

from __future__ import annotations

import copy
import functools
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.common.placement import IMAGE_LABEL

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "data" / "kuberay"
KUBERNETES_VERSION = "1.33"  # the schemas kubernetes-validate checks core objects against
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def strict_schema(node: Any) -> Any:
    """An openAPIV3Schema as a JSON schema that rejects unknown fields, as the API server does for a
    structural CRD: `additionalProperties: false` on objects with properties (unless they preserve
    unknown fields), `x-kubernetes-int-or-string` as integer or string."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (they sit beside the repo as shared/data/kuberay)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 60k lines
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {  # what the API server requires of any object's name
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft7Validator(schema)


def crd_errors(document: dict[str, Any]) -> list[str]:
    validator = crd_validator(document["kind"])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)]


def cluster_specs(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        document["kind"]]


def groups(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]


def core_errors(document: dict[str, Any]) -> str:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.path))}: {error.message}"
    return ""


KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_matches_the_kuberay_crd(name: str) -> None:
    assert crd_errors(load(name)) == []


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_pod_templates_are_valid_kubernetes(name: str) -> None:
    for group, spec in groups(cluster_specs(load(name))):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{group}-template"},
                    "template": spec["template"]}
        assert core_errors(template) == "", f"{name}, group {group}"


def test_core_objects_are_valid_kubernetes() -> None:
    assert core_errors(load("storage.yaml")) == ""
    for document in yaml.safe_load_all((REPO / "infra" / "mlflow.yaml").read_text()):
        assert core_errors(document) == "", f"infra/mlflow.yaml: {document['kind']} {document['metadata']['name']}"


def test_team_mlflow_is_where_the_cluster_looks_for_it() -> None:
    """infra/mlflow.yaml serves, on PostgreSQL with proxied artifacts, at the URI the RayJob and the
    RayService give the pipeline and the app (SEEDVL_TRACKING_URI)."""
    documents = {(d["kind"], d["metadata"]["name"]): d
                 for d in yaml.safe_load_all((REPO / "infra" / "mlflow.yaml").read_text())}
    service = documents[("Service", "mlflow")]
    (port,) = service["spec"]["ports"]
    in_cluster = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    job_env = yaml.safe_load(load("rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    (app,) = serve_config()["applications"]
    assert job_env["SEEDVL_TRACKING_URI"] == app["runtime_env"]["env_vars"]["SEEDVL_TRACKING_URI"] == in_cluster
    (container,) = documents[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in args and args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert in_cluster.removeprefix("http://") in args[args.index("--allowed-hosts") + 1].split(",")
    assert container["image"].rsplit("/", 1)[-1].split(":")[0] == "openseedvl-mlflow"
    assert (REPO / "infra" / "Dockerfile.mlflow").is_file()
    postgres = documents[("StatefulSet", "postgres")]["spec"]["template"]["spec"]["containers"][0]
    host = args[args.index("--backend-store-uri") + 1].split("@", 1)[1].split(":")[0]
    assert host == "postgres.mlflow.svc.cluster.local" and documents[("Service", "postgres")]
    assert all("valueFrom" in e for e in postgres["env"] + container["env"] if "PASSWORD" in e["name"]), "no inline passwords"


def test_validators_reject_what_the_api_server_would() -> None:
    """Typos and wrong types fail: the checks above can fail."""
    cluster = load("raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    errors = crd_errors(typo)
    assert any("minReplica" in e for e in errors) and any("'minReplicas' is a required property" in e for e in errors)
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "4"
    assert any(e.startswith("spec.workerGroupSpecs.1.maxReplicas") for e in crd_errors(wrong_type))
    bad_mode = load("rayjob.yaml")
    bad_mode["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert any("upscalingMode" in e for e in crd_errors(bad_mode))
    container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imagePullPolicy"], container["resource"] = "Always", {}
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                "template": cluster["spec"]["headGroupSpec"]["template"]}
    assert "resource" in core_errors(template)


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_clusters_run_the_pinned_ray_non_root_with_a_head_that_does_no_work(name: str) -> None:
    spec = cluster_specs(load(name))
    assert spec["rayVersion"] == pinned("ray")
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group, group_spec in groups(spec):
        pod = group_spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        image = container["image"]
        assert image.rsplit("/", 1)[-1].split(":")[0] == group_spec["labels"][IMAGE_LABEL], (
            f"{name}, group {group}: the {IMAGE_LABEL} label must name the image the group runs ({image})")
        assert image.endswith(":0.1.0"), f"{name}, group {group}: tag images with the project version"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if group == "head":
            assert gpus is None, f"{name}: the head has no GPU"
        else:
            assert group_spec["minReplicas"] <= group_spec.get("replicas", 0) <= group_spec["maxReplicas"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/mnt/cluster_storage" in mounts, f"{name}, group {group}: mount the shared run root"


def test_pipeline_cluster_has_cpu_and_gpu_groups_and_the_job_uses_the_same_cluster() -> None:
    cluster = load("raycluster.yaml")["spec"]
    by_name = dict(groups(cluster))
    assert set(by_name) == {"head", "cpu", "gpu"}
    gpu_limits = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                  for name, g in by_name.items()}
    assert gpu_limits["cpu"] is None and int(gpu_limits["gpu"]) > 0
    assert load("rayjob.yaml")["spec"]["rayClusterSpec"] == cluster, "rayjob.yaml's cluster drifted from raycluster.yaml"


def test_every_image_a_stage_names_runs_in_a_group_that_fits_it() -> None:
    """The full profile places each stage by image; the pipeline's cluster must offer every such image, on
    nodes with GPUs when the stage trains on GPUs."""
    from components.schema import load_config

    config, _ = load_config("full")
    named: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if hasattr(node, "__dataclass_fields__"):
            if "image" in node.__dataclass_fields__ and isinstance(node.image, str):
                named[path] = node.image
            for field in node.__dataclass_fields__:
                walk(getattr(node, field), f"{path}.{field}".lstrip("."))

    walk(config, "")
    assert named["data.clip_filter.resources"] == "openseedvl-cpu"
    assert named["train.vit_pretrain.resources"] == "openseedvl-gpu"
    assert not [path for path, image in named.items() if not image and not path.startswith("data.clip_scorer")], (
        "every stage of the full profile names its image")
    offered = {g["labels"][IMAGE_LABEL]: g for name, g in groups(load("raycluster.yaml")["spec"]) if name != "head"}
    for path, image in named.items():
        if image:
            assert image in offered, f"{path}.image={image}: no worker group of cluster/raycluster.yaml runs it"
    gpu_group = offered[named["train.vit_pretrain.resources"]]
    assert gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert config.train.vit_pretrain.use_gpu and config.train.vlm.use_gpu


def test_rayjob_runs_the_full_pipeline_with_root_and_tracking_from_its_environment(monkeypatch) -> None:
    from ray.runtime_env import RuntimeEnv

    from components.schema import load_config
    from pipelines.full import parse_args

    job = load("rayjob.yaml")["spec"]
    assert job["entrypoint"] == "python pipelines/full.py --profile full"
    assert job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    RuntimeEnv(**dict(runtime_env, working_dir=str(REPO)))  # Ray checks the fields (and that the folder exists: the image has it)
    dockerfile = (REPO / "infra" / "Dockerfile.cpu").read_text()
    assert f"WORKDIR {runtime_env['working_dir']}\n" in dockerfile, "working_dir is the image's copy of the repo"
    env = runtime_env["env_vars"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full.py"]
    args = parse_args(argv[2:])
    config, layered = load_config(args.profile, args.experiment, args.overrides)
    assert config.profile == "full"
    assert str(config.root) == env["SEEDVL_RUN_ROOT"] == "/mnt/cluster_storage/seed-vl"
    assert config.tracking_uri == env["SEEDVL_TRACKING_URI"]
    assert layered.source_of("mlflow.tracking_uri") == "$SEEDVL_TRACKING_URI"


def serve_config() -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    text = load("rayservice.yaml")["spec"]["serveConfigV2"]
    ServeDeploySchema.model_validate(yaml.safe_load(text)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(yaml.safe_load(text))
    return yaml.safe_load(text)


def test_rayservice_builds_our_app_through_the_config_loader(monkeypatch, tmp_path: Path) -> None:
    """The import path and args of serveConfigV2 (validated by Ray Serve's own schema) build the
    application with our loader: the full profile plus `set`, the key from the Secret's variable, model
    replicas autoscaling 1..4. Only the checkpoint is swapped for a local folder (the manifest's is a
    registry URI on the team's MLflow); nothing is deployed."""
    import importlib

    (app_config,) = serve_config()["applications"]
    module_name, attribute = app_config["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert app_config["args"]["checkpoint"] == "models:/seedvl@latest-pipeline"
    for key, value in app_config["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(key, value)
    service = load("rayservice.yaml")["spec"]["rayClusterConfig"]
    key_variables = {e["name"] for _, g in groups(service) for e in g["template"]["spec"]["containers"][0]["env"]
                     if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "seedvl-api-key"}
    assert key_variables == {"SEEDVL_API_KEY"}, "every Serve pod reads the key from the Secret"
    for _, group in groups(service):
        assert [e["name"] for e in group["template"]["spec"]["containers"][0]["env"]] == ["SEEDVL_API_KEY"]

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    args = dict(app_config["args"], checkpoint=str(export))
    monkeypatch.delenv("SEEDVL_API_KEY", raising=False)
    with pytest.raises(ValueError, match="SEEDVL_API_KEY"):  # no key in the environment: refused, not served open
        builder(args)
    monkeypatch.setenv("SEEDVL_API_KEY", "test-key")
    app = builder(args)
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    cfg = ingress.init_args[2]
    assert (ingress.name, model.name) == ("ChatIngress", "VlmModel")
    assert cfg.api_key_env in key_variables
    assert cfg.resources.image in {g["labels"][IMAGE_LABEL] for _, g in groups(service)}
    scaling = model._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert model.ray_actor_options["num_gpus"] == 1
    worker = service["workerGroupSpecs"][0]
    assert int(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["maxReplicas"] >= scaling.max_replicas, "room for every model replica the app may ask for"
    with pytest.raises(ValueError, match="unknown: \\['profil'\\]"):
        builder({"checkpoint": str(export), "profil": "full"})


def test_vm_cluster_passes_rays_launcher_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("vm-cluster.yaml")
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    images = {"head": raw["docker"]["head_image"], "cpu": raw["docker"]["worker_image"],
              "gpu": types["gpu"]["docker"]["worker_image"]}
    for node_type, image in images.items():
        assert image.rsplit("/", 1)[-1].split(":")[0] == types[node_type]["labels"][IMAGE_LABEL]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(broken)
