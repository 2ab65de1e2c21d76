"""The container and compose files, checked by the real tools that will read them."""

import json
import re
from pathlib import Path

import processes
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_config(*files: str) -> dict:
    args = [arg for f in files for arg in ("-f", f)]
    result = processes.run(["docker-compose", *args, "config"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (docker-compose 1.x prints them as source:target:mode)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}


def test_compose_file_validates_with_the_five_services_volumes_and_grace_periods():
    config = compose_config("docker-compose.yml")
    services = config["services"]
    nodes = {"trainer-node0", "trainer-node1"}  # the multinode profile's, started only when asked for
    assert set(services) == {"api", "lb", "trainer", "prometheus", "grafana"} | nodes
    # A node that dies comes back and rejoins (torchrun restarts both nodes' workers); one that keeps failing
    # stops. The image gives each rendezvous round its own store, without which those restarts hang.
    assert all(services[node]["profiles"] == ["multinode"] and services[node]["restart"] == "on-failure:3"
               and "--max-restarts 3" in " ".join(services[node]["command"]) for node in nodes)  # fmt: skip
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in (ROOT / "deploy" / "Dockerfile").read_text()
    assert set(config["volumes"]) == {"checkpoints", "multinode-checkpoints", "prometheus-data", "grafana-data"}
    api, trainer = services["api"], services["trainer"]
    # A finished training run stays stopped instead of being restarted into an immediate exit, forever.
    assert trainer["restart"] == "on-failure"
    assert all(s["restart"] == "unless-stopped" for name, s in services.items() if name not in {"trainer"} | nodes)
    assert api["command"][:2] == ["service", "serve"] and "8000" in api["command"]
    assert "exec trainer fit" in " ".join(trainer["command"]) and trainer["environment"]["TRAINER_STEPS"] == "5000"
    published = {name: [p["published"] for p in s.get("ports", [])] for name, s in services.items() if name not in nodes}
    # The API's port belongs to the load balancer: replicas publishing their own would collide.
    assert published == {"api": [], "lb": [8000], "trainer": [], "prometheus": [9090], "grafana": [3000]}
    assert mounts(api)["/checkpoints"] == mounts(trainer)["/checkpoints"] == "checkpoints"
    assert api["volumes"][0].endswith(":ro")
    assert "/health" in " ".join(api["healthcheck"]["test"])
    # Seconds: the trainer must finish a step and write last.pt; the API drains its requests.
    assert api["stop_grace_period"] == "45s" and trainer["stop_grace_period"] == "120s"
    # HAProxy's soft stop lets the streams it carries finish; SIGTERM would cut them.
    lb = services["lb"]
    assert lb["stop_signal"] == "SIGUSR1" and lb["stop_grace_period"] == "45s" and set(lb["depends_on"]) == {"api"}
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and "GF_SECURITY_ADMIN_PASSWORD" in grafana


def test_gpu_override_reserves_a_gpu_and_trains_gpt2():
    config = compose_config("docker-compose.yml", "deploy/docker-compose.gpu.yml")
    trainer = config["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert trainer["environment"]["TRAINER_PRESET"] == "gpt2"
    assert trainer["environment"]["TRAINER_DEVICE"] == "cuda"
    assert trainer["build"]["args"]["TORCH_INDEX"].endswith("/cu128")


def test_prometheus_configs_pass_promtool(up_module, tmp_path):
    compose = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    settings = up_module.UpSettings(run_dir=tmp_path, port=18000, trainer_metrics_port=19100)
    local = up_module.prometheus_config(settings)
    for path in (compose, local):
        result = processes.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(compose.read_text())["scrape_configs"]}
    # The compose stack finds every api replica in Docker's DNS; make up has one API and no load balancer.
    assert jobs["api"]["dns_sd_configs"] == [{"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "5s"}]
    assert jobs["lb"]["static_configs"] == [{"targets": ["lb:8405"]}]
    local_jobs = {job["job_name"]: job["static_configs"] for job in yaml.safe_load(local.read_text())["scrape_configs"]}
    assert local_jobs == {"api": [{"targets": ["127.0.0.1:18000"]}], "trainer": [{"targets": ["127.0.0.1:19100"]}]}


def test_image_runs_as_non_root_with_a_healthcheck_and_an_offline_tokenizer():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*?/health", dockerfile, flags=re.M)
    assert "tiktoken.get_encoding('r50k_base')" in dockerfile and "TIKTOKEN_CACHE_DIR" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"checkpoints", ".venv", ".git", "*.pt"} <= set(ignored)


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource():
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "gpt-service.yml").read_text())["providers"][0]
    grafana = mounts(compose_config("docker-compose.yml")["services"]["grafana"])
    assert grafana[provider["options"]["path"]] == str(ROOT / "deploy" / "grafana" / "dashboards")
    assert grafana["/etc/grafana/provisioning"] == str(provisioning)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "gpt-service.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
