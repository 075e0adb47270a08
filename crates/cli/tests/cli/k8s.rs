//! The Kubernetes manifests in `k8s/`: a kustomize base, the `direct-scaling` component and one overlay per
//! region. No API server runs here: every overlay is rendered with `kubectl kustomize` and the documents are
//! validated offline against the Kubernetes schemas with kubernetes-validate (strict), then checked for what a
//! schema cannot see:
//!
//! * every container has resources, a non-root read-only securityContext and (outside Jobs) probes on a port
//!   it declares;
//! * every ferry container's arguments, variables and config file are accepted by the real binary
//!   (`ferry check-config --role <role>`, secrets replaced by test values), and terminationGracePeriodSeconds
//!   exceeds the shutdown deadline those settings give;
//! * the scaling mode is consistent: with the worker HPA the autoscaler's actuator is "metrics" and the HPA
//!   follows this region's `ferry_autoscaler_desired_workers` within the policy's bounds, with explicit
//!   behavior; without it (components/direct-scaling) the actuator is "kubernetes" and RBAC lets it scale;
//! * secrets are only referenced, network policies deny ingress by default, both PDBs select pods, and the
//!   prometheus-adapter rules serve the metrics the HPAs ask for.
//!
//! Tools: kubectl (with kustomize v5) on PATH; kubernetes-validate in `$FERRY_TOOLS_DIR/kubernetes-validate`
//! or `target/tools/kubernetes-validate` (scripts/test.sh installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

use crate::support::manifests::{
    config_with_flags, role_env_names, scalar, setting, shutdown_deadline_ms,
};
use crate::support::{read, repo};

const KUBERNETES_VERSION: &str = "1.31.0";

/// A Python tool of scripts/test.sh: `$FERRY_TOOLS_DIR/<name>/bin/<name>`, else under target/tools.
fn tool(name: &str) -> PathBuf {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("FERRY_TOOLS_DIR") {
        tried.push(PathBuf::from(dir).join(name).join("bin").join(name));
    }
    tried.push(
        repo()
            .join("target/tools")
            .join(name)
            .join("bin")
            .join(name),
    );
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("{name} not found (looked at {tried:?}): run scripts/test.sh, which installs it")
        })
}

/// `kubectl kustomize <dir>`.
fn render(rel: &str) -> String {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(rel))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "kubectl is not on PATH: install kubectl (it bundles kustomize v5; Debian/Ubuntu package `kubectl` \
             from the Kubernetes apt repository) so the k8s/ overlays can be rendered"
        ),
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {rel} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(text: &str) -> Vec<Value> {
    // Documents are separated by `---` lines (kubectl kustomize writes exactly that).
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_norway::from_str(&cur).expect("YAML document");
            if !v.is_null() {
                docs.push(v);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs
}

fn overlays() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo().join("k8s/overlays"))
        .expect("k8s/overlays")
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| format!("k8s/overlays/{}", e.file_name().to_string_lossy()))
        .collect();
    out.sort();
    for want in ["k8s/overlays/eu-west", "k8s/overlays/us-east"] {
        assert!(out.iter().any(|o| o == want), "{want} is missing");
    }
    out
}

/// Every overlay, rendered once per test.
fn rendered() -> Vec<(String, Vec<Value>)> {
    overlays()
        .into_iter()
        .map(|o| {
            let docs = documents(&render(&o));
            (o, docs)
        })
        .collect()
}

fn kind_name(d: &Value) -> (&str, &str) {
    (
        d["kind"].as_str().unwrap_or(""),
        d["metadata"]["name"].as_str().unwrap_or(""),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind_name(d) == (kind, name))
}

fn get<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(docs, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    seq(v).iter().map(scalar).collect()
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected an integer, got {v:?}"))
}

/// (overlay, workload kind/name, pod spec) of every Deployment and Job.
fn pod_specs(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "Job")))
        .map(|d| {
            let (k, n) = kind_name(d);
            (format!("{k}/{n}"), d["spec"]["template"]["spec"].clone())
        })
        .collect()
}

/// The workload of one ferry role (the container's first argument).
fn role_container<'a>(docs: &'a [Value], role: &str) -> Vec<(&'a Value, &'a Value)> {
    let mut out = Vec::new();
    for d in docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "Job")))
    {
        if let Some(cs) = d["spec"]["template"]["spec"]["containers"].as_sequence() {
            for c in cs {
                if strings(&c["args"]).first().map(String::as_str) == Some(role) {
                    out.push((d, c));
                }
            }
        }
    }
    out
}

/// The data of the ConfigMap file a container sees at `path` (through a configMap volume).
fn mounted_file(docs: &[Value], pod: &Value, container: &Value, path: &str) -> String {
    for m in seq(&container["volumeMounts"]) {
        let mount = m["mountPath"].as_str().unwrap();
        let key = match m["subPath"].as_str() {
            Some(sub) if mount == path => sub.to_string(),
            None if path.starts_with(&format!("{mount}/")) => path[mount.len() + 1..].to_string(),
            _ => continue,
        };
        let vol = seq(&pod["volumes"])
            .into_iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("volume {:?} is not defined", m["name"]));
        let cm = vol["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: not a configMap volume"));
        return get(docs, "ConfigMap", cm)["data"][key.as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {cm} has no key {key}"))
            .to_string();
    }
    panic!("nothing is mounted at {path}")
}

// ---- the real binary -------------------------------------------------------------------------------------------

/// Which Redis key the Secrets hold: `redis-urls` (standalone shards) or `redis-cluster` (a Redis Cluster).
/// The manifests read both, each `optional`, so a pod gets exactly the one the Secret has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RedisSecret {
    Standalone,
    Cluster,
}

/// Stand-ins for the keys of the referenced Secrets; `None` for an optional key the Secret does not hold.
fn secret_value(name: &str, key: &str, redis: RedisSecret) -> Option<String> {
    Some(match (name, key) {
        (_, "jwt-secret") => "test-jwt-secret-0123456789abcdef0123456789".into(),
        (_, "database-url") => "postgres://ferry:test@postgres:5432/ferry".into(),
        (_, "redis-urls") if redis == RedisSecret::Standalone => {
            "redis://redis-0:6379,redis://redis-1:6379".into()
        }
        (_, "redis-cluster") if redis == RedisSecret::Cluster => {
            "redis://redis-cluster-0:6379,redis://redis-cluster-1:6379".into()
        }
        (_, "redis-urls" | "redis-cluster") => return None,
        other => panic!("secretKeyRef {other:?} has no test value"),
    })
}

/// The container's environment as the pod would see it (secrets replaced by test values, Redis as `redis`).
fn container_env(docs: &[Value], c: &Value, redis: RedisSecret) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in seq(&c["env"]) {
        let name = scalar(&e["name"]);
        let value = if let Some(v) = e.get("value") {
            scalar(v)
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            let key = r["key"].as_str().unwrap();
            match secret_value(r["name"].as_str().unwrap(), key, redis) {
                Some(v) => v,
                None => {
                    assert_eq!(
                        r["optional"].as_bool(),
                        Some(true),
                        "env {name}: {key} is absent from one kind of Secret, so it must be optional"
                    );
                    continue;
                }
            }
        } else if let Some(r) = e["valueFrom"].get("configMapKeyRef") {
            scalar(
                &get(docs, "ConfigMap", r["name"].as_str().unwrap())["data"]
                    [r["key"].as_str().unwrap()],
            )
        } else if e["valueFrom"].get("fieldRef").is_some() {
            "pod-0".into()
        } else {
            panic!("env {name}: unsupported source {e:?}")
        };
        // `$(NAME)` refers to a variable listed earlier, as Kubernetes expands it.
        let value = env
            .iter()
            .fold(value, |v, (k, earlier): (&String, &String)| {
                v.replace(&format!("$({k})"), earlier)
            });
        env.insert(name, value);
    }
    assert!(
        c.get("envFrom").is_none(),
        "envFrom hides which variables a container gets: list them"
    );
    env
}

/// `ferry check-config --role <role>` with exactly `env` (FERRY_CONFIG resolved to `file`) and the flags.
fn check_config(
    role: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    file: Option<&str>,
) -> String {
    let known = role_env_names(role);
    for k in env.keys().filter(|k| k.starts_with("FERRY_")) {
        assert!(known.contains(k), "ferry {role} does not read {k}");
    }
    for a in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let name = a.split('=').next().unwrap();
        let var = format!("FERRY_{}", name.replace('-', "_").to_ascii_uppercase());
        assert!(
            !env.contains_key(&var),
            "{role}: --{name} is set both as a flag and as {var}"
        );
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), config_with_flags(role, file, args)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_clear()
        .envs(env.iter().filter(|(k, _)| *k != "FERRY_CONFIG"))
        .arg("--config")
        .arg(tmp.path())
        .args(["check-config", "--role", role])
        .output()
        .expect("run ferry check-config");
    assert!(
        out.status.success(),
        "ferry check-config --role {role} refused args {args:?}, env {:?}, config file:\n{}\n{}",
        env.keys().collect::<Vec<_>>(),
        file.unwrap_or("(none)"),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The port a probe (or Service targetPort) means: a number, or the name of a container port.
fn resolve_port(c: &Value, port: &Value) -> i64 {
    match port {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(name) => seq(&c["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .map(|p| int(&p["containerPort"]))
            .unwrap_or_else(|| panic!("port {name} is not declared by container {:?}", c["name"])),
        other => panic!("port {other:?}"),
    }
}

// ---- tests -----------------------------------------------------------------------------------------------------

/// Validates every document of `file` (strict schemas); `expected` documents must each be reported as passed.
fn kubernetes_validate(file: &Path, expected: usize) {
    let out = Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate {}:\n{text}",
        file.display()
    );
    assert!(!text.contains("ERROR"), "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        expected,
        "kubernetes-validate did not check every document:\n{text}"
    );
}

#[test]
fn every_overlay_renders_to_valid_kubernetes_objects() {
    let dir = tempfile::tempdir().unwrap();
    for (i, rel) in std::iter::once("k8s/base".to_string())
        .chain(overlays())
        .enumerate()
    {
        let text = render(&rel);
        let docs = documents(&text);
        assert!(docs.len() > 10, "{rel}: only {} objects", docs.len());
        for d in &docs {
            let (kind, name) = kind_name(d);
            let ns = d["metadata"]["namespace"].as_str();
            assert!(
                kind == "Namespace" || ns == Some("ferry"),
                "{rel}: {kind}/{name} is in namespace {ns:?}, not ferry"
            );
        }
        let file = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        kubernetes_validate(&file, docs.len());
    }
    kubernetes_validate(&repo().join("k8s/base/prometheus-adapter-rules.yaml"), 1);
}

#[test]
fn every_container_is_hardened_and_probed() {
    for (overlay, docs) in rendered() {
        let configmaps: BTreeSet<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "ConfigMap")
            .map(|d| kind_name(d).1)
            .collect();
        for (workload, pod) in pod_specs(&docs) {
            let at = format!("{overlay}: {workload}");
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{at}: pod runAsNonRoot"
            );
            assert!(
                pod["terminationGracePeriodSeconds"].as_i64().is_some()
                    || workload.starts_with("Job/"),
                "{at}: set terminationGracePeriodSeconds"
            );
            for v in seq(&pod["volumes"]) {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    assert!(
                        configmaps.contains(cm),
                        "{at}: volume of missing ConfigMap {cm}"
                    );
                }
            }
            for c in seq(&pod["containers"])
                .iter()
                .chain(seq(&pod["initContainers"]).iter())
            {
                let at = format!("{at} container {}", scalar(&c["name"]));
                for (what, v) in [
                    ("requests", "cpu"),
                    ("requests", "memory"),
                    ("limits", "cpu"),
                    ("limits", "memory"),
                ] {
                    assert!(
                        !c["resources"][what][v].is_null(),
                        "{at}: resources.{what}.{v}"
                    );
                }
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["runAsNonRoot"].as_bool(),
                    Some(true),
                    "{at}: runAsNonRoot"
                );
                assert_ne!(sc["runAsUser"].as_i64(), Some(0), "{at}: runAsUser 0");
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{at}: allowPrivilegeEscalation"
                );
                assert_eq!(
                    sc["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{at}: readOnlyRootFilesystem"
                );
                assert_eq!(
                    strings(&sc["capabilities"]["drop"]),
                    ["ALL"],
                    "{at}: capabilities.drop"
                );
                let image = c["image"].as_str().unwrap();
                let tag = image
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .split_once(':')
                    .map(|(_, t)| t);
                assert!(
                    matches!(tag, Some(t) if t != "latest") || image.contains("@sha256:"),
                    "{at}: pin image {image}"
                );
                if workload.starts_with("Job/") {
                    continue;
                }
                for probe in ["livenessProbe", "readinessProbe"] {
                    let p = &c[probe];
                    assert!(!p["httpGet"].is_null(), "{at}: {probe} (httpGet)");
                    resolve_port(c, &p["httpGet"]["port"]);
                }
                assert_eq!(
                    c["livenessProbe"]["httpGet"]["path"].as_str(),
                    Some("/healthz"),
                    "{at}"
                );
                assert_eq!(
                    c["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/readyz"),
                    "{at}"
                );
            }
        }
        // Services point at ports their pods declare.
        for svc in docs.iter().filter(|d| d["kind"] == "Service") {
            let sel = svc["spec"]["selector"].as_mapping().expect("selector");
            let targets: Vec<&Value> = docs
                .iter()
                .filter(|d| d["kind"] == "Deployment")
                .filter(|d| {
                    let labels = &d["spec"]["template"]["metadata"]["labels"];
                    sel.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v)
                })
                .collect();
            assert_eq!(
                targets.len(),
                1,
                "{overlay}: Service {} selects {} Deployments",
                kind_name(svc).1,
                targets.len()
            );
            let c = &targets[0]["spec"]["template"]["spec"]["containers"][0];
            for p in seq(&svc["spec"]["ports"]) {
                resolve_port(c, &p["targetPort"]);
            }
        }
    }
}

#[test]
fn ferry_containers_are_accepted_by_the_binary_and_drain_in_time() {
    for (overlay, docs) in rendered() {
        let mut seen = BTreeSet::new();
        for role in ["gateway", "balancer", "worker", "migrate"] {
            for (workload, c) in role_container(&docs, role) {
                let at = format!("{overlay}: {}", kind_name(workload).1);
                let pod = &workload["spec"]["template"]["spec"];
                let args = strings(&c["args"]);
                // With a Secret for a Redis Cluster too: the role reads FERRY_REDIS_CLUSTER instead.
                if role != "migrate" {
                    let env = container_env(&docs, c, RedisSecret::Cluster);
                    assert!(env.contains_key("FERRY_REDIS_CLUSTER"), "{at}");
                    assert!(!env.contains_key("FERRY_REDIS_URLS"), "{at}");
                    let file = env
                        .get("FERRY_CONFIG")
                        .map(|p| mounted_file(&docs, pod, c, p));
                    check_config(role, &args[1..], &env, file.as_deref());
                }
                let env = container_env(&docs, c, RedisSecret::Standalone);
                for secret in [
                    "FERRY_JWT_SECRET",
                    "FERRY_DATABASE_URL",
                    "FERRY_REDIS_URLS",
                    "FERRY_REDIS_CLUSTER",
                ] {
                    if env.contains_key(secret) {
                        let e = seq(&c["env"])
                            .into_iter()
                            .find(|e| e["name"] == secret)
                            .unwrap();
                        assert!(
                            e.get("value").is_none(),
                            "{at}: {secret} must come from a Secret"
                        );
                    }
                }
                let file = env
                    .get("FERRY_CONFIG")
                    .map(|p| mounted_file(&docs, pod, c, p));
                let out = check_config(role, &args[1..], &env, file.as_deref());
                seen.insert(role);
                if role == "migrate" {
                    continue;
                }
                let deadline = shutdown_deadline_ms(role, &out);
                let grace = int(&pod["terminationGracePeriodSeconds"]) as u64 * 1000;
                assert!(
                    grace > deadline,
                    "{at}: terminationGracePeriodSeconds ({grace} ms) must exceed the shutdown deadline ({deadline} ms)"
                );
                // The probes and the Service hit the port the process listens on, on all interfaces.
                let listen = setting(
                    &out,
                    if role == "gateway" {
                        "listen"
                    } else {
                        "admin-listen"
                    },
                )
                .unwrap();
                assert!(listen.starts_with("0.0.0.0:"), "{at}: listens on {listen}");
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert_eq!(
                        resolve_port(c, &c[probe]["httpGet"]["port"]),
                        port_of(&listen),
                        "{at}: {probe} port"
                    );
                }
            }
        }
        assert_eq!(
            seen,
            BTreeSet::from(["gateway", "balancer", "worker", "migrate"]),
            "{overlay}"
        );
    }
}

/// Structural checks of a regions file: (region name, queues, min, max, actuator table) per region.
fn regions(text: &str) -> Vec<(String, Vec<String>, i64, i64, toml::Table)> {
    let t: toml::Table = text.parse().expect("regions.toml is TOML");
    let mut out = Vec::new();
    for r in t["regions"].as_array().expect("[[regions]]") {
        let name = r["name"].as_str().expect("name").to_string();
        let list = |k: &str| -> Vec<String> {
            r[k].as_array()
                .unwrap_or_else(|| panic!("{name}: {k}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert!(
            list("redis")
                .iter()
                .all(|u| u.starts_with("redis://") || u.starts_with("rediss://"))
        );
        let queues = list("queues");
        assert!(!queues.is_empty());
        let p = r["policy"].as_table().expect("[regions.policy]");
        let n = |k: &str| {
            p.get(k)
                .and_then(toml::Value::as_integer)
                .unwrap_or_else(|| panic!("{name}: policy.{k}"))
        };
        let (min, max) = (n("min-workers"), n("max-workers"));
        assert!(
            0 <= min && min <= max,
            "{name}: min-workers {min} max-workers {max}"
        );
        assert!(n("target-drain-seconds") > 0 && n("backlog-per-worker") > 0);
        assert!(n("scale-down-stabilization-seconds") >= 0);
        assert!((0.0..1.0).contains(&p["tolerance"].as_float().expect("tolerance")));
        let a = r["actuator"]
            .as_table()
            .expect("[regions.actuator]")
            .clone();
        assert!(
            matches!(a["kind"].as_str(), Some("metrics" | "kubernetes" | "local")),
            "{name}: actuator kind {:?}",
            a["kind"]
        );
        out.push((name, queues, min, max, a));
    }
    out
}

/// `ferry check-config --role autoscaler` on the container's arguments with the mounted regions file.
fn check_autoscaler(overlay: &str, args: &[String], env: &BTreeMap<String, String>, regions: &str) {
    let known = role_env_names("autoscaler");
    for k in env.keys().filter(|k| k.starts_with("FERRY_")) {
        assert!(
            known.contains(k),
            "{overlay}: ferry autoscaler does not read {k}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regions.toml");
    let config = dir.path().join("ferry.toml");
    let run = |text: &str| {
        std::fs::write(&file, text).unwrap();
        let mut args = args[1..].to_vec();
        let i = args
            .iter()
            .position(|a| a == "--regions")
            .expect("--regions");
        args[i + 1] = file.display().to_string();
        std::fs::write(&config, config_with_flags("autoscaler", None, &args)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env_clear()
            .envs(env)
            .arg("--config")
            .arg(&config)
            .args(["check-config", "--role", "autoscaler"])
            .output()
            .unwrap()
    };
    let out = run(regions);
    assert!(
        out.status.success(),
        "{overlay}: ferry check-config --role autoscaler refused {args:?} with regions.toml:\n{regions}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scaling_mode_is_consistent_in_every_overlay() {
    let mut modes = BTreeSet::new();
    for (overlay, docs) in rendered() {
        let autoscalers = role_container(&docs, "autoscaler");
        assert_eq!(autoscalers.len(), 1, "{overlay}: one autoscaler");
        let (dep, c) = autoscalers[0];
        assert_eq!(
            int(&dep["spec"]["replicas"]),
            1,
            "{overlay}: one autoscaler replica"
        );
        let args = strings(&c["args"]);
        let flag = |f: &str| -> String {
            let i = args
                .iter()
                .position(|a| a == f)
                .unwrap_or_else(|| panic!("{overlay}: autoscaler {f}"));
            args[i + 1].clone()
        };
        let admin = flag("--admin-listen");
        assert_eq!(admin, "0.0.0.0:9465");
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                resolve_port(c, &c[probe]["httpGet"]["port"]),
                9465,
                "{overlay}: autoscaler {probe}"
            );
        }
        let pod = &dep["spec"]["template"]["spec"];
        let file = mounted_file(&docs, pod, c, &flag("--regions"));
        check_autoscaler(
            &overlay,
            &args,
            &container_env(&docs, c, RedisSecret::Standalone),
            &file,
        );
        let rs = regions(&file);
        assert_eq!(
            rs.len(),
            1,
            "{overlay}: one region per overlay (the direct-scaling component edits the last)"
        );
        let (region, queues, min, max, actuator) = &rs[0];
        assert_eq!(
            Some(region.as_str()),
            overlay.rsplit('/').next(),
            "{overlay}: the region is named after its overlay"
        );
        // The workers consume the region's queues.
        let (worker, wc) = role_container(&docs, "worker")
            .into_iter()
            .find(|(d, _)| kind_name(d).1 == "ferry-worker")
            .expect("ferry-worker");
        let wargs = strings(&wc["args"]);
        let i = wargs
            .iter()
            .position(|a| a == "--queues")
            .expect("worker --queues");
        let wq: BTreeSet<&str> = wargs[i + 1].split(',').collect();
        assert_eq!(
            wq,
            queues.iter().map(String::as_str).collect(),
            "{overlay}: worker queues"
        );
        assert!(
            worker["spec"].get("replicas").is_none(),
            "{overlay}: ferry-worker's replicas belong to the scaler"
        );
        assert_eq!(
            int(&get(&docs, "Deployment", "ferry-worker-spill")["spec"]["replicas"]),
            0
        );

        match find(&docs, "HorizontalPodAutoscaler", "ferry-worker") {
            Some(hpa) => {
                modes.insert("metrics");
                assert_eq!(
                    actuator["kind"].as_str(),
                    Some("metrics"),
                    "{overlay}: the HPA scales, the autoscaler only exports"
                );
                let s = &hpa["spec"];
                assert_eq!(s["scaleTargetRef"]["name"].as_str(), Some("ferry-worker"));
                assert_eq!(
                    int(&s["minReplicas"]),
                    (*min).max(1),
                    "{overlay}: minReplicas = policy min-workers"
                );
                assert_eq!(
                    int(&s["maxReplicas"]),
                    *max,
                    "{overlay}: maxReplicas = policy max-workers"
                );
                let m = seq(&s["metrics"]);
                assert_eq!(
                    m.len(),
                    1,
                    "{overlay}: the worker HPA follows only the autoscaler"
                );
                let e = &m[0]["external"];
                assert_eq!(m[0]["type"].as_str(), Some("External"));
                assert_eq!(
                    e["metric"]["name"].as_str(),
                    Some("ferry_autoscaler_desired_workers")
                );
                let sel = &e["metric"]["selector"]["matchLabels"];
                assert_eq!(
                    sel["region"].as_str(),
                    Some(region.as_str()),
                    "{overlay}: HPA region label"
                );
                // The pool's decision (the largest of its queues'), not one queue's.
                assert!(!queues.is_empty());
                assert_eq!(
                    sel["queue"].as_str(),
                    Some("all"),
                    "{overlay}: HPA queue label"
                );
                assert_eq!(e["target"]["type"].as_str(), Some("AverageValue"));
                assert_eq!(
                    scalar(&e["target"]["averageValue"]),
                    "1",
                    "replicas = desired workers"
                );
                let b = &s["behavior"];
                assert_eq!(int(&b["scaleUp"]["stabilizationWindowSeconds"]), 0);
                let pols = |d: &str| -> BTreeSet<(String, i64, i64)> {
                    seq(&b[d]["policies"])
                        .iter()
                        .map(|p| {
                            (
                                scalar(&p["type"]),
                                int(&p["value"]),
                                int(&p["periodSeconds"]),
                            )
                        })
                        .collect()
                };
                assert_eq!(
                    pols("scaleUp"),
                    BTreeSet::from([("Pods".into(), 10, 15), ("Percent".into(), 100, 15)])
                );
                assert_eq!(int(&b["scaleDown"]["stabilizationWindowSeconds"]), 300);
                assert_eq!(
                    pols("scaleDown"),
                    BTreeSet::from([("Percent".into(), 10, 60)])
                );
            }
            None => {
                modes.insert("kubernetes");
                assert_eq!(
                    actuator["kind"].as_str(),
                    Some("kubernetes"),
                    "{overlay}: no worker HPA, so the autoscaler scales"
                );
                assert_eq!(
                    actuator["namespace"].as_str(),
                    worker["metadata"]["namespace"].as_str()
                );
                assert_eq!(actuator["deployment"].as_str(), Some("ferry-worker"));
                let spill = actuator["spill-deployment"]
                    .as_str()
                    .expect("spill-deployment");
                get(&docs, "Deployment", spill);
                // RBAC: the autoscaler's service account may scale both deployments and annotate pods.
                let sa = pod["serviceAccountName"]
                    .as_str()
                    .expect("autoscaler serviceAccountName");
                let binding = docs
                    .iter()
                    .find(|d| {
                        d["kind"] == "RoleBinding"
                            && seq(&d["subjects"]).iter().any(|s| {
                                s["kind"] == "ServiceAccount" && s["name"].as_str() == Some(sa)
                            })
                    })
                    .unwrap_or_else(|| panic!("{overlay}: no RoleBinding for {sa}"));
                let role = get(&docs, "Role", binding["roleRef"]["name"].as_str().unwrap());
                let allows = |res: &str, verb: &str, name: Option<&str>| {
                    seq(&role["rules"]).iter().any(|r| {
                        strings(&r["resources"]).iter().any(|x| x == res)
                            && strings(&r["verbs"]).iter().any(|x| x == verb)
                            && (r.get("resourceNames").is_none()
                                || name.is_some_and(|n| {
                                    strings(&r["resourceNames"]).iter().any(|x| x == n)
                                }))
                    })
                };
                for dep in ["ferry-worker", spill] {
                    for verb in ["get", "update", "patch"] {
                        assert!(
                            allows("deployments/scale", verb, Some(dep)),
                            "{overlay}: {verb} deployments/scale {dep}"
                        );
                    }
                    assert!(
                        allows("deployments", "get", Some(dep)),
                        "{overlay}: get deployments {dep}"
                    );
                }
                for verb in ["get", "list", "patch"] {
                    assert!(allows("pods", verb, None), "{overlay}: {verb} pods");
                }
            }
        }

        // Gateways: CPU 70 % and 5,000 WebSockets per pod.
        let g = &get(&docs, "HorizontalPodAutoscaler", "ferry-gateway")["spec"];
        assert_eq!(g["scaleTargetRef"]["name"].as_str(), Some("ferry-gateway"));
        let metrics = seq(&g["metrics"]);
        assert!(metrics.iter().any(|m| m["resource"]["name"] == "cpu"
            && int(&m["resource"]["target"]["averageUtilization"]) == 70));
        assert!(
            metrics
                .iter()
                .any(|m| m["pods"]["metric"]["name"] == "ferry_ws_connections"
                    && scalar(&m["pods"]["target"]["averageValue"]) == "5000")
        );
        assert!(!g["behavior"].is_null(), "{overlay}: gateway HPA behavior");
    }
    assert_eq!(
        modes,
        BTreeSet::from(["metrics", "kubernetes"]),
        "one overlay per scaling mode at least"
    );
}

#[test]
fn prometheus_adapter_serves_the_hpa_metrics() {
    let docs = documents(&read("k8s/base/prometheus-adapter-rules.yaml"));
    let config: Value = serde_norway::from_str(
        docs[0]["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml"),
    )
    .unwrap();
    let served = |section: &str| -> BTreeSet<String> {
        seq(&config[section])
            .iter()
            .map(|r| {
                let q = r["metricsQuery"].as_str().expect("metricsQuery");
                assert!(
                    q.contains("<<.Series>>") && q.contains("<<.LabelMatchers>>"),
                    "{q}"
                );
                let name = r["name"]["as"].as_str().expect("name.as").to_string();
                assert!(
                    r["seriesQuery"].as_str().unwrap().starts_with(&name),
                    "{name}: seriesQuery"
                );
                name
            })
            .collect()
    };
    let (pods, external) = (served("rules"), served("externalRules"));
    for (overlay, docs) in rendered() {
        for hpa in docs
            .iter()
            .filter(|d| d["kind"] == "HorizontalPodAutoscaler")
        {
            for m in seq(&hpa["spec"]["metrics"]) {
                match m["type"].as_str() {
                    Some("Pods") => assert!(
                        pods.contains(m["pods"]["metric"]["name"].as_str().unwrap()),
                        "{overlay}"
                    ),
                    Some("External") => {
                        assert!(
                            external.contains(m["external"]["metric"]["name"].as_str().unwrap()),
                            "{overlay}"
                        )
                    }
                    _ => {}
                }
            }
        }
    }
    // Both are catalogued metrics or the autoscaler's own.
    let catalogue = read("docs/metrics.md");
    assert!(catalogue.contains("`ferry_ws_connections`"));
    assert!(external.contains("ferry_autoscaler_desired_workers"));
}

#[test]
fn secrets_are_only_referenced_and_ingress_is_denied_by_default() {
    // No Secret object anywhere under k8s/, rendered or not.
    let mut files = Vec::new();
    let mut stack = vec![repo().join("k8s")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 10);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for d in documents(&text) {
            assert_ne!(
                d["kind"].as_str(),
                Some("Secret"),
                "{}: a Secret in the repository",
                f.display()
            );
            assert!(
                d.get("secretGenerator").is_none(),
                "{}: secretGenerator",
                f.display()
            );
        }
    }
    for (overlay, docs) in rendered() {
        assert!(
            docs.iter().all(|d| d["kind"] != "Secret"),
            "{overlay}: renders a Secret"
        );
        let refs: BTreeSet<(String, String)> = pod_specs(&docs)
            .iter()
            .flat_map(|(_, pod)| seq(&pod["containers"]))
            .flat_map(|c| seq(&c["env"]))
            .filter_map(|e| e["valueFrom"].get("secretKeyRef").cloned())
            .map(|r| (scalar(&r["name"]), scalar(&r["key"])))
            .collect();
        let allowed: BTreeSet<(String, String)> = [
            ("ferry-secrets", "jwt-secret"),
            ("ferry-secrets", "database-url"),
            ("ferry-secrets", "redis-urls"),
            ("ferry-secrets", "redis-cluster"),
            ("ferry-spill-redis", "redis-urls"),
            ("ferry-spill-redis", "redis-cluster"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into();
        assert!(
            refs.is_subset(&allowed),
            "{overlay}: unexpected secret references {refs:?}"
        );

        // NetworkPolicies: a default deny; the gateway's and the balancer's 8080 open; anything else only from
        // `monitoring`, but for the autoscaler's admin port, which gateway pods read too (GET /v1/autoscaler).
        let policies: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "NetworkPolicy")
            .collect();
        assert!(
            policies.iter().any(|p| p["spec"]["podSelector"]
                .as_mapping()
                .is_none_or(|m| m.is_empty())
                && strings(&p["spec"]["policyTypes"]) == ["Ingress"]
                && p["spec"]["ingress"].is_null()),
            "{overlay}: no default-deny ingress policy"
        );
        for p in &policies {
            let name = kind_name(p).1;
            for rule in seq(&p["spec"]["ingress"]) {
                let ports: Vec<i64> = seq(&rule["ports"])
                    .iter()
                    .map(|x| int(&x["port"]))
                    .collect();
                assert!(!ports.is_empty(), "{overlay}: {name} allows every port");
                if rule.get("from").is_none() {
                    assert_eq!(
                        ports,
                        [8080],
                        "{overlay}: {name} opens {ports:?} to everyone"
                    );
                    let component =
                        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                            .as_str();
                    assert!(
                        matches!(component, Some("gateway" | "balancer")),
                        "{overlay}: {name}: only gateways and balancers take traffic from anywhere"
                    );
                } else {
                    let component =
                        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                            .as_str();
                    for f in seq(&rule["from"]) {
                        let gateways = f["namespaceSelector"].is_null()
                            && f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                                .as_str()
                                == Some("gateway");
                        if gateways {
                            assert_eq!(
                                (component, ports.as_slice()),
                                (Some("autoscaler"), [9465].as_slice()),
                                "{overlay}: {name}: gateway pods reach only the autoscaler's admin port"
                            );
                            continue;
                        }
                        assert_eq!(
                            f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                                .as_str(),
                            Some("monitoring"),
                            "{overlay}: {name} admits {f:?}"
                        );
                    }
                }
            }
        }

        // Disruption budgets select the pods they protect.
        for target in ["ferry-gateway", "ferry-balancer", "ferry-worker"] {
            let dep = get(&docs, "Deployment", target);
            let labels = &dep["spec"]["template"]["metadata"]["labels"];
            let pdb = docs
                .iter()
                .filter(|d| d["kind"] == "PodDisruptionBudget")
                .find(|d| {
                    d["spec"]["selector"]["matchLabels"]
                        .as_mapping()
                        .is_some_and(|m| m.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v))
                });
            assert!(
                pdb.is_some(),
                "{overlay}: no PodDisruptionBudget for {target}"
            );
        }
    }
}

#[test]
fn checkov_passes_with_only_the_documented_skips() {
    // Every skipped check in k8s/.checkov.yaml has its reason in the comment right above it.
    let config = read("k8s/.checkov.yaml");
    let lines: Vec<&str> = config.lines().collect();
    let mut skips = 0;
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("- CKV_") {
            skips += 1;
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "k8s/.checkov.yaml: {} has no reason above it",
                l.trim()
            );
        }
    }
    assert!(skips > 0);
    // Not tempfile's default `.tmpXXXX`: checkov skips hidden directories.
    let dir = tempfile::Builder::new()
        .prefix("ferry-checkov-")
        .tempdir()
        .unwrap();
    for o in overlays() {
        let name = o.rsplit('/').next().unwrap().to_string();
        std::fs::write(dir.path().join(format!("{name}.yaml")), render(&o)).unwrap();
    }
    let out = Command::new(tool("checkov"))
        .arg("-d")
        .arg(dir.path())
        .arg("--config-file")
        .arg(repo().join("k8s/.checkov.yaml"))
        .args(["--framework", "kubernetes", "--skip-download", "--quiet"])
        .output()
        .expect("run checkov");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "checkov found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("Passed checks: "))
        .unwrap_or_else(|| panic!("no checkov summary:\n{text}"));
    let passed: u32 = summary["Passed checks: ".len()..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        passed > 100 && summary.contains("Failed checks: 0,"),
        "{summary}"
    );
}
