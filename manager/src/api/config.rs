//! Settings and recurring-job routes.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::{ApiError, ApiJson, ApiResult};
use crate::resources::{RecurringJob, RecurringJobSpec, RecurringTask, Setting, SettingSpec};
use crate::settings::{self, SettingType};

/// A setting as the API shows it: its definition and current value.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SettingView {
    /// Name.
    pub name: String,
    /// Current value (the default when none was set).
    pub value: String,
    /// Default value.
    pub default: String,
    /// What it does.
    pub description: String,
    /// `bool` or `int`.
    #[serde(rename = "type")]
    pub type_: SettingType,
    /// Smallest value (int).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Largest value (int).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// Body of `PUT /v1/settings/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSetting {
    /// New value, as text (`"true"`, `"200"`).
    pub value: String,
}

/// Body of `POST /v1/recurringjobs` and `PUT /v1/recurringjobs/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecurringJobBody {
    /// Name (POST only; on PUT it must equal the path's or be absent).
    #[serde(default)]
    pub name: Option<String>,
    /// `snapshot` or `backup`.
    pub task: RecurringTask,
    /// 5-field cron expression, UTC.
    pub cron: String,
    /// How many to keep per volume, 1..=100.
    pub retain: u32,
    /// Volumes at once, 1..=100 (default 1).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Volumes it applies to; empty = all.
    #[serde(default)]
    pub volumes: Vec<String>,
}

async fn view(state: &ApiState, def: &settings::SettingDefinition) -> ApiResult<SettingView> {
    let value = match state.store.get::<Setting>(def.name).await? {
        Some(s) => s.spec.value,
        None => def.default.to_owned(),
    };
    Ok(SettingView {
        name: def.name.to_owned(),
        value,
        default: def.default.to_owned(),
        description: def.description.to_owned(),
        type_: def.type_,
        min: def.min,
        max: def.max,
    })
}

/// `GET /v1/settings`
pub async fn list_settings(State(state): State<ApiState>) -> ApiResult<Json<Vec<SettingView>>> {
    let mut out = Vec::new();
    for def in settings::CATALOG {
        out.push(view(&state, def).await?);
    }
    Ok(Json(out))
}

/// `GET /v1/settings/{name}`
pub async fn get_setting(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<SettingView>> {
    Ok(Json(view(&state, settings::definition(&name)?).await?))
}

/// `PUT /v1/settings/{name}`
pub async fn set_setting(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetSetting>,
) -> ApiResult<Json<SettingView>> {
    let def = settings::definition(&name)?;
    let value = settings::validate(&name, &req.value)?;
    for _ in 0..8 {
        let result = match state.store.get::<Setting>(def.name).await? {
            None => state
                .store
                .create(&Setting::new(
                    def.name,
                    SettingSpec {
                        value: value.clone(),
                    },
                ))
                .await
                .map(|_| ()),
            Some(mut s) => {
                s.spec.value = value.clone();
                state.store.update(&s).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(setting = def.name, value = %value, "setting changed");
                return Ok(Json(view(&state, def).await?));
            }
            Err(e)
                if e.is_conflict()
                    || matches!(e, crate::store::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "setting {name:?} kept changing; retry"
    )))
}

/// Checks a 5-field cron expression: minute hour day-of-month month day-of-week, each `*`,
/// a number, a range `a-b`, a list `a,b`, with an optional step `/n` (or 6 fields, seconds
/// first; the recurring-job controller's `controllers::cron` reads both).
pub fn validate_cron(expr: &str) -> Result<(), String> {
    const BOUNDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    // Six fields: a leading seconds field (schedules finer than a minute).
    let mut bounds = BOUNDS.to_vec();
    if fields.len() == 6 {
        bounds.insert(0, ("second", 0, 59));
    } else if fields.len() != 5 {
        return Err(format!(
            "cron {expr:?} must have 5 fields (minute hour day-of-month month day-of-week), or 6 \
             with seconds first, not {}",
            fields.len()
        ));
    }
    for (field, (what, lo, hi)) in fields.iter().zip(bounds) {
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (part, None),
            };
            if let Some(s) = step {
                match s.parse::<u32>() {
                    Ok(n) if n >= 1 && n <= hi.max(1) => {}
                    _ => return Err(format!("cron {expr:?}: bad step {s:?} in the {what} field")),
                }
            }
            if range == "*" {
                continue;
            }
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (a, b),
                None => (range, range),
            };
            let num = |s: &str| -> Result<u32, String> {
                match s.parse::<u32>() {
                    Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "cron {expr:?}: {s:?} is not a {what} in {lo}..={hi}"
                    )),
                }
            };
            if num(a)? > num(b)? {
                return Err(format!("cron {expr:?}: range {range:?} is backwards"));
            }
        }
    }
    Ok(())
}

fn job_spec(req: RecurringJobBody) -> ApiResult<RecurringJobSpec> {
    validate_cron(&req.cron).map_err(ApiError::bad_request)?;
    if !(1..=100).contains(&req.retain) {
        return Err(ApiError::bad_request(format!(
            "retain {} is outside 1..=100",
            req.retain
        )));
    }
    let concurrency = req.concurrency.unwrap_or(1);
    if !(1..=100).contains(&concurrency) {
        return Err(ApiError::bad_request(format!(
            "concurrency {concurrency} is outside 1..=100"
        )));
    }
    for v in &req.volumes {
        crate::store::validate_name(crate::resources::Kind::Volume, v)?;
    }
    Ok(RecurringJobSpec {
        task: req.task,
        cron: req.cron.split_whitespace().collect::<Vec<_>>().join(" "),
        retain: req.retain,
        concurrency,
        volumes: req.volumes,
    })
}

async fn get_job(state: &ApiState, name: &str) -> ApiResult<RecurringJob> {
    state
        .store
        .get::<RecurringJob>(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("recurring job {name:?} not found")))
}

/// `GET /v1/recurringjobs`
pub async fn list_jobs(State(state): State<ApiState>) -> ApiResult<Json<Vec<RecurringJob>>> {
    Ok(Json(state.store.list::<RecurringJob>().await?))
}

/// `GET /v1/recurringjobs/{name}`
pub async fn get_job_route(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<RecurringJob>> {
    Ok(Json(get_job(&state, &name).await?))
}

/// `POST /v1/recurringjobs`
pub async fn create_job(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<RecurringJobBody>,
) -> ApiResult<(StatusCode, Json<RecurringJob>)> {
    let Some(name) = req.name.clone() else {
        return Err(ApiError::bad_request("name is required"));
    };
    crate::store::validate_name(crate::resources::Kind::RecurringJob, &name)?;
    let spec = job_spec(req)?;
    let created = state.store.create(&RecurringJob::new(&name, spec)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `PUT /v1/recurringjobs/{name}`
pub async fn update_job(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RecurringJobBody>,
) -> ApiResult<Json<RecurringJob>> {
    if let Some(n) = &req.name
        && *n != name
    {
        return Err(ApiError::bad_request(format!(
            "body name {n:?} differs from {name:?}"
        )));
    }
    get_job(&state, &name).await?;
    let spec = job_spec(req)?;
    state
        .store
        .modify(&name, |j: &mut RecurringJob| {
            j.spec = spec.clone();
            Ok(())
        })
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("recurring job {name:?} not found")))
}

/// `DELETE /v1/recurringjobs/{name}`
pub async fn delete_job(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    get_job(&state, &name).await?;
    state.store.delete::<RecurringJob>(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::validate_cron;

    #[test]
    fn cron_expressions() {
        for ok in [
            "* * * * *",
            "*/5 * * * *",
            "0 3 * * 1-5",
            "0,30 */2 1 1-12/2 7",
            "*/2 * * * * *",
        ] {
            assert!(validate_cron(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "5-1 * * * *",
            "*/0 * * * *",
            "a * * * *",
            "* * 0 * *",
            "60 * * * * *",
        ] {
            assert!(validate_cron(bad).is_err(), "{bad}");
        }
    }
}
