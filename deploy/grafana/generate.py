#!/usr/bin/env python3
"""Writes the smesh Grafana dashboards (JSON model, schema 39) next to this script.

Edit the panels here and re-run; the JSON files are what Grafana imports (Dashboards ->
Import, or a provisioning directory). Every query uses only metrics a proxy exports and the
recording rules in deploy/prometheus/smesh-rules.yml; tests/e2e/test_prometheus.py checks
both against a running proxy."""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(title, exprs, unit="short", kind="timeseries", legend="{{service}}"):
    targets = [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
               for i, (e, l) in enumerate(exprs if isinstance(exprs, list) else [(exprs, legend)])]
    return {"type": kind, "title": title, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}


def variable(name, query, multi=False):
    return {"name": name, "type": "query", "datasource": DS, "query": {"query": query, "refId": name},
            "definition": query, "refresh": 2, "includeAll": multi, "multi": multi, "current": {}}


DATASOURCE = {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}}


def dashboard(uid, title, panels, variables=()):
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8}
    return {"uid": uid, "title": title, "tags": ["smesh"], "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "panels": panels,
            "templating": {"list": [DATASOURCE, *variables]}, "annotations": {"list": []}}


SVC = 'service=~"$service"'
OVERVIEW = dashboard("smesh-overview", "smesh / mesh overview", [
    panel("Requests per second, by service", 'sum by (service) (smesh:requests:rate5m{direction="inbound"})', "reqps"),
    panel("Success rate, by service", '1 - smesh:error_ratio:rate5m{direction="inbound"}', "percentunit"),
    panel("p99 latency, by service (inbound)", 'smesh:latency_p99:rate5m{direction="inbound"}', "s"),
    panel("Proxy-made errors, by reason", 'sum by (reason) (rate(smesh_proxy_errors_total[5m]))', "reqps", legend="{{reason}}"),
    panel("Proxies answering scrapes", 'sum(up{job=~"smesh.*"})', kind="stat", legend="up"),
    panel("Share of inbound connections over mesh mTLS",
          'sum(rate(smesh_inbound_connections_total{tls="true"}[5m])) / sum(rate(smesh_inbound_connections_total[5m]))',
          "percentunit", kind="stat", legend="mTLS"),
    panel("TCP bytes per second, by service", [
        ('sum by (service) (rate(smesh_tcp_read_bytes_total[5m]))', "{{service}} read"),
        ('sum by (service) (rate(smesh_tcp_write_bytes_total[5m]))', "{{service}} written")], "Bps"),
    panel("Retries per second, by service", 'sum by (service) (rate(smesh_retries_total[5m]))', "reqps"),
])

SERVICE = dashboard("smesh-service", "smesh / service", [
    panel("Requests per second, by route", f'sum by (direction, route) (rate(smesh_requests_total{{{SVC}}}[5m]))', "reqps",
          legend="{{direction}} {{route}}"),
    panel("Responses, by status code", f'sum by (direction, status_code) (rate(smesh_responses_total{{{SVC}}}[5m]))', "reqps",
          legend="{{direction}} {{status_code}}"),
    panel("Success rate", f'1 - smesh:error_ratio:rate5m{{{SVC}}}', "percentunit", legend="{{direction}}"),
    panel("Latency", [
        (f'histogram_quantile({q}, sum by (le, direction) (rate(smesh_request_duration_seconds_bucket{{{SVC}}}[5m])))',
         f"{{{{direction}}}} p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
    panel("gRPC calls, by gRPC status", f'sum by (direction, grpc_status) (rate(smesh_grpc_responses_total{{{SVC}}}[5m]))',
          "reqps", legend="{{direction}} {{grpc_status}}"),
    panel("Retries and rate-limited requests", [
        (f'sum by (direction) (rate(smesh_retries_total{{{SVC}}}[5m]))', "{{direction}} retries"),
        (f'sum by (route) (rate(smesh_rate_limited_total{{{SVC}}}[5m]))', "rate limited {{route}}")], "reqps"),
], [variable("service", 'label_values(smesh_requests_total, service)', multi=True)])

ROUTE_SEL = 'service=~"$service", route=~"$route"'
ROUTE = dashboard("smesh-route", "smesh / route", [
    panel("Requests per second", f'sum by (direction) (rate(smesh_requests_total{{{ROUTE_SEL}}}[5m]))', "reqps",
          legend="{{direction}}"),
    panel("Responses, by class", f'sum by (class) (rate(smesh_responses_total{{{ROUTE_SEL}}}[5m]))', "reqps",
          legend="{{class}}"),
    panel("Latency", [
        (f'histogram_quantile({q}, sum by (le) (rate(smesh_request_duration_seconds_bucket{{{ROUTE_SEL}}}[5m])))',
         f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
    panel("Retries per second", f'sum(rate(smesh_retries_total{{{ROUTE_SEL}}}[5m]))', "reqps", legend="retries"),
    panel("Faults injected", f'sum by (kind) (rate(smesh_faults_injected_total{{{ROUTE_SEL}}}[5m]))', "reqps",
          legend="{{kind}}"),
], [variable("service", 'label_values(smesh_requests_total, service)'),
    variable("route", 'label_values(smesh_requests_total{service=~"$service"}, route)', multi=True)])

INST = 'instance=~"$instance"'
PROXY = dashboard("smesh-proxy", "smesh / proxy resources", [
    panel("Open client connections", f'smesh_connections_active{{{INST}}}', legend="{{instance}}"),
    panel("Inbound connections per second, by TLS", f'sum by (tls) (rate(smesh_inbound_connections_total{{{INST}}}[5m]))',
          "cps", legend="tls={{tls}}"),
    panel("Configuration loads, by result", f'sum by (result) (increase(smesh_config_reloads_total{{{INST}}}[5m]))',
          legend="{{result}}"),
    panel("Configuration generation", f'smesh_config_generation{{{INST}}}', legend="{{instance}}"),
    panel("Certificate expires in", f'smesh_identity_cert_expiry_timestamp_seconds{{{INST}}} - time() > 0', "s",
          legend="{{instance}}"),
    panel("TCP connections opened / closed per second", [
        (f'sum(rate(smesh_tcp_connections_opened_total{{{INST}}}[5m]))', "opened"),
        (f'sum(rate(smesh_tcp_connections_closed_total{{{INST}}}[5m]))', "closed")], "cps"),
    panel("Access-log lines dropped", f'rate(smesh_access_log_dropped_total{{{INST}}}[5m])', legend="{{instance}}"),
], [variable("instance", 'label_values(smesh_config_generation, instance)', multi=True)])

if __name__ == "__main__":
    here = pathlib.Path(__file__).parent
    for name, board in [("mesh-overview", OVERVIEW), ("service", SERVICE), ("route", ROUTE), ("proxy", PROXY)]:
        (here / f"smesh-{name}.json").write_text(json.dumps(board, indent=2) + "\n")
