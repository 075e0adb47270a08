//! JWT headers: the input is used as a token's header JSON, the token correctly signed with the gateway's HS256
//! secret, and also verified as a raw token. Only a header that says `HS256` (with or without a `kid`, `typ`) may
//! be accepted; `none`, other algorithms, `jku`/`x5u`/`jwk` tricks and malformed JSON must be refused, never
//! panic.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fuzz_target!(|data: &[u8]| {
    let h = ferry_fuzz::harness();
    if let Ok(raw) = std::str::from_utf8(data) {
        let _ = h.auth.verify(raw);
    }
    let claims =
        serde_json::json!({ "sub": "fuzzer", "exp": 4_000_000_000u64, "scope": "jobs:read" });
    let signing_input = format!(
        "{}.{}",
        B64.encode(data),
        B64.encode(serde_json::to_vec(&claims).unwrap())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(ferry_fuzz::SECRET).unwrap();
    mac.update(signing_input.as_bytes());
    let token = format!(
        "{signing_input}.{}",
        B64.encode(mac.finalize().into_bytes())
    );
    if h.auth.verify(&token).is_ok() {
        let header: serde_json::Value =
            serde_json::from_slice(data).expect("an accepted header is JSON");
        assert_eq!(
            header["alg"], "HS256",
            "accepted a token whose header is {header}"
        );
    }
});
