//! A node whose agent stops reporting: after `node-down-timeout` its replicas are marked
//! failed and replaced on a node that holds none of the volume's replicas; when no such
//! node is left, the volume stays degraded with a condition that says why. Data written
//! before verifies throughout. Healing times are printed
//! (`cargo test --test cluster_node_down -- --nocapture`).

mod cluster_common;
mod common;

use std::time::{Duration, Instant};

use cluster_common::{Cluster, condition, condition_message, fio};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// `node-down-timeout` of the test, seconds.
const NODE_DOWN_SECS: u64 = 5;

/// Index of the first node (other than node-1, where the engine runs) holding a replica.
fn replica_node(c: &Cluster, volume: &str) -> usize {
    (1..c.nodes.len())
        .find(|i| c.nodes[*i].agent.is_some() && !c.replicas_on(*i, volume).is_empty())
        .expect("a node other than node-1 with a replica")
}

#[test]
fn replicas_of_a_dead_node_are_replaced_then_degraded_when_no_node_is_free() {
    let mut c = Cluster::start(4, &[]);
    c.set_setting("node-down-timeout", &NODE_DOWN_SECS.to_string());
    c.create_volume("v1", SIZE, 3);
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    c.attach("v1", "node-1");
    let uri = c.wait_attached("v1");
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    fio(&uri, c.dir.path(), "before", 0, 16 * MIB, 7, &[]);

    // A node with a replica dies; the fourth node is free: replaced, healthy again.
    let dead = replica_node(&c, "v1");
    let t0 = Instant::now();
    c.kill_node(dead);
    fio(&uri, c.dir.path(), "after1", 16 * MIB, 8 * MIB, 8, &[]);
    // Healthy again with three replicas on the three live nodes.
    let live: Vec<usize> = (0..4).filter(|i| *i != dead).collect();
    let v =
        cluster_common::wait_for_value(Duration::from_secs(120), "replaced and healthy", || {
            let v = c.volume("v1");
            let placed = live.iter().all(|i| c.replicas_on(*i, "v1").len() == 1);
            (placed && v["status"]["robustness"] == "healthy").then_some(v)
        });
    println!(
        "HEAL node-{} down: healthy again after {:?} (node-down-timeout {NODE_DOWN_SECS}s)",
        dead + 1,
        t0.elapsed()
    );
    assert_eq!(v["status"]["healthyReplicas"], 3, "{v}");
    fio(
        &uri,
        c.dir.path(),
        "before",
        0,
        16 * MIB,
        7,
        &["--verify_only"],
    );

    // Another node with a replica dies: the two live nodes both hold one already, so
    // hard anti-affinity leaves the volume degraded, and the condition says so.
    let dead2 = replica_node(&c, "v1");
    c.kill_node(dead2);
    fio(&uri, c.dir.path(), "after2", 24 * MIB, 8 * MIB, 9, &[]);
    let v = c.wait_volume(
        "v1",
        Duration::from_secs(60),
        "degraded and cannot heal",
        |v| {
            v["status"]["robustness"] == "degraded"
                && condition(v, "Scheduled").as_deref() == Some("False")
        },
    );
    let why = condition_message(&v, "Scheduled");
    assert!(why.contains("anti-affinity"), "unclear condition: {v}");
    let healthy = condition_message(&v, "Healthy");
    assert!(healthy.contains("cannot heal"), "unclear condition: {v}");
    assert_eq!(v["status"]["healthyReplicas"], 2, "{v}");
    // The data is all there.
    fio(
        &uri,
        c.dir.path(),
        "before",
        0,
        16 * MIB,
        7,
        &["--verify_only"],
    );
    fio(
        &uri,
        c.dir.path(),
        "after1",
        16 * MIB,
        8 * MIB,
        8,
        &["--verify_only"],
    );
    fio(
        &uri,
        c.dir.path(),
        "after2",
        24 * MIB,
        8 * MIB,
        9,
        &["--verify_only"],
    );
}
