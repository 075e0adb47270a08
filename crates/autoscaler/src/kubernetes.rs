//! The `kubernetes` actuator: sets the replicas of a region's worker Deployment through its `scale` subresource
//! (kube-rs), and of an optional spill-over Deployment.
//!
//! A scale-down first marks the Deployment's pods with `controller.kubernetes.io/pod-deletion-cost` so that the
//! ReplicaSet removes the idlest pods (by the jobs each pod's worker holds, from the broker), then lowers the
//! replicas. Removed pods get SIGTERM, which a `ferry worker`
//! answers by draining.
//!
//! What the actuator's service account needs (RBAC, in the namespace): `get` and `patch` on
//! `deployments/scale`, `get` on `deployments`, and `list` and `patch` on `pods` (the last two only for the
//! deletion costs: without them a scale-down still happens, with the ReplicaSet's own choice of pods).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;

use crate::actuator::{Actuator, ActuatorError, Held};
use crate::config::{KubernetesActuator, Region};

/// The annotation the ReplicaSet controller reads to choose which pods to remove first (lowest cost first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// What each job a pod's worker holds adds to its deletion cost: more than any age, so the busiest pods survive.
pub const JOB_COST: u64 = 1_000_000;

/// Jobs counted per pod at most (the cost must stay within the annotation's 32-bit range).
pub const MAX_JOBS: u64 = 2_000;

/// The highest age part of a cost (seconds since the pod started: about 11.6 days), the tie-breaker between
/// pods holding as many jobs.
pub const MAX_AGE_COST: u64 = JOB_COST - 1;

/// In `spill-deployment`, replaced by the helped region's name: one spill Deployment per helped region.
pub const REGION_PLACEHOLDER: &str = "{region}";

/// If set, the bearer token file used with `api-url` (with no `api-url`, the kubeconfig or in-cluster
/// configuration says how to authenticate).
pub const TOKEN_FILE_ENV: &str = "FERRY_KUBERNETES_TOKEN_FILE";

/// A region's worker pool as a Kubernetes Deployment.
pub struct Kubernetes {
    region: String,
    config: KubernetesActuator,
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    /// The helped region the spill-over Deployment is running for, if any: it consumes one region's queues (its
    /// pod template says which), so it cannot serve two regions at once.
    spilling_for: Mutex<Option<String>>,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("region", &self.region)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Kubernetes {
    /// A client for `config.api_url` (plain `http://` allowed; a bearer token from the file named by
    /// [`TOKEN_FILE_ENV`] if that is set), or else the inferred configuration: the kubeconfig (`KUBECONFIG`,
    /// `~/.kube/config`), then the in-cluster service account. Nothing is requested yet.
    pub async fn new(region: Region, config: KubernetesActuator) -> Result<Self, ActuatorError> {
        let fail =
            |m: String| ActuatorError::Failed(format!("region {:?}: kubernetes: {m}", region.name));
        let kube_config = match &config.api_url {
            Some(url) => {
                let uri = url
                    .parse()
                    .map_err(|e| fail(format!("api-url {url:?}: {e}")))?;
                let mut c = kube::Config::new(uri);
                if let Some(file) = std::env::var_os(TOKEN_FILE_ENV).filter(|f| !f.is_empty()) {
                    c.auth_info.token_file = Some(file.to_string_lossy().into_owned());
                }
                c
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| fail(format!("no configuration (kubeconfig or in-cluster): {e}")))?,
        };
        let client = kube::Client::try_from(kube_config)
            .map_err(|e| fail(format!("cannot make a client: {e}")))?;
        Ok(Self {
            region: region.name,
            deployments: Api::namespaced(client.clone(), &config.namespace),
            pods: Api::namespaced(client, &config.namespace),
            config,
            spilling_for: Mutex::new(None),
        })
    }

    fn error(&self, deployment: &str, doing: &str, e: kube::Error) -> ActuatorError {
        let why = match &e {
            kube::Error::Api(s) => {
                let mut m = if s.message.is_empty() {
                    "the API server refused".to_owned()
                } else {
                    s.message.clone()
                };
                if !s.reason.is_empty() || s.code != 0 {
                    m.push_str(&format!(" ({} {})", s.code, s.reason));
                }
                m
            }
            other => other.to_string(),
        };
        ActuatorError::Failed(format!(
            "region {:?}: deployment {}/{deployment}: {doing}: {why}",
            self.region, self.config.namespace
        ))
    }

    /// The Deployment's replicas, from its scale subresource (0 when unset).
    async fn replicas(&self, deployment: &str) -> Result<u32, ActuatorError> {
        let scale = self
            .deployments
            .get_scale(deployment)
            .await
            .map_err(|e| self.error(deployment, "cannot read the scale", e))?;
        let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
        Ok(u32::try_from(n).unwrap_or(0))
    }

    /// Set `deployment`'s replicas to `desired`; lowering them marks the pods first (see [`Self::mark_pods`]).
    async fn resize(
        &self,
        deployment: &str,
        desired: u32,
        held: &Held,
    ) -> Result<(), ActuatorError> {
        let current = self.replicas(deployment).await?;
        if current == desired {
            return Ok(());
        }
        if desired < current {
            // Best effort: without the costs the ReplicaSet still removes pods, by its own choice.
            if let Err(e) = self.mark_pods(deployment, held).await {
                tracing::warn!(
                    region = %self.region,
                    error = %e,
                    "cannot set pod deletion costs; scaling down anyway"
                );
            }
        }
        let desired_i32 = i32::try_from(desired).unwrap_or(i32::MAX);
        let patch = serde_json::json!({ "spec": { "replicas": desired_i32 } });
        self.deployments
            .patch_scale(deployment, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                self.error(
                    deployment,
                    &format!("cannot set the replicas to {desired}"),
                    e,
                )
            })?;
        tracing::info!(region = %self.region, deployment, from = current, to = desired, "scaled");
        Ok(())
    }

    /// Give every pod of `deployment` a deletion cost reflecting how busy it is (see [`deletion_cost`]), so that
    /// the coming scale-down removes the idlest.
    async fn mark_pods(&self, deployment: &str, held: &Held) -> Result<(), ActuatorError> {
        let d = self
            .deployments
            .get(deployment)
            .await
            .map_err(|e| self.error(deployment, "cannot read the deployment", e))?;
        let selector = d.spec.map(|s| s.selector).unwrap_or_default();
        let selector = Selector::try_from(selector).map_err(|e| {
            ActuatorError::Failed(format!(
                "region {:?}: deployment {}/{deployment}: bad pod selector: {e}",
                self.region, self.config.namespace
            ))
        })?;
        if selector.selects_all() {
            // Never mark every pod of the namespace.
            return Err(ActuatorError::Failed(format!(
                "region {:?}: deployment {}/{deployment} has an empty pod selector",
                self.region, self.config.namespace
            )));
        }
        let pods = self
            .pods
            .list(&ListParams::default().labels_from(&selector))
            .await
            .map_err(|e| self.error(deployment, "cannot list its pods", e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for pod in pods.items {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                continue; // Already going.
            }
            let cost = deletion_cost(&pod, now, pod_jobs(&name, held));
            let patch = serde_json::json!({
                "metadata": { "annotations": { DELETION_COST: cost.to_string() } }
            });
            match self
                .pods
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // Gone since the list: nothing to mark.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(self.error(deployment, &format!("cannot annotate pod {name}"), e));
                }
            }
        }
        Ok(())
    }
}

/// The jobs held by the workers of the pod named `pod`: a worker's default consumer name is
/// `<hostname>-<pid>-<random>`, and a pod's hostname is its name.
pub fn pod_jobs(pod: &str, held: &Held) -> u64 {
    held.iter()
        .filter(|(consumer, _)| {
            consumer
                .strip_prefix(pod)
                .is_some_and(|rest| rest.starts_with('-'))
        })
        .map(|(_, n)| *n)
        .sum()
}

/// How much removing `pod` would cost, at `now` (Unix seconds), when its workers hold `jobs` jobs.
///
/// * 0 for a pod that is not Ready (starting, failing its probe, or with a container not ready): it does little
///   or nothing, so it goes first.
/// * Otherwise [`JOB_COST`] per job held (up to [`MAX_JOBS`]), plus the seconds since it started (1 up to
///   [`MAX_AGE_COST`]): the idlest go first, and of pods holding as many jobs the youngest, since the older have
///   warmed up.
pub fn deletion_cost(pod: &Pod, now: i64, jobs: u64) -> u64 {
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let containers_ready = status
        .and_then(|s| s.container_statuses.as_ref())
        .is_none_or(|cs| cs.iter().all(|c| c.ready));
    if !ready || !containers_ready {
        return 0;
    }
    let started = status
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.as_second());
    let age = started.map_or(0, |s| now.saturating_sub(s).max(0) as u64);
    jobs.min(MAX_JOBS) * JOB_COST + age.clamp(1, MAX_AGE_COST)
}

#[async_trait]
impl Actuator for Kubernetes {
    async fn current(&self) -> Result<u32, ActuatorError> {
        self.replicas(&self.config.deployment).await
    }

    async fn scale(&self, desired: u32, held: &Held) -> Result<(), ActuatorError> {
        self.resize(&self.config.deployment, desired, held).await
    }

    /// Scale `spill-deployment` to `workers`. That Deployment's pods must be set up (by whoever deploys them) to
    /// consume `from`'s Redis and queues. A name with `{region}` names one Deployment per helped region (the
    /// placeholder replaced by `from`'s name), so the region can help several at once; a plain name is one
    /// Deployment, serving one helped region at a time.
    async fn spill(&self, from: &Region, workers: u32, held: &Held) -> Result<(), ActuatorError> {
        let Some(deployment) = self.config.spill_deployment.as_deref() else {
            if workers == 0 {
                return Ok(());
            }
            return Err(ActuatorError::Failed(format!(
                "region {:?}: cannot lend {workers} workers to region {:?}: no spill-deployment is configured \
                 (set spill-deployment in its [regions.actuator], or helps-others = false)",
                self.region, from.name
            )));
        };
        if deployment.contains(REGION_PLACEHOLDER) {
            let deployment = deployment.replace(REGION_PLACEHOLDER, &from.name);
            return self.resize(&deployment, workers, held).await;
        }
        {
            let mut serving = self.spilling_for.lock().unwrap_or_else(|p| p.into_inner());
            match serving.as_deref() {
                Some(other) if other != from.name => {
                    if workers == 0 {
                        // None of `from`'s run: the Deployment works for `other`.
                        return Ok(());
                    }
                    return Err(ActuatorError::Failed(format!(
                        "region {:?}: spill deployment {}/{deployment} is serving region {other:?}; it cannot \
                         also serve region {:?}",
                        self.region, self.config.namespace, from.name
                    )));
                }
                _ => *serving = (workers > 0).then(|| from.name.clone()),
            }
        }
        self.resize(deployment, workers, held).await
    }
}
