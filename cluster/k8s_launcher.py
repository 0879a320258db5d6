"""The Kubernetes launcher (``--launcher kubernetes`` with ``endpoint.kind: kubernetes``): one run = a vLLM
Deployment + Service and an inference-perf Job (:mod:`cluster.k8s_manifests`), applied through the Kubernetes
Python client, in this order:

1. write the run's inference-perf config onto the results volume (``<results_mount>/<run_id>/config.yaml``);
2. create the Deployment and the Service; wait until the Deployment has a ready replica (vLLM answers
   ``/health``) — at most ``ready_timeout_s``, and fail at once when its pod cannot start (image pull errors,
   crash loops, bad configuration);
3. create the Job; wait until it succeeds or fails — at most ``job_timeout_s`` (the Job also carries it as
   ``activeDeadlineSeconds``);
4. wait for vLLM's step log to stop growing, copy inference-perf's reports and the step log into the run's folder
   and read them with the same code as the local inference-perf launcher
   (:func:`rooflab.collect.launchers.inference_perf.run_result`);
5. **always** delete the Job, the Service and the Deployment (a ``finally``: on success, failure, timeout, an API
   error or an interrupt), then wait — at most ``cleanup_timeout_s`` — until they are gone, so the run's GPUs are
   free when the run's GPU slots are; what could not be deleted is recorded in the manifest
   (``k8s.cleanup``) and logged.

Failures are one line in the manifest: timeouts and API errors 5xx/409/429 are transient (the collector may retry),
the rest are not. The pods' logs are saved under ``logs/`` (best effort).

Not run on a real cluster: the control flow is tested against the client's API with recorded-shape responses
(``tests/test_k8s_launcher.py``) and the manifests are validated against Kubernetes' schema offline.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from cluster.k8s_manifests import RUN_LABEL, RunObjects, client_config, run_manifests
from rooflab.collect.endpoint_spec import KubernetesSpec
from rooflab.collect.launchers import RunResult, one_line
from rooflab.collect.launchers.inference_perf import client_summary, run_result
from rooflab.collect.spec import Campaign
from rooflab.data.store import RunDir
from rooflab.data.sweep import SweepPoint
from rooflab.errors import InputError

log = logging.getLogger("rooflab.k8s")
# a pod that will not start by itself: fail the run at once instead of waiting for the timeout
FATAL_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "CrashLoopBackOff")
TRANSIENT_STATUS = (409, 429, 500, 502, 503, 504)


class RunFailed(Exception):
    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.reason, self.transient = reason, transient


@dataclass
class KubernetesLauncher:
    """See the module doc. ``apps`` / ``core`` / ``batch``: ``AppsV1Api``, ``CoreV1Api``, ``BatchV1Api`` (or
    anything with their methods); ``results_root``: where this process sees the results claim."""

    spec: KubernetesSpec
    apps: Any
    core: Any
    batch: Any
    results_root: Path
    poll_s: float = 5.0
    settle_s: float = 5.0  # the step log unchanged this long: vLLM has written all of it
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    name: str = "kubernetes"
    calls: list[str] = field(default_factory=list)  # what was created and deleted, in order (kind/name)

    @property
    def ns(self) -> str:
        return self.spec.namespace

    def close(self) -> None:
        pass  # nothing outlives a run

    # ------------------------------------------------------------------ one run
    def run(self, point: SweepPoint, rd: RunDir) -> RunResult:
        objs = RunObjects(rd.run_id, self.ns)
        created: list[tuple[str, str]] = []
        engine = {"kind": "kubernetes", "namespace": self.ns, "vllm_image": self.spec.vllm_image,
                  "base_url": objs.base_url}
        result: RunResult | None = None
        try:
            result = self._run(point, rd, objs, created, engine)
        except RunFailed as exc:
            result = RunResult("failed", exc.reason, engine=engine, transient=exc.transient)
        except ApiException as exc:
            result = RunResult("failed", f"Kubernetes API error {exc.status} {exc.reason}: "
                               f"{one_line(exc)[:200]}", engine=engine, transient=exc.status in TRANSIENT_STATUS)
        finally:
            self._save_logs(objs, rd)
            leftovers = self._delete(created, objs)
        assert result is not None  # an exception other than the ones above has propagated
        result.extra["k8s"] = {"objects": [f"{k}/{n}" for k, n in created], "cleanup": leftovers or "all deleted"}
        return result

    def _run(self, point: SweepPoint, rd: RunDir, objs: RunObjects, created: list[tuple[str, str]],
             engine: dict[str, Any]) -> RunResult:
        from rooflab.collect.workloads import write_config

        pod_dir = self.results_root / rd.run_id
        if pod_dir.exists():  # a previous attempt's files: this attempt's must not be mixed with them
            shutil.rmtree(pod_dir)
        pod_dir.mkdir(parents=True)
        cfg = client_config(self.spec, point, objs)
        write_config(cfg, pod_dir / "config.yaml")
        write_config(cfg, rd.path / "config.yaml")
        deployment, service, job = run_manifests(self.spec, point, rd.run_id)
        (rd.path / "k8s").mkdir(exist_ok=True)
        for m in (deployment, service, job):
            (rd.path / "k8s" / f"{m['kind'].lower()}.json").write_text(json.dumps(m, indent=1))
        self.apps.create_namespaced_deployment(self.ns, deployment)
        created.append(("Deployment", objs.server))
        self.calls.append(f"create Deployment/{objs.server}")
        self.core.create_namespaced_service(self.ns, service)
        created.append(("Service", objs.server))
        self.calls.append(f"create Service/{objs.server}")
        self._wait_ready(objs)
        self.batch.create_namespaced_job(self.ns, job)
        created.append(("Job", objs.job))
        self.calls.append(f"create Job/{objs.job}")
        self._wait_job(objs)
        steplog = pod_dir / "steplog.jsonl"
        self._settle(steplog)
        out_dir = rd.path / "inference-perf"
        if (pod_dir / "inference-perf").is_dir():
            shutil.copytree(pod_dir / "inference-perf", out_dir, dirs_exist_ok=True)
        ip = client_summary(out_dir, point.n_requests)
        if ip is None:
            raise RunFailed("the inference-perf Job wrote no summary_lifecycle_metrics.json")
        trace = rd.path / "traces" / "steplog.jsonl"
        trace.parent.mkdir(parents=True, exist_ok=True)
        if steplog.is_file():
            shutil.copyfile(steplog, trace)
        return run_result(point, rd, out_dir, trace, ip=ip, engine=engine, steplog=True)

    # ------------------------------------------------------------------ waits
    def _pods(self, objs: RunObjects, selector: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.ns, label_selector=selector).items or [])

    def _fatal(self, objs: RunObjects) -> str | None:
        for pod in self._pods(objs, f"{RUN_LABEL}={objs.labels[RUN_LABEL]}"):
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                if waiting is not None and waiting.reason in FATAL_WAITING:
                    return f"pod {pod.metadata.name}: {waiting.reason}: {(waiting.message or '')[:200]}"
        return None

    def _wait_ready(self, objs: RunObjects) -> None:
        deadline = self.clock() + self.spec.ready_timeout_s
        while True:
            dep = self.apps.read_namespaced_deployment_status(objs.server, self.ns)
            if dep.status is not None and (dep.status.ready_replicas or 0) >= 1:
                return
            fatal = self._fatal(objs)
            if fatal:
                raise RunFailed(f"vLLM cannot start: {fatal}")
            if self.clock() >= deadline:
                raise RunFailed(f"vLLM Deployment {objs.server} not ready after {self.spec.ready_timeout_s:g} s",
                                transient=True)
            self.sleep(self.poll_s)

    def _wait_job(self, objs: RunObjects) -> None:
        deadline = self.clock() + self.spec.job_timeout_s
        while True:
            job = self.batch.read_namespaced_job_status(objs.job, self.ns)
            st = job.status
            if st is not None and (st.succeeded or 0) >= 1:
                return
            if st is not None and (st.failed or 0) >= 1:
                why = "; ".join(f"{c.reason}: {c.message}" for c in (st.conditions or []) if c.type == "Failed")
                raise RunFailed(f"the inference-perf Job failed ({why or 'see logs/inference-perf.log'})")
            if self.clock() >= deadline:
                raise RunFailed(f"the inference-perf Job {objs.job} not done after {self.spec.job_timeout_s:g} s",
                                transient=True)
            self.sleep(self.poll_s)

    def _settle(self, path: Path) -> None:
        """Wait until ``path`` has not grown for ``settle_s`` (at most ten times that)."""
        last, since, deadline = -1, self.clock(), self.clock() + 10 * self.settle_s
        while self.clock() < deadline:
            size = path.stat().st_size if path.is_file() else -1
            if size != last:
                last, since = size, self.clock()
            elif self.clock() - since >= self.settle_s:
                return
            self.sleep(min(1.0, self.settle_s))

    # ------------------------------------------------------------------ clean-up
    def _save_logs(self, objs: RunObjects, rd: RunDir) -> None:
        for selector, name in ((f"job-name={objs.job}", "inference-perf.log"),
                               (f"{RUN_LABEL}={objs.labels[RUN_LABEL]},app.kubernetes.io/managed-by=rooflab",
                                "vllm.log")):
            try:
                pods = [p for p in self._pods(objs, selector) if name != "vllm.log" or
                        p.metadata.name.startswith(objs.server)]
                if pods:
                    text = self.core.read_namespaced_pod_log(pods[0].metadata.name, self.ns, tail_lines=2000)
                    (rd.path / "logs").mkdir(exist_ok=True)
                    (rd.path / "logs" / name).write_text(str(text))
            except Exception as exc:  # logs are best effort; the run's outcome does not depend on them
                log.debug("no %s for %s: %s", name, rd.run_id, one_line(exc))

    def _delete(self, created: list[tuple[str, str]], objs: RunObjects) -> list[str]:
        """Delete what was created (Job first), then wait until it is gone; returns what is left, one line each."""
        calls = {"Job": (self.batch.delete_namespaced_job, self.batch.read_namespaced_job_status),
                 "Service": (self.core.delete_namespaced_service, self.core.read_namespaced_service),
                 "Deployment": (self.apps.delete_namespaced_deployment, self.apps.read_namespaced_deployment_status)}
        left: list[str] = []
        pending = []
        for kind, name in reversed(created):
            delete, _ = calls[kind]
            try:
                delete(name, self.ns, propagation_policy="Foreground")
                self.calls.append(f"delete {kind}/{name}")
                pending.append((kind, name))
            except ApiException as exc:
                if exc.status == 404:
                    self.calls.append(f"delete {kind}/{name} (already gone)")
                    continue
                left.append(f"{kind}/{name}: delete failed: {exc.status} {exc.reason}")
            except Exception as exc:  # keep deleting the others whatever happens
                left.append(f"{kind}/{name}: delete failed: {one_line(exc)}")
        deadline = self.clock() + self.spec.cleanup_timeout_s
        while pending:
            still = []
            for kind, name in pending:
                try:
                    calls[kind][1](name, self.ns)
                    still.append((kind, name))
                except ApiException as exc:
                    if exc.status != 404:
                        still.append((kind, name))
            pending = still
            if not pending:
                break
            if self.clock() >= deadline:
                left += [f"{k}/{n}: still there after {self.spec.cleanup_timeout_s:g} s" for k, n in pending]
                break
            self.sleep(self.poll_s)
        for line in left:
            log.warning("run %s: %s (delete by hand: kubectl -n %s delete deploy,svc,job -l %s=%s)", objs.run_id,
                        line, self.ns, RUN_LABEL, objs.labels[RUN_LABEL])
        return left


def kubernetes_launcher(campaign: Campaign) -> KubernetesLauncher:
    """The launcher for ``campaign`` against the cluster this process is configured for: in a pod, its service
    account (``load_incluster_config``); elsewhere, the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    ep = campaign.endpoint
    if not isinstance(ep, KubernetesSpec):
        raise InputError(campaign.source, "endpoint.kind", f"--launcher kubernetes needs an endpoint of kind "
                         f"kubernetes, not {ep.kind}")
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, OSError) as exc:
            raise InputError(None, "kubeconfig", f"no Kubernetes cluster configured (not in a pod, and no usable "
                             f"kubeconfig): {one_line(exc)}") from None
    results = Path(ep.results_mount)
    if not results.is_dir():
        raise InputError(str(results), "endpoint.results_mount", "not a folder here: mount the results claim "
                         f"{ep.results_claim} at this path in the pod or machine that runs the launcher")
    return KubernetesLauncher(ep, client.AppsV1Api(), client.CoreV1Api(), client.BatchV1Api(), results)
