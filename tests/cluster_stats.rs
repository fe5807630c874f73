//! Per-volume I/O statistics end to end: fio writes to an attached volume over NBD, the
//! engine counts the requests, the manager turns two samples into rates in the volume's
//! `status.stats`, and `/metrics` shows them per volume.

mod cluster_common;
mod common;

use std::time::Duration;

use cluster_common::{Cluster, fio, wait_for_value};

const MIB: u64 = 1 << 20;

/// The value of `name{volume="VOLUME"}` in a Prometheus text page.
fn sample(text: &str, name: &str, volume: &str) -> Option<f64> {
    let prefix = format!("{name}{{volume=\"{volume}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn fio_writes_show_in_volume_stats_and_metrics() {
    let c = Cluster::start(1, &[]);
    c.create_volume("v1", 64 * MIB, 1);
    c.wait_volume("v1", Duration::from_secs(30), "replica running", |v| {
        v["status"]["state"] == "detached" && v["status"]["robustness"] == "healthy"
    });
    c.attach("v1", "node-1");
    let uri = c.wait_attached("v1");
    c.wait_robustness("v1", "healthy", Duration::from_secs(30));

    // ~8 s of rate-limited writes, so that samples are taken while fio runs.
    let writer = {
        let dir = c.dir.path().to_owned();
        std::thread::spawn(move || fio(&uri, &dir, "stats", 0, 32 * MIB, 1, &["--rate=4m"]))
    };
    let stats = wait_for_value(Duration::from_secs(15), "nonzero write stats", || {
        let v = c.volume("v1");
        let s = &v["status"]["stats"];
        (s["writeIops"].as_f64()? > 0.0 && s["writeBytesPerSecond"].as_f64()? > 0.0)
            .then(|| s.clone())
    });
    assert!(stats["writeOpsTotal"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert!(
        stats["writeBytesTotal"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(
        stats["writeLatencyMicros"].as_f64().unwrap_or(0.0) > 0.0,
        "{stats}"
    );
    let iops = wait_for_value(Duration::from_secs(10), "write IOPS in /metrics", || {
        let m = c.api.get("/metrics");
        assert_eq!(m.status, 200, "{}", m.text);
        sample(&m.text, "ironhorn_volume_write_iops", "v1").filter(|x| *x > 0.0)
    });
    println!("STATS v1 while fio writes: {stats}; /metrics write IOPS {iops}");
    writer.join().expect("fio thread");

    let m = c.api.get("/metrics").text;
    let total = sample(&m, "ironhorn_volume_write_bytes_total", "v1").unwrap_or(0.0);
    assert!(total > 0.0, "write bytes total in /metrics:\n{m}");
}
