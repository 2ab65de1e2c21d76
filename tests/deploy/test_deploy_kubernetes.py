"""The Kubernetes manifests (deploy/kubernetes), checked by the tools a cluster's operator would trust: kubectl's
kustomize composes them, kubernetes-validate holds every object to the API schemas of named Kubernetes versions,
checkov scans them for security findings. No cluster runs here: these tests are all the proof there is."""

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import kubernetes_validate
import processes
import pytest
import yaml
from torch.distributed.run import get_args_parser

from service.settings import ServiceSettings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = BASE / "prometheus-adapter" / "values.yaml"
# The oldest release still under its vendors' support when the manifests were written, and a recent one.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def listed_manifests() -> dict[str, list[dict]]:
    """file name -> its objects, for every file the kustomization lists."""
    return {name: load_all((BASE / name).read_text()) for name in kustomization()["resources"]}


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, as `kubectl apply -k` would send them."""
    kubectl = shutil.which("kubectl") or pytest.fail("kubectl not found: apt-get install -y kubernetes-client")
    result = processes.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in load_all(result.stdout)}


def test_the_kustomization_lists_every_manifest_and_kubectl_composes_them(rendered):
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    # A manifest left out of the list would never be applied, and one listed but missing fails `apply -k`.
    assert sorted(listed) == on_disk
    assert set(rendered) == {
        ("Namespace", "gpt-service"),
        ("PersistentVolumeClaim", "gpt-checkpoints"),
        ("Deployment", "gpt-api"),
        ("Service", "gpt-api"),
        ("PodDisruptionBudget", "gpt-api"),
        ("HorizontalPodAutoscaler", "gpt-api"),
        ("Service", "gpt-trainer"),
        ("Job", "gpt-trainer"),
        ("NetworkPolicy", "gpt-api"),
        ("NetworkPolicy", "gpt-trainer"),
    }
    assert sum(len(docs) for docs in listed_manifests().values()) == len(rendered)
    assert all(doc["metadata"].get("namespace") == "gpt-service" for (kind, _), doc in rendered.items()
               if kind != "Namespace")  # fmt: skip
    images = {c["image"] for key in [("Deployment", "gpt-api"), ("Job", "gpt-trainer")]
              for c in rendered[key]["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {"gpt-service:" + kustomization()["images"][0]["newTag"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(version, rendered):
    objects = [(name, doc) for name, docs in listed_manifests().items() for doc in docs]
    objects += [("kubectl kustomize", doc) for doc in rendered.values()]
    for source, doc in objects:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{source}: {doc['kind']} {doc['metadata']['name']} is invalid in {version}: {error}")


def test_the_schema_check_refuses_a_broken_manifest(rendered):
    """The validator is no rubber stamp: a misspelt field and a wrong type are each refused."""
    deployment = rendered["Deployment", "gpt-api"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/health"}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_checkov_finds_nothing_and_every_suppression_says_why(tmp_path):
    # checkov is a console script of the test extra, beside this interpreter.
    checkov = Path(sys.executable).parent / "checkov"
    result = processes.run(
        [str(checkov), "--directory", str(BASE), "--framework", "kubernetes", "--output", "json", "--skip-download"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    results = json.loads(result.stdout)["results"]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results["failed_checks"]]
    assert not failed, f"checkov findings to fix, or to suppress in the manifest with the reason: {failed}"
    assert result.returncode == 0, result.stderr
    # The kinds checkov has checks for, every one of them read: a file it could not parse is no pass.
    scanned = {c["resource"].rsplit(".", 1)[0] for c in results["passed_checks"] + results["skipped_checks"]}
    assert {"Deployment.gpt-service", "Job.gpt-service", "Service.gpt-service"} <= scanned
    suppressed = {c["check_id"]: c["check_result"].get("suppress_comment", "") for c in results["skipped_checks"]}
    assert all(len(reason) > 40 for reason in suppressed.values()), suppressed


def container(workload: dict) -> dict:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return only


def environment(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(workload)["env"]}


def test_the_api_probes_drains_runs_locked_down_and_is_served_scaled_and_protected(rendered):
    deployment = rendered["Deployment", "gpt-api"]
    pod = deployment["spec"]["template"]["spec"]
    api = container(deployment)
    probes = {kind: api[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    # Ready means serving a checkpoint (/health); alive means the process answers (/live), so a replica
    # waiting for the trainer's first checkpoint is kept out of the Service and not restarted.
    assert probes == {"startupProbe": "/live", "readinessProbe": "/health", "livenessProbe": "/live"}
    assert all(api[kind]["httpGet"]["port"] == "http" for kind in probes)
    assert api["ports"] == [{"name": "http", "containerPort": 8000}]
    env = environment(deployment)
    # Every variable is an option of the service (a misspelt one would be ignored, not refused).
    assert {name.removeprefix("SERVICE_").lower() for name in env} <= set(ServiceSettings.model_fields)
    sleep = api["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = float(env["SERVICE_DRAIN_TIMEOUT"]["value"])
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + drain
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert api["securityContext"]["readOnlyRootFilesystem"] and not api["securityContext"]["allowPrivilegeEscalation"]
    writable = {m["mountPath"]: m.get("readOnly", False) for m in api["volumeMounts"]}
    assert writable == {"/checkpoints": True, "/tmp": False}
    assert env["SERVICE_METRICS_DIR"]["value"].startswith("/tmp/")
    assert set(api["resources"]["requests"]) == set(api["resources"]["limits"]) == {"cpu", "memory"}

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service, budget = rendered["Service", "gpt-api"], rendered["PodDisruptionBudget", "gpt-api"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1

    claim = rendered["PersistentVolumeClaim", "gpt-checkpoints"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "gpt-checkpoints"


def test_the_autoscaler_reads_the_services_waiting_gauge_through_the_adapters_rule(rendered):
    autoscaler = rendered["HorizontalPodAutoscaler", "gpt-api"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt-api"}
    [metric] = autoscaler["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # The gauge the service exports under that name (service/metrics.py), which counts demand, not CPU.
    assert re.search(rf'Gauge\(\s*"{name}"', (ROOT / "service" / "metrics.py").read_text())
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert autoscaler["spec"]["minReplicas"] >= 2 > rendered["PodDisruptionBudget", "gpt-api"]["spec"]["maxUnavailable"]


def test_the_trainer_is_an_indexed_job_of_torchrun_nodes_meeting_at_pod_zero(rendered):
    job, rendezvous = rendered["Job", "gpt-trainer"], rendered["Service", "gpt-trainer"]
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert nodes == job["spec"]["parallelism"] >= 2
    trainer = container(job)
    # torchrun's own parser reads the command, as it would in the pod.
    launch = get_args_parser().parse_args(trainer["command"][1:])
    assert trainer["command"][0] == "torchrun" and launch.no_python
    assert launch.nnodes == str(nodes) and launch.rdzv_backend == "c10d" and launch.max_restarts > 0
    assert launch.training_script == "trainer" and launch.training_script_args[0] == "fit"
    # Pod 0's DNS name: <job>-0.<subdomain>, which the headless Service of that name publishes early.
    pod = job["spec"]["template"]["spec"]
    host, port = launch.rdzv_endpoint.split(":")
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and pod["subdomain"] == "gpt-trainer"
    assert rendezvous["spec"]["clusterIP"] == "None" and rendezvous["spec"]["publishNotReadyAddresses"]
    assert rendezvous["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert rendezvous["spec"]["ports"][0]["port"] == int(port)
    env = environment(job)
    assert env["TRAINER_RESUME"]["value"] == "true"
    trainer_options = {name.removeprefix("TRAINER_").lower() for name in env if name.startswith("TRAINER_")}
    assert trainer_options <= set(TrainerSettings.model_fields)
    assert "--out=/checkpoints" in launch.training_script_args
    mounts = {m["name"]: m for m in trainer["volumeMounts"]}
    assert mounts["checkpoints"]["mountPath"] == "/checkpoints" and not mounts["checkpoints"].get("readOnly")
    assert trainer["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
