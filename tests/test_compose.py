"""Static checks of docker-compose.yml, the Dockerfile and the configs the stack mounts.

There is no Docker engine in CI, so nothing is started: the files must agree with each other
(mount sources exist, service names and ports match the Prometheus scrape config and the Grafana
datasources, the promvae config points at the compose Prometheus and passes check-config).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def container_ports(service: str) -> set[int]:
    """Ports the service listens on inside the compose network (published or exposed)."""
    svc = SERVICES[service]
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    if svc.get("build"):
        ports |= {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", DOCKERFILE, re.MULTILINE)}
    return ports


def bind_mounts(service: str) -> dict[str, Path]:
    """container path -> host path of the service's relative bind mounts."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("./"):
            out[dst] = ROOT / src
    return out


def host_file(service: str, container_path: str) -> Path:
    """The repository file a container path of `service` comes from (through a bind mount)."""
    for dst, src in sorted(bind_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == dst:
            return src
        if container_path.startswith(dst.rstrip("/") + "/"):
            return src / container_path[len(dst.rstrip("/")) + 1:]
    raise AssertionError(f"{service}: {container_path} is not inside any bind mount")


def flag(service: str, name: str) -> str:
    for arg in SERVICES[service].get("command", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{service}: no --{name}= in command")


def assert_reachable(url_or_target: str, where: str) -> None:
    """host:port (or a URL) names a compose service and a port it listens on."""
    hostport = urlsplit(url_or_target).netloc if "://" in url_or_target else url_or_target
    host, port = hostport.rsplit(":", 1)
    assert host in SERVICES, f"{where}: {host!r} is not a compose service ({sorted(SERVICES)})"
    assert int(port) in container_ports(host), \
        f"{where}: {host} does not listen on {port} (ports {sorted(container_ports(host))})"


def test_the_stack_has_the_five_services():
    assert set(SERVICES) == {"prometheus", "node-exporter", "alertmanager", "grafana", "promvae"}
    assert SERVICES["promvae"]["build"] == "."


def test_every_mounted_file_exists():
    for name in SERVICES:
        for dst, src in bind_mounts(name).items():
            assert src.exists(), f"{name}: mount source {src} for {dst} does not exist"
            if Path(dst).suffix in (".yml", ".yaml", ".json"):
                assert src.is_file(), f"{name}: {src} should be a file"
    for named in (v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", [])):
        if not named.startswith(("/", "./")):
            assert named in COMPOSE.get("volumes", {}), f"undeclared volume {named}"


def test_prometheus_config_and_rules_are_mounted_where_the_command_reads_them():
    cfg_path = host_file("prometheus", flag("prometheus", "config.file"))
    assert cfg_path == ROOT / "dashboards" / "prometheus" / "prometheus.yml"
    cfg = yaml.safe_load(cfg_path.read_text())
    for rule_file in cfg["rule_files"]:
        assert (cfg_path.parent / rule_file).is_file(), rule_file


def test_scrape_and_alertmanager_targets_are_compose_services():
    cfg = yaml.safe_load((ROOT / "dashboards" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    for job in ("node", "promvae"):
        for sc in jobs[job]["static_configs"]:
            for target in sc["targets"]:
                assert_reachable(target, f"scrape job {job}")
    for am in cfg["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            for target in sc["targets"]:
                assert_reachable(target, "alertmanager target")
    assert {t for sc in jobs["promvae"]["static_configs"] for t in sc["targets"]} == \
        {"promvae:8080"}


def test_alertmanager_config_is_mounted_where_the_command_reads_it():
    path = host_file("alertmanager", flag("alertmanager", "config.file"))
    assert path == ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"


def test_grafana_datasources_point_at_compose_services():
    prov = host_file("grafana", "/etc/grafana/provisioning")
    assert prov == ROOT / "dashboards" / "grafana" / "provisioning"
    doc = yaml.safe_load((prov / "datasources" / "promvae.yml").read_text())
    urls = {d["uid"]: d["url"] for d in doc["datasources"]}
    assert set(urls) == {"prometheus", "promvae"}
    for uid, url in urls.items():
        assert_reachable(url, f"datasource {uid}")
    assert urlsplit(urls["promvae"]).hostname == "promvae"


def test_grafana_dashboard_provider_path_holds_the_dashboards():
    prov = host_file("grafana", "/etc/grafana/provisioning")
    doc = yaml.safe_load((prov / "dashboards" / "promvae.yml").read_text())
    for provider in doc["providers"]:
        folder = host_file("grafana", provider["options"]["path"])
        assert sorted(p.name for p in folder.glob("*.json")) == \
            ["anomaly-overview.json", "promvae-health.json", "series-drilldown.json"]
    env = SERVICES["grafana"]["environment"]
    assert host_file("grafana", env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()


def test_promvae_config_points_at_the_compose_prometheus_and_is_valid():
    path = host_file("promvae", flag("promvae", "config.file"))
    assert path == ROOT / "dashboards" / "promvae" / "promvae.yml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["prometheus"]["url"] == "http://prometheus:9090"
    assert_reachable(cfg["prometheus"]["url"], "promvae prometheus.url")
    listen = flag("promvae", "web.listen-address")
    assert int(listen.rsplit(":", 1)[1]) in container_ports("promvae")
    cli = Path(sys.executable).with_name("promvae")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "grafana_plugin_backend.cli"]
    result = subprocess.run([*cmd, "check-config", str(path)], check=False, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_rejects_a_broken_stack_config(tmp_path):
    # The check above can fail: a config with a bad key is refused.
    bad = tmp_path / "promvae.yml"
    bad.write_text("prometheus: {url: http://prometheus:9090}\nstep: -5s\nqueries: []\n")
    result = subprocess.run([sys.executable, "-m", "grafana_plugin_backend.cli", "check-config",
                             str(bad)], check=False, capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode != 0


def test_dockerfile():
    assert re.search(r"^FROM python:3\.11-slim\s*$", DOCKERFILE, re.MULTILINE)
    torch = DOCKERFILE.index("--index-url https://download.pytorch.org/whl/cpu torch==2.13.0")
    assert torch < DOCKERFILE.index("pip install .")
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/-/healthy", DOCKERFILE, re.MULTILINE)
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", DOCKERFILE, re.MULTILINE):
        for src in path.split():
            assert (ROOT / src).exists(), src


@pytest.mark.parametrize("needed", ["pyproject.toml", "README.md", "detector",
                                    "grafana_plugin_backend"])
def test_dockerignore_keeps_what_the_build_copies(needed):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert needed not in ignored
    assert ".venv" in ignored and ".git" in ignored
