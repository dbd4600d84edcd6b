"""The custom resources the manifests use, as strict pydantic models of the fields we set.

kubernetes-validate ships schemas for built-in kinds only, so RayCluster (KubeRay) and the Prometheus
Operator's ServiceMonitor/PodMonitor are checked here: an unknown or misspelt field is an error, as it
would be for the API server's structural schema. The RayCluster fields, their types and which are
required follow KubeRay's ``ray.io/v1`` Go types (``ray-operator/apis/ray/v1/raycluster_types.go`` at
commit 3275ee09f6a6c899c37e82ea6349785536de6bd4, KubeRay 1.2+). Pod templates are not modelled here:
the tests validate them with kubernetes-validate as ``PodTemplate`` objects.
"""

# ruff: noqa: N815 - field names are the Kubernetes API's camelCase, as the manifests spell them

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Quantity = str | int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResourceRequirements(_Strict):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class AutoscalerOptions(_Strict):
    resources: ResourceRequirements | None = None
    image: str | None = None
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    idleTimeoutSeconds: int | None = Field(None, ge=0, le=2**31 - 1)
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    env: list[dict[str, Any]] | None = None
    envFrom: list[dict[str, Any]] | None = None
    volumeMounts: list[dict[str, Any]] | None = None
    securityContext: dict[str, Any] | None = None


class PodTemplateSpec(_Strict):
    metadata: dict[str, Any] | None = None
    spec: dict[str, Any]


class HeadGroupSpec(_Strict):
    rayStartParams: dict[str, str]  # required in ray.io/v1 (values are strings, even numbers)
    template: PodTemplateSpec
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    enableIngress: bool | None = None
    headService: dict[str, Any] | None = None


class WorkerGroupSpec(_Strict):
    groupName: str = Field(min_length=1)
    replicas: int | None = Field(None, ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=0)
    idleTimeoutSeconds: int | None = Field(None, ge=0)
    numOfHosts: int | None = Field(None, ge=1)
    rayStartParams: dict[str, str]
    template: PodTemplateSpec
    suspend: bool | None = None
    scaleStrategy: dict[str, Any] | None = None


class RayClusterSpec(_Strict):
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] | None = None
    rayVersion: str | None = None
    enableInTreeAutoscaling: bool | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    headServiceAnnotations: dict[str, str] | None = None
    suspend: bool | None = None
    managedBy: str | None = None
    gcsFaultToleranceOptions: dict[str, Any] | None = None


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    labels: dict[str, str] | None = None


class RayCluster(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: ObjectMeta
    spec: RayClusterSpec


class Endpoint(_Strict):
    port: str
    path: str | None = None
    interval: str | None = None
    scrapeTimeout: str | None = None


class LabelSelector(_Strict):
    matchLabels: dict[str, str]


class ServiceMonitorSpec(_Strict):
    selector: LabelSelector
    endpoints: list[Endpoint] = Field(min_length=1)


class PodMonitorSpec(_Strict):
    selector: LabelSelector
    podMetricsEndpoints: list[Endpoint] = Field(min_length=1)


class ServiceMonitor(_Strict):
    apiVersion: Literal["monitoring.coreos.com/v1"]
    kind: Literal["ServiceMonitor"]
    metadata: ObjectMeta
    spec: ServiceMonitorSpec


class PodMonitor(_Strict):
    apiVersion: Literal["monitoring.coreos.com/v1"]
    kind: Literal["PodMonitor"]
    metadata: ObjectMeta
    spec: PodMonitorSpec


CUSTOM_KINDS: dict[str, type[BaseModel]] = {
    "RayCluster": RayCluster,
    "ServiceMonitor": ServiceMonitor,
    "PodMonitor": PodMonitor,
}
"""The custom kinds the manifests may contain, by kind."""
