//! Backup targets: an object store (S3-compatible, or a local/NFS directory) opened from a
//! URL, and the object layout inside it.
//!
//! `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&path_style=true&allow_http=true&anonymous=true]`
//! and `file:///ABSOLUTE/PATH` both go through the `object_store` crate, so every operation
//! runs the same code for both. S3 credentials come from the standard AWS environment
//! variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web
//! identity or container credentials); the region from the URL, the options, then
//! `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::codec::BlockHash;
use crate::error::{BackupError, Result};

/// Default number of block transfers in flight per operation.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Most block transfers in flight per operation.
pub const MAX_CONCURRENCY: usize = 64;

/// Options of a target beyond its URL (the URL's query wins over these).
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// S3 endpoint, e.g. `http://127.0.0.1:9000` (default: AWS).
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// Path-style S3 requests (default: on when an endpoint is set).
    pub path_style: Option<bool>,
    /// Block transfers in flight per operation, 1..=[`MAX_CONCURRENCY`]; default
    /// [`DEFAULT_CONCURRENCY`]. Memory in use is about twice this many blocks.
    pub concurrency: usize,
    /// Lease timings of the target lock (see [`crate::lock`]).
    pub lease: crate::lock::LeaseOptions,
    /// S3 credentials; default: from the environment.
    pub credentials: Option<Credentials>,
}

/// Static S3 credentials (instead of the environment's).
#[derive(Clone)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            endpoint: None,
            region: None,
            path_style: None,
            concurrency: DEFAULT_CONCURRENCY,
            lease: crate::lock::LeaseOptions::default(),
            credentials: None,
        }
    }
}

/// An opened backup target. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Target {
    pub(crate) store: Arc<dyn ObjectStore>,
    url: String,
    /// The directory of a `file://` target (for cleaning up interrupted writes).
    pub(crate) local_root: Option<PathBuf>,
    pub(crate) opts: TargetOptions,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parsed {
    S3 {
        bucket: String,
        prefix: String,
        query: Vec<(String, String)>,
    },
    File(PathBuf),
}

fn bad(url: &str, reason: impl Into<String>) -> BackupError {
    BackupError::InvalidTarget {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

fn percent_decode(url: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(url, "bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(url, "not UTF-8 after percent decoding"))
}

fn parse(url: &str) -> Result<Parsed> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
        {
            return Err(bad(
                url,
                "bucket must be lowercase letters, digits, '-' and '.'",
            ));
        }
        let prefix = percent_decode(url, prefix.trim_matches('/'))?;
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad(url, "prefix must not contain '.' or '..' parts"));
        }
        let mut q = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            let k = percent_decode(url, k)?;
            if !matches!(
                k.as_str(),
                "endpoint" | "region" | "path_style" | "allow_http" | "anonymous"
            ) {
                return Err(bad(
                    url,
                    format!(
                        "unknown query parameter {k:?} (endpoint, region, path_style, allow_http, anonymous)"
                    ),
                ));
            }
            q.push((k, percent_decode(url, v)?));
        }
        Ok(Parsed::S3 {
            bucket: bucket.to_owned(),
            prefix,
            query: q,
        })
    } else if let Some(rest) = url.strip_prefix("file://") {
        if rest.contains('?') || rest.contains('#') {
            return Err(bad(url, "file URLs take no query"));
        }
        let path = percent_decode(url, rest)?;
        if !path.starts_with('/') {
            return Err(bad(url, "file URLs need an absolute path: file:///PATH"));
        }
        if path.split('/').any(|p| p == "..") {
            return Err(bad(url, "path must not contain '..'"));
        }
        Ok(Parsed::File(PathBuf::from(path)))
    } else {
        Err(bad(url, "expected s3://BUCKET/PREFIX or file:///PATH"))
    }
}

fn parse_bool(url: &str, key: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(url, format!("{key} must be true or false"))),
    }
}

fn has_env(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

impl Target {
    /// Opens the target at `url`. A `file://` directory is created when missing. Nothing is
    /// sent to an S3 endpoint until an operation runs.
    pub fn open(url: &str, opts: &TargetOptions) -> Result<Target> {
        if opts.concurrency == 0 || opts.concurrency > MAX_CONCURRENCY {
            return Err(BackupError::invalid(
                "concurrency",
                opts.concurrency.to_string(),
                format!("must be 1 to {MAX_CONCURRENCY}"),
            ));
        }
        match parse(url)? {
            Parsed::File(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| BackupError::io(format!("create {}", dir.display()), e))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(url, e.to_string()))?;
                Ok(Target {
                    store: Arc::new(store),
                    url: url.to_owned(),
                    local_root: Some(dir),
                    opts: opts.clone(),
                })
            }
            Parsed::S3 {
                bucket,
                prefix,
                query,
            } => {
                let get = |k: &str| {
                    query
                        .iter()
                        .rev()
                        .find(|(q, _)| q == k)
                        .map(|(_, v)| v.clone())
                };
                let endpoint = get("endpoint").or_else(|| opts.endpoint.clone());
                let region = get("region")
                    .or_else(|| opts.region.clone())
                    .or_else(|| std::env::var("AWS_REGION").ok())
                    .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                    .unwrap_or_else(|| "us-east-1".into());
                let path_style = match get("path_style") {
                    Some(v) => parse_bool(url, "path_style", &v)?,
                    None => opts.path_style.unwrap_or(endpoint.is_some()),
                };
                let anonymous = match get("anonymous") {
                    Some(v) => parse_bool(url, "anonymous", &v)?,
                    None => false,
                };
                let allow_http = match get("allow_http") {
                    Some(v) => parse_bool(url, "allow_http", &v)?,
                    None => endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                };
                let has_creds = (has_env("AWS_ACCESS_KEY_ID") && has_env("AWS_SECRET_ACCESS_KEY"))
                    || has_env("AWS_WEB_IDENTITY_TOKEN_FILE")
                    || has_env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                    || has_env("AWS_CONTAINER_CREDENTIALS_FULL_URI");
                if !anonymous && !has_creds && opts.credentials.is_none() {
                    return Err(bad(
                        url,
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                         (or web identity / container credentials), or anonymous=true",
                    ));
                }
                let client = object_store::ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120));
                let retry = object_store::RetryConfig {
                    max_retries: 5,
                    retry_timeout: Duration::from_secs(60),
                    ..Default::default()
                };
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_region(region)
                    .with_virtual_hosted_style_request(!path_style)
                    .with_allow_http(allow_http)
                    .with_skip_signature(anonymous)
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(c) = &opts.credentials {
                    b = b
                        .with_access_key_id(&c.access_key_id)
                        .with_secret_access_key(&c.secret_access_key);
                }
                let s3 = b.build().map_err(|e| bad(url, e.to_string()))?;
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.as_str()))
                };
                Ok(Target {
                    store,
                    url: url.to_owned(),
                    local_root: None,
                    opts: opts.clone(),
                })
            }
        }
    }

    /// The URL the target was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Transfers in flight per operation.
    pub fn concurrency(&self) -> usize {
        self.opts.concurrency
    }

    pub(crate) async fn get(&self, key: &Path) -> Result<bytes::Bytes> {
        let r = self
            .store
            .get(key)
            .await
            .map_err(|e| BackupError::store("get", key.as_ref(), e))?;
        r.bytes()
            .await
            .map_err(|e| BackupError::store("get", key.as_ref(), e))
    }

    /// Whether `key` exists.
    pub(crate) async fn exists(&self, key: &Path) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(BackupError::store("head", key.as_ref(), e)),
        }
    }

    pub(crate) async fn put(
        &self,
        key: &Path,
        data: bytes::Bytes,
        mode: PutMode,
    ) -> Result<object_store::PutResult> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.store
            .put_opts(key, PutPayload::from(data), opts)
            .await
            .map_err(|e| BackupError::store("put", key.as_ref(), e))
    }

    pub(crate) async fn delete(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BackupError::store("delete", key.as_ref(), e)),
        }
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let p = Path::from(prefix);
        self.store
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| BackupError::store("list", prefix, e))
    }

    /// Removes files that an interrupted write left in a `file://` target's `dir` (the
    /// store writes `NAME#N` and renames it into place). Only called under the exclusive
    /// lock, when no write can be running.
    pub(crate) fn remove_staged_files(&self, dir: &str) -> u64 {
        let Some(root) = &self.local_root else {
            return 0;
        };
        fn walk(d: &FsPath, n: &mut u64) {
            let Ok(rd) = std::fs::read_dir(d) else { return };
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&p, n);
                } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
                    && let Some((_, suffix)) = name.rsplit_once('#')
                    && !suffix.is_empty()
                    && suffix.bytes().all(|b| b.is_ascii_digit())
                    && std::fs::remove_file(&p).is_ok()
                {
                    *n += 1;
                }
            }
        }
        let mut n = 0;
        walk(&root.join(dir), &mut n);
        n
    }
}

/// Object keys inside a target (see backup/README.md).
pub mod layout {
    use super::*;

    /// Prefix of every block object.
    pub const BLOCKS: &str = "blocks";
    /// Prefix of every volume's objects.
    pub const VOLUMES: &str = "volumes";
    /// Prefix of lock objects.
    pub const LOCKS: &str = "locks";
    /// Suffix of manifest objects.
    pub const MANIFEST_SUFFIX: &str = ".manifest";

    /// `blocks/<first two hex digits>/<hash>.blk`
    pub fn block(hash: &BlockHash) -> Path {
        let hex = hash.to_hex();
        Path::from(format!("{BLOCKS}/{}/{hex}.blk", &hex[..2]))
    }

    /// The hash named by a block key, if it is one.
    pub fn block_hash(key: &Path) -> Option<BlockHash> {
        let name = key.filename()?;
        BlockHash::from_hex(name.strip_suffix(".blk")?)
    }

    /// `volumes/<volume>/volume.json`: the backup volume's settings.
    pub fn volume_config(volume: &str) -> Path {
        Path::from(format!("{VOLUMES}/{volume}/volume.json"))
    }

    /// `volumes/<volume>/backups/` (listing prefix of one volume's manifests).
    pub fn manifests_of(volume: &str) -> String {
        format!("{VOLUMES}/{volume}/backups")
    }

    /// `volumes/<volume>/backups/<id>.manifest`
    pub fn manifest(volume: &str, id: &str) -> Path {
        Path::from(format!("{VOLUMES}/{volume}/backups/{id}{MANIFEST_SUFFIX}"))
    }

    /// The (volume, id) of a manifest key, if it is one.
    pub fn parse_manifest(key: &Path) -> Option<(String, String)> {
        let parts: Vec<_> = key.parts().collect();
        match parts.as_slice() {
            [v, vol, b, file] if v.as_ref() == VOLUMES && b.as_ref() == "backups" => {
                let id = file.as_ref().strip_suffix(MANIFEST_SUFFIX)?;
                Some((vol.as_ref().to_owned(), id.to_owned()))
            }
            _ => None,
        }
    }

    /// `locks/<id>.lock`
    pub fn lock(id: &str) -> Path {
        Path::from(format!("{LOCKS}/{id}.lock"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse("s3://bkt/a/b?endpoint=http://127.0.0.1:9000&path_style=true").unwrap(),
            Parsed::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into(),
                query: vec![
                    ("endpoint".into(), "http://127.0.0.1:9000".into()),
                    ("path_style".into(), "true".into())
                ],
            }
        );
        assert_eq!(
            parse("s3://bkt").unwrap(),
            Parsed::S3 {
                bucket: "bkt".into(),
                prefix: "".into(),
                query: vec![]
            }
        );
        assert_eq!(
            parse("file:///mnt/nfs/backups").unwrap(),
            Parsed::File("/mnt/nfs/backups".into())
        );
        for badurl in [
            "http://x",
            "s3://",
            "s3://Bucket/x",
            "s3://b/../x",
            "s3://b?foo=1",
            "file://relative",
            "file:///a/../b",
            "file:///a?x=1",
            "s3://b/%zz",
        ] {
            assert!(parse(badurl).is_err(), "{badurl}");
        }
    }

    #[test]
    fn layout_round_trips() {
        let h = BlockHash::of(b"x");
        assert_eq!(layout::block_hash(&layout::block(&h)), Some(h));
        let k = layout::manifest("vol-1", "bk-1");
        assert_eq!(
            layout::parse_manifest(&k),
            Some(("vol-1".into(), "bk-1".into()))
        );
        assert_eq!(layout::parse_manifest(&layout::volume_config("v")), None);
    }

    #[test]
    fn s3_without_credentials_is_refused() {
        // Never reaches for instance metadata: without credentials nothing is built.
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
            && std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_none()
            && std::env::var_os("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_none()
            && std::env::var_os("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_none()
        {
            let e = Target::open("s3://bkt/p", &TargetOptions::default()).unwrap_err();
            assert!(e.to_string().contains("credentials"), "{e}");
        }
        assert!(
            Target::open(
                "s3://bkt/p?anonymous=true&endpoint=http://127.0.0.1:1",
                &TargetOptions::default()
            )
            .is_ok()
        );
    }
}
