//! Snapshots through the REST API on a 3-replica volume: data written, a snapshot taken
//! (through the engine), more data written, the volume detached and reverted to the
//! snapshot (on each replica), attached again — and the data read back is the data of the
//! snapshot (qemu-io pattern checks over NBD). A snapshot of the detached volume is taken
//! on the replicas directly. Deleting the volume removes its processes and data.

mod cluster_common;
mod common;

use std::process::Command;
use std::time::Duration;

use cluster_common::{Cluster, condition, items};
use common::run_with_timeout;

const MIB: u64 = 1 << 20;

/// Runs qemu-io commands on the NBD export; panics when one fails.
#[track_caller]
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run_with_timeout(&mut c, 60);
    let text = out.all_output();
    assert!(
        out.success() && !text.contains("Pattern verification failed") && !text.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
    text
}

#[test]
fn snapshot_then_revert_restores_the_snapshot_data() {
    let c = Cluster::start(3, &[]);
    c.create_volume("v1", 32 * MIB, 3);
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    c.attach("v1", "node-1");
    let uri = c.wait_attached("v1");
    qemu_io(&uri, &["write -P 0xaa 0 1M", "write -P 0xab 4M 1M"]);
    c.snapshot("v1", "s1");
    wait_snapshot_ready(&c, "v1", "s1");
    // Overwrite after the snapshot, and write where there was nothing.
    qemu_io(&uri, &["write -P 0xcc 0 1M", "write -P 0xcd 8M 1M"]);
    qemu_io(&uri, &["read -P 0xcc 0 1M"]);
    // Reverting needs the volume detached.
    let refused = c
        .api
        .post("/v1/volumes/v1/snapshots/s1/revert", serde_json::json!({}));
    assert_eq!(
        refused.status, 409,
        "revert of an attached volume: {}",
        refused.text
    );
    c.detach("v1");
    c.wait_detached("v1");
    // A snapshot of the detached volume goes to every replica.
    c.snapshot("v1", "s2");
    wait_snapshot_ready(&c, "v1", "s2");
    c.revert("v1", "s1");
    let v = c.wait_volume("v1", Duration::from_secs(60), "reverted", |v| {
        condition(v, "Reverted").as_deref() == Some("True")
            && v["spec"]["revertToSnapshot"].is_null()
    });
    assert_eq!(v["status"]["robustness"], "healthy", "{v}");
    c.attach("v1", "node-2");
    let uri = c.wait_attached("v1");
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    qemu_io(
        &uri,
        &["read -P 0xaa 0 1M", "read -P 0xab 4M 1M", "read -P 0 8M 1M"],
    );
    // The snapshots are still listed, and one is removed through the engine.
    assert_eq!(c.api.delete("/v1/volumes/v1/snapshots/s2").status, 202);
    cluster_common::wait_for_value(Duration::from_secs(30), "snapshot s2 gone", || {
        let all = items(&c.api.get("/v1/volumes/v1/snapshots").body);
        (!all.iter().any(|s| s["metadata"]["name"] == "s2")).then_some(())
    });

    // Deleting the volume stops its engine and replicas and removes their data.
    assert_eq!(c.api.delete("/v1/volumes/v1").status, 202);
    cluster_common::wait_for_value(Duration::from_secs(60), "volume and data gone", || {
        let gone = c.api.get("/v1/volumes/v1").status == 404;
        let dirs: usize = c
            .nodes
            .iter()
            .map(|n| {
                std::fs::read_dir(n.disk.join("replicas"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum();
        let running = (0..c.nodes.len())
            .map(|i| c.instance_pids(i).len())
            .sum::<usize>();
        (gone && dirs == 0 && running == 0).then_some(())
    });
}

/// Waits until snapshot `snap` of `volume` is ready to use.
fn wait_snapshot_ready(c: &Cluster, volume: &str, snap: &str) {
    cluster_common::wait_for_value(Duration::from_secs(30), "snapshot ready", || {
        let all = items(&c.api.get(&format!("/v1/volumes/{volume}/snapshots")).body);
        all.iter()
            .find(|s| s["metadata"]["name"] == snap)
            .filter(|s| s["status"]["readyToUse"] == true)
            .map(|_| ())
    });
}
