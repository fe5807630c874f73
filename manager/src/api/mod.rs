//! The REST API under `/v1` (axum), JSON in and out, with bearer-token auth, an OpenAPI
//! document, server-sent events and Prometheus metrics.
//!
//! Handlers only write desired state (specs, or new Snapshot/Backup resources) and read
//! status; the controllers act on it. Every `/v1` route and `/metrics` needs
//! `Authorization: Bearer TOKEN`; `/v1/openapi.json` and the web UI's static assets do not
//! (they hold no data). Errors are `{"error": CODE, "message": "..."}` ([`error`]).

pub mod backups;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod nodes;
pub mod openapi;
pub mod ui;
pub mod volumes;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::trace::TraceLayer;

use crate::store::Store;
use error::ApiError;

/// Largest request body the API reads.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What every handler gets.
#[derive(Clone)]
pub struct ApiState {
    /// The store.
    pub store: Store,
    /// The bearer token every call must carry.
    pub token: Arc<str>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match header.and_then(|h| h.strip_prefix("Bearer ")) {
        Some(t) if same(t.trim().as_bytes(), state.token.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::unauthorized("the bearer token is wrong").into_response(),
        None => ApiError::unauthorized(
            "missing Authorization: Bearer TOKEN header (the token is printed when the manager first starts, and stored in DATA_DIR/token)",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /v1/openapi.json")
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi::document())
}

/// The API's routes (`/v1/...` and `/metrics`), with auth, tracing and body limits.
/// Merge other routes (the UI) beside it with [`Router::merge`]: they get no auth.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{name}",
            get(volumes::get)
                .patch(volumes::update)
                .delete(volumes::delete),
        )
        .route("/v1/volumes/{name}/attach", post(volumes::attach))
        .route("/v1/volumes/{name}/detach", post(volumes::detach))
        .route("/v1/volumes/{name}/expand", post(volumes::expand))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(volumes::list_snapshots).post(volumes::create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            get(volumes::get_snapshot_route).delete(volumes::delete_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}/revert",
            post(volumes::revert_snapshot),
        )
        .route("/v1/volumes/{name}/backups", post(volumes::create_backup))
        .route("/v1/volumes/{name}/replicas", get(volumes::list_replicas))
        .route(
            "/v1/volumes/{name}/replicas/{replica}",
            axum::routing::delete(volumes::remove_replica),
        )
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes/{name}", get(nodes::get).patch(nodes::update))
        .route("/v1/backups", get(backups::list))
        .route(
            "/v1/backups/{name}",
            get(backups::get).delete(backups::delete),
        )
        .route("/v1/backups/{name}/restore", post(backups::restore))
        .route(
            "/v1/backuptarget",
            get(backups::get_target).put(backups::set_target),
        )
        .route("/v1/settings", get(config::list_settings))
        .route(
            "/v1/settings/{name}",
            get(config::get_setting).put(config::set_setting),
        )
        .route(
            "/v1/recurringjobs",
            get(config::list_jobs).post(config::create_job),
        )
        .route(
            "/v1/recurringjobs/{name}",
            get(config::get_job_route)
                .put(config::update_job)
                .delete(config::delete_job),
        )
        .route("/v1/events", get(events::events))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/{*rest}", axum::routing::any(not_found))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .merge(v1)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http())
}
