//! The control plane's resource kinds: spec (desired, written by users and the API) and
//! status (observed, written by controllers), with Kubernetes-style metadata and conditions.
//!
//! Every kind derives kube's `CustomResource` (group `ironhorn.io`, version `v1beta1`,
//! namespaced, status subresource), so the same types serve the embedded store and, as
//! CRDs, the Kubernetes store.

pub mod backup;
pub mod condition;
pub mod engine;
pub mod node;
pub mod recurring_job;
pub mod replica;
pub mod setting;
pub mod snapshot;
pub mod volume;

use std::fmt;
use std::str::FromStr;

use kube::core::NamespaceResourceScope;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use backup::{
    Backup, BackupSpec, BackupState, BackupStatus, BackupTarget, BackupTargetSpec,
    BackupTargetStatus, DEFAULT_BACKUP_TARGET,
};
pub use condition::{Condition, ConditionStatus, get_condition, set_condition};
pub use engine::{
    DesiredState, Engine, EngineSpec, EngineStatus, InstanceState, RebuildStatus, ReplicaMode,
};
pub use node::{DiskSpec, DiskStatus, Node, NodeSpec, NodeStatus};
pub use recurring_job::{RecurringJob, RecurringJobSpec, RecurringJobStatus, RecurringTask};
pub use replica::{Replica, ReplicaSpec, ReplicaStatus};
pub use setting::{Setting, SettingSpec, SettingStatus};
pub use snapshot::{Snapshot, SnapshotSpec, SnapshotStatus};
pub use volume::{
    DEFAULT_NUMBER_OF_REPLICAS, DataLocality, Frontend, Robustness, VOLUME_BLOCK_SIZE, Volume,
    VolumeSpec, VolumeState, VolumeStats, VolumeStatus,
};

/// API group of every kind.
pub const GROUP: &str = "ironhorn.io";
/// API version of every kind.
pub const VERSION: &str = "v1beta1";
/// `apiVersion` field of every object.
pub const API_VERSION: &str = "ironhorn.io/v1beta1";

/// The resource kinds, for code that handles objects without knowing their Rust type
/// (store backends, the event stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// [`Volume`].
    Volume,
    /// [`Engine`].
    Engine,
    /// [`Replica`].
    Replica,
    /// [`Node`].
    Node,
    /// [`Snapshot`].
    Snapshot,
    /// [`Backup`].
    Backup,
    /// [`BackupTarget`].
    BackupTarget,
    /// [`RecurringJob`].
    RecurringJob,
    /// [`Setting`].
    Setting,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 9] = [
        Kind::Volume,
        Kind::Engine,
        Kind::Replica,
        Kind::Node,
        Kind::Snapshot,
        Kind::Backup,
        Kind::BackupTarget,
        Kind::RecurringJob,
        Kind::Setting,
    ];

    /// The `kind` field (`Volume`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Volume => "Volume",
            Kind::Engine => "Engine",
            Kind::Replica => "Replica",
            Kind::Node => "Node",
            Kind::Snapshot => "Snapshot",
            Kind::Backup => "Backup",
            Kind::BackupTarget => "BackupTarget",
            Kind::RecurringJob => "RecurringJob",
            Kind::Setting => "Setting",
        }
    }

    /// The lower-case plural used in URLs and CRD names (`volumes`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Engine => "engines",
            Kind::Replica => "replicas",
            Kind::Node => "nodes",
            Kind::Snapshot => "snapshots",
            Kind::Backup => "backups",
            Kind::BackupTarget => "backuptargets",
            Kind::RecurringJob => "recurringjobs",
            Kind::Setting => "settings",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `kind` string that names no resource kind.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown resource kind {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s || k.plural() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// A resource type the store can hold: one of the kinds above.
pub trait Object:
    kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Which kind it is.
    const KIND: Kind;

    /// The object's name (empty if unset).
    fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or("")
    }
}

macro_rules! object {
    ($($ty:ident),*) => {
        $(impl Object for $ty {
            const KIND: Kind = Kind::$ty;
        })*
    };
}
object!(
    Volume,
    Engine,
    Replica,
    Node,
    Snapshot,
    Backup,
    BackupTarget,
    RecurringJob,
    Setting
);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>().ok(), Some(k));
            assert_eq!(k.plural().parse::<Kind>().ok(), Some(k));
        }
        assert!("volume".parse::<Kind>().is_err());
    }

    #[test]
    fn crds_name_the_group_version_and_status_subresource() {
        let crd = Volume::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.plural, "volumes");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["State", "Robustness", "Size", "Node", "Age"]);
        for crd in [
            Engine::crd(),
            Replica::crd(),
            Node::crd(),
            Snapshot::crd(),
            Backup::crd(),
            BackupTarget::crd(),
            RecurringJob::crd(),
            Setting::crd(),
        ] {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
        }
    }

    #[test]
    fn volume_serialises_in_camel_case_with_defaults() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "Volume",
            "metadata": {"name": "v1"},
            "spec": {"size": 4096}
        }))
        .expect("minimal volume parses");
        assert_eq!(v.spec.number_of_replicas, DEFAULT_NUMBER_OF_REPLICAS);
        let json = serde_json::to_value(&v).expect("serialises");
        assert_eq!(json["spec"]["numberOfReplicas"], 3);
        assert_eq!(json["spec"]["dataLocality"], "disabled");
    }
}
