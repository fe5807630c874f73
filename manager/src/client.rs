//! A Rust client of the manager's REST API, used by the CLI and the CSI driver.
//!
//! ```ignore
//! let c = Client::new("http://127.0.0.1:9500", token)?;
//! c.create_volume(&CreateVolume { name: "v1".into(), size: 1 << 30, ..CreateVolume::named("v1", 1 << 30) }).await?;
//! c.attach_volume("v1", "node-1").await?;
//! ```

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::api::backups::{RestoreBackup, SetBackupTarget};
pub use crate::api::config::{RecurringJobBody, SetSetting, SettingView};
pub use crate::api::error::ErrorBody;
pub use crate::api::nodes::{UpdateDisk, UpdateNode};
pub use crate::api::volumes::{
    AttachVolume, CreateBackup, CreateSnapshot, CreateVolume, ExpandVolume, UpdateVolume,
};
use crate::resources::{Backup, BackupTarget, Node, RecurringJob, Replica, Snapshot, Volume};

/// Default timeout of one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager answered with an error.
    #[error("{method} {path}: {status}: {message}")]
    Api {
        /// Method of the call.
        method: Method,
        /// Path of the call.
        path: String,
        /// HTTP status.
        status: StatusCode,
        /// `error` code from the body.
        code: String,
        /// `message` from the body.
        message: String,
    },
    /// The manager could not be reached, or the answer not read.
    #[error("{method} {path}: {source}")]
    Http {
        /// Method of the call.
        method: Method,
        /// Path of the call.
        path: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// The base URL is not usable.
    #[error("bad manager URL {0:?}: must be http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the manager said 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl CreateVolume {
    /// A request for a blank volume with every optional field at its default.
    pub fn named(name: impl Into<String>, size: u64) -> Self {
        CreateVolume {
            name: name.into(),
            size,
            number_of_replicas: None,
            frontend: None,
            data_locality: None,
            disk_selector: vec![],
            node_selector: vec![],
            stale_replica_timeout_seconds: 0,
            from_backup: None,
            labels: Default::default(),
        }
    }
}

/// A client of one manager.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn seg(s: &str) -> String {
    // Names are DNS-like; escape anything else so it cannot change the path.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Client {
    /// A client of the manager at `base` (`http://127.0.0.1:9500`) with `token`.
    pub fn new(base: &str, token: impl Into<String>) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base));
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|source| ClientError::Http {
                method: Method::GET,
                path: base.clone(),
                source,
            })?;
        Ok(Client {
            http,
            base,
            token: token.into(),
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>> {
        let http_err = |source| ClientError::Http {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(http_err)?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error, e.message),
                Err(_) => (String::new(), String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Err(ClientError::Api {
                method,
                path: path.to_owned(),
                status,
                code,
                message,
            });
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(ClientError::Api {
                method,
                path: path.to_owned(),
                status,
                code: "decode".into(),
                message: format!("cannot parse the answer: {e}"),
            }),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.expect(Method::GET, path, None::<&()>).await
    }

    async fn expect<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        match self.call(method.clone(), path, body).await? {
            Some(v) => Ok(v),
            None => Err(ClientError::Api {
                method,
                path: path.to_owned(),
                status: StatusCode::NO_CONTENT,
                code: "decode".into(),
                message: "empty answer".into(),
            }),
        }
    }

    async fn no_answer(&self, method: Method, path: &str) -> Result<()> {
        self.call::<(), serde_json::Value>(method, path, None)
            .await
            .map(|_| ())
    }

    /// `GET /v1/volumes`
    pub async fn list_volumes(&self) -> Result<Vec<Volume>> {
        self.get("/v1/volumes").await
    }
    /// `GET /v1/volumes/{name}`
    pub async fn get_volume(&self, name: &str) -> Result<Volume> {
        self.get(&format!("/v1/volumes/{}", seg(name))).await
    }
    /// `POST /v1/volumes`
    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        self.expect(Method::POST, "/v1/volumes", Some(req)).await
    }
    /// `PATCH /v1/volumes/{name}`
    pub async fn update_volume(&self, name: &str, req: &UpdateVolume) -> Result<Volume> {
        self.expect(
            Method::PATCH,
            &format!("/v1/volumes/{}", seg(name)),
            Some(req),
        )
        .await
    }
    /// `DELETE /v1/volumes/{name}`
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        self.no_answer(Method::DELETE, &format!("/v1/volumes/{}", seg(name)))
            .await
    }
    /// `POST /v1/volumes/{name}/attach`
    pub async fn attach_volume(&self, name: &str, node: &str) -> Result<Volume> {
        let body = AttachVolume {
            node: node.to_owned(),
        };
        self.expect(
            Method::POST,
            &format!("/v1/volumes/{}/attach", seg(name)),
            Some(&body),
        )
        .await
    }
    /// `POST /v1/volumes/{name}/detach`
    pub async fn detach_volume(&self, name: &str) -> Result<Volume> {
        self.expect(
            Method::POST,
            &format!("/v1/volumes/{}/detach", seg(name)),
            None::<&()>,
        )
        .await
    }
    /// `POST /v1/volumes/{name}/expand`
    pub async fn expand_volume(&self, name: &str, size: u64) -> Result<Volume> {
        let body = ExpandVolume { size };
        self.expect(
            Method::POST,
            &format!("/v1/volumes/{}/expand", seg(name)),
            Some(&body),
        )
        .await
    }
    /// `GET /v1/volumes/{name}/snapshots`
    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<Snapshot>> {
        self.get(&format!("/v1/volumes/{}/snapshots", seg(volume)))
            .await
    }
    /// `POST /v1/volumes/{name}/snapshots`
    pub async fn create_snapshot(&self, volume: &str, req: &CreateSnapshot) -> Result<Snapshot> {
        self.expect(
            Method::POST,
            &format!("/v1/volumes/{}/snapshots", seg(volume)),
            Some(req),
        )
        .await
    }
    /// `GET /v1/volumes/{name}/snapshots/{snapshot}`
    pub async fn get_snapshot(&self, volume: &str, snapshot: &str) -> Result<Snapshot> {
        self.get(&format!(
            "/v1/volumes/{}/snapshots/{}",
            seg(volume),
            seg(snapshot)
        ))
        .await
    }
    /// `DELETE /v1/volumes/{name}/snapshots/{snapshot}`
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        self.no_answer(
            Method::DELETE,
            &format!("/v1/volumes/{}/snapshots/{}", seg(volume), seg(snapshot)),
        )
        .await
    }
    /// `POST /v1/volumes/{name}/snapshots/{snapshot}/revert`
    pub async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let path = format!(
            "/v1/volumes/{}/snapshots/{}/revert",
            seg(volume),
            seg(snapshot)
        );
        self.expect(Method::POST, &path, None::<&()>).await
    }
    /// `POST /v1/volumes/{name}/backups`
    pub async fn create_backup(&self, volume: &str, req: &CreateBackup) -> Result<Backup> {
        self.expect(
            Method::POST,
            &format!("/v1/volumes/{}/backups", seg(volume)),
            Some(req),
        )
        .await
    }
    /// `GET /v1/volumes/{name}/replicas`
    pub async fn list_replicas(&self, volume: &str) -> Result<Vec<Replica>> {
        self.get(&format!("/v1/volumes/{}/replicas", seg(volume)))
            .await
    }
    /// `DELETE /v1/volumes/{name}/replicas/{replica}`
    pub async fn remove_replica(&self, volume: &str, replica: &str) -> Result<()> {
        self.no_answer(
            Method::DELETE,
            &format!("/v1/volumes/{}/replicas/{}", seg(volume), seg(replica)),
        )
        .await
    }
    /// `GET /v1/nodes`
    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        self.get("/v1/nodes").await
    }
    /// `GET /v1/nodes/{name}`
    pub async fn get_node(&self, name: &str) -> Result<Node> {
        self.get(&format!("/v1/nodes/{}", seg(name))).await
    }
    /// `PATCH /v1/nodes/{name}`
    pub async fn update_node(&self, name: &str, req: &UpdateNode) -> Result<Node> {
        self.expect(
            Method::PATCH,
            &format!("/v1/nodes/{}", seg(name)),
            Some(req),
        )
        .await
    }
    /// `GET /v1/backups[?volume=]`
    pub async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<Backup>> {
        match volume {
            Some(v) => self.get(&format!("/v1/backups?volume={}", seg(v))).await,
            None => self.get("/v1/backups").await,
        }
    }
    /// `GET /v1/backups/{name}`
    pub async fn get_backup(&self, name: &str) -> Result<Backup> {
        self.get(&format!("/v1/backups/{}", seg(name))).await
    }
    /// `DELETE /v1/backups/{name}`
    pub async fn delete_backup(&self, name: &str) -> Result<()> {
        self.no_answer(Method::DELETE, &format!("/v1/backups/{}", seg(name)))
            .await
    }
    /// `POST /v1/backups/{name}/restore`
    pub async fn restore_backup(&self, name: &str, req: &RestoreBackup) -> Result<Volume> {
        self.expect(
            Method::POST,
            &format!("/v1/backups/{}/restore", seg(name)),
            Some(req),
        )
        .await
    }
    /// `GET /v1/backuptarget`
    pub async fn get_backup_target(&self) -> Result<BackupTarget> {
        self.get("/v1/backuptarget").await
    }
    /// `PUT /v1/backuptarget`
    pub async fn set_backup_target(&self, req: &SetBackupTarget) -> Result<BackupTarget> {
        self.expect(Method::PUT, "/v1/backuptarget", Some(req))
            .await
    }
    /// `GET /v1/settings`
    pub async fn list_settings(&self) -> Result<Vec<SettingView>> {
        self.get("/v1/settings").await
    }
    /// `GET /v1/settings/{name}`
    pub async fn get_setting(&self, name: &str) -> Result<SettingView> {
        self.get(&format!("/v1/settings/{}", seg(name))).await
    }
    /// `PUT /v1/settings/{name}`
    pub async fn set_setting(&self, name: &str, value: &str) -> Result<SettingView> {
        let body = SetSetting {
            value: value.to_owned(),
        };
        self.expect(
            Method::PUT,
            &format!("/v1/settings/{}", seg(name)),
            Some(&body),
        )
        .await
    }
    /// `GET /v1/recurringjobs`
    pub async fn list_recurring_jobs(&self) -> Result<Vec<RecurringJob>> {
        self.get("/v1/recurringjobs").await
    }
    /// `POST /v1/recurringjobs`
    pub async fn create_recurring_job(&self, req: &RecurringJobBody) -> Result<RecurringJob> {
        self.expect(Method::POST, "/v1/recurringjobs", Some(req))
            .await
    }
    /// `PUT /v1/recurringjobs/{name}`
    pub async fn update_recurring_job(
        &self,
        name: &str,
        req: &RecurringJobBody,
    ) -> Result<RecurringJob> {
        self.expect(
            Method::PUT,
            &format!("/v1/recurringjobs/{}", seg(name)),
            Some(req),
        )
        .await
    }
    /// `DELETE /v1/recurringjobs/{name}`
    pub async fn delete_recurring_job(&self, name: &str) -> Result<()> {
        self.no_answer(Method::DELETE, &format!("/v1/recurringjobs/{}", seg(name)))
            .await
    }
    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String> {
        let http_err = |source| ClientError::Http {
            method: Method::GET,
            path: "/metrics".into(),
            source,
        };
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(http_err)?;
        let status = resp.status();
        let text = resp.text().await.map_err(http_err)?;
        if !status.is_success() {
            return Err(ClientError::Api {
                method: Method::GET,
                path: "/metrics".into(),
                status,
                code: String::new(),
                message: text,
            });
        }
        Ok(text)
    }
}
