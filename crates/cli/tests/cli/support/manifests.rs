//! What the deployment checks (container.rs, k8s.rs) share: YAML scalars, and `ferry check-config` /
//! `ferry <role> --help` read back. The repository's files come from [`super::read`].

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_norway::Value;

/// How long the role may take to stop after SIGTERM, from its effective settings.
pub fn shutdown_deadline_ms(role: &str, out: &str) -> u64 {
    let n = |k: &str| -> u64 {
        setting(out, k)
            .unwrap_or_else(|| panic!("{k} not in check-config output"))
            .parse()
            .unwrap()
    };
    match (role, setting(out, "shutdown-deadline-ms")) {
        (_, Some(v)) => v.parse().unwrap(),
        // The balancer keeps open tunnels for --drain-ms after the signal, then closes them and exits.
        ("balancer", None) => n("drain-ms") + 1_000,
        ("worker", None) => {
            n("drain-timeout-ms") + n("cancel-grace-ms") + n("flush-timeout-ms") + 10_000
        }
        (r, None) => panic!("{r}: no shutdown deadline"),
    }
}

/// An effective setting of `ferry check-config` output (`key = value  # source`), unquoted.
pub fn setting(out: &str, key: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let (k, rest) = l.split_once(" = ")?;
        if k != key || rest.starts_with('#') {
            return None;
        }
        let v = rest.rsplit_once("  # ").map_or(rest, |(v, _)| v);
        Some(v.trim_matches('"').to_string())
    })
}

pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// `ferry <role> --help` → the FERRY_* variables the role reads.
pub fn role_env_names(role: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([role, "--help"])
        .output()
        .expect("run ferry --help");
    assert!(out.status.success(), "ferry {role} --help failed");
    String::from_utf8_lossy(&out.stdout)
        .split("[env: ")
        .skip(1)
        .map(|s| s.split(['=', ']']).next().unwrap().to_string())
        .collect()
}

/// The config file `base` (if any) with the long flags of `args` layered into `[role]` (the process-wide ones at
/// the top), so `check-config` sees both.
pub fn config_with_flags(role: &str, base: Option<&str>, args: &[String]) -> String {
    const GLOBAL: [&str; 4] = ["log", "log-format", "otlp-endpoint", "otlp-service-name"];
    let mut top: toml::Table = base.map_or_else(toml::Table::new, |b| {
        b.parse().expect("config file is TOML")
    });
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let flag = a
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("{role}: positional argument {a}"));
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None if args.get(i + 1).is_some_and(|n| !n.starts_with("--")) => {
                i += 1;
                (flag.to_string(), args[i].clone())
            }
            None => (flag.to_string(), "true".to_string()),
        };
        assert_ne!(
            name, "config",
            "{role}: pass the config file through the check (FERRY_CONFIG), not --config"
        );
        values.entry(name).or_default().push(value);
        i += 1;
    }
    let section = top
        .entry(role.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("[role] is a table")
        .clone();
    let mut section = section;
    for (k, vs) in values {
        let v = match vs.as_slice() {
            [one] if one == "true" || one == "false" => toml::Value::Boolean(one == "true"),
            [one] => toml::Value::String(one.clone()),
            many => toml::Value::Array(many.iter().cloned().map(toml::Value::String).collect()),
        };
        if GLOBAL.contains(&k.as_str()) {
            top.insert(k, v);
        } else {
            section.insert(k, v);
        }
    }
    top.insert(role.to_string(), toml::Value::Table(section));
    toml::to_string(&top).unwrap()
}
