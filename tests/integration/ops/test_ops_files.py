"""docs/ops: the alert rules and the Grafana dashboard refer only to metrics /metrics really serves, and
the rules pass `promtool check rules` (where promtool is installed: .ci/run installs Debian's prometheus)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, mint_token
from tests.integration.ops.metrics_scrape import Scrape, scrape
from tests.integration.streaming.conftest import connect
from tests.support import Client, eventually

OPS = ROOT / "docs" / "ops"
RULES = OPS / "tally-alerts.yml"
DASHBOARD = OPS / "tally-dashboard.json"
METRIC = re.compile(r"\b(?:tally|process)_[a-z0-9_]+")


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def referenced(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC.findall(expr)}


async def busy_scrape(client: Client, admin_headers: dict[str, str]) -> Scrape:
    """After a few requests, a stream and a projection that caught up."""
    assert (await client.post("/v1/wallets", json={"owner": "ops", "currency": "USD"},
                              headers=admin_headers)).status == 201
    await client.get("/nowhere")
    token = await mint_token(client.app, "auditor", ["audit:read"])
    stream = await connect(client, "/v1/streams/events", token, after="now")
    assert stream.status == 200
    async def caught_up() -> Scrape | None:
        found = await scrape(client)
        return found if 'tally_projection_lag_events{projection="balances"} 0.0' in found.text else None

    try:
        return await eventually(caught_up, interval=0.05, what="the balances projection to catch up")
    finally:
        stream.close()


async def test_every_metric_the_rules_and_the_dashboard_use_is_served(
    client: Client, admin_headers: dict[str, str]
) -> None:
    served = (await busy_scrape(client, admin_headers)).names()
    rules, panels = referenced(rule_expressions()), referenced(dashboard_expressions())
    assert {"tally_projection_lag_seconds", "tally_http_requests_total", "tally_db_pool_in_use"} <= rules
    assert len(panels) >= 10
    assert rules - served == set()
    assert panels - served == set()


def test_every_dashboard_panel_has_a_target() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules() -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_deployment_guides_scrape_config(tmp_path: Path) -> None:
    """docs/DEPLOYMENT.md's Prometheus configuration, with the rules beside it as its rule_files says."""
    guide = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    config = guide.split("\n## Prometheus\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(RULES, tmp_path / RULES.name)
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
async def test_promtool_accepts_the_exposition(client: Client, admin_headers: dict[str, str]) -> None:
    """README, Metrics: /metrics speaks the Prometheus text format (promtool also lints names and types)."""
    text = (await busy_scrape(client, admin_headers)).text
    promtool = await asyncio.create_subprocess_exec("promtool", "check", "metrics", stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(promtool.communicate(text.encode()), 60)
    assert promtool.returncode == 0 and output == b"", output.decode()


RULE_TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'tally_http_requests_total{instance="a", method="POST", route="/v1/wallets", status="201"}'
        values: '0+90x20'
      - series: 'tally_http_requests_total{instance="a", method="POST", route="/v1/wallets", status="503"}'
        values: '0+10x20'
      - series: 'tally_projection_lag_seconds{instance="a", projection="balances"}'
        values: '0 120x20'
      - series: 'tally_projection_lag_seconds{instance="b", projection="balances"}'
        values: '0x20'
      - series: 'tally_db_pool_in_use{instance="a"}'
        values: '2x20'
      - series: 'tally_db_pool_max_size{instance="a"}'
        values: '10x20'
      - series: 'tally_db_pool_waiting{instance="a"}'
        values: '0 3x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: TallyHigh5xxRate
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
      - eval_time: 15m
        alertname: TallyHigh503Rate
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 15m
        alertname: TallyProjectionLagging
        exp_alerts:
          - exp_labels: {severity: warning, projection: balances}
      - eval_time: 15m
        alertname: TallyPoolSaturated
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 3m
        alertname: TallyProjectionLagging
        exp_alerts: []
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_the_rules_fire_on_what_they_describe(tmp_path: Path) -> None:
    """A 10 % share of 503s, a projection two minutes behind on one process, pool waiters: each alert the
    README lists fires once its `for` has passed, labelled as the rule says, and not before (`promtool
    test rules`, on the rules without their annotations)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # their text is not what this checks
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    tests = tmp_path / "tally-alerts-test.yml"
    tests.write_text(RULE_TESTS.replace("RULES", str(tmp_path / RULES.name)))
    checked = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
