//! `GET /v1/events`: server-sent events of resource changes, from the store's watch.
//!
//! Each event's `event:` field is `Added`, `Modified` or `Deleted`, its `data:` the JSON
//! `{"type", "kind", "object"}`. `?kind=Volume` narrows to one kind; `?replay=true` first
//! sends every existing object as `Added`. A keep-alive comment goes out every 15 s. When
//! the watcher falls behind, an `event: Lagged` is sent and the stream ends: reconnect.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use schemars::JsonSchema;
use serde::Deserialize;

use super::ApiState;
use super::error::{ApiError, ApiQuery, ApiResult};
use crate::resources::Kind;

/// Query of `GET /v1/events`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct EventsQuery {
    /// Only this kind (`Volume`, or its plural `volumes`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Send every existing object first.
    #[serde(default)]
    pub replay: bool,
}

/// `GET /v1/events`
pub async fn events(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let kind: Option<Kind> = match &q.kind {
        Some(k) => Some(
            k.parse()
                .map_err(|e: crate::resources::UnknownKind| ApiError::bad_request(e.to_string()))?,
        ),
        None => None,
    };
    let raw = state.store.watch_all(q.replay).await?;
    let stream = raw
        .filter(move |e| {
            futures::future::ready(match e {
                Ok(e) => kind.is_none_or(|k| k == e.kind),
                Err(_) => true,
            })
        })
        .map(|e| {
            Ok(match e {
                Ok(e) => {
                    let name = format!("{:?}", e.type_);
                    Event::default()
                        .event(name)
                        .json_data(&e)
                        .unwrap_or_else(|_| Event::default().event("Error"))
                }
                Err(e) => Event::default().event("Lagged").data(e.to_string()),
            })
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
