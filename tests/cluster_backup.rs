//! Backups through the REST API against a real S3 server (moto on 127.0.0.1): a 2-replica
//! volume is written (qemu-io patterns over NBD), backed up (the backup controller takes a
//! snapshot and runs the backup through the engine), restored into a new volume (the
//! restore controller fills each replica before it starts), attached on another node and
//! compared byte for byte with the original (nbdcopy); the backup is then deleted and gone
//! from the target. A recurring snapshot job firing every two seconds keeps only `retain`
//! snapshots, a recurring backup job keeps one backup in the target, and a new control
//! plane pointed at the same target lists that backup and restores it byte for byte.

mod backup_support;
mod cluster_common;
mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use backup_support::{Moto, backup_json};
use cluster_common::{Cluster, condition, items, wait_for_value};
use common::run_with_timeout;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Runs qemu-io commands on the NBD export; panics when one fails.
#[track_caller]
fn qemu_io(uri: &str, cmds: &[&str]) {
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
}

/// The whole device behind `uri`, read with nbdcopy.
#[track_caller]
fn read_all(uri: &str, file: &std::path::Path) -> Vec<u8> {
    let out = run_with_timeout(Command::new("nbdcopy").arg(uri).arg(file), 60);
    assert!(out.success(), "nbdcopy {uri}: {out}");
    std::fs::read(file).expect("nbdcopy output")
}

fn backup(c: &Cluster, name: &str) -> Value {
    c.api.get(&format!("/v1/backups/{name}")).ok()
}

/// Gives the processes this test starts (manager, agents and the replicas they start, the
/// `ironhorn backup` CLI) the credentials moto accepts, as a deployment would.
#[allow(unsafe_code)]
fn set_s3_credentials() {
    // SAFETY: called first thing in the only test of this binary, before it starts any
    // thread that could read the environment.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
}

#[test]
fn backup_restore_and_recurring_snapshots() {
    set_s3_credentials();
    let started = Instant::now();
    let moto = Moto::start();
    moto.create_bucket("ihbk");
    let target = moto.url("ihbk", "cluster");
    let c = Cluster::start(3, &[]);
    let tmp = tempfile::tempdir().expect("temp dir");

    c.api.put("/v1/backuptarget", json!({"url": target})).ok();

    c.create_volume("src", 16 * MIB, 2);
    c.wait_robustness("src", "healthy", Duration::from_secs(30));
    c.attach("src", "node-1");
    let uri = c.wait_attached("src");
    qemu_io(
        &uri,
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xb2 5M 2M",
            "write -P 0xc3 15M 1M",
        ],
    );

    // Back up (the controller takes the snapshot itself).
    c.api
        .post(
            "/v1/volumes/src/backups",
            json!({"name": "bk1", "labels": {"app": "t"}}),
        )
        .ok();
    let b = wait_for_value(Duration::from_secs(90), "backup bk1 completed", || {
        let b = backup(&c, "bk1");
        assert_ne!(b["status"]["state"], "error", "backup failed: {b}");
        (b["status"]["state"] == "completed").then_some(b)
    });
    assert_eq!(b["status"]["progress"], 100, "{b}");
    assert_eq!(b["status"]["volumeSize"], 16 * MIB, "{b}");
    // Blocks of 2 MiB holding data: 0, 2, 3 and 7.
    assert_eq!(
        b["status"]["size"],
        8 * MIB,
        "stored bytes (holes excluded): {b}"
    );
    assert_eq!(condition(&b, "Ready").as_deref(), Some("True"), "{b}");
    let id = b["metadata"]["annotations"]["ironhorn.io/backup-id"]
        .as_str()
        .expect("backup id annotation")
        .to_owned();
    let v = c.volume("src");
    assert_eq!(v["status"]["lastBackup"], "bk1", "{v}");
    let listed = backup_json(&target, &["ls"]);
    assert!(
        listed.to_string().contains(&id),
        "{id} not in the target: {listed}"
    );
    let original = read_all(&uri, &tmp.path().join("src.raw"));
    assert_eq!(original.len() as u64, 16 * MIB);

    // Restore into a new volume; its replicas only start once restored.
    c.api
        .post(
            "/v1/backups/bk1/restore",
            json!({"name": "dst", "numberOfReplicas": 2}),
        )
        .ok();
    let v = c.wait_volume("dst", Duration::from_secs(90), "dst restored", |v| {
        condition(v, "Restored").as_deref() == Some("True")
    });
    assert_eq!(v["status"]["restoreProgress"], 100, "{v}");
    c.attach("dst", "node-2");
    let uri2 = c.wait_attached("dst");
    let restored = read_all(&uri2, &tmp.path().join("dst.raw"));
    assert!(
        restored == original,
        "restored volume differs from the original"
    );
    qemu_io(
        &uri2,
        &[
            "read -P 0xa1 0 1M",
            "read -P 0 1M 4M",
            "read -P 0xb2 5M 2M",
            "read -P 0xc3 15M 1M",
        ],
    );
    // The restored volume is an ordinary volume: it takes writes.
    qemu_io(&uri2, &["write -P 0xd4 2M 1M", "read -P 0xd4 2M 1M"]);

    // Deleting the backup removes it from the target.
    let del = c.api.delete("/v1/backups/bk1");
    assert_eq!(del.status, 202, "{}", del.text);
    wait_for_value(Duration::from_secs(60), "backup bk1 deleted", || {
        (c.api.get("/v1/backups/bk1").status == 404).then_some(())
    });
    let listed = backup_json(&target, &["ls"]);
    assert!(
        !listed.to_string().contains(&id),
        "{id} still in the target: {listed}"
    );

    // A recurring snapshot job every two seconds keeps two snapshots of src.
    c.api
        .post(
            "/v1/recurringjobs",
            json!({"name": "every2s", "task": "snapshot", "cron": "*/2 * * * * *",
                   "retain": 2, "volumes": ["src"]}),
        )
        .ok();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut current = Vec::new();
    while Instant::now() < deadline && seen.len() < 5 {
        let snaps = c.api.get("/v1/volumes/src/snapshots").ok();
        current = items(&snaps)
            .into_iter()
            .filter(|s| s["spec"]["labels"]["recurring-job"] == "every2s")
            .filter(|s| s["metadata"]["deletionTimestamp"].is_null())
            .collect();
        for s in &current {
            seen.insert(
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        assert!(
            current.len() <= 3,
            "retain 2 (one more may be on its way): {current:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        seen.len() >= 5,
        "the job fired {} times in 40 s: {seen:?}",
        seen.len()
    );
    let job = c.api.get("/v1/recurringjobs/every2s").ok();
    assert!(job["status"]["lastRun"].is_string(), "{job}");
    assert!(job["status"]["nextRun"].is_string(), "{job}");
    assert!(!current.is_empty());
    let del = c.api.delete("/v1/recurringjobs/every2s");
    assert!(del.status < 300, "{}", del.text);
    // Once it stopped, retention settles at two.
    wait_for_value(Duration::from_secs(30), "two snapshots kept", || {
        let snaps = c.api.get("/v1/volumes/src/snapshots").ok();
        let n = items(&snaps)
            .into_iter()
            .filter(|s| s["spec"]["labels"]["recurring-job"] == "every2s")
            .filter(|s| s["metadata"]["deletionTimestamp"].is_null())
            .count();
        (n == 2).then_some(())
    });

    // A recurring backup job every three seconds keeps one backup in the target.
    c.api
        .post(
            "/v1/recurringjobs",
            json!({"name": "bk3s", "task": "backup", "cron": "*/3 * * * * *",
                   "retain": 1, "volumes": ["src"]}),
        )
        .ok();
    let job_backups = || -> Vec<Value> {
        items(&c.api.get("/v1/backups?volume=src").ok())
            .into_iter()
            .filter(|b| b["spec"]["labels"]["recurring-job"] == "bk3s")
            .collect()
    };
    let mut completed = BTreeSet::new();
    wait_for_value(Duration::from_secs(60), "three recurring backups", || {
        for b in job_backups() {
            assert_ne!(
                b["status"]["state"], "error",
                "recurring backup failed: {b}"
            );
            if b["status"]["state"] == "completed" {
                completed.insert(
                    b["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
        (completed.len() >= 3).then_some(())
    });
    let del = c.api.delete("/v1/recurringjobs/bk3s");
    assert!(del.status < 300, "{}", del.text);
    let kept = wait_for_value(Duration::from_secs(60), "one recurring backup kept", || {
        let all = job_backups();
        (all.len() == 1 && all[0]["status"]["state"] == "completed").then_some(all)
    });
    let kept_id = kept[0]["metadata"]["annotations"]["ironhorn.io/backup-id"]
        .as_str()
        .expect("backup id")
        .to_owned();
    // The target holds exactly that one backup of src (bk1 and the older ones are gone).
    let listed = backup_json(&target, &["ls", "--volume", "src"]);
    let ids: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [kept_id.as_str()],
        "one backup of src in the target: {listed}"
    );
    drop(c);

    // A new control plane pointed at the same target finds the backup and restores it.
    let c2 = Cluster::start(1, &[]);
    c2.api
        .put(
            "/v1/backuptarget",
            json!({"url": target, "pollIntervalSeconds": 1}),
        )
        .ok();
    let found = kept_id.to_lowercase();
    wait_for_value(
        Duration::from_secs(30),
        "the backup listed from the target",
        || {
            let a = c2.api.get(&format!("/v1/backups/{found}"));
            (a.status == 200 && a.ok()["status"]["state"] == "completed").then_some(())
        },
    );
    let t = c2.api.get("/v1/backuptarget").ok();
    assert_eq!(t["status"]["available"], true, "{t}");
    c2.api
        .post(
            &format!("/v1/backups/{found}/restore"),
            json!({"name": "again", "numberOfReplicas": 1}),
        )
        .ok();
    c2.wait_volume("again", Duration::from_secs(60), "again restored", |v| {
        condition(v, "Restored").as_deref() == Some("True")
    });
    c2.attach("again", "node-1");
    let uri3 = c2.wait_attached("again");
    let again = read_all(&uri3, &tmp.path().join("again.raw"));
    assert!(
        again == original,
        "the backup restored on a new control plane differs"
    );
    eprintln!("cluster_backup took {:?}", started.elapsed());
}
