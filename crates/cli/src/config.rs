//! The configuration file: one TOML file for every role, layered under the environment and the flags.
//!
//! Precedence, lowest first: built-in defaults, the file (`--config` / `FERRY_CONFIG`), `FERRY_*` variables,
//! flags. The file's keys are the flags' long names, so there is one name per setting everywhere
//! (`--concurrency`, `FERRY_CONCURRENCY`, `concurrency = 20`). Top-level keys apply to every role that has
//! that flag (a shared file can hold `redis = [...]` once); a `[worker]`, `[gateway]`, `[dev]`, `[enqueue]` or
//! `[migrate]` table applies to one role and wins over top-level keys. A key no role knows, or a key in a
//! role's table that the role does not have, is refused, naming the key.
//!
//! The process-wide flags (`--log`, `--log-format`, `--otlp-endpoint`, `--otlp-service-name`) are top-level
//! keys only: they apply to the whole process whatever its role, so a role's table cannot hold them.
//!
//! How it layers: each file value becomes the clap default of its flag, after being checked by the flag's own
//! parser (so a bad value names the key, not the flag). Clap then applies environment variables and flags over
//! it. [`check`] runs the same layering and prints every effective setting with where it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command, CommandFactory, FromArgMatches};
use ferry_core::{REDACTED, redact_url};

use crate::CliError;
use crate::args::{Cli, Role};

/// The roles a file may configure, as their subcommand names.
const ROLES: [&str; 7] = [
    "dev",
    "gateway",
    "worker",
    "enqueue",
    "migrate",
    "autoscaler",
    "balancer",
];

/// Flags whose values are secret: never printed.
const SECRET: [&str; 2] = ["jwt-secret", "secret"];
/// Flags holding URLs that may carry a password: printed with the password replaced.
const URLS: [&str; 4] = ["redis", "database-url", "database-read-url", "jwks-url"];

/// A loaded file: per role, the values it sets (flag long name → values), and the process-wide ones.
#[derive(Debug, Default)]
pub struct FileValues {
    pub path: PathBuf,
    pub roles: BTreeMap<&'static str, BTreeMap<String, Vec<String>>>,
    /// Values of the global flags (`log`, `otlp-endpoint`, ...), top-level keys of the file.
    pub global: BTreeMap<String, Vec<String>>,
}

fn err(path: &Path, message: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("invalid config file {}: {message}", path.display()))
}

/// TOML value → the strings clap would have been given.
fn strings(path: &Path, key: &str, v: &toml::Value) -> Result<Vec<String>, CliError> {
    Ok(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(a) => a
            .iter()
            .map(|x| match x {
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    Err(err(path, format!("{key}: lists hold plain values")))
                }
                other => Ok(strings(path, key, other)?.remove(0)),
            })
            .collect::<Result<_, _>>()?,
        toml::Value::Datetime(d) => vec![d.to_string()],
        toml::Value::Table(_) => {
            return Err(err(
                path,
                format!(
                    "{key}: unknown table (known: {})",
                    ROLES.map(|r| format!("[{r}]")).join(", ")
                ),
            ));
        }
    })
}

/// The long flag names of a role's subcommand that a file may set (not `help`, not `config`).
fn flags_of(cmd: &Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version" | "config" | "log-format"))
        .map(str::to_owned)
        .collect()
}

/// The long names of the process-wide (`global`) flags a file may set: every role has them.
fn global_flags(cli: &Command) -> BTreeSet<String> {
    cli.get_arguments()
        .filter(|a| a.is_global_set())
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version" | "config"))
        .map(str::to_owned)
        .collect()
}

/// Check each value with `arg`'s own parser, on a command of its own (the real one has requirements between
/// flags), so the message names `key`.
fn check_values(path: &Path, key: &str, arg: &clap::Arg, vs: &[String]) -> Result<(), CliError> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return if matches!(vs, [v] if v == "true" || v == "false") {
            Ok(())
        } else {
            Err(err(path, format!("{key}: must be true or false")))
        };
    }
    let probe = Command::new("probe").arg(
        clap::Arg::new("v")
            .long("v")
            .action(ArgAction::Append)
            .value_parser(arg.get_value_parser().clone()),
    );
    for v in vs {
        probe
            .clone()
            .try_get_matches_from(["probe", "--v", v])
            .map_err(|e| {
                // "invalid value 'lots' for '--v <v>': invalid digit…" → "invalid value 'lots': invalid digit…"
                let why = e
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid value")
                    .trim_start_matches("error: ")
                    .replace(" for '--v <v>'", "");
                err(path, format!("{key}: {why}"))
            })?;
    }
    Ok(())
}

/// Read and check `path`: every key known, every value accepted by its flag's parser.
pub fn load(path: &Path) -> Result<FileValues, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    let table: toml::Table = text.parse().map_err(|e| err(path, e))?;
    let cli = Cli::command();
    let mut out = FileValues {
        path: path.to_owned(),
        ..FileValues::default()
    };
    let role_cmd = |r: &str| cli.find_subcommand(r).expect("every role is a subcommand");
    let globals = global_flags(&cli);
    let mut top = BTreeMap::new();
    for (key, value) in &table {
        if let Some(role) = ROLES.iter().find(|r| **r == key.as_str()) {
            let toml::Value::Table(section) = value else {
                return Err(err(path, format!("{key} must be a table ([{key}])")));
            };
            let known = flags_of(role_cmd(role));
            let entry = out.roles.entry(role).or_default();
            for (k, v) in section {
                if globals.contains(k) {
                    return Err(err(
                        path,
                        format!(
                            "{key}.{k}: --{k} applies to the whole process; set it at the top level"
                        ),
                    ));
                }
                if !known.contains(k) {
                    return Err(err(
                        path,
                        format!("unknown key {key}.{k}: ferry {key} has no --{k}"),
                    ));
                }
                entry.insert(k.clone(), strings(path, &format!("{key}.{k}"), v)?);
            }
        } else if globals.contains(key) {
            let arg = cli
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()))
                .expect("a global flag");
            let vs = strings(path, key, value)?;
            check_values(path, key, arg, &vs)?;
            out.global.insert(key.clone(), vs);
        } else {
            if !ROLES.iter().any(|r| flags_of(role_cmd(r)).contains(key)) {
                return Err(err(path, format!("unknown key {key}: no role has --{key}")));
            }
            top.insert(key.clone(), strings(path, key, value)?);
        }
    }
    // Top-level keys go to every role that has the flag, under its own table's values.
    for role in ROLES {
        let known = flags_of(role_cmd(role));
        let entry = out.roles.entry(role).or_default();
        for (k, v) in &top {
            if known.contains(k) && !entry.contains_key(k) {
                entry.insert(k.clone(), v.clone());
            }
        }
    }
    // Each value through its flag's parser, so the message names the key.
    for (role, values) in &out.roles {
        let cmd = role_cmd(role);
        for (k, vs) in values {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(k))
                .expect("checked above");
            check_values(path, &format!("{role}.{k}"), arg, vs)?;
        }
    }
    Ok(out)
}

/// The `ferry` command with `file`'s values as the defaults of their flags.
pub fn layered(file: &FileValues) -> Command {
    let mut cli = Cli::command();
    for (k, vs) in &file.global {
        let id = cli
            .get_arguments()
            .find(|a| a.get_long() == Some(k.as_str()))
            .map(|a| a.get_id().clone());
        if let Some(id) = id {
            let vs = vs.clone();
            cli = cli.mut_arg(id, move |a| a.default_values(vs));
        }
    }
    for (role, values) in &file.roles {
        let values = values.clone();
        cli = cli.mut_subcommand(*role, move |mut sc| {
            for (k, vs) in values {
                let id = sc
                    .get_arguments()
                    .find(|a| a.get_long() == Some(k.as_str()))
                    .map(|a| a.get_id().clone());
                if let Some(id) = id {
                    // A value from the file satisfies a required flag, and the flag it stands in for.
                    sc = sc.mut_arg(id, |a| {
                        a.default_values(vs.clone())
                            .required(false)
                            .required_unless_present(clap::builder::Resettable::Reset)
                    });
                    if k == "redis-cluster" {
                        sc = sc.mut_arg("redis", |a| {
                            a.required_unless_present(clap::builder::Resettable::Reset)
                        });
                    }
                }
            }
            sc
        });
    }
    cli
}

/// The config file named by `--config FILE`, `--config=FILE` or `FERRY_CONFIG`, looked up before parsing.
pub fn file_in(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
        if a == "--" {
            break;
        }
    }
    std::env::var_os("FERRY_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Why [`parse`] failed: the command line itself (clap's message, with its usage and help), or the
/// configuration file (a message of its own: a usage block would say nothing about the file).
#[derive(Debug)]
pub enum ParseError {
    Args(clap::Error),
    Config(CliError),
}

impl From<clap::Error> for ParseError {
    fn from(e: clap::Error) -> Self {
        Self::Args(e)
    }
}

/// Parse `args` with the config file layered in.
pub fn parse(args: Vec<OsString>) -> Result<Cli, ParseError> {
    let cmd = match file_in(&args) {
        Some(path) => layered(&load(&path).map_err(ParseError::Config)?),
        None => Cli::command(),
    };
    let matches = cmd.try_get_matches_from(args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The message of a clap error without its `error: ` prefix and usage block, naming the `FERRY_*` variable the
/// bad value came from when it came from one (clap names only the flag).
fn clap_message(cmd: &Command, e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let mut msg = text
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| l.trim().trim_start_matches("error: "))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) {
        let long = flag
            .trim_start_matches("--")
            .split(' ')
            .next()
            .unwrap_or_default();
        let var = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env())
            .filter(|v| std::env::var_os(v).is_some());
        if let Some(var) = var {
            msg = msg.replacen(
                &format!("'{flag}'"),
                &format!("'{flag}' (from {})", var.to_string_lossy()),
                1,
            );
        }
    }
    msg
}

/// A value as `check` and error messages show it: a secret as [`REDACTED`], a URL with its credentials redacted
/// by the rule every crate uses ([`redact_url`]).
pub(crate) fn shown(flag: &str, value: &str) -> String {
    if SECRET.contains(&flag) {
        return REDACTED.into();
    }
    if URLS.contains(&flag) {
        return redact_url(value);
    }
    value.to_owned()
}

/// `ferry check-config`: layer the file (if any) and the environment for `role`, validate the result as the
/// role would at start, and print every setting with its source. Secrets are redacted.
pub fn check(config: Option<&Path>, role: Role) -> Result<String, CliError> {
    let file = config.map(load).transpose()?;
    let cmd = match &file {
        Some(f) => layered(f),
        None => Cli::command(),
    };
    let from_file: BTreeSet<String> = file
        .as_ref()
        .and_then(|f| f.roles.get(role.as_str()))
        .map(|v| v.keys().cloned().collect())
        .unwrap_or_default();
    let name = role.as_str();
    let matches = cmd
        .clone()
        .try_get_matches_from(["ferry", name])
        .map_err(|e| {
            // The error without its usage block: "the following required arguments were not provided: --redis".
            let sc = cmd.find_subcommand(name).expect("role");
            CliError::Usage(format!("{name}: {}", clap_message(sc, &e)))
        })?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| CliError::Usage(e.to_string()))?;
    // The role's own validation, exactly as at start (nothing connects).
    match cli.command {
        crate::args::Command::Dev(a) => crate::dev::resolve(a).map(drop)?,
        crate::args::Command::Gateway(a) => crate::gateway::resolve(a).map(drop)?,
        crate::args::Command::Worker(a) => crate::worker::resolve(a).map(drop)?,
        crate::args::Command::Enqueue(a) => crate::enqueue::resolve(a).map(drop)?,
        crate::args::Command::Migrate(a) => crate::store::resolve_migrate(a.database).map(drop)?,
        crate::args::Command::Autoscaler(a) => crate::autoscaler::resolve(a).map(drop)?,
        crate::args::Command::Balancer(a) => crate::balancer::resolve(a).map(drop)?,
        _ => {}
    }
    let (_, sub) = matches.subcommand().expect("a role was given");
    let sc = cmd.find_subcommand(name).expect("role");
    let mut out = format!(
        "# ferry {name}: configuration is valid{}\n",
        file.as_ref()
            .map(|f| format!(" ({})", f.path.display()))
            .unwrap_or_default()
    );
    // The process-wide settings first: top-level keys.
    let global_from_file: BTreeSet<String> = file
        .as_ref()
        .map(|f| f.global.keys().cloned().collect())
        .unwrap_or_default();
    // In the order `--help` lists them: `layered` moves each argument the file sets to the end of its command.
    let plain = Cli::command();
    let in_order = |plain: &Command, layered: &Command| -> Vec<clap::Arg> {
        plain
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter_map(|long| {
                layered
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .cloned()
            })
            .collect()
    };
    for arg in in_order(&plain, &cmd).iter().filter(|a| a.is_global_set()) {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "config") {
            continue;
        }
        out.push_str(&setting(arg, long, &matches, &global_from_file));
    }
    out.push_str(&format!("[{name}]\n"));
    let plain_sc = plain.find_subcommand(name).expect("role");
    for arg in in_order(plain_sc, sc) {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "config" | "log-format") {
            continue;
        }
        out.push_str(&setting(&arg, long, sub, &from_file));
    }
    Ok(out)
}

/// One line of [`check`]: `long = value  # source`, or `# long = …  # unset` for a setting with no value (a
/// comment, so the output is a valid config file).
fn setting(
    arg: &clap::Arg,
    long: &str,
    matches: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> String {
    let id = arg.get_id().as_str();
    let values: Vec<String> = matches
        .get_raw(id)
        .map(|v| v.map(|s| shown(long, &s.to_string_lossy())).collect())
        .unwrap_or_default();
    let source = match matches.value_source(id) {
        Some(clap::parser::ValueSource::EnvVariable) => "env",
        Some(clap::parser::ValueSource::CommandLine) => "flag",
        Some(clap::parser::ValueSource::DefaultValue) if from_file.contains(long) => "file",
        Some(_) => "default",
        None => "unset",
    };
    let rendered = match values.as_slice() {
        [] => return format!("# {long} = …  # {source}\n"),
        [one]
            if arg.get_num_args().is_none_or(|n| n.max_values() <= 1)
                && arg.get_value_delimiter().is_none() =>
        {
            toml_value(one)
        }
        many => format!(
            "[{}]",
            many.iter()
                .map(|v| toml_value(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!("{long} = {rendered}  # {source}\n")
}

/// A value as TOML: numbers and booleans bare, everything else quoted.
fn toml_value(v: &str) -> String {
    if v == "true" || v == "false" || (!v.is_empty() && v.parse::<f64>().is_ok()) {
        v.to_owned()
    } else {
        toml::Value::String(v.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::NamedTempFile, PathBuf) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let p = f.path().to_owned();
        (f, p)
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let (_f, p) = file("[worker]\nconcurency = 3\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown key worker.concurency"), "{e}");
        let (_f, p) = file("colour = \"red\"\n");
        assert!(
            load(&p)
                .unwrap_err()
                .to_string()
                .contains("unknown key colour")
        );
        let (_f, p) = file("[worker]\nconcurrency = \"lots\"\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("worker.concurrency") && e.contains("lots"),
            "{e}"
        );
        let (_f, p) = file("[worker\n");
        assert!(
            load(&p)
                .unwrap_err()
                .to_string()
                .starts_with("invalid config file")
        );
        let (_f, p) = file("[wroker]\nqueues = [\"a\"]\n");
        assert!(load(&p).unwrap_err().to_string().contains("wroker"));
    }

    #[test]
    fn a_redis_cluster_from_the_file_or_a_flag_stands_in_for_redis() {
        let (_f, p) =
            file("redis-cluster = [\"redis://10.0.0.1:7000\"]\n[worker]\nqueues = [\"a\"]\n");
        let cli = parse(
            ["ferry", "--config", p.to_str().unwrap(), "worker"]
                .iter()
                .map(OsString::from)
                .collect(),
        )
        .unwrap();
        let crate::args::Command::Worker(w) = cli.command else {
            panic!("worker")
        };
        assert_eq!(w.redis.redis_cluster, ["redis://10.0.0.1:7000"]);
        assert!(w.redis.redis.is_empty());
        let flags = |extra: &[&str]| -> Vec<OsString> {
            ["ferry", "worker", "--queues", "a"]
                .iter()
                .chain(extra)
                .map(OsString::from)
                .collect()
        };
        assert!(parse(flags(&["--redis-cluster", "redis://h:7000"])).is_ok());
        let message = |r: Result<crate::args::Cli, ParseError>| match r {
            Err(ParseError::Args(e)) => e.to_string(),
            other => panic!("{other:?}"),
        };
        let both = message(parse(flags(&[
            "--redis",
            "redis://h:1",
            "--redis-cluster",
            "redis://h:7000",
        ])));
        assert!(both.contains("cannot be used with"), "{both}");
        let neither = message(parse(flags(&[])));
        assert!(neither.contains("--redis <URL>"), "{neither}");
    }

    #[test]
    fn file_sits_between_defaults_and_flags() {
        let (_f, p) = file(
            "redis = [\"redis://10.0.0.1:6379\"]\n[worker]\nqueues = [\"a\", \"b\"]\nconcurrency = 7\nbatch-size = 3\n",
        );
        let args = |extra: &[&str]| -> Vec<OsString> {
            ["ferry", "--config", p.to_str().unwrap(), "worker"]
                .iter()
                .chain(extra)
                .map(OsString::from)
                .collect()
        };
        let cli = parse(args(&["--batch-size", "9"])).unwrap();
        let crate::args::Command::Worker(w) = cli.command else {
            panic!("worker")
        };
        assert_eq!(w.redis.redis, ["redis://10.0.0.1:6379"]);
        assert_eq!(w.queues, ["a", "b"]);
        assert_eq!(w.concurrency, 7, "from the file");
        assert_eq!(w.batch_size, 9, "the flag wins");
        assert_eq!(w.claim_wait_ms, 1_000, "the default stays");
    }

    #[test]
    fn global_flags_are_top_level_keys() {
        let (_f, p) = file(
            "log = \"info,ferry_worker=debug\"\notlp-endpoint = \"http://127.0.0.1:4318\"\nlog-format = \"json\"\n[worker]\nqueues = [\"a\"]\nredis = [\"redis://h:1\"]\n",
        );
        let args = |extra: &[&str]| -> Vec<OsString> {
            ["ferry", "--config", p.to_str().unwrap()]
                .iter()
                .chain(extra)
                .map(OsString::from)
                .collect()
        };
        let cli = parse(args(&["worker"])).unwrap();
        assert_eq!(cli.log.as_deref(), Some("info,ferry_worker=debug"));
        assert_eq!(cli.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        assert_eq!(cli.otlp_service_name, None);
        assert_eq!(cli.log_format, crate::args::LogFormat::Json);
        // A flag wins over the file, before or after the subcommand.
        let cli = parse(args(&["worker", "--log", "warn"])).unwrap();
        assert_eq!(cli.log.as_deref(), Some("warn"));
        let cli = parse(args(&["--otlp-endpoint", "http://c:1", "worker"])).unwrap();
        assert_eq!(cli.otlp_endpoint.as_deref(), Some("http://c:1"));
        let out = check(Some(&p), Role::Worker).unwrap();
        let (top, _) = out.split_once("[worker]").unwrap();
        assert!(
            top.contains("otlp-endpoint = \"http://127.0.0.1:4318\"  # file"),
            "{out}"
        );
        assert!(
            top.contains("log = \"info,ferry_worker=debug\"  # file"),
            "{out}"
        );
        // Not in a role's table, and still checked by the flag's parser.
        let (_f, p) = file("[worker]\nlog = \"debug\"\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("worker.log") && e.contains("top level"), "{e}");
        let (_f, p) = file("log-format = \"yaml\"\n");
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("log-format") && e.contains("yaml"), "{e}");
    }

    /// The values of `check`'s output, without sources: `key = value` and `# key = …` lines.
    fn values(out: &str) -> Vec<&str> {
        out.lines()
            .filter(|l| l.contains(" = "))
            .map(|l| l.rsplit_once("  # ").map_or(l, |(v, _)| v))
            .collect()
    }

    #[test]
    fn check_prints_a_config_file_in_help_order() {
        let (_f, p) = file(
            "redis = [\"redis://10.0.0.1:6379\"]\nlog = \"debug\"\n[worker]\nqueues = [\"a\", \"b\"]\nconcurrency = 7\nwebhook-timeout-ms = 10\n",
        );
        let out = check(Some(&p), Role::Worker).unwrap();
        // Valid TOML, unset settings as comments.
        let table: toml::Table = out.parse().unwrap_or_else(|e| panic!("{e}\n{out}"));
        assert_eq!(table["worker"]["concurrency"].as_integer(), Some(7));
        assert!(out.contains("\n# otlp-endpoint = …  # unset\n"), "{out}");
        assert!(out.contains("\n# consumer = …  # unset\n"), "{out}");
        // Fed back as the config file, it is the same configuration.
        let (_g, q) = file(&out);
        let again = check(Some(&q), Role::Worker).unwrap();
        assert_eq!(values(&again), values(&out), "{again}");
        // Settings from the file stand where they stand without it (the order of `--help`).
        let (_h, r) = file("redis = [\"redis://10.0.0.1:6379\"]\n[worker]\nqueues = [\"a\"]\n");
        let keys = |o: &str| -> Vec<String> {
            o.lines()
                .filter_map(|l| l.split_once(" = "))
                .map(|(k, _)| k.trim_start_matches("# ").to_owned())
                .collect()
        };
        assert_eq!(keys(&out), keys(&check(Some(&r), Role::Worker).unwrap()));
        assert!(out.contains("concurrency = 7  # file\n"), "{out}");
    }

    #[test]
    fn check_prints_sources_and_redacts_secrets() {
        let (_f, p) = file(
            "redis = [\"redis://:hunter2@10.0.0.1:6379\"]\n[gateway]\njwt-secret = \"0123456789abcdef0123456789abcdef\"\ndatabase-url = \"postgres://ferry:pw@db/ferry\"\n",
        );
        let out = check(Some(&p), Role::Gateway).unwrap();
        assert!(
            !out.contains("hunter2") && !out.contains("0123456789abcdef") && !out.contains(":pw@"),
            "{out}"
        );
        assert!(out.contains("jwt-secret = \"<redacted>\"  # file"), "{out}");
        assert!(
            out.contains("database-url = \"postgres://ferry:<redacted>@db/ferry\"  # file"),
            "{out}"
        );
        assert!(
            out.contains("listen = \"127.0.0.1:8080\"  # default"),
            "{out}"
        );
        // Validation runs as at start.
        let (_f, p) =
            file("[worker]\nqueues = [\"a\"]\nredis = [\"redis://h:1\"]\nconcurrency = 0\n");
        let e = check(Some(&p), Role::Worker).unwrap_err().to_string();
        assert!(e.contains("--concurrency"), "{e}");
        let (_f, p) = file("[worker]\nqueues = [\"a\"]\n");
        let e = check(Some(&p), Role::Worker).unwrap_err().to_string();
        assert!(e.contains("--redis"), "{e}");
    }
}
