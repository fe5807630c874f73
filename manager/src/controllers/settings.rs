//! The settings the controllers and the scheduler read, with their defaults.

use std::time::Duration;

use crate::resources::setting::Setting;
use crate::scheduler::Policy;
use crate::store::{Store, StoreError};

/// Settings of the controllers, read once per pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSettings {
    /// Scheduling policy.
    pub policy: Policy,
    /// A node silent this long has its replicas marked failed and replaced
    /// (`node-down-timeout`, seconds; default 60).
    pub node_down_timeout: Duration,
    /// A failed replica whose process does not come back within this time is replaced
    /// (`replica-replenishment-wait-interval`, seconds; default 60).
    pub replica_replenishment_wait: Duration,
    /// Period of agent reports (`agent-report-interval`, milliseconds; default 1000).
    pub report_interval: Duration,
    /// Replica rebuilds that may run at once on one node, counted on the node of the
    /// replica being rebuilt (`concurrent-replica-rebuild-per-node-limit`; default 5;
    /// 0 starts no new rebuild).
    pub rebuilds_per_node: u32,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            policy: Policy::default(),
            node_down_timeout: Duration::from_secs(60),
            replica_replenishment_wait: Duration::from_secs(60),
            report_interval: Duration::from_secs(1),
            rebuilds_per_node: 5,
        }
    }
}

impl ControlSettings {
    /// Reads the settings; missing or unparsable values keep their defaults (the API
    /// validates values on update).
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        let mut s = ControlSettings::default();
        // The stored value, else the catalog's default.
        let get = |name: &'static str| async move {
            let stored = store.get::<Setting>(name).await?.map(|s| s.spec.value);
            Ok::<_, StoreError>(stored.or_else(|| {
                crate::settings::definition(name)
                    .ok()
                    .map(|d| d.default.to_owned())
            }))
        };
        if let Some(v) = get("replica-soft-anti-affinity").await? {
            s.policy.soft_node_anti_affinity = v == "true";
        }
        if let Some(v) = get("replica-zone-soft-anti-affinity").await? {
            s.policy.soft_zone_anti_affinity = v == "true";
        }
        if let Some(v) = get("storage-over-provisioning-percentage").await?
            && let Ok(n) = v.parse()
        {
            s.policy.over_provisioning_percent = n;
        }
        if let Some(v) = get("storage-minimal-available-percentage").await?
            && let Ok(n) = v.parse()
        {
            s.policy.minimum_free_percent = n;
        }
        if let Some(v) = get("node-down-timeout").await?
            && let Ok(n) = v.parse()
        {
            s.node_down_timeout = Duration::from_secs(n);
        }
        if let Some(v) = get("replica-replenishment-wait-interval").await?
            && let Ok(n) = v.parse()
        {
            s.replica_replenishment_wait = Duration::from_secs(n);
        }
        if let Some(v) = get("agent-report-interval").await?
            && let Ok(n) = v.parse()
        {
            s.report_interval = Duration::from_millis(n);
        }
        if let Some(v) = get(crate::settings::CONCURRENT_REBUILD_LIMIT).await?
            && let Ok(n) = v.parse()
        {
            s.rebuilds_per_node = n;
        }
        Ok(s)
    }
}
