//! The manager restarts while fio writes to a volume: engines and replicas belong to the
//! agents, so I/O never sees an error; the restarted manager finds the same state (volume
//! attached, healthy, same endpoint) and the data verifies.

mod cluster_common;
mod common;

use std::time::Duration;

use cluster_common::{Cluster, fio};

const MIB: u64 = 1 << 20;

#[test]
fn manager_restart_mid_io_is_invisible_to_io() {
    let mut c = Cluster::start(3, &[]);
    c.create_volume("v1", 64 * MIB, 3);
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    c.attach("v1", "node-1");
    let uri = c.wait_attached("v1");
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    let before = c.volume("v1");
    // About 8 s of rate-limited writes, then verification.
    let writer = {
        let uri = uri.clone();
        let dir = c.dir.path().to_owned();
        std::thread::spawn(move || fio(&uri, &dir, "through", 0, 32 * MIB, 3, &["--rate=4m"]))
    };
    std::thread::sleep(Duration::from_secs(2));
    c.kill_manager();
    std::thread::sleep(Duration::from_secs(2));
    c.start_manager();
    writer
        .join()
        .expect("fio saw an error while the manager restarted");
    c.wait_nodes_ready();
    let after = c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    assert_eq!(after["status"]["state"], "attached", "{after}");
    assert_eq!(
        after["status"]["endpoint"], before["status"]["endpoint"],
        "{after}"
    );
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "the volume is the same object"
    );
    // No replica was replaced or re-added.
    for i in 0..3 {
        assert_eq!(c.replicas_on(i, "v1").len(), 1);
    }
    fio(
        &uri,
        c.dir.path(),
        "through",
        0,
        32 * MIB,
        3,
        &["--verify_only"],
    );
}
