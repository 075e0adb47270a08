//! `GET /debug/pprof/profile` against a real gateway over real HTTP: off by default (404), `admin` only, limits
//! named in 400s, a decodable pprof protobuf, one capture at a time (409).
//!
//! Every capture happens in one test: the sampler is process-wide, so captures in tests running side by side in
//! one process (`cargo test`) would collide.

use std::sync::Arc;

use ferry_broker::{EngineConfig, MemoryBroker};
use ferry_telemetry::profile::protos::{Message, Profile};
use reqwest::Method;

use crate::support::{ADMIN, TestApp, USER, is_problem, token};

const PATH: &str = "/debug/pprof/profile";

async fn gateway(profiling: bool) -> TestApp {
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    TestApp::start(broker, |c| c.profiling = profiling).await
}

/// The raw answer: status, headers and body bytes (a profile is not text).
async fn fetch(
    app: &TestApp,
    query: &str,
    token: &str,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let res = app
        .client
        .get(format!("{}{PATH}{query}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .expect("answered");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, headers, res.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn off_by_default_answers_404_saying_how_to_turn_it_on() {
    let app = gateway(false).await;
    let admin = token("ops", ADMIN, None);
    // Authentication comes first, as openapi.json documents: 401 without a token, 403 without `admin`.
    is_problem(&app.anon(PATH).await, 401, "unauthorized");
    let reader = token("ops", "jobs:read", None);
    is_problem(&app.get(PATH, &reader).await, 403, "forbidden");
    for r in [
        app.get(PATH, &admin).await,
        app.get(&format!("{PATH}?seconds=1"), &admin).await,
    ] {
        is_problem(&r, 404, "not-found");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains("off"), "{detail}");
        assert!(detail.contains("--profiling"), "{detail}");
    }
    // The default config, not just this test's: nothing served unless asked.
    let (app, _) = TestApp::memory().await;
    is_problem(&app.get(PATH, &admin).await, 404, "not-found");
}

#[tokio::test]
async fn needs_a_token_with_the_admin_scope() {
    let app = gateway(true).await;
    let r = app.anon(&format!("{PATH}?seconds=1")).await;
    is_problem(&r, 401, "unauthorized");
    let r = app
        .send(
            Method::GET,
            &format!("{PATH}?seconds=1"),
            Some("not.a.jwt"),
            None,
        )
        .await;
    is_problem(&r, 401, "unauthorized");
    // Every other scope, queues:admin included, is not enough.
    let user = token(
        "u1",
        &format!("{USER} queues:admin queues:read publish"),
        None,
    );
    let r = app.get(&format!("{PATH}?seconds=1"), &user).await;
    is_problem(&r, 403, "forbidden");
    assert!(r.body["detail"].as_str().unwrap().contains("admin"));
}

#[tokio::test]
async fn bad_parameters_are_400s_naming_the_parameter() {
    let app = gateway(true).await;
    let admin = token("ops", ADMIN, None);
    for (query, field) in [
        ("?seconds=0", "seconds"),
        ("?seconds=61", "seconds"),
        ("?seconds=abc", "seconds"),
        ("?seconds=-5", "seconds"),
        ("?hz=abc", "hz"),
        ("?hz=0", "hz"),
        ("?hz=1001", "hz"),
        ("?seconds=1&hz=2.5", "hz"),
    ] {
        let r = app.get(&format!("{PATH}{query}"), &admin).await;
        is_problem(&r, 400, "bad-request");
        assert_eq!(r.field(), field, "{query}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().starts_with(field),
            "{query}: {:?}",
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_gets_a_pprof_profile_and_captures_are_one_at_a_time() {
    let app = gateway(true).await;
    let admin = token("ops", ADMIN, None);

    let started = std::time::Instant::now();
    let (status, headers, body) = fetch(&app, "?seconds=1&hz=250", &admin).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(headers["content-type"], "application/octet-stream");
    let disposition = headers["content-disposition"].to_str().unwrap();
    let name = disposition
        .strip_prefix("attachment; filename=\"ferry-gateway-")
        .and_then(|s| s.strip_suffix(".pb\""))
        .unwrap_or_else(|| panic!("{disposition}"));
    let unix: u64 = name.parse().expect("unix seconds in the file name");
    assert!(unix > 1_600_000_000, "{disposition}");
    let profile = Profile::decode(body.as_slice()).expect("a pprof Profile protobuf");
    assert!(!profile.sample_type.is_empty());
    assert!(
        profile.duration_nanos >= 900_000_000,
        "{}",
        profile.duration_nanos
    );
    // The sample types are named through the string table ("samples"/"count", "cpu"/"nanoseconds").
    let names: Vec<&str> = profile
        .sample_type
        .iter()
        .filter_map(|t| profile.string_table.get(t.ty as usize))
        .map(String::as_str)
        .collect();
    assert!(names.contains(&"cpu"), "{names:?}");

    // Two captures overlapping in time: exactly one is served, the other is refused at once with 409.
    let first = {
        let (app, admin) = (&app, admin.clone());
        async move { fetch(app, "?seconds=3", &admin).await }
    };
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        fetch(&app, "?seconds=3", &admin).await
    };
    let ((s1, h1, b1), (s2, h2, b2)) = tokio::join!(first, second);
    let mut statuses = [s1, s2];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    let (served, (refused_headers, refused)) = if s1 == 409 {
        (b2, (h1, b1))
    } else {
        (b1, (h2, b2))
    };
    assert!(Profile::decode(served.as_slice()).is_ok());
    assert_eq!(refused_headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&refused).expect("problem+json");
    assert_eq!(problem["type"], "urn:ferry:problem:conflict");
    assert_eq!(problem["status"], 409);

    // Once done, the next capture is served again.
    let (status, _, body) = fetch(&app, "?seconds=1", &admin).await;
    assert_eq!(status, 200);
    assert!(Profile::decode(body.as_slice()).is_ok());
}
