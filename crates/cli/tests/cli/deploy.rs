//! The monitoring artefacts in `deploy/`: the Prometheus alert rules and their unit tests, the example scrape
//! config and the Grafana dashboard. `promtool` (from the Debian package `prometheus`, unpacked by `scripts/test.sh`)
//! checks the Prometheus files; the dashboard is parsed here. Every metric the alerts and the dashboard use must
//! be in the catalogue, `docs/metrics.md`, so neither can drift from what the binaries export.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::support::{promtool as promtool_path, read, repo};

/// Runs `promtool` with `args` from the repository root and panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(promtool_path())
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        args.join(" "),
        out.status
    );
    format!("{stdout}{stderr}")
}

fn path_arg(rel: &str) -> String {
    repo().join(rel).display().to_string()
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", &path_arg("deploy/prometheus/alerts.yml")]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rule_unit_tests_pass() {
    let out = promtool(&[
        "test",
        "rules",
        &path_arg("deploy/prometheus/alerts_test.yml"),
    ]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn example_prometheus_config_is_valid() {
    let out = promtool(&[
        "check",
        "config",
        &path_arg("deploy/prometheus/prometheus.yml"),
    ]);
    // The config references alerts.yml relative to itself; promtool checks that file too.
    assert!(out.contains("1 rule files found"), "{out}");
}

/// Names of the alerts defined in alerts.yml (`- alert: Name` lines).
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn every_alert_is_complete_and_fires_in_a_unit_test() {
    let rules = read("deploy/prometheus/alerts.yml");
    let names = alert_names(&rules);
    assert!(
        names.len() >= 15,
        "expected the full alert set, found {names:?}"
    );

    // Each alert's block runs to the next `- alert:`.
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert_eq!(blocks.len(), names.len());
    for (name, block) in names.iter().zip(&blocks) {
        for field in ["expr:", "for:", "summary:", "description:", "runbook:"] {
            assert!(block.contains(field), "alert {name} has no `{field}`");
        }
        assert!(
            block.contains("severity: page") || block.contains("severity: ticket"),
            "alert {name}: severity must be page or ticket"
        );
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "duplicate alert names: {names:?}"
    );

    // In alerts_test.yml, every alert has an alert_rule_test expecting it to fire (a non-empty exp_alerts).
    let tests = read("deploy/prometheus/alerts_test.yml");
    let mut fired = BTreeSet::new();
    for case in tests.split("alertname:").skip(1) {
        let name = case.lines().next().unwrap_or("").trim().to_string();
        let body = case.split("- eval_time:").next().unwrap_or("");
        if body.contains("exp_labels:") {
            fired.insert(name);
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !fired.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "alerts never expected to fire in alerts_test.yml: {missing:?}"
    );
}

/// Every panel, including those nested in collapsed rows.
fn all_panels(panels: &[Value], out: &mut Vec<Value>) {
    for p in panels {
        out.push(p.clone());
        if let Some(nested) = p.get("panels").and_then(Value::as_array) {
            all_panels(nested, out);
        }
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/ferry.json")).expect("ferry.json is JSON")
}

fn dashboard_panels(d: &Value) -> Vec<Value> {
    let mut panels = Vec::new();
    all_panels(
        d["panels"].as_array().expect("dashboard has panels"),
        &mut panels,
    );
    panels
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = dashboard_panels(d)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        match &var["query"] {
            Value::String(q) => exprs.push(q.clone()),
            q => exprs.extend(q["query"].as_str().map(str::to_string)),
        }
    }
    exprs
}

#[test]
fn dashboard_panels_have_titles_and_targets() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    let panels = dashboard_panels(&d);
    assert!(panels.len() >= 20, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "panel without a title: {p}");
        assert!(
            ids.insert(p["id"].to_string()),
            "duplicate panel id in {title}"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?} has a target without expr"
            );
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} must use the datasource variable"
        );
    }

    let vars: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "queue", "instance"] {
        assert!(vars.contains(v), "no `{v}` template variable: {vars:?}");
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool has no offline query parser, but it parses rule expressions: wrap each query in a recording rule,
    // with the Grafana variables replaced by what they expand to.
    let exprs = dashboard_exprs(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        if e.starts_with("label_values(") {
            continue;
        }
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$queue", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules).unwrap();
    promtool(&["check", "rules", &file.display().to_string()]);
}

/// Metric names in `text`: identifiers starting `ferry_` or `process_`, with the histogram series suffixes
/// `_bucket`, `_sum` and `_count` removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let is_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    let mut prev = ' ';
    let mut skip_to = 0;
    for (i, c) in text.char_indices() {
        if i >= skip_to && !is_ident(prev) {
            let rest = &text[i..];
            if rest.starts_with("ferry_") || rest.starts_with("process_") {
                let end = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
                let mut name = &rest[..end];
                for suffix in ["_bucket", "_sum", "_count"] {
                    if let Some(base) = name.strip_suffix(suffix) {
                        name = base;
                        break;
                    }
                }
                names.insert(name.to_string());
                skip_to = i + end;
            }
        }
        prev = c;
    }
    names
}

#[test]
fn metric_name_scan() {
    let found = metric_names(
        "histogram_quantile(0.9, rate(ferry_job_processing_seconds_bucket{queue=\"a\"}[5m])) \
         / process_open_fds + my_ferry_thing + ferry_x_count",
    );
    let want: BTreeSet<String> = [
        "ferry_job_processing_seconds",
        "process_open_fds",
        "ferry_x",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(found, want);
}

#[test]
fn alerts_and_dashboard_use_only_catalogued_metrics() {
    let catalogue = metric_names(&read("docs/metrics.md"));
    for m in [
        "ferry_queue_depth",
        "ferry_job_processing_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(
            catalogue.contains(m),
            "catalogue scan missed {m}: {catalogue:?}"
        );
    }

    let d = dashboard();
    let sources = [
        (
            "deploy/prometheus/alerts.yml",
            metric_names(&read("deploy/prometheus/alerts.yml")),
        ),
        (
            "deploy/prometheus/alerts_test.yml",
            metric_names(&read("deploy/prometheus/alerts_test.yml")),
        ),
        (
            "deploy/grafana/ferry.json",
            metric_names(&dashboard_exprs(&d).join("\n")),
        ),
    ];
    let mut problems = Vec::new();
    for (file, names) in &sources {
        assert!(names.len() >= 10, "{file}: only {names:?} found");
        for n in names.difference(&catalogue) {
            problems.push(format!("{file}: {n}"));
        }
    }
    assert!(
        problems.is_empty(),
        "metrics not in docs/metrics.md:\n{}",
        problems.join("\n")
    );
}
