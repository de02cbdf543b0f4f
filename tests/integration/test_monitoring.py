"""The metrics an operator alerts and graphs on: present from the start, and every one the
alert rules and the Grafana dashboard name is one the mirror exports."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.binaries import require_binary
from tests.support.fakehub import FakeHub
from tests.support.mirror import RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\b((?:mirror|process)_[a-z_]+)\b")


async def exported(mirror: RunningMirror) -> dict[str, int]:
    """Every sample name /metrics shows, with how many samples it has."""
    status, _, body = await mirror.get("/metrics")
    assert status == 200
    names: dict[str, int] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names[sample.name] = names.get(sample.name, 0) + 1
    return names


async def test_every_gauge_has_a_value_from_the_start(fake_hub: FakeHub, tmp_path: Path) -> None:
    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings) as mirror:
        names = await exported(mirror)
    for name in (
        "mirror_upstream_circuit_open",
        "mirror_upstream_ratelimit_remaining",
        "mirror_upstream_ratelimit_limit",
        "mirror_blob_fills_in_flight",
        "mirror_cache_bytes",
        "mirror_cache_blobs",
        "mirror_cache_budget_bytes",
        "mirror_pinned_bytes",
        "mirror_pins_over_budget",
        "mirror_ready",
        "mirror_store_degraded",
        "mirror_disk_free_bytes",
        "mirror_disk_total_bytes",
        "mirror_offline",
        "mirror_evictions_total",
        "mirror_request_duration_seconds_bucket",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ):
        assert names.get(name, 0) > 0, f"{name} has no sample at start"


async def test_alerts_and_dashboard_name_only_metrics_the_mirror_exports(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    image = make_image([make_layer(b"graphed")])
    fake_hub.add_image("library/app", "1", image)
    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings) as mirror:
        for path in ("/v2/app/manifests/1", f"/v2/app/blobs/{image.layers[0].digest}"):
            status, _, _ = await mirror.get(path, accept=[OCI_MANIFEST])
            assert status == 200
        names = await exported(mirror)

    dashboard = json.loads((DEPLOY / "grafana" / "mirror.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 10
    rules = (DEPLOY / "prometheus" / "alerts.yaml").read_text()
    expressions += [line for line in rules.splitlines() if "mirror_" in line]
    named = {name for expression in expressions for name in METRIC_NAME.findall(expression)}
    assert named, "no metric named at all"
    missing = sorted(name for name in named if name not in names)
    assert not missing, f"named but not exported: {missing}"


async def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    promtool = require_binary("promtool")
    rules = DEPLOY / "prometheus"
    for command in (
        [promtool, "check", "rules", "alerts.yaml"],
        [promtool, "test", "rules", "alerts.test.yaml"],
    ):
        done = await asyncio.to_thread(
            subprocess.run, command, cwd=rules, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


async def test_requests_are_counted_and_timed_by_route(fake_hub: FakeHub, tmp_path: Path) -> None:
    """The counts and the latency histogram are tallied in memory and handed to the
    exporter in batches: a scrape still sees every request answered before it."""
    fake_hub.add_image("library/app", "1.0", make_image([make_layer(b"counted")]))
    settings = settings_for(fake_hub.url, tmp_path / "data")
    async with RunningMirror(settings) as mirror:
        for _ in range(7):
            status, _, _ = await mirror.get("/v2/app/manifests/1.0")
            assert status == 200
        status, _, _ = await mirror.get("/v2/app/manifests/nope")
        assert status == 404
        _, _, body = await mirror.get("/metrics")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return sum(
            v
            for (n, sample_labels), v in samples.items()
            if n == name and labels.items() <= dict(sample_labels).items()
        )

    assert value("mirror_requests_total", route="manifest", status="200") == 7
    assert value("mirror_requests_total", route="manifest", status="404") == 1
    assert value("mirror_request_duration_seconds_count", route="manifest") == 8
    assert value("mirror_request_duration_seconds_bucket", route="manifest", le="+Inf") == 8
    assert value("mirror_request_duration_seconds_sum", route="manifest") > 0
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (n, labels), v in samples.items()
        if n == "mirror_request_duration_seconds_bucket" and dict(labels)["route"] == "manifest"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative, as Prometheus reads them
