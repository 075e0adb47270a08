//! The `kubernetes` actuator against a fake API server (axum on 127.0.0.1) that serves exactly the endpoints
//! the actuator calls and records every request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ferry_autoscaler::Actuator;
use ferry_autoscaler::actuator::Held;
use ferry_autoscaler::config::{ActuatorConfig, KubernetesActuator, Region};
use ferry_autoscaler::kubernetes::{DELETION_COST, JOB_COST, Kubernetes, MAX_AGE_COST};
use serde_json::{Value, json};

const NS: &str = "ferry";

#[derive(Debug, Clone)]
struct Req {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Option<Value>,
}

#[derive(Debug)]
struct Deployment {
    /// `None`: the scale's `spec.replicas` is absent.
    replicas: Option<i64>,
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Cluster {
    deployments: BTreeMap<String, Deployment>,
    pods: Vec<Value>,
    /// Answer every pod PATCH with this status.
    pod_patch_fails: Option<StatusCode>,
    log: Vec<Req>,
}

type Shared = Arc<Mutex<Cluster>>;

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} {name:?} not found"),
    )
}

fn scale_json(name: &str, d: &Deployment) -> Value {
    let selector: Vec<String> = d
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut spec = json!({});
    if let Some(r) = d.replicas {
        spec["replicas"] = json!(r);
    }
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "resourceVersion": "7"},
        "spec": spec,
        "status": {"replicas": d.replicas.unwrap_or(0), "selector": selector.join(",")},
    })
}

fn deployment_json(name: &str, d: &Deployment) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 3},
        "spec": {
            "replicas": d.replicas,
            "selector": {"matchLabels": d.match_labels},
            "template": {
                "metadata": {"labels": d.match_labels},
                "spec": {"containers": [{"name": "worker", "image": "ferry:test", "args": ["worker"]}]},
            },
        },
        "status": {"replicas": d.replicas, "readyReplicas": d.replicas, "observedGeneration": 3},
    })
}

/// The pods whose labels match `selector` (`k=v,k=v` only: what a matchLabels selector is).
fn select(pods: &[Value], selector: &str) -> Vec<Value> {
    let wanted: Vec<(&str, &str)> = selector
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    pods.iter()
        .filter(|p| {
            wanted
                .iter()
                .all(|(k, v)| p["metadata"]["labels"][k].as_str() == Some(v))
        })
        .cloned()
        .collect()
}

async fn api(
    State(cluster): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut c = cluster.lock().unwrap();
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&body).expect("request body is JSON"))
    };
    c.log.push(Req {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: query.clone(),
        content_type: headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned()),
        body: body.clone(),
    });
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        (
            "GET",
            [
                "apis",
                "apps",
                "v1",
                "namespaces",
                NS,
                "deployments",
                name,
                "scale",
            ],
        ) => match c.deployments.get(*name) {
            Some(d) => axum::Json(scale_json(name, d)).into_response(),
            None => not_found("deployments.apps", name),
        },
        (
            "PATCH",
            [
                "apis",
                "apps",
                "v1",
                "namespaces",
                NS,
                "deployments",
                name,
                "scale",
            ],
        ) => {
            let Some(d) = c.deployments.get_mut(*name) else {
                return not_found("deployments.apps", name);
            };
            let replicas = body.as_ref().and_then(|b| b["spec"]["replicas"].as_i64());
            match replicas {
                Some(r) => {
                    d.replicas = Some(r);
                    axum::Json(scale_json(name, d)).into_response()
                }
                None => status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "no spec.replicas".into(),
                ),
            }
        }
        ("GET", ["apis", "apps", "v1", "namespaces", NS, "deployments", name]) => {
            match c.deployments.get(*name) {
                Some(d) => axum::Json(deployment_json(name, d)).into_response(),
                None => not_found("deployments.apps", name),
            }
        }
        ("GET", ["api", "v1", "namespaces", NS, "pods"]) => {
            let items = select(
                &c.pods,
                query.get("labelSelector").map_or("", String::as_str),
            );
            axum::Json(json!({
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": "42"},
                "items": items,
            }))
            .into_response()
        }
        ("PATCH", ["api", "v1", "namespaces", NS, "pods", name]) => {
            if let Some(code) = c.pod_patch_fails {
                return status(
                    code,
                    "Forbidden",
                    format!("pods {name:?} is forbidden: cannot patch"),
                );
            }
            let Some(p) = c.pods.iter_mut().find(|p| p["metadata"]["name"] == *name) else {
                return not_found("pods", name);
            };
            if let Some(a) = body
                .as_ref()
                .and_then(|b| b["metadata"]["annotations"].as_object())
            {
                for (k, v) in a {
                    p["metadata"]["annotations"][k] = v.clone();
                }
            }
            axum::Json(p.clone()).into_response()
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the fake API server does not serve {method} {uri}"),
        ),
    }
}

/// Start the fake API server; returns its URL.
async fn serve(cluster: Shared) -> String {
    let app = Router::new().fallback(api).with_state(cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        ("region".to_owned(), "eu-west".to_owned()),
    ])
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pod(name: &str, app: &str, started_secs_ago: i64, ready: bool) -> Value {
    let start = k8s_openapi::jiff::Timestamp::from_second(now() - started_secs_ago).unwrap();
    let r = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": labels(app),
            "annotations": {"kubectl.kubernetes.io/default-container": "worker"},
            "uid": format!("uid-{name}"),
        },
        "spec": {"containers": [{"name": "worker", "image": "ferry:test"}]},
        "status": {
            "phase": "Running",
            "startTime": start.to_string(),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "ContainersReady", "status": r},
                {"type": "Ready", "status": r},
            ],
            "containerStatuses": [{
                "name": "worker", "ready": ready, "restartCount": 0, "image": "ferry:test", "imageID": "",
                "started": true,
            }],
        },
    })
}

fn region(name: &str, actuator: KubernetesActuator) -> Region {
    Region {
        name: name.into(),
        redis: vec!["redis://127.0.0.1:6379".into()],
        redis_cluster: Vec::new(),
        redis_cluster_vshards: None,
        queues: vec!["default".into()],
        policy: Default::default(),
        actuator: ActuatorConfig::Kubernetes(actuator),
        helps_others: true,
    }
}

struct Fixture {
    cluster: Shared,
    actuator: Kubernetes,
}

impl Fixture {
    async fn new(spill: Option<&str>) -> Self {
        let mut c = Cluster::default();
        c.deployments.insert(
            "ferry-worker".into(),
            Deployment {
                replicas: Some(4),
                match_labels: labels("ferry-worker"),
            },
        );
        c.deployments.insert(
            "ferry-spill".into(),
            Deployment {
                replicas: None,
                match_labels: labels("ferry-spill"),
            },
        );
        c.pods = vec![
            pod("ferry-worker-7d9f-young", "ferry-worker", 600, true),
            pod("ferry-worker-7d9f-old", "ferry-worker", 2 * 3600, true),
            // The oldest, but not Ready: it goes first.
            pod("ferry-worker-7d9f-stuck", "ferry-worker", 3 * 3600, false),
            pod(
                "ferry-worker-7d9f-ancient",
                "ferry-worker",
                30 * 24 * 3600,
                true,
            ),
            // Another Deployment's pod: never touched.
            pod("ferry-spill-55c1-a", "ferry-spill", 5 * 3600, true),
        ];
        let cluster = Arc::new(Mutex::new(c));
        let url = serve(cluster.clone()).await;
        let cfg = KubernetesActuator {
            namespace: NS.into(),
            deployment: "ferry-worker".into(),
            spill_deployment: spill.map(Into::into),
            api_url: Some(url),
        };
        let actuator = Kubernetes::new(region("eu-west", cfg.clone()), cfg)
            .await
            .unwrap();
        Self { cluster, actuator }
    }

    fn take_log(&self) -> Vec<Req> {
        std::mem::take(&mut self.cluster.lock().unwrap().log)
    }

    fn replicas(&self, name: &str) -> Option<i64> {
        self.cluster.lock().unwrap().deployments[name].replicas
    }

    fn cost(&self, pod: &str) -> Option<String> {
        let c = self.cluster.lock().unwrap();
        let p = c
            .pods
            .iter()
            .find(|p| p["metadata"]["name"] == pod)
            .unwrap();
        p["metadata"]["annotations"][DELETION_COST]
            .as_str()
            .map(Into::into)
    }
}

fn calls(log: &[Req]) -> Vec<String> {
    log.iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

const SCALE: &str = "/apis/apps/v1/namespaces/ferry/deployments/ferry-worker/scale";
const MERGE: &str = "application/merge-patch+json";

#[tokio::test]
async fn current_reads_the_scale_subresource() {
    let f = Fixture::new(None).await;
    assert_eq!(f.actuator.current().await.unwrap(), 4);
    assert_eq!(calls(&f.take_log()), [format!("GET {SCALE}")]);

    f.cluster
        .lock()
        .unwrap()
        .deployments
        .get_mut("ferry-worker")
        .unwrap()
        .replicas = Some(9);
    assert_eq!(f.actuator.current().await.unwrap(), 9);
    // No spec.replicas: 0.
    f.cluster
        .lock()
        .unwrap()
        .deployments
        .get_mut("ferry-worker")
        .unwrap()
        .replicas = None;
    assert_eq!(f.actuator.current().await.unwrap(), 0);
}

#[tokio::test]
async fn scaling_up_patches_only_the_scale() {
    let f = Fixture::new(None).await;
    f.actuator.scale(7, &Held::new()).await.unwrap();
    let log = f.take_log();
    assert_eq!(
        calls(&log),
        [format!("GET {SCALE}"), format!("PATCH {SCALE}")]
    );
    assert_eq!(log[1].content_type.as_deref(), Some(MERGE));
    assert_eq!(log[1].body, Some(json!({"spec": {"replicas": 7}})));
    assert_eq!(f.replicas("ferry-worker"), Some(7));
    assert_eq!(
        f.cost("ferry-worker-7d9f-old"),
        None,
        "no pod is annotated on a scale-up"
    );
    assert_eq!(f.actuator.current().await.unwrap(), 7);
}

#[tokio::test]
async fn scaling_to_the_current_size_changes_nothing() {
    let f = Fixture::new(None).await;
    f.actuator.scale(4, &Held::new()).await.unwrap();
    assert_eq!(calls(&f.take_log()), [format!("GET {SCALE}")]);
    assert_eq!(f.replicas("ferry-worker"), Some(4));
}

#[tokio::test]
async fn scaling_down_marks_the_idlest_pods_then_lowers_the_replicas() {
    let f = Fixture::new(None).await;
    // Jobs held per consumer, as the broker reports them: the young pod's two workers hold 3, the stuck pod's
    // worker 1 (it is not Ready, so it goes first all the same). The ancient pod's worker holds none, and
    // "ferry-worker-7d9f-old2"'s consumer is not the old pod's (a pod's consumers are "<pod>-…").
    let held: Held = [
        ("ferry-worker-7d9f-young-7-1a2b3c4d", 2),
        ("ferry-worker-7d9f-young-8-5e6f7a8b", 1),
        ("ferry-worker-7d9f-stuck-7-0f0f0f0f", 1),
        ("ferry-worker-7d9f-old2-7-00000000", 5),
    ]
    .into_iter()
    .map(|(c, n)| (c.to_owned(), n))
    .collect();
    f.actuator.scale(1, &held).await.unwrap();
    let log = f.take_log();
    let c = calls(&log);
    assert_eq!(
        c[..3],
        [
            format!("GET {SCALE}"),
            "GET /apis/apps/v1/namespaces/ferry/deployments/ferry-worker".to_owned(),
            "GET /api/v1/namespaces/ferry/pods".to_owned(),
        ]
    );
    // The selector sent is the Deployment's matchLabels.
    assert_eq!(
        log[2].query.get("labelSelector").map(String::as_str),
        Some("app=ferry-worker,region=eu-west")
    );
    // Every pod of the Deployment annotated, and only those, before the scale PATCH, which comes last.
    let mut patched: Vec<&str> = c[3..c.len() - 1]
        .iter()
        .map(|s| {
            s.strip_prefix("PATCH /api/v1/namespaces/ferry/pods/")
                .expect(s)
        })
        .collect();
    patched.sort();
    assert_eq!(
        patched,
        [
            "ferry-worker-7d9f-ancient",
            "ferry-worker-7d9f-old",
            "ferry-worker-7d9f-stuck",
            "ferry-worker-7d9f-young"
        ]
    );
    for r in &log[3..] {
        assert_eq!(
            r.content_type.as_deref(),
            Some(MERGE),
            "{} {}",
            r.method,
            r.path
        );
    }
    for r in &log[3..log.len() - 1] {
        let body = r.body.as_ref().unwrap();
        let annotations = body["metadata"]["annotations"].as_object().unwrap();
        assert_eq!(annotations.len(), 1, "{body}");
        assert!(annotations[DELETION_COST].is_string(), "{body}");
        assert_eq!(
            body.as_object().unwrap().len(),
            1,
            "only metadata is patched: {body}"
        );
    }
    assert_eq!(c.last().unwrap(), &format!("PATCH {SCALE}"));
    assert_eq!(
        log.last().unwrap().body,
        Some(json!({"spec": {"replicas": 1}}))
    );
    assert_eq!(f.replicas("ferry-worker"), Some(1));

    // Costs: not Ready 0; otherwise a million per job held plus the age in seconds (capped), so the pod holding
    // jobs survives the idle ones, and of idle pods the oldest survives.
    let cost = |p: &str| -> u64 { f.cost(p).unwrap().parse().unwrap() };
    assert_eq!(cost("ferry-worker-7d9f-stuck"), 0);
    let young = cost("ferry-worker-7d9f-young");
    let old = cost("ferry-worker-7d9f-old");
    let ancient = cost("ferry-worker-7d9f-ancient");
    assert!((600..700).contains(&(young - 3 * JOB_COST)), "{young}");
    assert!((7200..7300).contains(&old), "{old}");
    assert_eq!(ancient, MAX_AGE_COST);
    assert!(young > ancient && ancient > old, "{young} {ancient} {old}");
    assert_eq!(
        f.cost("ferry-spill-55c1-a"),
        None,
        "another Deployment's pod"
    );
}

#[tokio::test]
async fn a_scale_down_happens_even_when_pods_cannot_be_annotated() {
    let f = Fixture::new(None).await;
    f.cluster.lock().unwrap().pod_patch_fails = Some(StatusCode::FORBIDDEN);
    f.actuator.scale(2, &Held::new()).await.unwrap();
    let c = calls(&f.take_log());
    assert_eq!(c.last().unwrap(), &format!("PATCH {SCALE}"));
    assert_eq!(f.replicas("ferry-worker"), Some(2));
}

#[tokio::test]
async fn spill_scales_the_spill_deployment() {
    let f = Fixture::new(Some("ferry-spill")).await;
    let busy = region(
        "us-east",
        KubernetesActuator {
            namespace: NS.into(),
            deployment: "other".into(),
            spill_deployment: None,
            api_url: None,
        },
    );
    let third = region(
        "ap-south",
        KubernetesActuator {
            namespace: NS.into(),
            deployment: "other".into(),
            spill_deployment: None,
            api_url: None,
        },
    );

    f.actuator.spill(&busy, 3, &Held::new()).await.unwrap();
    let log = f.take_log();
    let spill_scale = "/apis/apps/v1/namespaces/ferry/deployments/ferry-spill/scale";
    assert_eq!(
        calls(&log),
        [format!("GET {spill_scale}"), format!("PATCH {spill_scale}")]
    );
    assert_eq!(log[1].body, Some(json!({"spec": {"replicas": 3}})));
    assert_eq!(log[1].content_type.as_deref(), Some(MERGE));
    assert_eq!(f.replicas("ferry-spill"), Some(3));
    assert_eq!(
        f.replicas("ferry-worker"),
        Some(4),
        "the region's own pool is untouched"
    );

    // It serves one region at a time.
    let e = f
        .actuator
        .spill(&third, 2, &Held::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ferry-spill") && e.contains("us-east") && e.contains("ap-south"),
        "{e}"
    );
    f.actuator.spill(&third, 0, &Held::new()).await.unwrap();
    assert!(f.take_log().is_empty());
    assert_eq!(f.replicas("ferry-spill"), Some(3));

    // Back to zero: the spill deployment's pods are marked, then it scales down.
    f.actuator.spill(&busy, 0, &Held::new()).await.unwrap();
    let c = calls(&f.take_log());
    assert_eq!(c.last().unwrap(), &format!("PATCH {spill_scale}"));
    assert!(
        c.contains(&"PATCH /api/v1/namespaces/ferry/pods/ferry-spill-55c1-a".to_owned()),
        "{c:?}"
    );
    assert_eq!(f.replicas("ferry-spill"), Some(0));
    // Now free for another region.
    f.actuator.spill(&third, 1, &Held::new()).await.unwrap();
    assert_eq!(f.replicas("ferry-spill"), Some(1));
}

#[tokio::test]
async fn a_spill_deployment_per_helped_region_serves_several_at_once() {
    let f = Fixture::new(Some("ferry-spill-{region}")).await;
    for name in ["ferry-spill-us-east", "ferry-spill-ap-south"] {
        f.cluster.lock().unwrap().deployments.insert(
            name.into(),
            Deployment {
                replicas: Some(0),
                match_labels: labels(name),
            },
        );
    }
    let helped = |name: &str| {
        region(
            name,
            KubernetesActuator {
                namespace: NS.into(),
                deployment: "other".into(),
                spill_deployment: None,
                api_url: None,
            },
        )
    };
    f.actuator
        .spill(&helped("us-east"), 3, &Held::new())
        .await
        .unwrap();
    f.actuator
        .spill(&helped("ap-south"), 2, &Held::new())
        .await
        .unwrap();
    assert_eq!(f.replicas("ferry-spill-us-east"), Some(3));
    assert_eq!(f.replicas("ferry-spill-ap-south"), Some(2));
    assert_eq!(
        f.replicas("ferry-spill"),
        None,
        "the plain name is not used"
    );
    f.actuator
        .spill(&helped("us-east"), 0, &Held::new())
        .await
        .unwrap();
    assert_eq!(f.replicas("ferry-spill-us-east"), Some(0));
    assert_eq!(f.replicas("ferry-spill-ap-south"), Some(2));
}

#[tokio::test]
async fn spill_without_a_spill_deployment() {
    let f = Fixture::new(None).await;
    let busy = region(
        "us-east",
        KubernetesActuator {
            namespace: NS.into(),
            deployment: "other".into(),
            spill_deployment: None,
            api_url: None,
        },
    );
    f.actuator.spill(&busy, 0, &Held::new()).await.unwrap();
    let e = f
        .actuator
        .spill(&busy, 2, &Held::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spill-deployment") && e.contains("us-east"),
        "{e}"
    );
    assert!(f.take_log().is_empty(), "nothing asked of the API");
}

#[tokio::test]
async fn api_errors_name_the_deployment() {
    let f = Fixture::new(None).await;
    f.cluster.lock().unwrap().deployments.remove("ferry-worker");
    let e = f.actuator.current().await.unwrap_err().to_string();
    assert!(
        e.contains("ferry/ferry-worker") && e.contains("not found") && e.contains("404"),
        "{e}"
    );
    let e = f
        .actuator
        .scale(2, &Held::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ferry/ferry-worker") && e.contains("not found"),
        "{e}"
    );
    assert!(e.contains("eu-west"), "names the region: {e}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error() {
    // A port nothing listens on (bound then closed).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = KubernetesActuator {
        namespace: NS.into(),
        deployment: "ferry-worker".into(),
        spill_deployment: None,
        api_url: Some(format!("http://{addr}")),
    };
    let k = Kubernetes::new(region("eu-west", cfg.clone()), cfg)
        .await
        .unwrap();
    let e = k.current().await.unwrap_err().to_string();
    assert!(e.contains("ferry/ferry-worker"), "{e}");
}

#[tokio::test]
async fn a_bad_api_url_is_refused() {
    let cfg = KubernetesActuator {
        namespace: NS.into(),
        deployment: "ferry-worker".into(),
        spill_deployment: None,
        api_url: Some("not a url".into()),
    };
    let e = Kubernetes::new(region("eu-west", cfg.clone()), cfg)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("api-url") && e.contains("eu-west"), "{e}");
}
