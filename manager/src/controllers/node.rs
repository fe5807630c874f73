//! Node controller: the `Ready` condition from the agent's reports, and per disk the space
//! promised to the replicas scheduled there and whether new replicas may go there.

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::patch::patch_status;
use super::world::{World, not_ready_after};
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::node::Node;

/// See the module documentation.
#[derive(Debug)]
pub struct NodeController;

#[async_trait::async_trait]
impl Controller for NodeController {
    fn name(&self) -> &'static str {
        "node"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        for node in &world.nodes {
            let name = node.name_any();
            let Some(status) = desired_status(ctx, world, node, &name) else {
                continue;
            };
            if node.status.as_ref() != Some(&status) {
                patch_status::<Node, _>(&ctx.store, &name, |o| {
                    let s = o.status.get_or_insert_with(Default::default);
                    s.conditions = status.conditions.clone();
                    for (k, d) in &status.disks {
                        let t = s.disks.entry(k.clone()).or_default();
                        t.storage_scheduled = d.storage_scheduled;
                        t.scheduled_replicas = d.scheduled_replicas.clone();
                        t.schedulable = d.schedulable;
                        for c in &d.conditions {
                            if c.type_ == "Schedulable" {
                                set_condition(
                                    &mut t.conditions,
                                    &c.type_,
                                    c.status,
                                    &c.reason,
                                    &c.message,
                                );
                            }
                        }
                    }
                })
                .await?;
            }
        }
        Ok(())
    }
}

fn desired_status(
    ctx: &Context,
    world: &World,
    node: &Node,
    name: &str,
) -> Option<crate::resources::node::NodeStatus> {
    let mut st = node.status.clone().unwrap_or_default();
    let silent = ctx.liveness.silent_for(name);
    let limit = not_ready_after(world.settings.report_interval);
    if ctx.liveness.has_reported(name) || silent >= limit {
        let ready = ctx.liveness.has_reported(name) && silent < limit;
        if ready {
            set_condition(
                &mut st.conditions,
                "Ready",
                ConditionStatus::True,
                "AgentReporting",
                "the node's agent reports",
            );
        } else {
            set_condition(
                &mut st.conditions,
                "Ready",
                ConditionStatus::False,
                "AgentSilent",
                &format!(
                    "no report from the node's agent for more than {}s; its replicas are replaced after {}s (node-down-timeout)",
                    limit.as_secs(),
                    world.settings.node_down_timeout.as_secs()
                ),
            );
        }
    }
    let mut promised: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    for r in world.replicas.iter().filter(|r| r.spec.node_id == name) {
        promised
            .entry(r.spec.disk_name.as_str())
            .or_default()
            .insert(r.name_any(), r.spec.size);
    }
    for (disk_name, spec) in &node.spec.disks {
        let d = st.disks.entry(disk_name.clone()).or_default();
        let scheduled = promised.remove(disk_name.as_str()).unwrap_or_default();
        d.storage_scheduled = scheduled.values().sum();
        d.scheduled_replicas = scheduled;
        d.schedulable = d.healthy && spec.allow_scheduling && node.spec.allow_scheduling;
        let (s, reason, msg) = if d.schedulable {
            (
                ConditionStatus::True,
                "Schedulable",
                "new replicas may go here".to_owned(),
            )
        } else if !d.healthy {
            (
                ConditionStatus::False,
                "DiskUnhealthy",
                "the agent cannot use the disk".to_owned(),
            )
        } else {
            (
                ConditionStatus::False,
                "SchedulingDisabled",
                "scheduling is disabled on the node or disk".to_owned(),
            )
        };
        set_condition(&mut d.conditions, "Schedulable", s, reason, &msg);
    }
    Some(st)
}
