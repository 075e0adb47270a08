//! The regions file (`ferry autoscaler --regions FILE`, TOML): which regions exist, where their Redis shards
//! are, which queues their workers serve, how they scale and what carries the decision out.
//!
//! ```toml
//! [[regions]]
//! name = "eu-west"
//! redis = ["redis://redis-0.eu-west:6379"]   # or redis-cluster = ["redis://node-0.eu-west:6379"]
//! queues = ["default", "emails"]
//! [regions.policy]            # every key optional, see `Policy`
//! min-workers = 1
//! max-workers = 50
//! [regions.actuator]
//! kind = "kubernetes"         # or "local" or "metrics"
//! namespace = "ferry"
//! deployment = "ferry-worker"
//! ```

use std::path::{Path, PathBuf};

use ferry_core::QueueName;
use serde::Deserialize;

use crate::policy::Policy;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionsFile {
    pub regions: Vec<Region>,
}

/// One region: its own Redis and its own worker pool, which serves every queue listed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Region {
    pub name: String,
    /// The region's Redis shard URLs (as `ferry worker --redis`).
    #[serde(default)]
    pub redis: Vec<String>,
    /// Or its Redis Cluster: one or more node URLs (as `ferry worker --redis-cluster`).
    #[serde(default)]
    pub redis_cluster: Vec<String>,
    /// The cluster's virtual shards (as `--redis-cluster-vshards`); the default when absent.
    #[serde(default)]
    pub redis_cluster_vshards: Option<usize>,
    /// Queues this region's workers serve.
    pub queues: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    pub actuator: ActuatorConfig,
    /// Whether this region's workers may help another region that is at its maximum (default true).
    #[serde(default = "yes")]
    pub helps_others: bool,
}

fn yes() -> bool {
    true
}

/// What carries a region's decision out.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ActuatorConfig {
    /// Only export the decision as metrics (`ferry_autoscaler_desired_workers`), for an HPA or KEDA.
    Metrics(MetricsActuator),
    /// Start and stop `ferry worker` processes on this machine.
    Local(LocalActuator),
    /// Set the replicas of a worker Deployment through the scale subresource.
    Kubernetes(KubernetesActuator),
}

impl ActuatorConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Metrics(_) => "metrics",
            Self::Local(_) => "local",
            Self::Kubernetes(_) => "kubernetes",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsActuator {}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LocalActuator {
    /// The `ferry` binary (default: this process's own executable).
    pub ferry_bin: Option<PathBuf>,
    /// Extra arguments for every worker (`["--concurrency", "20"]`).
    #[serde(default)]
    pub worker_args: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubernetesActuator {
    pub namespace: String,
    pub deployment: String,
    /// The Deployment of workers that consume another region's queues during spill-over; `{region}` in it is
    /// replaced by the helped region's name (one Deployment per helped region).
    pub spill_deployment: Option<String>,
    /// The API server (default: in-cluster configuration, then the local kubeconfig).
    pub api_url: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid regions file {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl RegionsFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parse and check: names unique, each region with shards and valid queue names, each policy valid.
    /// Messages name the region and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if file.regions.is_empty() {
            return Err("no [[regions]]".into());
        }
        let mut names = std::collections::HashSet::new();
        for r in &file.regions {
            let at = |m: String| format!("region {:?}: {m}", r.name);
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "region name {:?}: letters, digits, '-' and '_' only",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(format!("region {:?} is listed twice", r.name));
            }
            let key = match (r.redis.is_empty(), r.redis_cluster.is_empty()) {
                (true, true) => {
                    return Err(at(
                        "redis: list at least one shard URL (or redis-cluster: a node of a Redis Cluster)"
                            .into(),
                    ));
                }
                (false, false) => {
                    return Err(at(
                        "redis and redis-cluster: give one of them, not both".into()
                    ));
                }
                (false, true) => "redis",
                (true, false) => "redis-cluster",
            };
            if let Some(u) = r
                .urls()
                .iter()
                .find(|u| !u.starts_with("redis://") && !u.starts_with("rediss://"))
            {
                return Err(at(format!("{key}: {u:?} is not a redis:// URL")));
            }
            if r.redis_cluster_vshards.is_some() && r.redis_cluster.is_empty() {
                return Err(at(
                    "redis-cluster-vshards: applies to redis-cluster only".into()
                ));
            }
            if r.queues.is_empty() {
                return Err(at("queues: list at least one queue".into()));
            }
            for q in &r.queues {
                QueueName::parse(q).map_err(|e| at(format!("queues: {e}")))?;
            }
            r.policy
                .validate()
                .map_err(|e| at(format!("policy: {e}")))?;
        }
        Ok(file)
    }
}

impl Region {
    /// The URLs of the region's Redis: its shards, or the nodes of its cluster.
    pub fn urls(&self) -> &[String] {
        if self.redis_cluster.is_empty() {
            &self.redis
        } else {
            &self.redis_cluster
        }
    }

    /// How a worker of this region is told where its Redis is: `--redis URLS` or `--redis-cluster URLS`
    /// (with `--redis-cluster-vshards` when the file sets it).
    pub fn worker_redis_args(&self) -> Vec<String> {
        if self.redis_cluster.is_empty() {
            return vec!["--redis".into(), self.redis.join(",")];
        }
        let mut args = vec!["--redis-cluster".into(), self.redis_cluster.join(",")];
        if let Some(n) = self.redis_cluster_vshards {
            args.extend(["--redis-cluster-vshards".into(), n.to_string()]);
        }
        args
    }

    pub fn queue_names(&self) -> Vec<QueueName> {
        self.queues
            .iter()
            .filter_map(|q| QueueName::parse(q).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[regions]]
name = "eu-west"
redis = ["redis://127.0.0.1:6379"]
queues = ["default"]
[regions.policy]
max-workers = 50
[regions.actuator]
kind = "kubernetes"
namespace = "ferry"
deployment = "ferry-worker"

[[regions]]
name = "us-east"
redis = ["redis://127.0.0.1:6380"]
queues = ["default"]
helps-others = false
[regions.actuator]
kind = "local"
worker-args = ["--concurrency", "20"]
"#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let f = RegionsFile::parse(GOOD).unwrap();
        assert_eq!(f.regions.len(), 2);
        assert_eq!(f.regions[0].policy.max_workers, 50);
        assert_eq!(f.regions[0].policy.min_workers, 1);
        assert_eq!(f.regions[0].actuator.kind(), "kubernetes");
        assert!(f.regions[0].helps_others && !f.regions[1].helps_others);
        match &f.regions[1].actuator {
            ActuatorConfig::Local(l) => assert_eq!(l.worker_args, ["--concurrency", "20"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_region_may_run_on_a_redis_cluster() {
        let text = GOOD.replace(
            "redis = [\"redis://127.0.0.1:6380\"]",
            "redis-cluster = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\nredis-cluster-vshards = 8",
        );
        let f = RegionsFile::parse(&text).unwrap();
        let r = &f.regions[1];
        assert_eq!(
            r.urls(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            r.worker_redis_args(),
            [
                "--redis-cluster",
                "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
                "--redis-cluster-vshards",
                "8"
            ]
        );
        assert_eq!(
            f.regions[0].worker_redis_args(),
            ["--redis", "redis://127.0.0.1:6379"]
        );
    }

    #[test]
    fn bad_files_name_the_problem() {
        let cases = [
            (
                GOOD.replace("max-workers = 50", "max-wrkers = 50"),
                "max-wrkers",
            ),
            (
                GOOD.replace("kind = \"local\"", "kind = \"docker\""),
                "docker",
            ),
            (GOOD.replace("\"us-east\"", "\"eu-west\""), "listed twice"),
            (
                GOOD.replace("max-workers = 50", "max-workers = 0"),
                "region \"eu-west\": policy: max-workers",
            ),
            (
                GOOD.replace("redis://127.0.0.1:6380", "127.0.0.1:6380"),
                "region \"us-east\": redis",
            ),
            (
                GOOD.replace(
                    "queues = [\"default\"]\n[regions.policy]",
                    "queues = [\"bad queue\"]\n[regions.policy]",
                ),
                "region \"eu-west\": queues",
            ),
            ("".to_owned(), "regions"),
            (
                GOOD.replace(
                    "redis = [\"redis://127.0.0.1:6380\"]",
                    "redis = [\"redis://127.0.0.1:6380\"]\nredis-cluster = [\"redis://127.0.0.1:7000\"]",
                ),
                "region \"us-east\": redis and redis-cluster: give one of them, not both",
            ),
            (
                GOOD.replace("redis = [\"redis://127.0.0.1:6380\"]", ""),
                "region \"us-east\": redis: list at least one shard URL",
            ),
            (
                GOOD.replace(
                    "redis = [\"redis://127.0.0.1:6380\"]",
                    "redis = [\"redis://127.0.0.1:6380\"]\nredis-cluster-vshards = 8",
                ),
                "redis-cluster-vshards: applies to redis-cluster only",
            ),
        ];
        for (text, want) in cases {
            let e = RegionsFile::parse(&text).unwrap_err();
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
    }
}
