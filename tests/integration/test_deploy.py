"""What deploy/ gives an operator: Kubernetes manifests that build and validate offline, a
container image that runs as a numeric non-root user, a hardened systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import Settings, load
from mirror.content.redis_client import parse_sentinel_url
from mirror.domain.units import parse_duration
from tests.support.binaries import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BUILDS = ("overlays/single", "overlays/replicas", "overlays/object-storage", "nodes")


def build(target: str) -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # A deprecation warning today is a build that stops working with a later kustomize.
    assert done.stderr == "", done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def of_kind(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("target", BUILDS)
def test_every_build_validates_against_the_kubernetes_schemas(
    target: str, tmp_path: Path
) -> None:
    documents = build(target)
    rendered = tmp_path / "built.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    done = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", str(rendered)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(documents)


def restricted_pod(documents: list[dict[str, Any]], replicas: int) -> dict[str, Any]:
    """The mirror's pod spec, once checked to be a restricted, well-probed cluster citizen."""
    deployment = of_kind(documents, "Deployment", "mirror")
    assert deployment["metadata"]["namespace"] == "mirror"
    assert deployment["spec"]["replicas"] == replicas
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"requests", "limits"} <= set(container["resources"])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    return pod


def test_the_workload_is_a_restricted_well_probed_cluster_citizen() -> None:
    for overlay, replicas in (("overlays/single", 1), ("overlays/replicas", 3)):
        documents = build(overlay)
        pod = restricted_pod(documents, replicas)
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "mirror-data"
        assert "emptyDir" not in volumes["data"]
        claim = of_kind(documents, "PersistentVolumeClaim", "mirror-data")
        modes = claim["spec"]["accessModes"]
        assert modes == (["ReadWriteOnce"] if replicas == 1 else ["ReadWriteMany"])
        budgets = [d for d in documents if d["kind"] == "PodDisruptionBudget"]
        assert (len(budgets) == 1) == (replicas > 1)
    replicas_build = build("overlays/replicas")
    env = of_kind(replicas_build, "Deployment", "mirror")["spec"]["template"]["spec"]
    variables = {e["name"]: e["value"] for e in env["containers"][0]["env"]}
    assert variables["MIRROR_REDIS_URL"] == "redis://mirror-redis:6379/0"
    of_kind(replicas_build, "Service", "mirror-redis")


def test_the_config_map_is_a_config_the_mirror_loads(tmp_path: Path) -> None:
    config = of_kind(build("overlays/single"), "ConfigMap", "mirror-config")
    path = tmp_path / "config.yaml"
    path.write_text(config["data"]["config.yaml"])
    settings = load({}, env={}, config_file=path)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 5000)
    assert settings.data_dir == Path("/var/lib/mirror/data")


OBJECT_STORAGE = "overlays/object-storage"


def config_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """The mirror's config.yaml in the built ConfigMap, parsed."""
    config: dict[str, Any] = yaml.safe_load(
        of_kind(documents, "ConfigMap", "mirror-config")["data"]["config.yaml"]
    )
    return config


def test_the_object_storage_replicas_share_no_disk() -> None:
    documents = build(OBJECT_STORAGE)
    # No claim at all: no storage class has to offer ReadWriteMany.
    assert [d for d in documents if d["kind"] == "PersistentVolumeClaim"] == []
    assert "ReadWriteMany" not in yaml.safe_dump_all(documents)
    pod = restricted_pod(documents, 3)
    spec = of_kind(documents, "Deployment", "mirror")["spec"]
    # A new pod is ready before an old one goes; losing a node, or a drain, costs one replica.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    across_nodes = spread["kubernetes.io/hostname"]
    assert (across_nodes["maxSkew"], across_nodes["whenUnsatisfiable"]) == (1, "DoNotSchedule")
    assert across_nodes["labelSelector"] == spec["selector"]
    budget = of_kind(documents, "PodDisruptionBudget", "mirror")["spec"]
    assert (budget["selector"], budget["maxUnavailable"]) == (spec["selector"], 1)
    config = config_of(documents)
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The data dir holds only fills in progress: a bounded emptyDir of the pod's own.
    assert mounts["data"]["mountPath"] == config["data_dir"]
    assert set(volumes["data"]) == {"name", "emptyDir"}
    assert volumes["data"]["emptyDir"]["sizeLimit"]
    # The bucket's credentials are files of a mounted Secret, named by the *_file keys; a pod
    # waits for the Secret rather than start without them.
    s3 = config["storage"]["s3"]
    assert volumes["s3"]["secret"] == {"secretName": "mirror-s3"}
    assert mounts["s3"]["readOnly"] is True
    for key in ("access_key_id_file", "secret_access_key_file"):
        assert Path(s3[key]).parent == Path(mounts["s3"]["mountPath"]), key
    # Redis follows its master through several sentinels, and no password sits in a ConfigMap.
    sentinel = parse_sentinel_url(config["redis_url"])
    assert len(sentinel.sentinels) == 3
    assert sentinel.password is None


def test_the_object_storage_config_keeps_the_base_settings(tmp_path: Path) -> None:
    base = config_of(build("overlays/single"))
    config = config_of(build(OBJECT_STORAGE))
    assert {key: config.get(key) for key in base} == base
    # Everything but the storage key (see the next test) is already a config the mirror loads.
    del config["storage"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load({}, env={}, config_file=path)
    assert settings.redis_url == config["redis_url"]
    assert settings.data_dir == Path("/var/lib/mirror/data")


def test_the_object_storage_config_map_is_a_config_the_mirror_loads(tmp_path: Path) -> None:
    config = config_of(build(OBJECT_STORAGE))
    s3 = config["storage"]["s3"]
    # The Secret's files, as the pod has them (the loader reads them).
    for key, secret in (("access_key_id_file", "key-id"), ("secret_access_key_file", "secret")):
        path = tmp_path / Path(s3[key]).name
        path.write_text(secret + "\n")
        s3[key] = str(path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load({}, env={}, config_file=path)
    storage = settings.storage
    assert storage is not None
    assert (storage.bucket, storage.access_key_id, storage.secret_access_key) == (
        "mirror", "key-id", "secret",
    )  # fmt: skip
    assert settings.redis_url == config["redis_url"]


def test_the_nodes_pull_through_the_services_fixed_address() -> None:
    service = of_kind(build("overlays/single"), "Service", "mirror")
    address = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    hosts = of_kind(build("nodes"), "ConfigMap", "mirror-hosts")["data"]
    assert set(hosts) == {"docker.io", "ghcr.io", "registry.k8s.io"}
    for text in hosts.values():
        assert f'[host."{address}"]' in text


def test_the_image_runs_as_a_numeric_user_and_checks_its_readiness() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "/readyz" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    assert "/readyz" in " ".join(compose["services"]["mirror-a"]["healthcheck"]["test"])


def test_the_systemd_unit_is_hardened_and_its_config_loads(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    unit = tmp_path / "mirror.service"
    shutil.copy(DEPLOY / "mirror.service", unit)
    done = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for mirror.service: ([\d.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 4.0
    text = unit.read_text()
    assert "ExecStart=/opt/mirror/bin/mirror serve --config /etc/mirror/config.yaml" in text
    settings = load({}, env={}, config_file=DEPLOY / "config.yaml")
    assert settings.data_dir == Path("/var/lib/mirror")


def stopping_takes(config_text: str, env: dict[str, str], tmp_path: Path) -> float:
    """What a graceful stop may take with this config: shutdown_delay + shutdown_grace."""
    path = tmp_path / "stop.yaml"
    path.write_text(config_text)
    settings: Settings = load({}, env=env, config_file=path)
    return settings.shutdown_delay + settings.shutdown_grace


def test_kubernetes_gives_a_stopping_pod_more_time_than_its_grace(tmp_path: Path) -> None:
    for overlay in ("overlays/single", "overlays/replicas"):
        documents = build(overlay)
        config = of_kind(documents, "ConfigMap", "mirror-config")["data"]["config.yaml"]
        deployment = of_kind(documents, "Deployment", "mirror")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        # /readyz turns 503 on SIGTERM and the port stays open for shutdown_delay: the
        # endpoints drop the pod meanwhile, so no preStop sleep stands before the signal.
        assert "preStop" not in container.get("lifecycle", {})
        assert pod["terminationGracePeriodSeconds"] > stopping_takes(config, env, tmp_path)
    replicas = of_kind(build("overlays/replicas"), "Deployment", "mirror")["spec"]
    # A rolling update starts a new pod before it stops an old one.
    assert replicas["strategy"]["type"] == "RollingUpdate"
    assert replicas["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    budget = of_kind(build("overlays/replicas"), "PodDisruptionBudget", "mirror")["spec"]
    assert 0 < budget["maxUnavailable"] < replicas["replicas"]


def test_systemd_and_compose_wait_longer_than_the_grace(tmp_path: Path) -> None:
    unit = (DEPLOY / "mirror.service").read_text()
    env = dict(re.findall(r"^Environment=(MIRROR_[A-Z_]+)=(.*)$", unit, re.MULTILINE))
    needed = stopping_takes((DEPLOY / "config.yaml").read_text(), env, tmp_path)
    (timeout,) = re.findall(r"^TimeoutStopSec=(\S+)$", unit, re.MULTILINE)
    assert parse_duration(timeout) > needed
    # SIGTERM to the main process alone: with --workers it passes it on, and a second
    # SIGTERM straight from systemd would make the workers stop at once.
    assert re.search(r"^KillMode=mixed$", unit, re.MULTILINE)
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    for name in ("mirror-a", "mirror-b"):
        service = compose["services"][name]
        variables = {k: str(v) for k, v in service["environment"].items()}
        needed = stopping_takes("{}", variables, tmp_path)
        assert parse_duration(service["stop_grace_period"]) > needed
