//! The container artefacts: `deploy/Dockerfile`, `.dockerignore` and the local cluster `deploy/compose.yaml`
//! (with `deploy/regions.compose.toml`). No Docker engine runs here, so the files are parsed and checked:
//!
//! * the Dockerfile: stages, pinned base images, no remote `ADD`, a runtime stage with only ca-certificates, a
//!   numeric non-root `USER`, the binary at /usr/local/bin/ferry, `ENTRYPOINT ["ferry"]`, the ports, OCI labels;
//! * compose: every `depends_on` target exists (with a condition it can meet), published ports are unique, no
//!   literal secrets, and every ferry service's command and environment are accepted by the real binary
//!   (`ferry check-config --role <role>`, flags passed as a config file), with a `stop_grace_period` longer than
//!   the role's own shutdown deadline; the autoscaler (a role still being written) gets structural checks;
//! * the Prometheus config inlined in compose passes `promtool check config` with `deploy/prometheus/alerts.yml`.

use std::collections::{BTreeMap, BTreeSet};

use std::process::Command;

use serde_norway::Value;

use crate::support::manifests::{
    config_with_flags, role_env_names, scalar, setting, shutdown_deadline_ms,
};
use crate::support::{read, repo};

// ---- Dockerfile ------------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Instr {
    op: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instrs: Vec<Instr>,
}

/// Instructions of a Dockerfile: comments dropped, `\` continuations joined, grouped by `FROM`.
fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let op = op.to_ascii_uppercase();
        let args = args.trim().to_string();
        if op == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                other => panic!("cannot read FROM {other:?}"),
            };
            stages.push(Stage {
                image: words[0].to_string(),
                name,
                instrs: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("{op} before the first FROM"));
            stage.instrs.push(Instr { op, args });
        }
    }
    stages
}

/// `name:tag` (not `latest`) or `name@sha256:...`.
fn pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    matches!(last.split_once(':'), Some((_, tag)) if !tag.is_empty() && tag != "latest" && !tag.contains('$'))
}

fn dockerfile() -> Vec<Stage> {
    dockerfile_stages(&read("deploy/Dockerfile"))
}

#[test]
fn dockerfile_parser_reads_stages_and_continuations() {
    let s = dockerfile_stages(
        "# c\nFROM a:1 AS b\nRUN x \\\n  # inner\n  && y\nFROM --platform=linux/amd64 c:2\nUSER 1\n",
    );
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name.as_deref(), Some("b"));
    assert_eq!(s[0].instrs[0].args, "x  && y");
    assert_eq!(s[1].image, "c:2");
    assert!(pinned("rust:1.95-bookworm") && pinned("registry.local:5000/x/y:1.2"));
    assert!(!pinned("debian") && !pinned("debian:latest") && !pinned("registry.local:5000/x"));
}

#[test]
fn dockerfile_stages_are_pinned_and_build_the_ferry_binary() {
    let stages = dockerfile();
    assert!(
        stages.len() >= 2,
        "a multi-stage build is expected, found {} stage(s)",
        stages.len()
    );
    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    for (i, s) in stages.iter().enumerate() {
        let earlier = stages[..i]
            .iter()
            .any(|p| p.name.as_deref() == Some(&s.image));
        assert!(
            earlier || pinned(&s.image),
            "FROM {}: pin the base image by tag (not latest) or digest",
            s.image
        );
        for ins in &s.instrs {
            let a = ins.args.to_ascii_lowercase();
            assert!(
                !(ins.op == "ADD" && (a.contains("http://") || a.contains("https://"))),
                "ADD of a remote URL: {}",
                ins.args
            );
            if let Some(from) = ins
                .args
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--from="))
            {
                assert!(
                    names.contains(&from),
                    "COPY --from={from}: no such stage ({names:?})"
                );
            }
        }
    }
    let builder = &stages[0];
    assert_eq!(builder.image, "rust:1.95-bookworm");
    assert!(
        builder.instrs.iter().any(|i| i.op == "RUN"
            && i.args
                .contains("cargo build --release --locked -p ferry-cli")),
        "the builder runs `cargo build --release --locked -p ferry-cli`"
    );
}

#[test]
fn dockerfile_runtime_is_minimal_and_non_root() {
    let stages = dockerfile();
    let rt = stages.last().expect("a stage");
    assert_eq!(rt.image, "debian:bookworm-slim");
    fn of<'a>(rt: &'a Stage, op: &'a str) -> impl Iterator<Item = &'a Instr> + 'a {
        rt.instrs.iter().filter(move |i| i.op == op)
    }

    // Only ca-certificates is installed.
    for run in of(rt, "RUN") {
        let words: Vec<&str> = run.args.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            if *w == "install" && i > 0 && words[i - 1].ends_with("apt-get") {
                let pkgs: Vec<&str> = words[i + 1..]
                    .iter()
                    .take_while(|w| !matches!(**w, "&&" | "||" | ";"))
                    .filter(|w| !w.starts_with('-'))
                    .copied()
                    .collect();
                assert_eq!(pkgs, ["ca-certificates"], "runtime packages: {}", run.args);
            }
        }
    }

    // The last USER: numeric, not root, the uid the user was created with.
    let user = of(rt, "USER")
        .last()
        .expect("the runtime stage sets USER")
        .args
        .clone();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap_or_else(|_| {
        panic!("USER {user}: use a numeric uid (Kubernetes runAsNonRoot needs one)")
    });
    assert_ne!(uid, 0, "USER must not be root");
    assert_eq!(uid, 10001);
    assert!(
        of(rt, "RUN").any(|r| r.args.contains(&format!("--uid {uid}"))),
        "the runtime stage creates the user with uid {uid}"
    );

    let entry = of(rt, "ENTRYPOINT")
        .last()
        .expect("ENTRYPOINT")
        .args
        .clone();
    let entry: Vec<String> = serde_json::from_str(&entry)
        .unwrap_or_else(|_| panic!("ENTRYPOINT {entry}: use the exec (JSON) form"));
    assert_eq!(entry, ["ferry"]);
    assert!(
        of(rt, "COPY")
            .any(|c| c.args.starts_with("--from=") && c.args.ends_with("/usr/local/bin/ferry")),
        "the binary is copied from the builder to /usr/local/bin/ferry"
    );

    let exposed: BTreeSet<&str> = of(rt, "EXPOSE")
        .flat_map(|e| e.args.split_whitespace())
        .collect();
    for port in ["8080", "9464", "9465"] {
        assert!(exposed.contains(port), "EXPOSE {port} (found {exposed:?})");
    }
    let labels: String = of(rt, "LABEL")
        .map(|l| l.args.clone())
        .collect::<Vec<_>>()
        .join(" ");
    for key in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.licenses",
    ] {
        assert!(labels.contains(key), "LABEL {key} is missing");
    }
}

#[test]
fn dockerignore_drops_build_output_and_keeps_sources() {
    let lines: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target", "node_modules", ".git"] {
        assert!(lines.contains(must), ".dockerignore must exclude {must}/");
    }
    for keep in ["Cargo.toml", "Cargo.lock", "crates", "loadtest", "*", "**"] {
        assert!(
            !lines.contains(keep),
            ".dockerignore excludes {keep}, which the build needs"
        );
    }
}

// ---- compose ---------------------------------------------------------------------------------------------------

fn compose() -> Value {
    let mut v: Value =
        serde_norway::from_str(&read("deploy/compose.yaml")).expect("compose.yaml is YAML");
    // A merged anchor may itself hold `<<` (gateway-2 ← gateway-1 ← x-ferry-image): merge until none is left.
    for _ in 0..8 {
        if !has_merge_key(&v) {
            return v;
        }
        v.apply_merge().expect("merge keys");
    }
    panic!("compose.yaml: merge keys nested too deep");
}

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m
            .iter()
            .any(|(k, v)| k.as_str() == Some("<<") || has_merge_key(v)),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        _ => false,
    }
}

fn services(c: &Value) -> BTreeMap<String, Value> {
    c["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().expect("service name").to_string(), v.clone()))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().map(scalar).collect(),
        Value::Null => Vec::new(),
        other => vec![scalar(other)],
    }
}

/// Test values for the variables compose interpolates.
fn test_vars() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("FERRY_DB_PASSWORD", "test-db-password"),
        (
            "FERRY_JWT_SECRET",
            "test-jwt-secret-0123456789abcdef0123456789",
        ),
    ])
}

/// Compose variable interpolation: `$$`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`.
fn interpolate(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {s}"));
            let expr = &r[..end];
            let name_end = expr.find([':', '-', '?']).unwrap_or(expr.len());
            let (name, modifier) = expr.split_at(name_end);
            let default = modifier
                .strip_prefix(":-")
                .or_else(|| modifier.strip_prefix('-'));
            match (vars.get(name), default) {
                (Some(v), _) => out.push_str(v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => panic!("${{{name}}} has no test value and no default"),
            }
            rest = &r[end + 1..];
        } else {
            panic!("bare $ in {s}: use ${{VAR}} or $$");
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn interpolation_follows_compose() {
    let vars = BTreeMap::from([("A", "1")]);
    assert_eq!(interpolate("x${A:?no}y$${B}", &vars), "x1y${B}");
    assert_eq!(interpolate("${B:-d}", &vars), "d");
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    let vars = test_vars();
    match &svc["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (scalar(k), interpolate(&scalar(v), &vars)))
            .collect(),
        Value::Sequence(s) => s
            .iter()
            .map(|kv| {
                let kv = scalar(kv);
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_string(), interpolate(v, &vars))
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment: {other:?}"),
    }
}

fn is_ferry(svc: &Value) -> bool {
    !svc["build"].is_null()
        || svc["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("ferry"))
}

/// `45s`, `1m30s`, `500ms` → milliseconds.
fn duration_ms(s: &str) -> u64 {
    let mut total = 0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().unwrap_or_else(|_| panic!("duration {s}"));
        num.clear();
        total += match c {
            'h' => n * 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                n
            }
            'm' => n * 60_000,
            's' => n * 1_000,
            _ => panic!("duration {s}"),
        };
    }
    assert!(num.is_empty(), "duration {s} lacks a unit");
    total
}

#[test]
fn compose_references_ports_and_secrets() {
    let c = compose();
    let svcs = services(&c);
    for want in [
        "redis",
        "postgres",
        "migrate",
        "gateway-1",
        "gateway-2",
        "worker-1",
        "worker-2",
        "autoscaler",
        "prometheus",
    ] {
        assert!(svcs.contains_key(want), "compose has no service {want}");
    }
    let mut host_ports = BTreeMap::new();
    for (name, svc) in &svcs {
        // Every service runs an image pinned by tag; ferry's own is built from deploy/Dockerfile.
        let image = svc["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no image"));
        if is_ferry(svc) {
            assert_eq!(
                svc["build"]["dockerfile"].as_str(),
                Some("deploy/Dockerfile"),
                "{name}"
            );
        } else {
            assert!(pinned(image), "{name}: pin {image} by tag");
        }
        if let Some(deps) = svc.get("depends_on") {
            let deps = deps
                .as_mapping()
                .unwrap_or_else(|| panic!("{name}: depends_on in the long form, with conditions"));
            for (dep, how) in deps {
                let dep = scalar(dep);
                let target = svcs
                    .get(&dep)
                    .unwrap_or_else(|| panic!("{name} depends on {dep}, which is not a service"));
                let cond = how["condition"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name} → {dep}: no condition"));
                match cond {
                    "service_healthy" => assert!(
                        target.get("healthcheck").is_some(),
                        "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                    ),
                    "service_completed_successfully" => assert_eq!(
                        target["restart"].as_str(),
                        Some("no"),
                        "{name} waits for {dep} to complete: {dep} must not restart"
                    ),
                    "service_started" => {}
                    other => panic!("{name} → {dep}: unknown condition {other}"),
                }
            }
        }
        for p in strings(&svc["ports"]) {
            let parts: Vec<&str> = p.split(':').collect();
            assert!(
                parts.len() >= 2,
                "{name}: publish {p} with an explicit host port"
            );
            let host = parts[..parts.len() - 1].join(":");
            if let Some(other) = host_ports.insert(host.clone(), name.clone()) {
                panic!("host port {host} is published by both {other} and {name}");
            }
        }
    }
    // depends_on has no cycle.
    fn visit(n: &str, svcs: &BTreeMap<String, Value>, path: &mut Vec<String>) {
        assert!(
            !path.iter().any(|p| p == n),
            "depends_on cycle: {path:?} → {n}"
        );
        path.push(n.to_string());
        if let Some(m) = svcs[n].get("depends_on").and_then(Value::as_mapping) {
            for d in m.keys() {
                visit(d.as_str().unwrap(), svcs, path);
            }
        }
        path.pop();
    }
    for n in svcs.keys() {
        visit(n, &svcs, &mut Vec::new());
    }

    // No literal secrets: passwords and the JWT secret come from interpolated variables.
    let secretish = ["PASSWORD", "SECRET", "DATABASE_URL"];
    for (name, svc) in &svcs {
        if let Value::Mapping(m) = &svc["environment"] {
            for (k, v) in m {
                let (k, v) = (scalar(k), scalar(v));
                if secretish.iter().any(|s| k.contains(s)) && !k.ends_with("_FILE") {
                    assert!(
                        v.contains("${") && v.contains(":?"),
                        "{name}: {k} must come from a required variable (${{VAR:?message}}), not a literal"
                    );
                }
            }
        }
    }
}

/// `ferry check-config --role <role>` with exactly `env` and the flags as a config file. The printed settings.
fn check_config(role: &str, args: &[String], env: &BTreeMap<String, String>) -> String {
    let known = role_env_names(role);
    for k in env.keys().filter(|k| k.starts_with("FERRY_")) {
        assert!(known.contains(k), "ferry {role} does not read {k}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config_with_flags(role, None, args)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_clear()
        .envs(env)
        .arg("--config")
        .arg(file.path())
        .args(["check-config", "--role", role])
        .output()
        .expect("run ferry check-config");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ferry check-config --role {role} refused args {args:?} env {:?}:\n{}",
        env.keys().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    // A setting given both as a flag and a variable is ambiguous to a reader.
    for a in args.iter().filter_map(|a| a.strip_prefix("--")) {
        let name = a.split('=').next().unwrap();
        let var = format!("FERRY_{}", name.replace('-', "_").to_ascii_uppercase());
        assert!(
            !env.contains_key(&var),
            "{role}: --{name} is set both as a flag and as {var}"
        );
    }
    stdout
}

#[test]
fn compose_ferry_services_are_accepted_by_the_binary() {
    let c = compose();
    let mut roles = BTreeSet::new();
    for (name, svc) in services(&c).iter().filter(|(_, s)| is_ferry(s)) {
        let command = strings(&svc["command"]);
        let (role, args) = command
            .split_first()
            .unwrap_or_else(|| panic!("{name}: no command"));
        roles.insert(role.clone());
        let env = environment(svc);
        if role == "autoscaler" {
            // The binary's own check, with the mounted regions file.
            let mut args = args.to_vec();
            let i = args
                .iter()
                .position(|a| a == "--regions")
                .expect("--regions");
            args[i + 1] = repo()
                .join("deploy/regions.compose.toml")
                .display()
                .to_string();
            check_config(role, &args, &env);
            continue;
        }
        let out = check_config(role, args, &env);
        if matches!(role.as_str(), "gateway" | "worker" | "balancer") {
            let deadline = shutdown_deadline_ms(role, &out);
            let grace = svc["stop_grace_period"]
                .as_str()
                .map(duration_ms)
                .unwrap_or_else(|| panic!("{name}: set stop_grace_period"));
            assert!(
                grace > deadline,
                "{name}: stop_grace_period {grace} ms must exceed the shutdown deadline {deadline} ms"
            );
            assert!(svc.get("healthcheck").is_some(), "{name}: no healthcheck");
            // Reachable from Prometheus: not on loopback.
            let listen = setting(
                &out,
                if role == "gateway" {
                    "listen"
                } else {
                    "admin-listen"
                },
            )
            .unwrap();
            assert!(listen.starts_with("0.0.0.0:"), "{name} listens on {listen}");
        }
    }
    assert_eq!(
        roles,
        BTreeSet::from(
            ["autoscaler", "balancer", "gateway", "migrate", "worker"].map(String::from)
        )
    );
}

/// Structural checks of a regions file (`ferry autoscaler --regions`), returning the actuator kinds.
fn check_regions(text: &str) -> Vec<String> {
    let t: toml::Table = text.parse().expect("regions file is TOML");
    let regions = t["regions"].as_array().expect("[[regions]]");
    assert!(!regions.is_empty());
    let mut kinds = Vec::new();
    for r in regions {
        let name = r["name"].as_str().expect("region name");
        for list in ["redis", "queues"] {
            let v = r[list]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {list} list"));
            assert!(
                !v.is_empty() && v.iter().all(|x| x.is_str()),
                "{name}: {list}"
            );
        }
        for u in r["redis"].as_array().unwrap() {
            assert!(
                u.as_str().unwrap().starts_with("redis://")
                    || u.as_str().unwrap().starts_with("rediss://")
            );
        }
        let p = r["policy"]
            .as_table()
            .unwrap_or_else(|| panic!("{name}: [regions.policy]"));
        let int = |k: &str| {
            p.get(k)
                .and_then(toml::Value::as_integer)
                .unwrap_or_else(|| panic!("{name}: policy.{k}"))
        };
        assert!(int("min-workers") >= 0 && int("min-workers") <= int("max-workers"));
        assert!(int("target-drain-seconds") > 0 && int("backlog-per-worker") > 0);
        assert!(int("scale-down-stabilization-seconds") >= 0);
        let tol = p["tolerance"].as_float().expect("policy.tolerance");
        assert!((0.0..1.0).contains(&tol));
        let a = r["actuator"]
            .as_table()
            .unwrap_or_else(|| panic!("{name}: [regions.actuator]"));
        let kind = a["kind"].as_str().expect("actuator.kind").to_string();
        match kind.as_str() {
            "metrics" | "local" => {}
            "kubernetes" => {
                for k in ["namespace", "deployment"] {
                    assert!(
                        a.get(k).and_then(toml::Value::as_str).is_some(),
                        "{name}: actuator.{k}"
                    );
                }
            }
            other => panic!("{name}: unknown actuator kind {other}"),
        }
        kinds.push(kind);
    }
    kinds
}

#[test]
fn compose_autoscaler_is_wired() {
    let c = compose();
    let svcs = services(&c);
    let a = &svcs["autoscaler"];
    let cmd = strings(&a["command"]);
    assert_eq!(cmd[0], "autoscaler");
    let flag = |f: &str| -> String {
        let i = cmd
            .iter()
            .position(|x| x == f)
            .unwrap_or_else(|| panic!("autoscaler: no {f}"));
        cmd[i + 1].clone()
    };
    let regions = flag("--regions");
    assert_eq!(flag("--admin-listen"), "0.0.0.0:9465");
    // The regions file is mounted from the repository.
    let mount = strings(&a["volumes"])
        .into_iter()
        .find(|v| v.split(':').nth(1) == Some(regions.as_str()))
        .unwrap_or_else(|| panic!("{regions} is not mounted"));
    let src = mount.split(':').next().unwrap();
    assert_eq!(src, "./regions.compose.toml");
    assert_eq!(
        check_regions(&read("deploy/regions.compose.toml")),
        ["metrics"]
    );
    // Its flags exist.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["autoscaler", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for f in ["--regions", "--admin-listen"] {
        assert!(text.contains(f), "ferry autoscaler has no {f}");
    }
}

#[test]
fn compose_prometheus_config_is_valid_and_scrapes_every_ferry_service() {
    let c = compose();
    let svcs = services(&c);
    let content = c["configs"]["prometheus"]["content"]
        .as_str()
        .expect("configs.prometheus.content");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        interpolate(content, &test_vars()),
    )
    .unwrap();
    std::fs::copy(
        repo().join("deploy/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .unwrap();
    let out = Command::new(crate::support::promtool())
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check config: {text}");
    assert!(text.contains("1 rule files found"), "{text}");

    // Prometheus mounts the rules it loads.
    let p = &svcs["prometheus"];
    assert!(
        strings(&p["volumes"])
            .iter()
            .any(|v| v.starts_with("./prometheus/alerts.yml:/etc/prometheus/alerts.yml")),
        "alerts.yml is mounted beside prometheus.yml"
    );
    assert_eq!(
        p["configs"][0]["target"].as_str(),
        Some("/etc/prometheus/prometheus.yml")
    );

    // Targets: every gateway on 8080, every worker on 9464, the autoscaler on 9465, and nothing else.
    let cfg: Value = serde_norway::from_str(content).unwrap();
    let mut targets = BTreeSet::new();
    for job in cfg["scrape_configs"].as_sequence().unwrap() {
        let name = job["job_name"].as_str().unwrap();
        assert!(
            name.starts_with("ferry-"),
            "job {name}: the process alerts select job=~\"ferry-.*\""
        );
        for sc in job["static_configs"].as_sequence().unwrap() {
            targets.extend(strings(&sc["targets"]));
        }
    }
    let mut want = BTreeSet::new();
    for (name, svc) in svcs.iter().filter(|(_, s)| is_ferry(s)) {
        let cmd = strings(&svc["command"]);
        let port = match cmd[0].as_str() {
            "gateway" => 8080,
            "worker" => 9464,
            "autoscaler" => 9465,
            "balancer" => 9466,
            _ => continue,
        };
        want.insert(format!("{name}:{port}"));
    }
    assert_eq!(targets, want);
}
