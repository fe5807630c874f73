//! A 3-replica volume on a 3-node cluster (manager + agents, real processes), driven through
//! the REST API: created, attached, written and verified with fio over NBD; a replica
//! SIGKILLed under I/O makes it degraded, the manager heals it (the agent restarts the
//! process, the engine rebuilds it online) back to healthy, and everything written
//! verifies; the volume is then expanded online. With the per-node rebuild limit at 0 a
//! killed replica waits (degraded, with a `Rebuild` condition saying why) until the limit
//! is raised. The healing time is printed (`cargo test --test cluster_heal -- --nocapture`).

mod cluster_common;
mod common;

use std::time::{Duration, Instant};

use cluster_common::{Cluster, condition, fio};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

#[test]
fn killed_replica_is_rebuilt_and_data_verifies() {
    let c = Cluster::start(3, &[]);
    c.create_volume("v1", SIZE, 3);
    let v = c.wait_volume("v1", Duration::from_secs(30), "3 replicas running", |v| {
        v["status"]["state"] == "detached" && v["status"]["robustness"] == "healthy"
    });
    assert_eq!(condition(&v, "Scheduled").as_deref(), Some("True"), "{v}");
    // One replica per node (hard anti-affinity).
    for i in 0..3 {
        assert_eq!(c.replicas_on(i, "v1").len(), 1, "node-{} replicas", i + 1);
    }
    c.attach("v1", "node-1");
    let uri = c.wait_attached("v1");
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));
    fio(&uri, c.dir.path(), "first", 0, 16 * MIB, 1, &[]);
    // The agents report what the replicas take on disk: the 16 MiB written, not the size.
    let v = c.wait_volume("v1", Duration::from_secs(30), "actual size", |v| {
        v["status"]["actualSize"].as_u64().unwrap_or(0) >= 16 * MIB
    });
    let actual = v["status"]["actualSize"].as_u64().unwrap_or(0);
    assert!(
        actual < SIZE,
        "actual size {actual} of a {SIZE}-byte volume 1/4 written"
    );

    // Kill node-2's replica while fio writes elsewhere.
    let (victim, pid) = c.replicas_on(1, "v1").remove(0);
    let writer = {
        let uri = uri.clone();
        let dir = c.dir.path().to_owned();
        std::thread::spawn(move || fio(&uri, &dir, "during", 32 * MIB, 16 * MIB, 2, &["--rate=4m"]))
    };
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the replica");
    c.wait_robustness("v1", "degraded", Duration::from_secs(30));
    let degraded = killed.elapsed();
    let v = c.wait_robustness("v1", "healthy", Duration::from_secs(90));
    let healed = killed.elapsed();
    writer.join().expect("fio thread");
    println!("HEAL killed replica {victim}: degraded after {degraded:?}, healthy after {healed:?}");
    assert_eq!(v["status"]["healthyReplicas"], 3, "{v}");
    cluster_common::wait_for_value(Duration::from_secs(10), "replicas shown RW", || {
        let rs = cluster_common::items(&c.api.get("/v1/volumes/v1/replicas").body);
        (rs.len() == 3 && rs.iter().all(|r| r["status"]["mode"] == "RW")).then_some(())
    });
    // Everything written before and during the fault reads back.
    fio(
        &uri,
        c.dir.path(),
        "first",
        0,
        16 * MIB,
        1,
        &["--verify_only"],
    );
    fio(
        &uri,
        c.dir.path(),
        "during",
        32 * MIB,
        16 * MIB,
        2,
        &["--verify_only"],
    );
    c.wait_robustness("v1", "healthy", Duration::from_secs(5));

    // Expand online through the engine: the NBD export grows, the data stays.
    c.api
        .post(
            "/v1/volumes/v1/expand",
            serde_json::json!({"size": 2 * SIZE}),
        )
        .ok();
    c.wait_volume("v1", Duration::from_secs(30), "expanded", |v| {
        v["status"]["currentSize"] == 2 * SIZE
    });
    let mut info = std::process::Command::new("nbdinfo");
    info.args(["--size", &uri]);
    let out = common::run_with_timeout(&mut info, 30);
    assert_eq!(out.stdout.trim(), (2 * SIZE).to_string(), "{out}");
    fio(
        &uri,
        c.dir.path(),
        "first",
        0,
        16 * MIB,
        1,
        &["--verify_only"],
    );
    fio(&uri, c.dir.path(), "grown", SIZE, 16 * MIB, 4, &[]);

    // concurrent-replica-rebuild-per-node-limit 0: a killed replica comes back but is not
    // rebuilt; the volume stays degraded and says why. Raising the limit lets it heal.
    c.set_setting("concurrent-replica-rebuild-per-node-limit", "0");
    let (victim, pid) = c.replicas_on(2, "v1").remove(0);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the replica");
    // Writes make the engine notice the dead replica.
    fio(&uri, c.dir.path(), "late", 96 * MIB, 8 * MIB, 5, &[]);
    c.wait_robustness("v1", "degraded", Duration::from_secs(30));
    let v = c.wait_volume("v1", Duration::from_secs(30), "rebuild held back", |v| {
        condition(v, "Rebuild").as_deref() == Some("False")
    });
    let why = cluster_common::condition_message(&v, "Rebuild");
    assert!(
        why.contains(&victim) && why.contains("concurrent-replica-rebuild-per-node-limit"),
        "{why}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.volume("v1")["status"]["robustness"], "degraded");
    c.set_setting("concurrent-replica-rebuild-per-node-limit", "5");
    c.wait_robustness("v1", "healthy", Duration::from_secs(90));
    fio(
        &uri,
        c.dir.path(),
        "grown",
        SIZE,
        16 * MIB,
        4,
        &["--verify_only"],
    );
    fio(
        &uri,
        c.dir.path(),
        "late",
        96 * MIB,
        8 * MIB,
        5,
        &["--verify_only"],
    );
}
