//! Replica scheduling: which node and disk a new replica of a volume goes to. A pure
//! function of the nodes, the replicas that exist and the policy, so it is tested alone.
//!
//! A disk is a candidate when its node is ready and schedulable (not evicting), carries
//! every tag of the volume's `nodeSelector`; the disk is healthy, schedulable, carries every
//! tag of the `diskSelector`; its file system keeps at least `minimum_free_percent` free;
//! and the replicas promised to it (sum of their sizes, this one included) fit in
//! `over_provisioning_percent` of its size less the reserved bytes (replicas are sparse, so
//! promising more than the disk holds is allowed and bounded).
//!
//! Among candidates: a node that holds no replica of the volume first (hard anti-affinity
//! refuses the others; soft only prefers), then a zone that holds none (soft by default,
//! hard as a setting), then the disk with the most unpromised space; ties go to the
//! smaller node and disk name, so the answer is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use crate::resources::node::Node;
use crate::resources::replica::Replica;

/// Scheduling settings (from the Setting resources).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Replicas of one volume may share a node when no other node fits (default: no).
    pub soft_node_anti_affinity: bool,
    /// Replicas of one volume may share a zone when no other zone fits (default: yes).
    pub soft_zone_anti_affinity: bool,
    /// Sum of replica sizes a disk may promise, in percent of its size less the reserve
    /// (default 100, bounds 100..=1000).
    pub over_provisioning_percent: u64,
    /// Percent of a disk's file system that must stay free for new replicas to go there
    /// (default 10, bounds 0..=99).
    pub minimum_free_percent: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            soft_node_anti_affinity: false,
            soft_zone_anti_affinity: true,
            over_provisioning_percent: 100,
            minimum_free_percent: 10,
        }
    }
}

/// What a new replica needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The volume.
    pub volume: &'a str,
    /// Its size in bytes.
    pub size: u64,
    /// Tags every chosen node must carry.
    pub node_selector: &'a [String],
    /// Tags every chosen disk must carry.
    pub disk_selector: &'a [String],
}

/// Where a replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Node name.
    pub node: String,
    /// Disk name on that node.
    pub disk: String,
    /// The disk's path (the replica lives in `PATH/replicas/NAME`).
    pub disk_path: String,
}

/// Why no disk fits; the message says what is short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot schedule a replica of volume {volume}: {reason}")]
pub struct Unschedulable {
    /// The volume.
    pub volume: String,
    /// What is short, for the volume's `Scheduled` condition.
    pub reason: String,
}

/// Picks a disk for one more replica of `req.volume`. `ready` names the nodes whose agent
/// reports; `replicas` are every replica in the cluster (for promised space and for the
/// volume's existing placements).
pub fn schedule(
    req: &Request<'_>,
    nodes: &[Node],
    ready: &BTreeSet<String>,
    replicas: &[Replica],
    policy: &Policy,
) -> Result<Placement, Unschedulable> {
    let fail = |reason: String| Unschedulable {
        volume: req.volume.to_owned(),
        reason,
    };
    // Promised bytes per (node, disk) and the volume's own nodes and zones.
    let mut promised: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut used_nodes = BTreeSet::new();
    for r in replicas {
        if r.spec.node_id.is_empty() {
            continue;
        }
        *promised
            .entry((r.spec.node_id.as_str(), r.spec.disk_name.as_str()))
            .or_default() += r.spec.size;
        if r.spec.volume_name == req.volume {
            used_nodes.insert(r.spec.node_id.as_str());
        }
    }
    let zone_of: BTreeMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.spec.zone.as_str())))
        .collect();
    let used_zones: BTreeSet<&str> = used_nodes
        .iter()
        .filter_map(|n| zone_of.get(n).copied())
        .filter(|z| !z.is_empty())
        .collect();

    // Why disks were turned down, to say what is short when none fits.
    let mut why = Rejections::default();
    // (node already used, zone already used, -free) sorts best first.
    let mut best: Option<((bool, bool, i128), Placement)> = None;
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if !ready.contains(name) {
            why.node_down += 1;
            continue;
        }
        if !node.spec.allow_scheduling || node.spec.eviction_requested {
            why.node_unschedulable += 1;
            continue;
        }
        if !req.node_selector.iter().all(|t| node.spec.tags.contains(t)) {
            why.node_tags += 1;
            continue;
        }
        let node_used = used_nodes.contains(name);
        if node_used && !policy.soft_node_anti_affinity {
            why.anti_affinity += 1;
            continue;
        }
        let zone_used = !node.spec.zone.is_empty() && used_zones.contains(node.spec.zone.as_str());
        if zone_used && !policy.soft_zone_anti_affinity {
            why.zone_anti_affinity += 1;
            continue;
        }
        let statuses = node.status.as_ref().map(|s| &s.disks);
        for (disk_name, disk) in &node.spec.disks {
            let Some(st) = statuses.and_then(|s| s.get(disk_name)) else {
                why.disk_unhealthy += 1;
                continue;
            };
            if !st.healthy {
                why.disk_unhealthy += 1;
                continue;
            }
            if !disk.allow_scheduling {
                why.disk_unschedulable += 1;
                continue;
            }
            if !req.disk_selector.iter().all(|t| disk.tags.contains(t)) {
                why.disk_tags += 1;
                continue;
            }
            let max = st.storage_maximum;
            if u128::from(st.storage_available) * 100
                < u128::from(max) * u128::from(policy.minimum_free_percent)
            {
                why.disk_full += 1;
                continue;
            }
            let limit = u128::from(max.saturating_sub(disk.storage_reserved))
                * u128::from(policy.over_provisioning_percent)
                / 100;
            let promised_here = u128::from(
                promised
                    .get(&(name, disk_name.as_str()))
                    .copied()
                    .unwrap_or(0),
            );
            let after = promised_here + u128::from(req.size);
            if after > limit {
                why.over_provisioned += 1;
                continue;
            }
            let key = (node_used, zone_used, -((limit - after) as i128));
            let placement = Placement {
                node: name.to_owned(),
                disk: disk_name.clone(),
                disk_path: disk.path.clone(),
            };
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, placement));
            }
        }
    }
    match best {
        Some((_, p)) => Ok(p),
        None => Err(fail(why.describe(req, nodes.len()))),
    }
}

/// Counts of the reasons disks or nodes were turned down.
#[derive(Debug, Default)]
struct Rejections {
    node_down: usize,
    node_unschedulable: usize,
    node_tags: usize,
    anti_affinity: usize,
    zone_anti_affinity: usize,
    disk_unhealthy: usize,
    disk_unschedulable: usize,
    disk_tags: usize,
    disk_full: usize,
    over_provisioned: usize,
}

impl Rejections {
    fn describe(&self, req: &Request<'_>, nodes: usize) -> String {
        if nodes == 0 {
            return "no node has registered".into();
        }
        let mut parts = Vec::new();
        let mut add = |n: usize, what: String| {
            if n > 0 {
                parts.push(what);
            }
        };
        add(
            self.anti_affinity,
            format!(
                "{} node(s) already hold a replica of {} (hard node anti-affinity: each replica needs its own node)",
                self.anti_affinity, req.volume
            ),
        );
        add(self.node_down, format!("{} node(s) down", self.node_down));
        add(
            self.node_unschedulable,
            format!(
                "{} node(s) not schedulable or evicting",
                self.node_unschedulable
            ),
        );
        add(
            self.node_tags,
            format!(
                "{} node(s) lack the node tags {:?}",
                self.node_tags, req.node_selector
            ),
        );
        add(
            self.zone_anti_affinity,
            format!(
                "{} node(s) in zones that already hold a replica (hard zone anti-affinity)",
                self.zone_anti_affinity
            ),
        );
        add(
            self.disk_unhealthy,
            format!("{} disk(s) unhealthy or not reported", self.disk_unhealthy),
        );
        add(
            self.disk_unschedulable,
            format!("{} disk(s) not schedulable", self.disk_unschedulable),
        );
        add(
            self.disk_tags,
            format!(
                "{} disk(s) lack the disk tags {:?}",
                self.disk_tags, req.disk_selector
            ),
        );
        add(
            self.disk_full,
            format!(
                "{} disk(s) below the minimum free percentage",
                self.disk_full
            ),
        );
        add(
            self.over_provisioned,
            format!(
                "{} disk(s) would exceed the over-provisioning limit with {} more bytes",
                self.over_provisioned, req.size
            ),
        );
        if parts.is_empty() {
            "no node has a disk".into()
        } else {
            parts.join("; ")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resources::node::{DiskSpec, DiskStatus, NodeSpec, NodeStatus};
    use crate::resources::replica::ReplicaSpec;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, zone: &str, disks: &[(&str, u64, u64, &[&str])]) -> Node {
        let mut spec = NodeSpec {
            allow_scheduling: true,
            tags: vec![],
            zone: zone.into(),
            disks: BTreeMap::new(),
            eviction_requested: false,
        };
        let mut status = NodeStatus::default();
        for (d, max, free, tags) in disks {
            spec.disks.insert(
                (*d).into(),
                DiskSpec {
                    path: format!("/{name}/{d}"),
                    allow_scheduling: true,
                    storage_reserved: 0,
                    tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                },
            );
            status.disks.insert(
                (*d).into(),
                DiskStatus {
                    storage_maximum: *max,
                    storage_available: *free,
                    healthy: true,
                    schedulable: true,
                    ..Default::default()
                },
            );
        }
        let mut n = Node::new(name, spec);
        n.status = Some(status);
        n
    }

    fn replica(name: &str, volume: &str, node: &str, disk: &str, size: u64) -> Replica {
        Replica::new(
            name,
            ReplicaSpec {
                volume_name: volume.into(),
                node_id: node.into(),
                disk_name: disk.into(),
                data_dir: String::new(),
                size,
                desired_state: Default::default(),
                failed_at: None,
                healthy_at: None,
            },
        )
    }

    fn req(size: u64) -> Request<'static> {
        Request {
            volume: "v",
            size,
            node_selector: &[],
            disk_selector: &[],
        }
    }

    fn all_ready(nodes: &[Node]) -> BTreeSet<String> {
        nodes
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect()
    }

    fn three() -> Vec<Node> {
        (1..=3)
            .map(|i| node(&format!("n{i}"), "", &[("d", 100 * GIB, 90 * GIB, &[])]))
            .collect()
    }

    #[test]
    fn three_replicas_land_on_three_nodes_and_a_fourth_is_refused() {
        let nodes = three();
        let ready = all_ready(&nodes);
        let policy = Policy::default();
        let mut rs = Vec::new();
        for i in 0..3 {
            let p = schedule(&req(GIB), &nodes, &ready, &rs, &policy).unwrap();
            rs.push(replica(&format!("r{i}"), "v", &p.node, &p.disk, GIB));
        }
        let used: BTreeSet<_> = rs.iter().map(|r| r.spec.node_id.clone()).collect();
        assert_eq!(used.len(), 3);
        let e = schedule(&req(GIB), &nodes, &ready, &rs, &policy).unwrap_err();
        assert!(e.reason.contains("hard node anti-affinity"), "{e}");
        // Soft anti-affinity shares a node instead.
        let soft = Policy {
            soft_node_anti_affinity: true,
            ..Policy::default()
        };
        assert!(schedule(&req(GIB), &nodes, &ready, &rs, &soft).is_ok());
    }

    #[test]
    fn down_nodes_and_unschedulable_disks_are_skipped() {
        let mut nodes = three();
        let mut ready = all_ready(&nodes);
        ready.remove("n1");
        nodes[1].spec.disks.get_mut("d").unwrap().allow_scheduling = false;
        let p = schedule(&req(GIB), &nodes, &ready, &[], &Policy::default()).unwrap();
        assert_eq!(p.node, "n3");
        nodes[2].spec.allow_scheduling = false;
        let e = schedule(&req(GIB), &nodes, &ready, &[], &Policy::default()).unwrap_err();
        assert!(e.reason.contains("1 node(s) down"), "{e}");
        assert!(e.reason.contains("not schedulable"), "{e}");
    }

    #[test]
    fn space_honours_over_provisioning_and_minimum_free() {
        let nodes = vec![node("n1", "", &[("d", 10 * GIB, 9 * GIB, &[])])];
        let ready = all_ready(&nodes);
        let p = Policy::default();
        assert!(schedule(&req(10 * GIB), &nodes, &ready, &[], &p).is_ok());
        let e = schedule(&req(11 * GIB), &nodes, &ready, &[], &p).unwrap_err();
        assert!(e.reason.contains("over-provisioning"), "{e}");
        let over = Policy {
            over_provisioning_percent: 200,
            ..p.clone()
        };
        assert!(schedule(&req(11 * GIB), &nodes, &ready, &[], &over).is_ok());
        // Other volumes' replicas count against the promise.
        let others = vec![replica("x", "other", "n1", "d", 6 * GIB)];
        assert!(schedule(&req(5 * GIB), &nodes, &ready, &others, &p).is_err());
        assert!(schedule(&req(4 * GIB), &nodes, &ready, &others, &p).is_ok());
        // A disk with less than 10% free takes nothing.
        let full = vec![node("n1", "", &[("d", 10 * GIB, GIB - 1, &[])])];
        let e = schedule(&req(GIB), &full, &ready, &[], &p).unwrap_err();
        assert!(e.reason.contains("minimum free"), "{e}");
    }

    #[test]
    fn tags_select_nodes_and_disks() {
        let mut nodes = vec![
            node("n1", "", &[("hdd", 100 * GIB, 90 * GIB, &["hdd"])]),
            node("n2", "", &[("ssd", 100 * GIB, 90 * GIB, &["ssd", "fast"])]),
        ];
        nodes[0].spec.tags = vec!["edge".into()];
        let ready = all_ready(&nodes);
        let ssd = vec!["ssd".to_owned()];
        let r = Request {
            disk_selector: &ssd,
            ..req(GIB)
        };
        let p = schedule(&r, &nodes, &ready, &[], &Policy::default()).unwrap();
        assert_eq!((p.node.as_str(), p.disk.as_str()), ("n2", "ssd"));
        let edge = vec!["edge".to_owned()];
        let r = Request {
            node_selector: &edge,
            disk_selector: &ssd,
            ..req(GIB)
        };
        let e = schedule(&r, &nodes, &ready, &[], &Policy::default()).unwrap_err();
        assert!(
            e.reason.contains("node tags") && e.reason.contains("disk tags"),
            "{e}"
        );
    }

    #[test]
    fn zones_spread_first_and_can_be_hard() {
        let nodes = vec![
            node("a1", "a", &[("d", 100 * GIB, 90 * GIB, &[])]),
            node("a2", "a", &[("d", 100 * GIB, 95 * GIB, &[])]),
            node("b1", "b", &[("d", 50 * GIB, 40 * GIB, &[])]),
        ];
        let ready = all_ready(&nodes);
        let rs = vec![replica("r0", "v", "a1", "d", GIB)];
        // a2 has more room, but b1 is in a zone without a replica.
        let p = schedule(&req(GIB), &nodes, &ready, &rs, &Policy::default()).unwrap();
        assert_eq!(p.node, "b1");
        let rs = vec![
            replica("r0", "v", "a1", "d", GIB),
            replica("r1", "v", "b1", "d", GIB),
        ];
        let p = schedule(&req(GIB), &nodes, &ready, &rs, &Policy::default()).unwrap();
        assert_eq!(p.node, "a2");
        let hard = Policy {
            soft_zone_anti_affinity: false,
            ..Policy::default()
        };
        let e = schedule(&req(GIB), &nodes, &ready, &rs, &hard).unwrap_err();
        assert!(e.reason.contains("hard zone anti-affinity"), "{e}");
    }

    #[test]
    fn the_roomiest_disk_wins_and_ties_are_deterministic() {
        let nodes = vec![
            node(
                "n1",
                "",
                &[
                    ("d1", 100 * GIB, 90 * GIB, &[]),
                    ("d2", 200 * GIB, 190 * GIB, &[]),
                ],
            ),
            node("n2", "", &[("d", 100 * GIB, 90 * GIB, &[])]),
        ];
        let ready = all_ready(&nodes);
        let p = schedule(&req(GIB), &nodes, &ready, &[], &Policy::default()).unwrap();
        assert_eq!((p.node.as_str(), p.disk.as_str()), ("n1", "d2"));
        let same = three();
        let p = schedule(&req(GIB), &same, &all_ready(&same), &[], &Policy::default()).unwrap();
        assert_eq!(p.node, "n1");
        let e = schedule(&req(GIB), &[], &BTreeSet::new(), &[], &Policy::default()).unwrap_err();
        assert!(e.reason.contains("no node"), "{e}");
    }
}
