//! The `ReplicaSync` gRPC service: rebuild and reconciliation, driven by the engine.
//!
//! `Sync` pulls from a healthy peer: it lists the peer's layers, compares the crc32 of every
//! chunk of every snapshot (and, for reconciliation, of the head) with its own, fetches only
//! the chunks that differ, deletes snapshots the peer does not have, and finally gives its
//! layers the peer's tree. Progress (bytes compared or copied of the total) streams back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use ironhorn_proto::replica::replica_control_client::ReplicaControlClient;
use ironhorn_proto::replica::replica_sync_server::{ReplicaSync, ReplicaSyncServer};
use ironhorn_proto::replica::{self as pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use super::control::ControlService;
use crate::meta::HEAD_NAME;
use crate::store::{CHUNK_SIZE, Store};

/// The `ReplicaSync` service of one replica.
#[derive(Clone)]
pub struct SyncService {
    store: Arc<Store>,
    control: ControlService,
}

impl SyncService {
    /// A sync service over `store`; `control` answers the info it returns.
    pub fn new(store: Arc<Store>, control: ControlService) -> Self {
        SyncService { store, control }
    }

    /// Wraps the service for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> ReplicaSyncServer<SyncService> {
        ReplicaSyncServer::new(self)
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> crate::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("store task failed: {e}"))),
    }
}

async fn peer_sums(
    peer: &mut ReplicaControlClient<Channel>,
    layer: &str,
) -> Result<HashMap<u64, u32>, Status> {
    let mut s = peer
        .layer_checksums(pb::LayerChecksumsRequest {
            layer: layer.to_owned(),
        })
        .await?
        .into_inner();
    let mut out = HashMap::new();
    while let Some(b) = s.message().await? {
        out.extend(b.chunks.into_iter().map(|c| (c.index, c.crc)));
    }
    Ok(out)
}

/// One layer to bring over: its name and which chunks to fetch or clear.
struct Plan {
    layer: String,
    fetch: Vec<u64>,
    clear: Vec<u64>,
    same: u64,
}

async fn run_sync(
    store: Arc<Store>,
    source: String,
    include_head: bool,
    tx: mpsc::Sender<Result<pb::SyncProgress, Status>>,
) -> Result<(), Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{source}"))
        .map_err(|e| Status::invalid_argument(format!("bad source address {source:?}: {e}")))?;
    let mut peer = ReplicaControlClient::new(
        endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect to {source}: {e}")))?,
    )
    .max_decoding_message_size(64 << 20);
    let listing = peer
        .list_layers(pb::ListLayersRequest {})
        .await?
        .into_inner();
    let head_parent = listing.head_chain.iter().rev().nth(1).cloned();
    let snaps: Vec<&pb::Layer> = listing.layers.iter().filter(|l| !l.is_head).collect();
    for l in &snaps {
        let (name, created, labels) = (
            l.name.clone(),
            l.created_unix_ms,
            l.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
        );
        blocking(&store, move |s| s.prepare_layer(&name, created, labels)).await?;
    }
    let mut layers: Vec<String> = snaps.iter().map(|l| l.name.clone()).collect();
    if include_head {
        layers.push(HEAD_NAME.to_owned());
    }
    // Plan first, so that the total is known before copying starts.
    let mut plans = Vec::new();
    let mut total = 0u64;
    for layer in layers {
        let theirs = peer_sums(&mut peer, &layer).await?;
        let name = layer.clone();
        let mine = blocking(&store, move |s| s.checksums(&name)).await?;
        let mine: HashMap<u64, u32> = mine.iter().copied().collect();
        let mut fetch: Vec<u64> = theirs
            .iter()
            .filter(|(c, crc)| mine.get(c) != Some(crc))
            .map(|(c, _)| *c)
            .collect();
        fetch.sort_unstable();
        let mut clear: Vec<u64> = mine
            .keys()
            .filter(|c| !theirs.contains_key(c))
            .copied()
            .collect();
        clear.sort_unstable();
        total += theirs.len() as u64 * CHUNK_SIZE;
        plans.push(Plan {
            same: (theirs.len() - fetch.len()) as u64 * CHUNK_SIZE,
            layer,
            fetch,
            clear,
        });
    }
    let mut done = 0u64;
    let mut skipped = 0u64;
    let progress = |layer: &str, done, skipped| pb::SyncProgress {
        layer: layer.to_owned(),
        done_bytes: done,
        total_bytes: total,
        skipped_bytes: skipped,
    };
    for plan in plans {
        done += plan.same;
        skipped += plan.same;
        for c in plan.clear {
            let name = plan.layer.clone();
            blocking(&store, move |s| s.import_chunk(&name, c, &[])).await?;
        }
        if !plan.fetch.is_empty() {
            let mut data = peer
                .read_layer(pb::ReadLayerRequest {
                    layer: plan.layer.clone(),
                    chunks: plan.fetch.clone(),
                })
                .await?
                .into_inner();
            let mut current: Option<(u64, Vec<(u64, Bytes)>)> = None;
            loop {
                let msg = data.message().await?;
                let next_chunk = msg.as_ref().map(|m| m.chunk);
                let finished = match (&next_chunk, &current) {
                    (None, Some(_)) | (Some(Some(_)), Some(_)) => current.take(),
                    _ => None,
                };
                if let Some((c, runs)) = finished {
                    let name = plan.layer.clone();
                    blocking(&store, move |s| s.import_chunk(&name, c, &runs)).await?;
                    done += CHUNK_SIZE;
                    let _ = tx.send(Ok(progress(&plan.layer, done, skipped))).await;
                }
                let Some(m) = msg else { break };
                if let Some(c) = m.chunk {
                    current = Some((c, Vec::new()));
                }
                match current.as_mut() {
                    Some((_, runs)) if !m.data.is_empty() => {
                        runs.push((m.offset, Bytes::from(m.data)))
                    }
                    Some(_) => {}
                    None => {
                        return Err(Status::data_loss(
                            "peer sent layer data before naming its chunk",
                        ));
                    }
                }
            }
        }
        let _ = tx.send(Ok(progress(&plan.layer, done, skipped))).await;
    }
    let tree: Vec<(String, Option<String>, bool)> = snaps
        .iter()
        .map(|l| {
            let parent = (!l.parent.is_empty()).then(|| l.parent.clone());
            (l.name.clone(), parent, l.removed)
        })
        .collect();
    blocking(&store, move |s| {
        s.finish_sync(&tree, head_parent.as_deref())
    })
    .await?;
    info!(done, skipped, total, "sync finished");
    let _ = tx.send(Ok(progress("", total, skipped))).await;
    Ok(())
}

#[tonic::async_trait]
impl ReplicaSync for SyncService {
    async fn begin_rebuild(
        &self,
        _request: Request<pb::BeginRebuildRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        blocking(&self.store, |s| s.begin_rebuild()).await?;
        Ok(Response::new(self.control.info_now().await?))
    }

    type SyncStream = ReceiverStream<Result<pb::SyncProgress, Status>>;

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let req = request.into_inner();
        if req.source.is_empty() {
            return Err(Status::invalid_argument("source address is empty"));
        }
        let (tx, rx) = mpsc::channel(16);
        let store = Arc::clone(&self.store);
        let span = info_span!("sync", source = %req.source, include_head = req.include_head);
        tokio::spawn(
            async move {
                // Stop as soon as the engine stops listening (it gave up on this rebuild):
                // a sync left running, e.g. blocked on a hung peer, could otherwise wake up
                // later and import into, or finish, the layers of a newer rebuild.
                let result = tokio::select! {
                    r = run_sync(store, req.source, req.include_head, tx.clone()) => r,
                    () = tx.closed() => Err(Status::cancelled("the engine abandoned the sync")),
                };
                if let Err(e) = result {
                    warn!(error = %e, "sync failed");
                    let _ = tx.send(Err(e)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn finish_rebuild(
        &self,
        _request: Request<pb::FinishRebuildRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        blocking(&self.store, |s| s.finish_rebuild()).await?;
        Ok(Response::new(self.control.info_now().await?))
    }
}
