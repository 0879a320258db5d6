"""Work pools rooflab deploys to: a **process** pool (each flow run a process on the worker's machine; the default)
or a **Kubernetes** pool (each flow run a Job's pod, through ``prefect-kubernetes``' worker), whose base job
template :func:`kubernetes_job_template` extends for GPU nodes and the shared data store.

The Kubernetes template starts from ``prefect-kubernetes``' own default and adds variables (all with defaults, all
overridable per deployment or per flow run through ``job_variables``):

* ``gpu_count`` (default 0) of ``nvidia.com/gpu`` in the container's limits — 0 for the campaign flow and for runs
  whose GPUs are in the pods the Kubernetes launcher creates (:mod:`cluster.k8s_launcher`); a run flow that starts
  its own vLLM inside its pod (``command`` endpoint) sets it to the run's TP;
* ``node_selector`` and ``tolerations`` (GPU nodes are usually tainted);
* ``store_claim`` / ``store_mount``: the PersistentVolumeClaim of the shared data store (ReadWriteMany), mounted in
  every flow-run pod at the path the deployments' ``store`` parameter names.

It also moves ``completions`` / ``parallelism`` from the pod spec (where the upstream default puts them and where
Kubernetes' schema has no such fields) to the Job spec. :func:`render_job_manifest` renders the Job a flow run
would get, through ``prefect-kubernetes``' own code, so it can be validated offline.
"""

from __future__ import annotations

import copy
from typing import Any
from uuid import uuid4

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound

from rooflab.errors import InputError

POOL_TYPES = ("process", "kubernetes")
GPU_RESOURCE = "nvidia.com/gpu"


def _variable(kind: str, default: Any, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "default": default, "description": description, **extra}


def kubernetes_job_template(*, image: str | None = None, namespace: str = "rooflab", store_claim: str = "rooflab-store",
                            store_mount: str = "/store", node_selector: dict[str, str] | None = None,
                            service_account: str | None = "rooflab") -> dict[str, Any]:
    """The Kubernetes pool's base job template (see the module doc); the arguments set the variables' defaults."""
    from prefect_kubernetes.worker import KubernetesWorker

    t = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    job = t["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    for key in ("completions", "parallelism"):  # Job fields, not pod fields
        job["spec"][key] = pod.pop(key, 1)
    container = pod["containers"][0]
    container["resources"]["limits"][GPU_RESOURCE] = "{{ gpu_count }}"
    container["volumeMounts"] = [{"name": "store", "mountPath": "{{ store_mount }}"}]
    pod["volumes"] = [{"name": "store", "persistentVolumeClaim": {"claimName": "{{ store_claim }}"}}]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    props = t["variables"]["properties"]
    props["gpu_count"] = _variable("integer", 0, f"GPUs ({GPU_RESOURCE}) the flow-run pod requests", minimum=0)
    props["node_selector"] = _variable("object", node_selector or {}, "node labels the pod must run on",
                                       additionalProperties={"type": "string"})
    props["tolerations"] = _variable("array", [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
                                     "taints the pod tolerates (GPU nodes are usually tainted)",
                                     items={"type": "object"})
    props["store_claim"] = _variable("string", store_claim, "PersistentVolumeClaim (ReadWriteMany) of the data store")
    props["store_mount"] = _variable("string", store_mount, "where the data store is mounted in the pod")
    props["namespace"]["default"] = namespace
    if image:
        props["image"]["default"] = image
    if service_account:
        props["service_account_name"]["default"] = service_account
    return t


def render_job_manifest(template: dict[str, Any], values: dict[str, Any] | None = None,
                        flow_run_name: str = "rooflab-run") -> dict[str, Any]:
    """The Job manifest ``prefect-kubernetes``' worker would submit for a flow run of a deployment with job variables
    ``values`` on a pool with base job template ``template`` (its own configuration class does the rendering)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # what BaseJobConfiguration.from_template_and_values does, without its server round trip (this template has no
    # block or variable references to resolve)
    props = template["variables"]["properties"]
    variables = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    variables.update(values or {})
    cfg = KubernetesWorkerJobConfiguration(**apply_values(copy.deepcopy(template["job_configuration"]), variables))
    cfg.prepare_for_flow_run(FlowRun(id=uuid4(), name=flow_run_name, flow_id=uuid4()))
    return dict(cfg.job_manifest)


def ensure_pool(name: str, pool_type: str = "process", base_job_template: dict[str, Any] | None = None) -> str:
    """Create work pool ``name`` of ``pool_type`` (or update its base job template when one is given). Returns what
    was done, in words."""
    if pool_type not in POOL_TYPES:
        raise InputError(None, "--pool-type", f"unknown work pool type {pool_type!r} (known: {', '.join(POOL_TYPES)})")
    if base_job_template is None and pool_type == "process":
        from prefect.workers.process import ProcessWorker

        base_job_template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type,
                                                   base_job_template=base_job_template or {}))
            return f"created work pool {name} ({pool_type})"
        if pool.type != pool_type:
            raise InputError(None, "--pool-type", f"work pool {name} exists with type {pool.type}, not {pool_type}")
        if pool_type == "kubernetes" and base_job_template is not None:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=base_job_template))
            return f"work pool {name} ({pool_type}): base job template updated"
        return f"work pool {name} ({pool_type}) exists"
