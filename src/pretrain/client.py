"""Drive PretrainJobs on a cluster from Python: submit, read, watch, wait, logs, suspend, delete.

What Kubeflow Trainer's `TrainerClient` is to TrainJobs, over the `kubernetes` client and the
`pretrain.api` models (`pip install pretrain[operator]`). A job is validated here as
`pretrain validate` does before it is sent, so a bad field fails in one line naming it; what the
API server refuses (CEL rules, quotas, RBAC) comes back as its own message, also in one line.
Connection follows kubectl: `KUBECONFIG` or ~/.kube/config, its current context (or `context`)
and that context's namespace (or `namespace`, else "default"); inside a pod, the service account.

    from pretrain.client import PretrainClient
    c = PretrainClient()
    name = c.submit("job.yaml", overrides=["training.maxSteps=100"])
    for status in c.watch(name): print(status.get("phase"), (status.get("progress") or {}).get("step"))
    for line in c.logs(name, follow=True): print(line)
    c.wait(name)   # the final status; ClientError if it failed or the timeout passed
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pretrain.api.spec import GROUP, PLURAL, VERSION, Phase, PretrainJob
from pretrain.contract import pod_name
from pretrain.errors import UserError

#: The phases a job ends in.
FINAL_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)


class ClientError(UserError):
    """A request that cannot be done, in one line: a missing job, the API server's refusal, a
    failed job waited for, a timeout."""


def _api_message(e: Exception) -> str:
    """The API server's own message (its Status), or the error's first line."""
    body = getattr(e, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message") or body).splitlines()[0][:500]
        except (ValueError, AttributeError):
            pass
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


class PretrainClient:
    """PretrainJobs of one namespace (each call may name another)."""

    def __init__(self, namespace: str | None = None, *, context: str | None = None, kubeconfig: str | None = None,
                 api_client: Any = None) -> None:  # fmt: skip
        import kubernetes

        self.k: Any = kubernetes
        if api_client is None:
            api_client, current = _connect(context, kubeconfig)
            namespace = namespace or current
        self.namespace = namespace or "default"
        self.custom: Any = self.k.client.CustomObjectsApi(api_client)
        self.core: Any = self.k.client.CoreV1Api(api_client)

    # ---- jobs

    def submit(self, job: PretrainJob | dict[str, Any] | str | Path, overrides: Iterable[str] = (),
               namespace: str | None = None) -> str:  # fmt: skip
        """Validate and create a job (a YAML file, a manifest as a dict, or a model); its name.
        The manifest is sent as written (with the overrides), not with every default filled in,
        as kubectl apply sends it."""
        import copy

        from pretrain.api.validation import apply_overrides, load_document, parse_job

        if isinstance(job, str | Path):
            body = load_document(job, overrides)
        elif isinstance(job, dict):
            body = apply_overrides(copy.deepcopy(job), overrides)
        else:
            body = apply_overrides(job.model_dump(by_alias=True, exclude_none=True, mode="json"), overrides)
        model = parse_job(body)
        ns = namespace or model.metadata.namespace or self.namespace
        body["metadata"] = {**body["metadata"], "namespace": ns}
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        except self.k.client.ApiException as e:
            raise ClientError(f"pretrainjob {ns}/{model.metadata.name} not created: {_api_message(e)}") from None
        return str(model.metadata.name)

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The job as the API holds it (spec and status)."""
        ns = namespace or self.namespace
        try:
            obj: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            return dict(obj)
        except self.k.client.ApiException as e:
            if e.status == 404:
                raise ClientError(f'pretrainjob "{name}" not found in namespace {ns}') from None
            raise ClientError(f"pretrainjob {ns}/{name}: {_api_message(e)}") from None

    def status(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        return dict(self.get(name, namespace).get("status") or {})

    def list(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The namespace's jobs, by name."""
        ns = namespace or self.namespace
        try:
            items = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        except self.k.client.ApiException as e:
            raise ClientError(f"pretrainjobs in {ns}: {_api_message(e)}") from None
        return sorted(items, key=lambda o: o["metadata"]["name"])

    def checkpoint_uri(self, name: str, namespace: str | None = None) -> str:
        """Where the job's checkpoints and history (metrics.jsonl) are: spec.checkpoint.uri."""
        uri = ((self.get(name, namespace).get("spec") or {}).get("checkpoint") or {}).get("uri")
        if not uri:
            raise ClientError(f"pretrainjob {name} has no checkpoint.uri: its history stayed in its pods")
        return str(uri)

    def report(self, name: str, output: str | Path, namespace: str | None = None) -> Path:
        """`pretrain report` of the job's history (read with this machine's storage credentials):
        the report.html written."""
        from pretrain.report import write_report

        return write_report([self.checkpoint_uri(name, namespace)], Path(output))

    def set_suspend(self, name: str, suspend: bool, namespace: str | None = None) -> None:
        """Suspend (the pods go, the job is held) or resume a job: spec.runPolicy.suspend."""
        ns = namespace or self.namespace
        self.get(name, ns)  # a missing job in its own words
        patch = {"spec": {"runPolicy": {"suspend": suspend}}}
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch)
        except self.k.client.ApiException as e:
            raise ClientError(f"pretrainjob {ns}/{name}: {_api_message(e)}") from None

    def delete(self, name: str, namespace: str | None = None) -> None:
        """Delete a job; its pods, Service and ConfigMap go with it (owner references)."""
        ns = namespace or self.namespace
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except self.k.client.ApiException as e:
            if e.status == 404:
                raise ClientError(f'pretrainjob "{name}" not found in namespace {ns}') from None
            raise ClientError(f"pretrainjob {ns}/{name}: {_api_message(e)}") from None

    # ---- following a job

    def watch(self, name: str, namespace: str | None = None, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The job's status, now and at every change, until it ends (its last status is the
        last yielded) or `timeout` seconds pass. A watch, not polling: a broken stream is
        resumed from the last version seen."""
        ns = namespace or self.namespace
        obj = self.get(name, ns)
        last = dict(obj.get("status") or {})
        yield last
        deadline = None if timeout is None else time.monotonic() + timeout
        version = obj["metadata"]["resourceVersion"]
        while last.get("phase") not in FINAL_PHASES:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            for event_status, seen in self._events(name, ns, version, left):
                version = seen
                if event_status is None:
                    raise ClientError(f'pretrainjob "{name}" was deleted')
                if event_status != last:
                    last = event_status
                    yield last
                if last.get("phase") in FINAL_PHASES:
                    return

    def _events(
        self, name: str, ns: str, version: str, left: float | None
    ) -> Iterator[tuple[dict[str, Any] | None, str]]:
        """(status, resourceVersion) of each change of one job for up to `left` seconds (60 at
        most per request); None for a deletion."""
        seconds = max(1, min(60, int(left) if left is not None else 60))
        w: Any = self.k.watch.Watch()
        try:
            for ev in w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                               field_selector=f"metadata.name={name}", resource_version=version,
                               timeout_seconds=seconds):  # fmt: skip
                obj = ev["object"]
                version = obj["metadata"]["resourceVersion"]
                yield (None if ev["type"] == "DELETED" else dict(obj.get("status") or {})), version
        except self.k.client.ApiException as e:
            if e.status != 410:  # 410 Gone: the version left the history; read afresh below
                raise ClientError(f"watching pretrainjob {ns}/{name}: {_api_message(e)}") from None
            obj = self.get(name, ns)
            yield dict(obj.get("status") or {}), obj["metadata"]["resourceVersion"]
        finally:
            w.stop()

    def wait(self, name: str, namespace: str | None = None, timeout: float | None = None,
             until: tuple[str, ...] = FINAL_PHASES) -> dict[str, Any]:  # fmt: skip
        """Wait until the job reaches a phase of `until` (by default its end); its status then.
        A failed job is a ClientError (unless Failed alone is waited for), as is a job that ended
        in another phase than those, or the timeout."""
        status: dict[str, Any] = {}
        for status in self.watch(name, namespace, timeout):
            phase = status.get("phase")
            if phase == Phase.FAILED.value and until != (Phase.FAILED.value,):
                raise ClientError(f"pretrainjob {name} failed: {status.get('reason', '')}: {status.get('message', '')}")
            if phase in until:
                return status
        phase = status.get("phase") or "no phase yet"
        after = "" if phase in FINAL_PHASES else f" after {timeout}s"
        raise ClientError(f"pretrainjob {name} is {phase}{after}, not {' or '.join(until)}")

    def logs(self, name: str, rank: int = 0, *, follow: bool = False, namespace: str | None = None,
             tail: int | None = None) -> Iterator[str]:  # fmt: skip
        """The log lines of node `rank`'s pod in the job's current attempt; with `follow`, until
        its container ends."""
        ns = namespace or self.namespace
        status = self.status(name, ns)
        attempt = int(status.get("attempt") or 0)
        if attempt < 1:
            raise ClientError(f"pretrainjob {name} has no pods yet (phase {status.get('phase') or 'none'})")
        pod = pod_name(name, attempt, rank)
        try:
            stream: Any = self.core.read_namespaced_pod_log(pod, ns, follow=follow, tail_lines=tail,
                                                            _preload_content=False)  # fmt: skip
        except self.k.client.ApiException as e:
            raise ClientError(f"pod {pod} of pretrainjob {name}: {_api_message(e)}") from None
        try:
            buffer = b""
            for chunk in stream.stream(amt=None, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                yield from (line.decode(errors="replace") for line in lines)
            if buffer:
                yield buffer.decode(errors="replace")
        finally:
            stream.release_conn()


def _connect(context: str | None, kubeconfig: str | None) -> tuple[Any, str | None]:
    """An API client as kubectl would make it, and the namespace of its context (None: in a pod
    its own namespace, else unset)."""
    import kubernetes as untyped

    kubernetes: Any = untyped
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")  # read now: the client reads it at import
    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            raise ClientError("no kubeconfig (KUBECONFIG or ~/.kube/config) and not inside a cluster") from None
        own = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return kubernetes.client.ApiClient(), own.read_text().strip() if own.is_file() else None
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    if chosen is None:
        raise ClientError(f"context {context!r} is not in the kubeconfig")
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=chosen["name"])
    return client, (chosen.get("context") or {}).get("namespace")
