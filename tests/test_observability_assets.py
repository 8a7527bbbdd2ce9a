"""The operator artefacts query what the broker really exposes: every metric name and label used in the
Grafana dashboard (deploy/grafana) and the alert rules (deploy/prometheus) exists in broker.metrics, and
both files have the shape Grafana and Prometheus (or a PrometheusRule) load. Where promtool is installed,
it also checks the PromQL and evaluates each alert on a scenario it must (or must not) fire for."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import LoopCounter, LoopHistogram, Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "token-broker-dashboard.json"
ALERTS_PATH = ROOT / "deploy" / "prometheus" / "token-broker-alerts.yaml"

# Labels Prometheus attaches to every scraped series (target labels); the broker does not set them.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})
SEVERITIES = frozenset({"warning", "critical"})
DATASOURCE_UID = "${DS_PROMETHEUS}"
RUNBOOK = "README.md#operations"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# Sample names as PromQL sees them (broker_x_total, broker_x_bucket, ...), plus Prometheus's own `up`;
# `$` keeps Grafana variables such as $__rate_interval out.
_METRIC = re.compile(r"(?<![\w:$])(broker_\w+|up)(?![\w:])")
_SELECTOR = re.compile(r"(?<![\w:$])(broker_\w+|up)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
_DURATION = re.compile(r"(\d+(ms|[smhdwy]))+")


# --- what the broker exposes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed() -> dict[str, frozenset[str]]:
    """Sample name -> label names, parsed from the exposition of a fresh ``Metrics`` in which every
    labelled metric has one child (a labelled metric shows no sample before its first child)."""
    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
        elif isinstance(metric, LoopCounter) and metric.labelnames:
            metric.inc(*["x"] * len(metric.labelnames))
        elif isinstance(metric, LoopHistogram) and metric.labelnames:
            metric.observe(0.0, *["x"] * len(metric.labelnames))
    labels: dict[str, set[str]] = {"up": set()}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(found) for name, found in labels.items()}


# --- what the artefacts query ---------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
    return document


def _rule_file() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    return document


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _rule_file()["groups"] for rule in group["rules"]]


def _panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)


def _template_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else str(query)


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, every templating query and every alert."""
    dashboard = _dashboard()
    found = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    found += [
        (f"variable {variable['name']}", _template_query(variable))
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    found += [(f"alert {rule['alert']}", rule["expr"]) for rule in _rules()]
    return found


EXPRESSIONS = [pytest.param(expr, id=where) for where, expr in _expressions()]


def metric_names(expr: str) -> list[str]:
    return _METRIC.findall(_STRING.sub('""', expr))


def unknown_metrics(expr: str, exposed: dict[str, frozenset[str]]) -> set[str]:
    """Names in ``expr`` that are no sample name of the broker's exposition (nor ``up``)."""
    return {name for name in metric_names(expr) if name not in exposed}


def _argument_after(text: str, start: int) -> str | None:
    """The parenthesised expression starting at ``start`` (after blanks), without its parentheses."""
    while start < len(text) and text[start].isspace():
        start += 1
    if start == len(text) or text[start] != "(":
        return None
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1 : end]
    return None


def label_problems(expr: str, exposed: dict[str, frozenset[str]]) -> list[str]:
    """Labels that ``expr`` matches on, or groups by, which the metric they apply to does not have.

    A matcher applies to its selector's metric; ``by (...)``/``without (...)`` to every metric of the
    aggregated expression, which must follow the clause (``sum by (x) (...)``, the prefix form).
    """
    text = _STRING.sub('""', expr)
    problems = []
    for name, matchers in _SELECTOR.findall(text):
        allowed = exposed.get(name, frozenset()) | TARGET_LABELS
        problems += [
            f"{name}{{{label}=...}}" for label in _MATCHER_LABEL.findall(matchers) if label not in allowed
        ]
    for clause in _GROUPING.finditer(text):
        body = _argument_after(text, clause.end())
        if body is None:
            problems.append(f"{clause.group(0)} is not followed by the expression it aggregates")
            continue
        labels = [label.strip() for label in clause.group(2).split(",") if label.strip()]
        for name in sorted(set(metric_names(body))):
            allowed = exposed.get(name, frozenset()) | TARGET_LABELS
            problems += [
                f"{clause.group(1)} ({label}) over {name}" for label in labels if label not in allowed
            ]
    return problems


# --- metric names and labels ----------------------------------------------------------------------------


def test_every_broker_metric_family_shows_samples(exposed: dict[str, frozenset[str]]) -> None:
    """The fixture's registry exposes samples of every family Metrics registers, so a name missing
    from it is really not a broker metric (and not just a labelled metric without a child yet)."""
    families = {family.name for family in Metrics().registry.collect()}
    shown = {family for family in families if any(name.startswith(family) for name in exposed)}
    assert families == shown
    assert {"le", "outcome"} == exposed["broker_token_request_seconds_bucket"]
    assert {"caller", "outcome"} == exposed["broker_token_requests_total"]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_every_metric_queried_is_exposed_by_the_broker(expr: str, exposed: dict[str, frozenset[str]]) -> None:
    """Each dashboard query, variable query and alert names at least one metric, and every name is a
    sample name the broker exposes: the suffix must fit the type (_total on counters only,
    _bucket/_sum/_count on histograms), so a misspelled or unsuffixed name fails here."""
    assert metric_names(expr), f"no broker_ metric (or up) found in {expr!r}"
    assert set() == unknown_metrics(expr, exposed)


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_every_label_queried_exists_on_its_metric(expr: str, exposed: dict[str, frozenset[str]]) -> None:
    """Label matchers and by/without clauses use only labels their metric really has (or the target
    labels Prometheus adds, or le on a _bucket series)."""
    assert [] == label_problems(expr, exposed)


def test_the_checks_catch_misspelled_metrics_and_wrong_labels(exposed: dict[str, frozenset[str]]) -> None:
    """The checkers above report what they are meant to: a misspelled name, a counter without its
    _total suffix, a gauge with one, a label the metric lacks, and a postfix aggregation."""
    assert {"broker_token_request_total"} == unknown_metrics("rate(broker_token_request_total[5m])", exposed)
    assert {"broker_refresh"} == unknown_metrics("rate(broker_refresh[5m])", exposed)
    assert {"broker_cached_tokens_total"} == unknown_metrics("broker_cached_tokens_total", exposed)
    assert set() == unknown_metrics('up{job=~"x"} == 0 and broker_cached_tokens > 0', exposed)
    assert [
        "broker_refresh_total{caller=...}",
        "by (app) over broker_token_requests_total",
        "by (le) is not followed by the expression it aggregates",
    ] == label_problems(
        'rate(broker_refresh_total{caller="a"}[5m]) + sum by (app) (rate(broker_token_requests_total[5m]))'
        " + sum(rate(broker_token_request_seconds_bucket[5m])) by (le)",
        exposed,
    )


# --- alert rules ----------------------------------------------------------------------------------------


def test_alert_file_is_a_rule_file_and_a_prometheusrule_spec() -> None:
    """The file is only `groups:` of named groups of alerting rules, with no key outside what both
    Prometheus's rule files and a PrometheusRule's spec accept; group and alert names are unique."""
    document = _rule_file()
    assert ["groups"] == list(document)
    groups = document["groups"]
    assert len(groups) == len({group["name"] for group in groups})
    for group in groups:
        assert set() == set(group) - {"name", "interval", "limit", "rules"}
        for rule in group["rules"]:
            assert set() == set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert isinstance(rule["expr"], str)
    names = [rule["alert"] for rule in _rules()]
    assert sorted(set(names)) == sorted(names)


@pytest.mark.parametrize("rule", [pytest.param(rule, id=rule["alert"]) for rule in _rules()])
def test_every_alert_has_for_severity_summary_and_runbook(rule: dict[str, Any]) -> None:
    """Each alert waits a `for` duration, carries severity warning or critical, a summary and a
    description, and points to the README's Operations section."""
    assert _DURATION.fullmatch(str(rule.get("for", ""))), f"for: {rule.get('for')!r}"
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    annotations = rule.get("annotations", {})
    assert annotations.get("summary", "").strip()
    assert annotations.get("description", "").strip()
    assert RUNBOOK in annotations.get("runbook", "")


# --- dashboard ------------------------------------------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_targets() -> None:
    """Panel ids are unique (Grafana links and edits by id) and every panel has a query."""
    panels = list(_panels(_dashboard()))
    ids = [panel["id"] for panel in panels]
    assert sorted(set(ids)) == sorted(ids)
    assert [] == [panel["title"] for panel in panels if not panel.get("targets")]
    assert [] == [
        panel["title"]
        for panel in panels
        for target in panel["targets"]
        if not target.get("expr", "").strip()
    ]


def test_dashboard_is_importable_with_any_prometheus_datasource() -> None:
    """A current schema, a fixed uid, no instance id, a DS_PROMETHEUS datasource variable that every
    panel and query uses, job and instance variables, and panels inside the 24-column grid."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["id"] is None
    assert "token-broker" == dashboard["uid"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert ("datasource", "prometheus") == (
        variables["DS_PROMETHEUS"]["type"],
        variables["DS_PROMETHEUS"]["query"],
    )
    assert {"job", "instance"} <= set(variables)
    for panel in _panels(dashboard):
        assert DATASOURCE_UID == panel["datasource"]["uid"], panel["title"]
        assert [DATASOURCE_UID] * len(panel["targets"]) == [t["datasource"]["uid"] for t in panel["targets"]]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


# --- promtool, where installed -------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules_and_the_dashboard_queries(tmp_path: Path) -> None:
    """Promtool parses the rule file, and every dashboard query once Grafana's variables are filled in."""
    checked = _promtool("check", "rules", str(ALERTS_PATH))
    assert 0 == checked.returncode, checked.stdout + checked.stderr
    exprs = [target["expr"] for panel in _panels(_dashboard()) for target in panel["targets"]]
    filled = [
        expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        for expr in exprs
    ]
    rules = [{"record": f"dashboard:query{n}", "expr": expr} for n, expr in enumerate(filled)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _promtool("check", "rules", str(path))
    assert 0 == checked.returncode, checked.stdout + checked.stderr


_T = 'job="token-broker", namespace="ns", instance="10.0.0.1:9090"'
_T2 = 'job="token-broker", namespace="ns", instance="10.0.0.2:9090"'


def _upstream(outcome: str, aadsts: str = "") -> str:
    return f'broker_upstream_requests_total{{{_T}, app="a", outcome="{outcome}", aadsts="{aadsts}"}}'


def _transitions(was: str, to: str) -> str:
    return f'broker_tenant_transitions_total{{{_T}, app="a", from="{was}", to="{to}"}}'


# (alert, input series {selector: promtool values}, minutes evaluated, fires)
SCENARIOS = [
    (
        "TokenBrokerCredentialRejected",
        {f'broker_credential_failures_total{{{_T}, app="a"}}': "_x5 1x30"},
        8,
        True,
    ),
    (
        "TokenBrokerCredentialRejected",
        {f'broker_credential_failures_total{{{_T}, app="a"}}': "1x40"},
        30,
        False,
    ),
    ("TokenBrokerRedisErrors", {f"broker_redis_errors_total{{{_T}}}": "0+3x20"}, 12, True),
    ("TokenBrokerRedisErrors", {f"broker_redis_errors_total{{{_T}}}": "5x20"}, 12, False),
    (
        "TokenBrokerRedisMisconfigured",
        {f'broker_redis_failures_total{{{_T}, reason="moved"}}': "0+6x20"},
        16,
        True,
    ),
    (  # a dropped connection is not a misconfiguration
        "TokenBrokerRedisMisconfigured",
        {f'broker_redis_failures_total{{{_T}, reason="connection"}}': "0+6x20"},
        16,
        False,
    ),
    (  # 30 L1 hits, 70 L1 misses of which 40 hit Redis: 70 %
        "TokenBrokerCacheHitRatioLow",
        {
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="hit"}}': "0+30x40",
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="miss"}}': "0+70x40",
            f'broker_cache_lookups_total{{{_T}, layer="redis", result="hit"}}': "0+40x40",
            f'broker_cache_lookups_total{{{_T}, layer="redis", result="miss"}}': "0+30x40",
        },
        35,
        True,
    ),
    (  # same L1 misses, 65 of 70 answered by Redis: 95 %, an L1 miss answered by Redis is a hit
        "TokenBrokerCacheHitRatioLow",
        {
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="hit"}}': "0+30x40",
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="miss"}}': "0+70x40",
            f'broker_cache_lookups_total{{{_T}, layer="redis", result="hit"}}': "0+65x40",
            f'broker_cache_lookups_total{{{_T}, layer="redis", result="miss"}}': "0+5x40",
        },
        35,
        False,
    ),
    (  # 30 % but only 10 requests a minute
        "TokenBrokerCacheHitRatioLow",
        {
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="hit"}}': "0+3x40",
            f'broker_cache_lookups_total{{{_T}, layer="l1", result="miss"}}': "0+7x40",
        },
        35,
        False,
    ),
    (
        "TokenBrokerUpstreamErrors",
        {
            _upstream("ok"): "0+10x40",
            _upstream("temporarily_unavailable"): "0+10x40",
        },
        30,
        True,
    ),
    (  # customer-side refusals only
        "TokenBrokerUpstreamErrors",
        {
            _upstream("ok"): "0+10x40",
            _upstream("consent_required", "AADSTS65001"): "0+10x40",
            _upstream("upstream_error", "AADSTS500011"): "0+10x40",
        },
        30,
        False,
    ),
    (
        "TokenBrokerKeyVaultErrors",
        {
            f'broker_keyvault_requests_total{{{_T}, outcome="ok"}}': "1x100",
            f'broker_keyvault_requests_total{{{_T}, outcome="error"}}': "_x10 1x80",
        },
        20,
        True,
    ),
    (
        "TokenBrokerKeyVaultErrors",
        {f'broker_keyvault_requests_total{{{_T}, outcome="ok"}}': "1+1x100"},
        20,
        False,
    ),
    (
        "TokenBrokerHigh503Rate",
        {
            f'broker_token_requests_total{{{_T}, caller="c", outcome="ok"}}': "0+60x30",
            f'broker_token_requests_total{{{_T}, caller="c", outcome="temporarily_unavailable"}}': "0+10x30",
        },
        20,
        True,
    ),
    (  # the first server_error creates its series: the offset term sees it
        "TokenBrokerServerErrors",
        {
            f'broker_token_requests_total{{{_T}, caller="c", outcome="ok"}}': "0+60x30",
            f'broker_token_requests_total{{{_T}, caller="c", outcome="server_error"}}': "_x5 1x25",
        },
        8,
        True,
    ),
    (
        "TokenBrokerServerErrors",
        {
            f'broker_token_requests_total{{{_T}, caller="c", outcome="ok"}}': "0+60x40",
            f'broker_token_requests_total{{{_T}, caller="c", outcome="server_error"}}': "1x40",
        },
        30,
        False,
    ),
    ("TokenBrokerCallerRateLimited", {f'broker_rate_limited_total{{{_T}, caller="c"}}': "0+5x30"}, 20, True),
    (
        "TokenBrokerCallerRateLimited",
        {f'broker_rate_limited_total{{{_T}, caller="c"}}': "0+5x5 25x25"},
        20,
        False,
    ),
    (
        "TokenBrokerEntraUnreachable",
        {f'broker_upstream_unreachable_total{{{_T}, cause="dns"}}': "0+2x30"},
        20,
        True,
    ),
    (
        "TokenBrokerBackgroundTaskFailing",
        {f'broker_background_task_failures_total{{{_T}, task="purge_listener"}}': "0+1x30"},
        20,
        True,
    ),
    (
        "TokenBrokerBackgroundTaskFailing",
        {f'broker_background_task_failures_total{{{_T}, task="purge_listener"}}': "0x5 1x25"},
        20,
        False,
    ),
    ("TokenBrokerTargetDown", {f"up{{{_T}}}": "1x5 0x20", f"up{{{_T2}}}": "1x25"}, 15, True),
    ("TokenBrokerDown", {f"up{{{_T}}}": "1x5 0x20", f"up{{{_T2}}}": "1x25"}, 15, False),
    ("TokenBrokerDown", {f"up{{{_T}}}": "1x5 0x20", f"up{{{_T2}}}": "1x5 0x20"}, 15, True),
    (  # a tenant went from ready to consent_required: the series' first increment (it did not exist)
        "TokenBrokerTenantLeftReady",
        {_transitions("ready", "consent_required"): "_x5 1x30"},
        8,
        True,
    ),
    (  # an existing series grows
        "TokenBrokerTenantLeftReady",
        {_transitions("ready", "missing_roles"): "2x5 3x30"},
        8,
        True,
    ),
    (  # ... and the alert ends once the window has passed
        "TokenBrokerTenantLeftReady",
        {_transitions("ready", "missing_roles"): "2x5 3x30"},
        25,
        False,
    ),
    (  # new tenants and tenants becoming ready are not a reason to page
        "TokenBrokerTenantLeftReady",
        {
            _transitions("new", "consent_required"): "_x5 1x30",
            _transitions("consent_required", "ready"): "_x5 1x30",
        },
        8,
        False,
    ),
]


@needs_promtool
@pytest.mark.parametrize(
    ("alert", "series", "minutes", "fires"),
    [
        pytest.param(*case, id=f"{case[0]}-{'fires' if case[3] else 'quiet'}-{n}")
        for n, case in enumerate(SCENARIOS)
    ],
)
def test_alert_fires_exactly_in_its_scenario(
    tmp_path: Path, alert: str, series: dict[str, str], minutes: int, fires: bool
) -> None:
    """Promtool evaluates the real rule file on synthetic series: the alert is firing after the given
    minutes in its scenario, and not in the look-alike ones (customer-side errors, low traffic, an L1
    miss answered by Redis, one replica of two down, no new failure)."""
    test = {
        "rule_files": [str(ALERTS_PATH)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": [
                    {
                        "expr": f'count(ALERTS{{alertname="{alert}", alertstate="firing"}}) or vector(0)',
                        "eval_time": f"{minutes}m",
                        "exp_samples": [{"labels": "{}", "value": 1 if fires else 0}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "alert-test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = _promtool("test", "rules", str(path))
    assert 0 == result.returncode, result.stdout + result.stderr
