"""The Kubernetes objects of one run (``endpoint.kind: kubernetes``): a vLLM **Deployment** (one replica, the run's
TP in GPUs, the models volume read-only, the results volume for the step log), its **Service**, and an
inference-perf **Job** (the rendered config read from the results volume, reports written there). Plain manifests
(the API's JSON shape), rendered from the campaign's :class:`~rooflab.collect.endpoint_spec.KubernetesSpec` and
the sweep point; ``tests/test_k8s_launcher.py`` validates them against Kubernetes' own schema offline.

Every object carries ``app.kubernetes.io/managed-by: rooflab`` and ``rooflab.io/run: <run id>`` labels, so that
``kubectl delete deploy,svc,job -l rooflab.io/run=<id>`` removes a run's objects by hand if a launcher was killed
before its own clean-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rooflab.collect.endpoint_spec import KubernetesSpec
from rooflab.collect.launchers.endpoints import STEPLOG_ENV, vllm_engine_flags
from rooflab.data.sweep import SweepPoint

VLLM_PORT = 8000
MODELS_MOUNT = "/models"
RESULTS_MOUNT = "/results"  # inside the pods
RUN_LABEL = "rooflab.io/run"
MANAGED = {"app.kubernetes.io/managed-by": "rooflab"}


def k8s_name(prefix: str, run_id: str) -> str:
    """A DNS-1123 name (lower case, ≤ 63 characters) for a run's object."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return f"{prefix}-{slug}"[:63].rstrip("-")


@dataclass(frozen=True)
class RunObjects:
    """The names of one run's objects and where its files are."""

    run_id: str
    namespace: str

    @property
    def server(self) -> str:
        return k8s_name("rooflab-vllm", self.run_id)  # the Deployment and its Service

    @property
    def job(self) -> str:
        return k8s_name("rooflab-ip", self.run_id)

    @property
    def labels(self) -> dict[str, str]:
        return {**MANAGED, RUN_LABEL: k8s_name("r", self.run_id)}

    @property
    def base_url(self) -> str:
        return f"http://{self.server}.{self.namespace}.svc.cluster.local:{VLLM_PORT}"

    def pod_dir(self) -> str:
        """The run's folder on the results volume, as the pods see it."""
        return f"{RESULTS_MOUNT}/{self.run_id}"


def served_name(ep: KubernetesSpec, point: SweepPoint) -> str:
    return (ep.served_model_name or "{model}").format(model=point.model)


def _pod_volumes(ep: KubernetesSpec) -> list[dict[str, Any]]:
    return [{"name": "models", "persistentVolumeClaim": {"claimName": ep.models_claim, "readOnly": True}},
            {"name": "results", "persistentVolumeClaim": {"claimName": ep.results_claim}}]


MOUNTS = [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
          {"name": "results", "mountPath": RESULTS_MOUNT}]


def vllm_deployment(ep: KubernetesSpec, point: SweepPoint, objs: RunObjects) -> dict[str, Any]:
    """One vLLM server for the run: ``tp`` GPUs, the step log on the results volume, ready when ``/health``
    answers."""
    model_path = ep.model_path.format(model=point.model)
    args = ["--host", "0.0.0.0", "--port", str(VLLM_PORT), "--model", model_path,
            "--served-model-name", served_name(ep, point), "--tensor-parallel-size", str(point.tp),
            *vllm_engine_flags(dict(point.engine)), *ep.args]
    env = [{"name": STEPLOG_ENV, "value": f"{objs.pod_dir()}/steplog.jsonl"},
           *({"name": k, "value": v} for k, v in ep.env)]
    gpus = {ep.gpu_resource: str(point.tp)}
    pod: dict[str, Any] = {
        "containers": [{
            "name": "vllm", "image": ep.vllm_image, "args": args, "env": env,
            "ports": [{"name": "http", "containerPort": VLLM_PORT}],
            "resources": {"limits": gpus, "requests": gpus},
            "readinessProbe": {"httpGet": {"path": "/health", "port": VLLM_PORT}, "periodSeconds": 5,
                               "failureThreshold": 3},
            "volumeMounts": [*MOUNTS, {"name": "shm", "mountPath": "/dev/shm"}]}],
        "volumes": [*_pod_volumes(ep), {"name": "shm", "emptyDir": {"medium": "Memory"}}],  # NCCL at TP > 1
        "tolerations": [{"key": ep.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}],
        "restartPolicy": "Always"}
    if ep.node_selector:
        pod["nodeSelector"] = dict(ep.node_selector)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": objs.server, "namespace": objs.namespace, "labels": objs.labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": objs.labels},
                     "template": {"metadata": {"labels": objs.labels}, "spec": pod}}}


def vllm_service(objs: RunObjects) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": objs.server, "namespace": objs.namespace, "labels": objs.labels},
            "spec": {"selector": objs.labels, "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": VLLM_PORT}]}}


def client_job(ep: KubernetesSpec, objs: RunObjects, timeout_s: float) -> dict[str, Any]:
    """inference-perf once, against the run's Service; no retries (a retry is the collector's decision)."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": objs.job, "namespace": objs.namespace, "labels": objs.labels},
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": int(timeout_s), "ttlSecondsAfterFinished": 3600,
                     "template": {"metadata": {"labels": {**MANAGED, RUN_LABEL: objs.labels[RUN_LABEL]}},
                                  "spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "inference-perf", "image": ep.client_image,
                                                           "command": ["inference-perf", "-c",
                                                                       f"{objs.pod_dir()}/config.yaml"],
                                                           "workingDir": objs.pod_dir(),
                                                           "volumeMounts": MOUNTS}],
                                           "volumes": _pod_volumes(ep)}}}}


def client_config(ep: KubernetesSpec, point: SweepPoint, objs: RunObjects) -> dict[str, Any]:
    """The run's inference-perf config: against the Service, tokenizer and output paths as the Job's pod sees
    them."""
    from rooflab.collect.workloads import render_config

    tok = (ep.tokenizer or ep.model_path).format(model=point.model)
    return render_config(point, base_url=objs.base_url, model_name=served_name(ep, point), tokenizer_dir=tok,
                         output_dir=f"{objs.pod_dir()}/inference-perf", local_tokenizer=False)


def run_manifests(ep: KubernetesSpec, point: SweepPoint, run_id: str, timeout_s: float | None = None
                  ) -> list[dict[str, Any]]:
    """Deployment, Service, Job — in the order they are applied."""
    objs = RunObjects(run_id, ep.namespace)
    return [vllm_deployment(ep, point, objs), vllm_service(objs),
            client_job(ep, objs, ep.job_timeout_s if timeout_s is None else timeout_s)]
