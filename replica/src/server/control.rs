//! The replica's gRPC control service (`ironhorn.replica.v1.ReplicaControl`).
//!
//! A thin adapter over [`Store`]: every request is validated, handed to the store on
//! tokio's blocking pool (store calls are synchronous file I/O), and the result is mapped
//! back to protobuf. Store errors become [`tonic::Status`] codes through one
//! `From<StoreError>` conversion, with the error's text as the message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ironhorn_proto::replica as pb;
use ironhorn_proto::replica::replica_control_server::{ReplicaControl, ReplicaControlServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::StoreError;
use crate::store::{BLOCK_SIZE, CHUNK_SIZE, LayerInfo, Store};

/// Most chunk checksums sent in one [`pb::ChunkChecksums`] message.
pub const CHECKSUM_BATCH: usize = 65536;

/// Most layer bytes carried by one [`pb::LayerData`] message (1 MiB).
pub const READ_LAYER_MAX_DATA: usize = 1 << 20;

/// Messages buffered per streaming call before the producer waits for the client.
const STREAM_DEPTH: usize = 4;

/// How many names `CreateSnapshot` tries when it has to make one up and the first is taken.
const GENERATED_NAME_TRIES: u32 = 16;

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match err {
            StoreError::InvalidRange { .. }
            | StoreError::InvalidSize { .. }
            | StoreError::InvalidName { .. }
            | StoreError::EpochLowered { .. } => Status::invalid_argument(message),
            StoreError::SnapshotNotFound(_) | StoreError::NotAReplica { .. } => {
                Status::not_found(message)
            }
            StoreError::SnapshotExists(_) => Status::already_exists(message),
            StoreError::SnapshotState { .. } | StoreError::Rebuilding(_) => {
                Status::failed_precondition(message)
            }
            StoreError::NoSpace { .. } => Status::resource_exhausted(message),
            StoreError::CorruptMetadata { .. } => Status::data_loss(message),
            StoreError::Io { .. } => Status::internal(message),
        }
    }
}

/// The `ReplicaControl` gRPC service of one replica.
#[derive(Clone)]
pub struct ControlService {
    store: Arc<Store>,
    dir: PathBuf,
    data_address: SocketAddr,
}

impl ControlService {
    /// A service over `store` (kept in `dir`) whose data protocol listens on `data_address`.
    pub fn new(store: Arc<Store>, dir: PathBuf, data_address: SocketAddr) -> Self {
        ControlService {
            store,
            dir,
            data_address,
        }
    }

    /// Wraps the service for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> ReplicaControlServer<ControlService> {
        ReplicaControlServer::new(self)
    }

    /// Runs `f` with the store on the blocking pool and maps its error to a `Status`.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> crate::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(result) => result.map_err(|e| {
                tracing::debug!(error = %e, "control request failed");
                Status::from(e)
            }),
            Err(join) => {
                tracing::error!(error = %join, "store task failed");
                Err(Status::internal(format!("store task failed: {join}")))
            }
        }
    }

    /// The replica's info, read on the blocking pool.
    pub(crate) async fn info_now(&self) -> Result<pb::ReplicaInfo, Status> {
        let dir = self.dir.display().to_string();
        let data_address = self.data_address.to_string();
        self.blocking(move |store| Ok(replica_info(store, dir, data_address)))
            .await
    }
}

/// Builds a [`pb::ReplicaInfo`] from the store's current state.
fn replica_info(store: &Store, dir: String, data_address: String) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        dir,
        size: store.size(),
        block_size: BLOCK_SIZE as u32,
        epoch: store.epoch(),
        head: store.head_name(),
        data_address,
        snapshot_count: u32::try_from(store.snapshot_count()).unwrap_or(u32::MAX),
        allocated_bytes: store.allocated_bytes(),
        rebuilding: store.is_rebuilding(),
    }
}

/// Converts a store layer description into its protobuf form.
fn layer_to_pb(layer: LayerInfo) -> pb::Layer {
    pb::Layer {
        name: layer.name,
        parent: layer.parent.unwrap_or_default(),
        children: layer.children,
        is_head: layer.is_head,
        removed: layer.removed,
        created_unix_ms: layer.created_unix_ms,
        labels: layer.labels.into_iter().collect(),
        allocated_bytes: layer.allocated_bytes,
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Rejects an empty layer name in a request before it reaches the store.
fn require_name(name: &str, what: &str) -> Result<(), Status> {
    if name.is_empty() {
        Err(Status::invalid_argument(format!(
            "{what} must not be empty"
        )))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl ReplicaControl for ControlService {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        Ok(Response::new(self.info_now().await?))
    }

    async fn set_epoch(
        &self,
        request: Request<pb::SetEpochRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let epoch = request.into_inner().epoch;
        self.blocking(move |store| store.set_epoch(epoch)).await?;
        tracing::info!(epoch, "epoch raised");
        Ok(Response::new(self.info_now().await?))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Layer>, Status> {
        let req = request.into_inner();
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let layer = if req.name.is_empty() {
            self.blocking(move |store| {
                let base = format!("snap-{}", unix_ms());
                let mut last = None;
                for attempt in 0..GENERATED_NAME_TRIES {
                    let name = if attempt == 0 {
                        base.clone()
                    } else {
                        format!("{base}-{attempt}")
                    };
                    match store.snapshot(&name, labels.clone()) {
                        Err(e @ StoreError::SnapshotExists(_)) => last = Some(e),
                        other => return other,
                    }
                }
                Err(last.unwrap_or(StoreError::SnapshotExists(base)))
            })
            .await?
        } else {
            let name = req.name;
            self.blocking(move |store| store.snapshot(&name, labels))
                .await?
        };
        tracing::info!(snapshot = %layer.name, "snapshot created");
        Ok(Response::new(layer_to_pb(layer)))
    }

    async fn list_layers(
        &self,
        _request: Request<pb::ListLayersRequest>,
    ) -> Result<Response<pb::ListLayersResponse>, Status> {
        let (layers, head_chain) = self
            .blocking(|store| Ok((store.layers(), store.head_chain())))
            .await?;
        Ok(Response::new(pb::ListLayersResponse {
            layers: layers.into_iter().map(layer_to_pb).collect(),
            head_chain,
        }))
    }

    async fn remove_snapshot(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<pb::RemoveSnapshotResponse>, Status> {
        let name = request.into_inner().name;
        require_name(&name, "snapshot name")?;
        let logged = name.clone();
        self.blocking(move |store| store.remove_snapshot(&name))
            .await?;
        tracing::info!(snapshot = %logged, "snapshot removed");
        Ok(Response::new(pb::RemoveSnapshotResponse {}))
    }

    async fn purge(
        &self,
        _request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let purged = self.blocking(|store| store.purge()).await?;
        tracing::info!(?purged, "purge done");
        Ok(Response::new(pb::PurgeResponse { purged }))
    }

    async fn revert(
        &self,
        request: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let name = request.into_inner().name;
        require_name(&name, "snapshot name")?;
        self.blocking(move |store| store.revert(&name)).await?;
        Ok(Response::new(self.info_now().await?))
    }

    async fn expand(
        &self,
        request: Request<pb::ExpandRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let size = request.into_inner().size;
        self.blocking(move |store| store.expand(size)).await?;
        Ok(Response::new(self.info_now().await?))
    }

    type LayerChecksumsStream = ReceiverStream<Result<pb::ChunkChecksums, Status>>;

    async fn layer_checksums(
        &self,
        request: Request<pb::LayerChecksumsRequest>,
    ) -> Result<Response<Self::LayerChecksumsStream>, Status> {
        let layer = request.into_inner().layer;
        require_name(&layer, "layer")?;
        // Computing checksums may read the whole layer: do it before answering so that a
        // bad layer name is the call's status rather than a stream error.
        let sums = self.blocking(move |store| store.checksums(&layer)).await?;
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        tokio::spawn(async move {
            let chunk_size = CHUNK_SIZE as u32;
            if sums.is_empty() {
                let _ = tx
                    .send(Ok(pb::ChunkChecksums {
                        chunk_size,
                        chunks: Vec::new(),
                    }))
                    .await;
                return;
            }
            for batch in sums.chunks(CHECKSUM_BATCH) {
                let msg = pb::ChunkChecksums {
                    chunk_size,
                    chunks: batch
                        .iter()
                        .map(|&(index, crc)| pb::ChunkChecksum { index, crc })
                        .collect(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn block_status(
        &self,
        request: Request<pb::BlockStatusRequest>,
    ) -> Result<Response<pb::BlockStatusResponse>, Status> {
        let req = request.into_inner();
        let extents = self
            .blocking(move |store| store.block_status(req.offset, req.length))
            .await?;
        Ok(Response::new(pb::BlockStatusResponse {
            extents: extents
                .into_iter()
                .map(|(length, hole)| pb::Extent { length, hole })
                .collect(),
        }))
    }

    type ReadLayerStream = ReceiverStream<Result<pb::LayerData, Status>>;

    async fn read_layer(
        &self,
        request: Request<pb::ReadLayerRequest>,
    ) -> Result<Response<Self::ReadLayerStream>, Status> {
        let req = request.into_inner();
        require_name(&req.layer, "layer")?;
        let layer = req.layer;
        let chunks: Vec<u64> = if req.chunks.is_empty() {
            let name = layer.clone();
            let sums = self.blocking(move |store| store.checksums(&name)).await?;
            sums.iter().map(|&(index, _)| index).collect()
        } else {
            let size = self.store.size();
            let chunk_count = size.div_ceil(CHUNK_SIZE);
            if let Some(bad) = req.chunks.iter().find(|&&c| c >= chunk_count) {
                return Err(Status::invalid_argument(format!(
                    "chunk {bad} is past the end of the volume ({chunk_count} chunks of {CHUNK_SIZE} bytes)"
                )));
            }
            req.chunks
        };
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || stream_layer(&store, &layer, &chunks, &tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends the allocated runs of `chunks` of `layer` down `tx` (blocking), at most
/// [`READ_LAYER_MAX_DATA`] bytes per message, with `chunk` set on each chunk's first one.
/// Stops at the first store error (sent as the stream's error) or when the client leaves.
fn stream_layer(
    store: &Store,
    layer: &str,
    chunks: &[u64],
    tx: &mpsc::Sender<Result<pb::LayerData, Status>>,
) {
    for &chunk in chunks {
        let runs = match store.read_chunk(layer, chunk) {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(layer, chunk, error = %e, "read_layer failed");
                let _ = tx.blocking_send(Err(Status::from(e)));
                return;
            }
        };
        let mut first = Some(chunk);
        for msg in split_runs(runs) {
            let msg = pb::LayerData {
                chunk: first.take(),
                ..msg
            };
            if tx.blocking_send(Ok(msg)).is_err() {
                return;
            }
        }
        if let Some(chunk) = first {
            // No allocated data in this chunk: tell the receiver so it can punch it.
            let msg = pb::LayerData {
                offset: chunk * CHUNK_SIZE,
                data: Default::default(),
                chunk: Some(chunk),
            };
            if tx.blocking_send(Ok(msg)).is_err() {
                return;
            }
        }
    }
}

/// Cuts runs `(offset, data)` into messages of at most [`READ_LAYER_MAX_DATA`] bytes.
fn split_runs(runs: Vec<(u64, Bytes)>) -> impl Iterator<Item = pb::LayerData> {
    runs.into_iter().flat_map(|(offset, data)| {
        let len = data.len();
        (0..len)
            .step_by(READ_LAYER_MAX_DATA)
            .map(move |start| {
                let end = (start + READ_LAYER_MAX_DATA).min(len);
                pb::LayerData {
                    offset: offset + start as u64,
                    data: data.slice(start..end).into(),
                    chunk: None,
                }
            })
            .collect::<Vec<_>>()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn split_runs_caps_message_size() {
        let big = Bytes::from(vec![7u8; READ_LAYER_MAX_DATA * 2 + 512]);
        let small = Bytes::from(vec![1u8; 4096]);
        let msgs: Vec<_> = split_runs(vec![(0, big), (10 << 20, small)]).collect();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].offset, 0);
        assert_eq!(msgs[1].offset, READ_LAYER_MAX_DATA as u64);
        assert_eq!(msgs[2].offset, 2 * READ_LAYER_MAX_DATA as u64);
        assert_eq!(msgs[2].data.len(), 512);
        assert_eq!(msgs[3].offset, 10 << 20);
        assert!(msgs.iter().all(|m| m.data.len() <= READ_LAYER_MAX_DATA));
    }

    #[test]
    fn split_runs_skips_empty_runs() {
        let msgs: Vec<_> = split_runs(vec![(0, Bytes::new())]).collect();
        assert!(msgs.is_empty());
    }

    #[test]
    fn status_codes() {
        use tonic::Code;
        let cases: Vec<(StoreError, Code)> = vec![
            (
                StoreError::InvalidRange {
                    offset: 1,
                    length: 2,
                    size: 3,
                },
                Code::InvalidArgument,
            ),
            (
                StoreError::InvalidSize {
                    size: 1,
                    reason: "x",
                },
                Code::InvalidArgument,
            ),
            (
                StoreError::InvalidName {
                    name: "a/b".into(),
                    reason: "slash",
                },
                Code::InvalidArgument,
            ),
            (
                StoreError::EpochLowered {
                    requested: 1,
                    current: 2,
                },
                Code::InvalidArgument,
            ),
            (StoreError::SnapshotNotFound("s".into()), Code::NotFound),
            (StoreError::NotAReplica { dir: "/x".into() }, Code::NotFound),
            (StoreError::SnapshotExists("s".into()), Code::AlreadyExists),
            (
                StoreError::SnapshotState {
                    name: "s".into(),
                    reason: "head".into(),
                },
                Code::FailedPrecondition,
            ),
            (StoreError::Rebuilding("x"), Code::FailedPrecondition),
            (
                StoreError::NoSpace {
                    op: "write",
                    path: "/x".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                StoreError::CorruptMetadata {
                    path: "/x".into(),
                    reason: "crc".into(),
                },
                Code::DataLoss,
            ),
            (
                StoreError::Io {
                    op: "read",
                    path: "/x".into(),
                    source: std::io::Error::other("boom"),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }
}
