//! End-to-end tests of `ironhorn backup` (the real binary) against a real S3 server (moto,
//! started here on 127.0.0.1) and a `file://` target: full and incremental backups of a
//! replica directory, restore compared byte for byte, a corrupt block, a backup killed
//! part-way; and a backup taken through a running engine whose restore an engine serves.

#![allow(clippy::unwrap_used)]

mod backup_support;
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use backup_support::{Moto, backup, backup_cmd, backup_json, files_ending, read_replica};
use common::{Cluster, Engine, EngineConfig, Replica, random_bytes, run_ok, wait_until};
use ironhorn_replica::Store;

/// Test volume: 64 MiB in 64 KiB backup blocks (1024 blocks).
const SIZE: u64 = 64 << 20;
const BS: u64 = 64 << 10;
const BLOCKS: u64 = SIZE / BS;

/// Writes random data into 3/4 of the volume (the rest stays a hole) and snapshots `s1`;
/// returns the volume's contents.
fn make_replica(dir: &Path, seed: u64) -> Vec<u8> {
    let store = Store::create(dir, SIZE).unwrap();
    let mut expect = vec![0u8; SIZE as usize];
    let data = random_bytes((SIZE / 4 * 3) as usize, seed);
    // Blocks 0..512 and 768..1024 hold data; 512..768 is a hole.
    store.write(0, &data[..(SIZE / 2) as usize]).unwrap();
    store
        .write(SIZE / 4 * 3, &data[(SIZE / 2) as usize..])
        .unwrap();
    expect[..(SIZE / 2) as usize].copy_from_slice(&data[..(SIZE / 2) as usize]);
    expect[(SIZE / 4 * 3) as usize..].copy_from_slice(&data[(SIZE / 2) as usize..]);
    store.snapshot("s1", BTreeMap::new()).unwrap();
    expect
}

/// Changes 11 blocks (~1.07 % of the volume's blocks) with a few random 4 KiB pages each,
/// snapshots `s2`, and returns the new contents.
fn change_one_percent(dir: &Path, mut expect: Vec<u8>) -> Vec<u8> {
    let store = Store::open(dir).unwrap();
    for k in 0..11u64 {
        let block = (k * 89 + 3) % BLOCKS;
        let off = block * BS + 4096 * (k % 16);
        let page = random_bytes(8192, 500 + k);
        store.write(off, &page).unwrap();
        expect[off as usize..off as usize + 8192].copy_from_slice(&page);
    }
    store.snapshot("s2", BTreeMap::new()).unwrap();
    expect
}

fn full_incremental_restore(target: &str, work: &Path) {
    let rdir = work.join("replica");
    let v1 = make_replica(&rdir, 11);
    let dir = rdir.to_str().unwrap();
    let bs = BS.to_string();
    let r1 = backup_json(
        target,
        &[
            "create",
            "--replica-dir",
            dir,
            "--snapshot",
            "s1",
            "--volume",
            "vol",
            "--block-size",
            &bs,
            "--label",
            "app=db",
        ],
    );
    let p1 = &r1["progress"];
    assert_eq!(p1["total_blocks"], 768, "the hole is not read: {r1}");
    assert_eq!(p1["transferred_blocks"], 768, "{r1}");
    let id1 = r1["id"].as_str().unwrap().to_owned();

    let v2 = change_one_percent(&rdir, v1.clone());
    let r2 = backup_json(
        target,
        &[
            "create",
            "--replica-dir",
            dir,
            "--snapshot",
            "s2",
            "--volume",
            "vol",
        ],
    );
    let p2 = &r2["progress"];
    let uploaded = p2["transferred_blocks"].as_u64().unwrap();
    assert_eq!(r2["base"], id1.as_str(), "{r2}");
    assert_eq!(p2["total_blocks"], 11, "only changed blocks are read: {r2}");
    assert_eq!(uploaded, 11, "{r2}");
    assert!(
        uploaded as f64 <= 0.015 * BLOCKS as f64,
        "incremental uploaded {uploaded} of {BLOCKS} blocks"
    );
    let id2 = r2["id"].as_str().unwrap().to_owned();

    let list = backup_json(target, &["ls", "--volume", "vol"]);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id1.as_str(), id2.as_str()]);
    let m = backup_json(target, &["inspect", &id1]);
    assert_eq!(m["labels"]["app"], "db");
    assert_eq!(m["block_count"], 768);
    assert!(
        backup_json(target, &["verify", &id2])["bad"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    for (id, expect, name) in [(&id1, &v1, "restore1"), (&id2, &v2, "restore2")] {
        let to = work.join(name);
        backup_json(target, &["restore", id, "--to", to.to_str().unwrap()]);
        let got = read_replica(&to);
        assert!(
            got == *expect,
            "restore of {id} differs at {:?}",
            common::first_difference_in(&got, expect)
        );
        // The restored replica holds the backup's snapshot.
        let s = Store::open(&to).unwrap();
        assert!(
            s.layers()
                .iter()
                .any(|l| l.name == if name == "restore1" { "s1" } else { "s2" })
        );
    }

    // Delete the first backup: the second still restores.
    let rm = backup_json(target, &["rm", &id1]);
    // 8 of the 11 changed blocks replaced blocks of s1 (3 were in its hole).
    assert_eq!(rm["gc"]["blocks_deleted"], 8, "{rm}");
    let to = work.join("restore3");
    backup_json(target, &["restore", &id2, "--to", to.to_str().unwrap()]);
    assert!(read_replica(&to) == v2);
}

#[test]
fn full_incremental_restore_s3() {
    let moto = Moto::start();
    moto.create_bucket("ihtest");
    let work = tempfile::tempdir().unwrap();
    full_incremental_restore(&moto.url("ihtest", "backups"), work.path());
}

#[test]
fn full_incremental_restore_file() {
    let work = tempfile::tempdir().unwrap();
    let target = format!("file://{}/target", work.path().display());
    full_incremental_restore(&target, work.path());
}

#[test]
fn corrupt_block_is_reported_and_not_restored() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("target");
    let target = format!("file://{}", root.display());
    let rdir = work.path().join("replica");
    make_replica(&rdir, 3);
    let r = backup_json(
        &target,
        &[
            "create",
            "--replica-dir",
            rdir.to_str().unwrap(),
            "--snapshot",
            "s1",
            "--block-size",
            "1MiB",
        ],
    );
    let id = r["id"].as_str().unwrap().to_owned();
    let blocks = files_ending(&root.join("blocks"), ".blk");
    assert_eq!(blocks.len(), 48);
    let victim = &blocks[blocks.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let i = bytes.len() - 100;
    bytes[i] ^= 0x01;
    std::fs::write(victim, bytes).unwrap();
    let hash = victim.file_stem().unwrap().to_str().unwrap().to_owned();

    let v = backup(&target, &["verify", &id]);
    assert!(
        !v.success(),
        "verify of a corrupt backup must fail: {}",
        v.all_output()
    );
    let report: serde_json::Value = serde_json::from_str(v.stdout.trim()).unwrap();
    let bad = report["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["hash"], hash.as_str());
    assert!(
        bad[0]["problem"].as_str().unwrap().contains("crc32"),
        "{report}"
    );

    let to = work.path().join("restored");
    let out = backup(&target, &["restore", &id, "--to", to.to_str().unwrap()]);
    assert!(!out.success(), "restore of a corrupt backup must fail");
    assert!(
        out.stderr.contains(&hash),
        "names the bad block: {}",
        out.all_output()
    );
    assert!(!to.exists(), "nothing is left at the destination");
    assert!(
        !work.path().join(".restored.restoring").exists(),
        "the partial replica is removed"
    );
}

#[test]
fn killed_backup_leaves_no_manifest_and_runs_again() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("target");
    let target = format!("file://{}", root.display());
    let rdir = work.path().join("replica");
    let v1 = make_replica(&rdir, 5);
    let dir = rdir.to_str().unwrap();
    // Paced to ~8 s so that it is surely killed part-way.
    let mut c = backup_cmd(
        &target,
        &[
            "create",
            "--replica-dir",
            dir,
            "--snapshot",
            "s1",
            "--block-size",
            "64KiB",
            "--limit-rate",
            "6MiB",
        ],
    );
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "some blocks uploaded", || {
        files_ending(&root.join("blocks"), ".blk").len() >= 20
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = files_ending(&root.join("blocks"), ".blk").len();
    assert!(partial < 768, "killed before the end ({partial} blocks)");
    assert!(
        files_ending(&root, ".manifest").is_empty(),
        "no manifest after a killed backup"
    );
    assert!(backup_json(&target, &["ls"]).as_array().unwrap().is_empty());

    let r = backup_json(
        &target,
        &["create", "--replica-dir", dir, "--snapshot", "s1"],
    );
    let p = &r["progress"];
    // Blocks the killed run stored are not uploaded again.
    assert_eq!(
        p["transferred_blocks"].as_u64().unwrap() + p["skipped_blocks"].as_u64().unwrap(),
        p["total_blocks"].as_u64().unwrap()
    );
    assert!(p["skipped_blocks"].as_u64().unwrap() >= 20, "{r}");
    let id = r["id"].as_str().unwrap();
    let to = work.path().join("restored");
    backup_json(&target, &["restore", id, "--to", to.to_str().unwrap()]);
    assert!(read_replica(&to) == v1);
}

#[test]
fn bad_input_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let target = format!("file://{}/t", work.path().display());
    for (args, needle) in [
        (vec!["inspect", "nope"], "not found"),
        (vec!["inspect", "../x"], "invalid backup id"),
        (
            vec![
                "create",
                "--replica-dir",
                "/nonexistent",
                "--snapshot",
                "s",
                "--volume",
                "v",
            ],
            "holds no replica",
        ),
    ] {
        let out = backup(&target, &args);
        assert!(!out.success(), "{args:?}");
        assert!(
            out.stderr.contains(needle),
            "{args:?}: {}",
            out.all_output()
        );
    }
    let out = backup("http://x", &["ls"]);
    assert!(
        !out.success() && out.stderr.contains("expected s3://"),
        "{}",
        out.all_output()
    );
}

/// A backup taken through a running engine (by one of its replicas) while the volume is
/// exported, restored into a new replica directory that a new engine then serves.
#[test]
fn engine_backup_restores_into_a_servable_replica() {
    let size: u64 = 32 << 20;
    let cluster = Cluster::start(2, size);
    let target = format!("file://{}", cluster.path("target").display());
    let image = cluster.path("image");
    let data = random_bytes(size as usize, 77);
    std::fs::write(&image, &data).unwrap();
    run_ok(
        std::process::Command::new("nbdcopy")
            .arg("--")
            .arg(&image)
            .arg(cluster.uri()),
        120,
    );
    cluster.engine.ctl_json(&["snapshot", "create", "b1"]);
    let r = cluster
        .engine
        .ctl_json(&["backup", "create", "--snapshot", "b1", "--target", &target]);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["uploaded_blocks"], 16, "{r}");
    let id = r["backup_id"].as_str().unwrap().to_owned();
    let info = cluster.engine.info();
    assert_eq!(info["backups"][0]["backup_id"], id.as_str(), "{info}");
    assert_eq!(info["backups"][0]["done_bytes"], size, "{info}");

    // The volume changes after the snapshot: the backup keeps the snapshot's data.
    let image2 = cluster.path("image2");
    std::fs::write(&image2, random_bytes(size as usize, 78)).unwrap();
    run_ok(
        std::process::Command::new("nbdcopy")
            .arg("--")
            .arg(&image2)
            .arg(cluster.uri()),
        120,
    );
    let to = cluster.path("restored");
    backup_json(&target, &["restore", &id, "--to", to.to_str().unwrap()]);

    let replica = Replica::start("restored", &to, size);
    let engine = Engine::start(EngineConfig::new("restored", size, vec![replica.address()]));
    engine.wait_all_rw(Duration::from_secs(30));
    let out = cluster.path("out");
    common::nbd_export_to_file(&engine.uri(), &out);
    assert_eq!(
        common::first_difference(&image, &out),
        None,
        "served restore equals the snapshot"
    );
}
