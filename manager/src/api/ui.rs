//! The web UI: static assets from `ui/` at the repository root, embedded in the binary at
//! build time and served at `/` (no CDN, nothing fetched at run time).
//!
//! Every asset is served with its content type, an ETag (a hash of its bytes computed at
//! compile time) and `Cache-Control: no-cache`, so browsers revalidate and get `304 Not
//! Modified` until the binary changes. Pages get a strict Content-Security-Policy: scripts,
//! styles and connections from the manager itself only. The UI talks to the API under `/v1`
//! with the bearer token the user signs in with; these routes need no token (they hold no
//! data).

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file of the UI.
#[derive(Debug)]
pub struct Asset {
    /// Path under `ui/` (and under `/` when served).
    pub path: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Strong ETag of `body`, quoted.
    pub etag: &'static str,
}

/// FNV-1a 64 of `bytes`, evaluated at compile time for the ETags.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// `"` + 16 hex digits + `"` of a hash, at compile time.
const fn etag_bytes(h: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($path:literal, $ct:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/", $path));
        const TAG: [u8; 18] = etag_bytes(fnv1a(BODY));
        Asset {
            path: $path,
            body: BODY,
            content_type: $ct,
            etag: match std::str::from_utf8(&TAG) {
                Ok(s) => s,
                Err(_) => panic!("etag is ascii"),
            },
        }
    }};
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Every file of the UI (a unit test checks that `ui/` holds no other served file).
pub static ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("style.css", CSS),
    asset!("favicon.svg", SVG),
    asset!("js/app.js", JS),
    asset!("js/api.js", JS),
    asset!("js/store.js", JS),
    asset!("js/model.js", JS),
    asset!("js/ui.js", JS),
    asset!("js/chart.js", JS),
    asset!("js/pages/dashboard.js", JS),
    asset!("js/pages/volumes.js", JS),
    asset!("js/pages/volume.js", JS),
    asset!("js/pages/nodes.js", JS),
    asset!("js/pages/backups.js", JS),
    asset!("js/pages/settings.js", JS),
];

/// Content-Security-Policy of the pages: nothing from anywhere but the manager.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The asset served at a request path (`/` is `index.html`).
pub fn find(path: &str) -> Option<&'static Asset> {
    let p = path.trim_start_matches('/');
    let p = if p.is_empty() { "index.html" } else { p };
    ASSETS.iter().find(|a| a.path == p)
}

/// Answers a GET of `asset`: 304 when the browser's copy is current, else the bytes.
pub fn respond(asset: &'static Asset, request_headers: &HeaderMap) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.content_type == HTML {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    let fresh = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == asset.etag
        });
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    (StatusCode::OK, headers, asset.body).into_response()
}

/// Routes `/` and every asset path; merge it into the API router. Unknown paths fall
/// through to the router's own fallback.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let mut router = Router::new();
    for asset in ASSETS {
        let serve = move |headers: HeaderMap| async move { respond(asset, &headers) };
        router = router.route(&format!("/{}", asset.path), get(serve));
        if asset.path == "index.html" {
            router = router.route("/", get(serve));
        }
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn ui_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui")
    }

    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let entries = std::fs::read_dir(dir).expect("ui/ is readable");
        for entry in entries {
            let path = entry.expect("ui/ entry").path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if let Ok(rel) = path.strip_prefix(base) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }

    #[test]
    fn every_served_file_under_ui_is_embedded() {
        let base = ui_dir();
        let mut files = Vec::new();
        walk(&base, &base, &mut files);
        let served: Vec<&String> = files
            .iter()
            .filter(|f| {
                [".html", ".js", ".css", ".svg"]
                    .iter()
                    .any(|e| f.ends_with(e))
                    && !f.starts_with("screenshots/")
            })
            .collect();
        assert!(!served.is_empty());
        for f in served {
            assert!(
                find(f).is_some(),
                "ui/{f} is not listed in ASSETS (manager/src/api/ui.rs)"
            );
        }
    }

    #[test]
    fn content_types_follow_extensions() {
        for a in ASSETS {
            let want = match a.path.rsplit('.').next() {
                Some("html") => HTML,
                Some("js") => JS,
                Some("css") => CSS,
                Some("svg") => SVG,
                other => panic!("no content type for {other:?}"),
            };
            assert_eq!(a.content_type, want, "{}", a.path);
            assert_eq!(a.etag.len(), 18);
        }
    }

    #[test]
    fn index_is_served_at_root_and_etag_revalidates() {
        let index = find("/").expect("index");
        assert_eq!(index.path, "index.html");
        assert!(find("/js/app.js").is_some());
        assert!(find("/nope.js").is_none());
        assert!(find("/../Cargo.toml").is_none());

        let r = respond(index, &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], HTML);
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let etag = r.headers()[header::ETAG].clone();

        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(respond(index, &h).status(), StatusCode::NOT_MODIFIED);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0000\""));
        assert_eq!(respond(index, &h).status(), StatusCode::OK);
    }

    #[test]
    fn index_loads_only_embedded_same_origin_assets() {
        let index = std::str::from_utf8(find("/").expect("index").body).expect("utf-8");
        for attr in ["src=\"", "href=\""] {
            for part in index.split(attr).skip(1) {
                let target = part.split('"').next().unwrap_or_default();
                if target.starts_with('#') {
                    continue;
                }
                assert!(
                    find(target).is_some(),
                    "index.html refers to {target}, which is not embedded"
                );
            }
        }
    }
}
