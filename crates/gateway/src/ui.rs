//! The web dashboard at `/ui`: one HTML page, its ES modules and its stylesheet, embedded in the binary with
//! `include_str!` so ferry needs no npm to build or run (there is no build step: the files in `src/ui/` are what
//! the browser runs). The page talks to the same `/v1` routes and `/v1/ws` as any client, with the token the
//! user pastes; nothing here is authenticated, because nothing here is data.
//!
//! Every answer carries a strict `Content-Security-Policy` (no inline script or style, connections only to this
//! origin), `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` (a `#token=` never leaves in a
//! `Referer` anyway, but nothing else should either). Assets are revalidated by `ETag` (`no-cache`), so a new
//! binary's dashboard is picked up at once; an unknown asset is a 404 problem.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;

/// The policy of every `/ui` answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `(name, content type, body)` of every embedded asset; `index.html` is also `/ui` and `/ui/`.
pub const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/api.js"),
    ),
    (
        "dom.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/dom.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("ui/app.css"),
    ),
];

/// The `/ui` routes, merged into the gateway's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{asset}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    serve(&name, &headers)
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|(n, _, _)| *n == name) else {
        return ApiError::NotFound(format!("no dashboard asset {name:?}")).into_response();
    };
    let ((_, content_type, body), etag) = (ASSETS[i], &ETAGS[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag.as_str()));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    res
}

/// A strong validator per asset, by position in [`ASSETS`], from its content (the workspace's stable hash),
/// computed once: the same binary always gives the same tags.
static ETAGS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|(_, _, body)| {
            format!(
                "\"{:016x}\"",
                ferry_broker::shard::stable_hash(body.as_bytes())
            )
        })
        .collect()
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_no_inline_script_or_style() {
        let (_, _, html) = ASSETS[0];
        assert!(!html.contains("<script>"), "inline script in index.html");
        assert!(!html.contains("<style"), "inline style in index.html");
        assert!(
            !html.contains(" style="),
            "inline style attribute in index.html"
        );
        assert!(
            !html
                .split_whitespace()
                .any(|w| w.starts_with("on") && w.contains('=')),
            "inline event handler in index.html"
        );
        for (name, _, body) in ASSETS {
            assert!(!body.contains("innerHTML"), "{name} uses innerHTML");
        }
    }
}
