//! HTTP bodies: the input is POSTed as a job, as a batch and as a channel message to a live gateway. Bad bodies
//! must get a 4xx problem+json that names no internal type; nothing may answer 5xx or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let h = ferry_fuzz::harness();
    for path in [
        "/v1/queues/fuzz/jobs",
        "/v1/queues/fuzz/jobs/batch",
        "/v1/channels/fuzz/publish",
    ] {
        let (status, ctype, body) = h.rt.block_on(async {
            let r = h
                .http
                .post(format!("{}{path}", h.base))
                .bearer_auth(&h.token)
                .header("content-type", "application/json")
                .body(data.to_vec())
                .send()
                .await
                .expect("the gateway answers");
            let status = r.status().as_u16();
            let ctype = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (status, ctype, r.bytes().await.expect("body"))
        });
        assert!(status < 500, "{path}: {status} for {data:?}: {body:?}");
        if status >= 400 {
            ferry_fuzz::assert_problem(status, &ctype, &body);
        }
    }
});
