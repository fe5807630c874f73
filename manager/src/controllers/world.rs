//! One read of the whole cluster state, taken at the start of a reconcile pass, with the
//! lookups the controllers need.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;

use super::liveness::Liveness;
use super::settings::ControlSettings;
use crate::resources::condition::{ConditionStatus, get_condition};
use crate::resources::engine::Engine;
use crate::resources::node::Node;
use crate::resources::replica::Replica;
use crate::resources::snapshot::Snapshot;
use crate::resources::volume::Volume;
use crate::store::{Store, StoreError};

/// Every resource the controllers look at.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Volumes.
    pub volumes: Vec<Volume>,
    /// Replicas.
    pub replicas: Vec<Replica>,
    /// Engines.
    pub engines: Vec<Engine>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Settings the controllers use.
    pub settings: ControlSettings,
}

impl World {
    /// Reads everything.
    pub async fn load(store: &Store) -> Result<World, StoreError> {
        Ok(World {
            volumes: store.list::<Volume>().await?,
            replicas: store.list::<Replica>().await?,
            engines: store.list::<Engine>().await?,
            nodes: store.list::<Node>().await?,
            snapshots: store.list::<Snapshot>().await?,
            settings: ControlSettings::load(store).await?,
        })
    }

    /// Replicas of a volume.
    pub fn replicas_of<'a>(&'a self, volume: &'a str) -> impl Iterator<Item = &'a Replica> + 'a {
        self.replicas
            .iter()
            .filter(move |r| r.spec.volume_name == volume)
    }

    /// The engine of a volume.
    pub fn engine_of(&self, volume: &str) -> Option<&Engine> {
        self.engines.iter().find(|e| e.spec.volume_name == volume)
    }

    /// A volume by name.
    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name_any() == name)
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name_any() == name)
    }

    /// Nodes whose agent reports now (Ready condition true).
    pub fn ready_nodes(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|n| node_ready(n))
            .map(|n| n.name_any())
            .collect()
    }

    /// Whether the node's agent has been silent for longer than the node-down timeout
    /// (its replicas are then replaced).
    pub fn node_gone(&self, liveness: &Liveness, node: &str) -> bool {
        self.node(node).is_none() || liveness.silent_for(node) > self.settings.node_down_timeout
    }
}

/// Whether the node's Ready condition holds.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| get_condition(&s.conditions, "Ready"))
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// A node is shown not ready after this much silence (three missed reports).
pub fn not_ready_after(report_interval: Duration) -> Duration {
    report_interval * 3 + Duration::from_millis(500)
}
