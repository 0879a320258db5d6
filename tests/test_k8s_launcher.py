"""The Kubernetes side of issue 19, offline (no cluster here):

* the manifests of a run (vLLM Deployment + Service, inference-perf Job) and the Job the Kubernetes work pool's base
  job template renders validate against Kubernetes' own schema (``kubernetes-validate``, strict: unknown fields are
  errors) — and broken ones do not;
* the launcher's control flow runs against the Kubernetes client's API: a fake with the client's method names whose
  answers are API-shaped JSON (written here by hand in the shape the API server returns; not recorded from a real
  cluster) deserialized by the client's own models. Happy path through the collector to a manifest; a server that
  never gets ready; a pod that cannot pull its image; a failed Job; API errors on create and on delete; an
  interrupt — and in every case whatever was created is deleted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from test_steplog_adapter import synthetic  # a two-request vllm-steplog log (prompt 10, 3 outputs each)

from cluster.k8s_launcher import KubernetesLauncher
from cluster.k8s_manifests import RUN_LABEL, RunObjects, run_manifests
from rooflab.collect.collector import run_one
from rooflab.collect.spec import parse_campaign
from rooflab.data.store import Store
from rooflab.data.sweep import SweepPoint, run_id
from rooflab.errors import InputError

K8S = "1.30"  # the schema version the manifests are validated against (kubernetes-validate bundles 1.x schemas)
ENDPOINT = {"kind": "kubernetes", "namespace": "calib", "client_image": "registry.example/inference-perf:0.7.0",
            "vllm_image": "registry.example/vllm-steplog:0.15.1", "node_selector": {"nvidia.com/gpu.product": "H100"},
            "args": ["--enforce-eager"], "env": {"HF_HUB_OFFLINE": 1}}
CAMPAIGN = {"name": "k8s", "hardware": "H100-SXM", "models": [{"model": "llama-3.1-8b", "tp": [1, 4]}],
            "validation": {"models": [], "points": [{"family": "W3", "rate": 1}]},
            "families": {"W3": {"rate": [1], "input_tokens": 128, "output_tokens": 32}}, "duration_s": 10,
            "engine": {"max_model_len": 4096, "max_num_seqs": 64}, "endpoint": ENDPOINT}
# the two requests of the synthetic step log
POINT = SweepPoint("llama-3.1-8b", 1, "H100-SXM", "W3", (("input_tokens", 10), ("output_tokens", 3), ("rate", 0.2)),
                   duration_s=10.0, engine=(("max_model_len", 4096),))


def campaign(**endpoint):
    return parse_campaign({**CAMPAIGN, "endpoint": {**ENDPOINT, **endpoint}}, source="k8s.yaml")


def validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, K8S, strict=True)


# ------------------------------------------------------------------------------------------ manifests
def test_run_manifests_validate_against_the_kubernetes_schema():
    c = campaign()
    point = next(p for p in c.candidates() if p.tp == 4)
    deployment, service, job = run_manifests(c.endpoint, point, "W3-0123456789abcdef")
    for m in (deployment, service, job):
        validate(m)
    pod = deployment["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    assert vllm["resources"]["limits"] == {"nvidia.com/gpu": "4"}  # the run's TP in GPUs
    args = vllm["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4" and args[args.index("--max-num-seqs") + 1] == "64"
    assert args[args.index("--model") + 1] == "/models/llama-3.1-8b" and args[-1] == "--enforce-eager"
    assert {"name": "ROOFLAB_STEPLOG_PATH", "value": "/results/W3-0123456789abcdef/steplog.jsonl"} in vllm["env"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    # the Service selects the Deployment's pods; names are DNS labels; every object carries the run's label
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert all(len(m["metadata"]["name"]) <= 63 and m["metadata"]["name"] == m["metadata"]["name"].lower()
               for m in (deployment, service, job))
    assert len({m["metadata"]["labels"][RUN_LABEL] for m in (deployment, service, job)}) == 1
    ip = job["spec"]["template"]["spec"]["containers"][0]
    assert ip["command"] == ["inference-perf", "-c", "/results/W3-0123456789abcdef/config.yaml"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 3600


def test_the_schema_check_can_fail():
    deployment, _, job = run_manifests(campaign().endpoint, POINT, "r1")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = ["nvidia.com/gpu"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["completions"] = 1  # a Job field put in the pod spec
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_work_pool_base_job_template_renders_a_valid_job():
    from prefect_kubernetes.worker import KubernetesWorker

    from flows.work_pool import kubernetes_job_template, render_job_manifest

    template = kubernetes_job_template(image="registry.example/rooflab:0.1", store_mount="/store")
    job = render_job_manifest(template, {"gpu_count": 2, "node_selector": {"nvidia.com/gpu.product": "H100"}})
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "rooflab-store"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "store", "mountPath": "/store"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and pod["tolerations"]
    assert job["metadata"]["namespace"] == "rooflab" and pod["containers"][0]["image"].endswith("rooflab:0.1")
    validate(render_job_manifest(template))  # the defaults alone (a campaign flow's pod: no GPU)
    # the upstream default puts Job fields in the pod spec: the schema rejects it, which is why the template moves them
    upstream = KubernetesWorker.get_default_base_job_template()
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(render_job_manifest(upstream, {"image": "x"}))


@pytest.mark.parametrize("change,where", [({"namespace": "Bad_NS"}, "endpoint.namespace"),
                                          ({"client_image": None}, "endpoint.client_image"),
                                          ({"args": ["--tensor-parallel-size=2"]}, "endpoint.args"),
                                          ({"node_selector": {"bad key!": "x"}}, "endpoint.node_selector")])
def test_kubernetes_endpoint_errors_are_one_line(change, where):
    doc = {**CAMPAIGN, "endpoint": {k: v for k, v in {**ENDPOINT, **change}.items() if v is not None}}
    with pytest.raises(InputError) as e:
        parse_campaign(doc, source="k8s.yaml")
    assert str(e.value).startswith(f"k8s.yaml: {where}") and "\n" not in str(e.value)


def test_the_local_launchers_refuse_a_kubernetes_endpoint(tmp_path):
    from rooflab.collect.launchers.factory import make_launcher

    with pytest.raises(InputError, match="--launcher kubernetes"):
        make_launcher(campaign(), "inference-perf", tmp_path)


# ------------------------------------------------------------------------------------------ the API, faked
def model(doc: dict, kind: str):
    """An API answer as the client returns it: JSON deserialized by the client's own model classes."""
    return ApiClient().deserialize(json.dumps(doc), kind, "application/json")


def deployment_status(body: dict, ready: int) -> dict:
    """What GET .../deployments/<name>/status answers: the object as created, with the server's status."""
    return {**body, "status": {"replicas": 1, "updatedReplicas": 1, "readyReplicas": ready or None,
                       "availableReplicas": ready or None, "unavailableReplicas": None if ready else 1,
                       "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}}


def job_status(body: dict, state: str) -> dict:
    status = {"active": {"active": 1, "startTime": "2026-12-04T10:00:00Z"},
              "succeeded": {"succeeded": 1, "completionTime": "2026-12-04T10:01:00Z",
                            "conditions": [{"type": "Complete", "status": "True"}]},
              "failed": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                      "reason": "BackoffLimitExceeded",
                                                      "message": "Job has reached the specified backoff limit"}]}}
    return {**body, "status": status[state]}


def pod_list(name: str, waiting: str | None = None) -> dict:
    state = {"waiting": {"reason": waiting, "message": "Back-off pulling image"}} if waiting else \
        {"running": {"startedAt": "2026-12-04T10:00:00Z"}}
    return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        {"metadata": {"name": f"{name}-5d8f7c9b4-x2x7k"},
         "status": {"phase": "Pending" if waiting else "Running",
                    "containerStatuses": [{"name": "vllm", "image": "i", "imageID": "", "ready": not waiting,
                                           "restartCount": 0, "state": state}]}}]}


class FakeCluster:
    """The three APIs' methods the launcher calls. ``ready_after`` polls until the Deployment is ready (None:
    never); ``job``: how the Job ends; on success it writes what the pods would have written onto the results
    volume (the synthetic step log and inference-perf's summary)."""

    def __init__(self, results: Path, *, ready_after: int | None = 1, job: str = "succeeded",
                 waiting: str | None = None, fail_create_job: int | None = None,
                 fail_delete: dict[str, int] | None = None,
                 interrupt_job: bool = False):
        self.results, self.ready_after, self.job, self.waiting = results, ready_after, job, waiting
        self.fail_create_job, self.fail_delete, self.interrupt_job = fail_create_job, fail_delete or {}, interrupt_job
        self.objects: dict[tuple[str, str], dict] = {}
        self.log: list[str] = []
        self.polls = 0

    # creation
    def _create(self, kind: str, ns: str, body: dict) -> None:
        assert ns == "calib" and body["kind"] == kind
        self.objects[(kind, body["metadata"]["name"])] = body
        self.log.append(f"create {kind}")

    def create_namespaced_deployment(self, ns, body):
        self._create("Deployment", ns, body)

    def create_namespaced_service(self, ns, body):
        self._create("Service", ns, body)

    def create_namespaced_job(self, ns, body):
        if self.fail_create_job:
            raise ApiException(status=self.fail_create_job, reason="Internal Server Error")
        self._create("Job", ns, body)

    # reads
    def _get(self, kind: str, name: str) -> dict:
        if (kind, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[(kind, name)]

    def read_namespaced_deployment_status(self, name, ns):
        body = self._get("Deployment", name)
        self.polls += 1
        ready = self.ready_after is not None and self.polls > self.ready_after
        return model(deployment_status(body, 1 if ready else 0), "V1Deployment")

    def read_namespaced_service(self, name, ns):
        return model(self._get("Service", name), "V1Service")

    def read_namespaced_job_status(self, name, ns):
        body = self._get("Job", name)
        if self.interrupt_job:
            raise KeyboardInterrupt
        if self.job == "succeeded":
            rid = body["spec"]["template"]["spec"]["containers"][0]["command"][-1].split("/")[-2]
            out = self.results / rid
            (out / "inference-perf").mkdir(parents=True, exist_ok=True)
            (out / "inference-perf" / "summary_lifecycle_metrics.json").write_text(
                json.dumps({"successes": {"count": 2}, "failures": {"count": 0}}))
            (out / "steplog.jsonl").write_text("".join(json.dumps(x) + "\n" for x in synthetic()))
        return model(job_status(body, self.job), "V1Job")

    def list_namespaced_pod(self, ns, label_selector):
        name = next((n for (k, n) in self.objects if k == "Deployment"), "none")
        return model(pod_list(name, self.waiting), "V1PodList")

    def read_namespaced_pod_log(self, name, ns, tail_lines=None):
        return f"log of {name}\n"

    # deletion
    def _delete(self, kind: str, name: str, ns: str, propagation_policy: str) -> None:
        if kind in self.fail_delete:
            raise ApiException(status=self.fail_delete[kind], reason="Forbidden")
        self._get(kind, name)
        del self.objects[(kind, name)]
        self.log.append(f"delete {kind}")

    def delete_namespaced_deployment(self, name, ns, propagation_policy=None):
        self._delete("Deployment", name, ns, propagation_policy)

    def delete_namespaced_service(self, name, ns, propagation_policy=None):
        self._delete("Service", name, ns, propagation_policy)

    def delete_namespaced_job(self, name, ns, propagation_policy=None):
        self._delete("Job", name, ns, propagation_policy)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def launcher(tmp_path: Path, fake: FakeCluster, **endpoint) -> KubernetesLauncher:
    clock = Clock()
    spec = campaign(**{"ready_timeout_s": 60, "job_timeout_s": 120, "cleanup_timeout_s": 30, **endpoint}).endpoint
    return KubernetesLauncher(spec, fake, fake, fake, fake.results, poll_s=5, settle_s=2, clock=clock,
                              sleep=clock.sleep)


@pytest.fixture
def results(tmp_path):
    (tmp_path / "results").mkdir()
    return tmp_path / "results"


def collect_one(tmp_path, lau):
    store = Store(tmp_path / "store")
    rid = run_id("k8s", POINT, 0)
    return store, rid, run_one(store, lau, "k8s", rid, POINT, 0, max_retries=1)


def test_a_run_end_to_end_through_the_collector(tmp_path, results):
    fake = FakeCluster(results, ready_after=2)
    store, rid, m = collect_one(tmp_path, launcher(tmp_path, fake))
    assert m["status"] == "ok", m["reason"]
    assert fake.log == ["create Deployment", "create Service", "create Job",
                        "delete Job", "delete Service", "delete Deployment"]
    assert not fake.objects and m["k8s"]["cleanup"] == "all deleted"
    assert m["counts"] == {"steps": 8, "requests": 2} and m["engine"]["kind"] == "vllm"
    assert len(store.requests(campaign="k8s")) == 2 and len(store.steps(campaign="k8s")) == 8
    run = store.run_dir(rid).path
    assert (run / "traces" / "steplog.jsonl").is_file() and (run / "config.yaml").is_file()
    assert {p.name for p in (run / "k8s").iterdir()} == {"deployment.json", "service.json", "job.json"}
    assert (run / "logs" / "inference-perf.log").read_text().startswith("log of")
    cfg = (results / rid / "config.yaml").read_text()  # the config the Job read, with the pod's paths
    assert "rooflab-vllm-" in cfg and f"/results/{rid}/inference-perf" in cfg


def test_a_server_that_never_gets_ready_times_out_and_is_deleted(tmp_path, results):
    fake = FakeCluster(results, ready_after=None)
    _, _, m = collect_one(tmp_path, launcher(tmp_path, fake))
    assert m["status"] == "failed" and m["transient"] and "not ready after 60 s" in m["reason"]
    assert "create Job" not in fake.log and fake.log[-2:] == ["delete Service", "delete Deployment"]
    assert not fake.objects


def test_a_pod_that_cannot_pull_its_image_fails_at_once(tmp_path, results):
    fake = FakeCluster(results, ready_after=None, waiting="ImagePullBackOff")
    lau = launcher(tmp_path, fake)
    _, _, m = collect_one(tmp_path, lau)
    assert m["status"] == "failed" and not m["transient"] and "ImagePullBackOff" in m["reason"]
    assert fake.polls == 1 and not fake.objects


def test_a_failed_job_fails_the_run_and_everything_is_deleted(tmp_path, results):
    fake = FakeCluster(results, job="failed")
    _, _, m = collect_one(tmp_path, launcher(tmp_path, fake))
    assert m["status"] == "failed" and "BackoffLimitExceeded" in m["reason"] and not fake.objects


def test_api_errors_on_create_and_delete(tmp_path, results):
    fake = FakeCluster(results, fail_create_job=503)
    _, _, m = collect_one(tmp_path, launcher(tmp_path, fake))
    assert m["status"] == "failed" and m["transient"] and "503" in m["reason"] and not fake.objects
    fake = FakeCluster(results, fail_delete={"Service": 403})
    _, _, m = collect_one(tmp_path / "2", launcher(tmp_path, fake))
    assert m["status"] == "ok"  # the run's data is good; what could not be deleted is recorded
    assert m["k8s"]["cleanup"] == [f"Service/{RunObjects(m['run_id'], 'calib').server}: delete failed: 403 Forbidden"]
    assert set(fake.objects) == {("Service", RunObjects(m["run_id"], "calib").server)}


def test_an_interrupt_still_deletes_what_was_created(tmp_path, results):
    fake = FakeCluster(results, interrupt_job=True)
    with pytest.raises(KeyboardInterrupt):
        collect_one(tmp_path, launcher(tmp_path, fake))
    assert fake.log[:3] == ["create Deployment", "create Service", "create Job"] and not fake.objects
