//! Library tests of the backup store against a `file://` target and a real S3 server
//! (moto, started by the test on 127.0.0.1): incremental backups and restore, corruption,
//! and randomised create/delete sequences with concurrent backups and garbage collection.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{MemSink, MemSource, Moto, SinkRef, moto_options, random_bytes};
use ironhorn_backup::codec::BlockHash;
use ironhorn_backup::target::layout;
use ironhorn_backup::{
    BackupError, CreateRequest, LeaseOptions, Progress, SnapshotId, Target, TargetOptions,
};
use tokio_util::sync::CancellationToken;

const BS: u64 = 64 << 10;

fn fast_lease(mut o: TargetOptions) -> TargetOptions {
    o.lease = LeaseOptions {
        ttl: Duration::from_secs(3),
        skew: Duration::from_millis(500),
        retry: Duration::from_millis(20),
        wait: Duration::from_secs(60),
    };
    o
}

fn req(volume: &str) -> CreateRequest {
    let mut r = CreateRequest::new(volume);
    r.block_size = Some(BS);
    r
}

async fn restore_to_vec(t: &Target, id: &str) -> Result<Vec<u8>, BackupError> {
    let sink: Arc<MemSink> = Arc::new(MemSink::default());
    let s2 = sink.clone();
    let r = t
        .restore_backup(
            id,
            move |m| {
                *s2.data.lock().unwrap() = vec![0; m.size as usize];
                Ok(SinkRef(s2))
            },
            Arc::new(Progress::new()),
            None,
            CancellationToken::new(),
        )
        .await;
    let state = *sink.state.lock().unwrap();
    match r {
        Ok(_) => {
            assert_eq!(state, Some("committed"));
            Ok(sink.data.lock().unwrap().clone())
        }
        Err(e) => {
            assert_eq!(state, Some("aborted"), "a failed restore aborts its sink");
            Err(e)
        }
    }
}

/// Full backup, 1 % of the blocks changed, incremental backup, restore both.
async fn incremental_round_trip(t: &Target) {
    let size = 1024 * BS as usize; // 64 MiB, 1024 blocks
    let mut v1 = random_bytes(size, 1);
    // A quarter of the volume is zeros (not stored).
    v1[size / 2..size / 2 + size / 4].fill(0);
    let s1 = MemSource::new("s1", 1, v1.clone(), vec![]);
    let p1 = Arc::new(Progress::new());
    let r1 = t
        .create_backup(Arc::new(s1), req("vol"), p1, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r1.base, None);
    assert_eq!(r1.progress.transferred_blocks, 768);
    assert_eq!(r1.progress.total_blocks, 768, "holes are not read");

    // Change ~1 % of the blocks (10 of 1024), a few 4 KiB pages in each.
    let mut v2 = v1.clone();
    let mut replaced = 0;
    for k in 0..10u64 {
        let block = (k * 97 + 5) % 1024;
        let off = (block * BS + 4096 * (k % 8)) as usize;
        let b = block as usize * BS as usize;
        if v1[b..b + BS as usize].iter().any(|x| *x != 0) {
            replaced += 1;
        }
        v2[off..off + 8192].copy_from_slice(&random_bytes(8192, 100 + k));
    }
    let id1 = SnapshotId {
        name: "s1".into(),
        created_unix_ms: 1,
    };
    let s2 = MemSource::new("s2", 2, v2.clone(), vec![(id1, Arc::new(v1.clone()))]);
    let p2 = Arc::new(Progress::new());
    let r2 = t
        .create_backup(Arc::new(s2), req("vol"), p2, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(r2.base.as_deref(), Some(r1.id.as_str()));
    assert_eq!(r2.progress.total_blocks, 10, "only changed blocks are read");
    assert_eq!(
        r2.progress.transferred_blocks, 10,
        "only changed blocks are uploaded"
    );

    assert!(
        restore_to_vec(t, &r1.id).await.unwrap() == v1,
        "backup 1 restores"
    );
    assert!(
        restore_to_vec(t, &r2.id).await.unwrap() == v2,
        "backup 2 restores"
    );
    let v = t
        .verify_backup(&r2.id, Arc::new(Progress::new()))
        .await
        .unwrap();
    assert!(v.ok());
    assert_eq!(t.list_backups(Some("vol")).await.unwrap().len(), 2);

    // Deleting the first keeps every block the second uses.
    let d = t
        .delete_backup(&r1.id, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        d.gc.blocks_deleted, replaced,
        "the replaced blocks are freed"
    );
    assert!(restore_to_vec(t, &r2.id).await.unwrap() == v2);
    assert!(matches!(
        t.read_manifest(&r1.id).await,
        Err(BackupError::BackupNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_round_trip_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bk", dir.path().display());
    let t = Target::open(&url, &fast_lease(TargetOptions::default())).unwrap();
    incremental_round_trip(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_round_trip_s3() {
    let moto = Moto::start();
    moto.create_bucket("libbucket");
    let t = Target::open(&moto.url("libbucket", "inc"), &fast_lease(moto_options())).unwrap();
    incremental_round_trip(&t).await;
}

/// A flipped byte in a stored block: verify names it, restore fails and aborts.
/// `raw` is a second, independent handle on the same objects (the test's "attacker").
async fn corruption(t: &Target, raw: &dyn object_store::ObjectStore) {
    let data = random_bytes(16 * BS as usize, 7);
    let s = MemSource::new("s", 1, data.clone(), vec![]);
    let r = t
        .create_backup(
            Arc::new(s),
            req("c"),
            Arc::new(Progress::new()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let m = t.read_manifest(&r.id).await.unwrap();
    let victim = m.blocks[5];
    let key = layout::block(&victim.1);
    let mut b = raw.get(&key).await.unwrap().bytes().await.unwrap().to_vec();
    let i = b.len() / 2;
    b[i] ^= 0x40;
    raw.put(&key, b.into()).await.unwrap();
    let v = t
        .verify_backup(&r.id, Arc::new(Progress::new()))
        .await
        .unwrap();
    assert_eq!(v.bad.len(), 1, "{v:?}");
    assert_eq!(v.bad[0].hash, victim.1.to_hex());
    assert_eq!(v.bad[0].offsets, vec![victim.0 * BS]);
    assert!(v.bad[0].problem.contains("crc32"), "{}", v.bad[0].problem);
    match restore_to_vec(t, &r.id).await {
        Err(BackupError::BadBlock { hash, offset, .. }) => {
            assert_eq!(hash, victim.1.to_hex());
            assert_eq!(offset, victim.0 * BS);
        }
        other => panic!("restore of a corrupt backup: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_block_is_reported_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bk");
    let t = Target::open(
        &format!("file://{}", root.display()),
        &TargetOptions::default(),
    )
    .unwrap();
    let raw = object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap();
    corruption(&t, &raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_block_is_reported_s3() {
    let moto = Moto::start();
    moto.create_bucket("corrupt");
    let t = Target::open(&moto.url("corrupt", "p"), &moto_options()).unwrap();
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_bucket_name("corrupt")
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let raw = object_store::prefix::PrefixStore::new(raw, "p");
    corruption(&t, &raw).await;
}

/// Randomised create/delete sequences with concurrent backups: after every step every
/// manifest's blocks exist; once quiet, a collection leaves exactly the referenced blocks.
async fn random_gc(t: &Target, seed: u64, rounds: usize) {
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // A pool of block contents, so that backups share blocks across volumes.
    let pool: Vec<Vec<u8>> = (0..12)
        .map(|i| random_bytes(BS as usize, 1000 + i))
        .collect();
    let mut created = 0i64;
    for round in 0..rounds {
        let mut tasks = Vec::new();
        let n_create = 1 + (next() % 3) as usize;
        for _ in 0..n_create {
            created += 1;
            let vol = format!("v{}", next() % 3);
            let mut data = vec![0u8; 8 * BS as usize];
            for b in 0..8 {
                let pick = (next() % 14) as usize;
                if pick < pool.len() {
                    data[b * BS as usize..(b + 1) * BS as usize].copy_from_slice(&pool[pick]);
                }
            }
            let t = t.clone();
            let full = next() % 2 == 0;
            tasks.push(tokio::spawn(async move {
                let s = MemSource::new("s", created, data, vec![]);
                let mut r = req(&vol);
                r.incremental = !full;
                t.create_backup(
                    Arc::new(s),
                    r,
                    Arc::new(Progress::new()),
                    CancellationToken::new(),
                )
                .await
                .map(|_| ())
            }));
        }
        let existing = t.list_backups(None).await.unwrap();
        for _ in 0..(next() % 3) {
            if existing.is_empty() {
                break;
            }
            let victim = existing[(next() % existing.len() as u64) as usize]
                .id
                .clone();
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                match t.delete_backup(&victim, CancellationToken::new()).await {
                    Ok(_) | Err(BackupError::BackupNotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }));
        }
        if next() % 4 == 0 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                t.gc(CancellationToken::new()).await.map(|_| ())
            }));
        }
        for task in tasks {
            task.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        // Every block any manifest references is stored.
        let stored = stored_blocks(t).await;
        for b in t.list_backups(None).await.unwrap() {
            let m = t.read_manifest(&b.id).await.unwrap();
            for r in &m.blocks {
                assert!(
                    stored.contains(&r.1),
                    "round {round}: {} lost block {}",
                    m.id,
                    r.1
                );
            }
        }
    }
    // Quiet: one collection leaves exactly the referenced blocks.
    t.gc(CancellationToken::new()).await.unwrap();
    let mut referenced = BTreeSet::new();
    let list = t.list_backups(None).await.unwrap();
    for b in &list {
        let m = t.read_manifest(&b.id).await.unwrap();
        referenced.extend(m.blocks.iter().map(|r| r.1));
        assert!(
            t.verify_backup(&b.id, Arc::new(Progress::new()))
                .await
                .unwrap()
                .ok()
        );
    }
    let stored: BTreeSet<BlockHash> = stored_blocks(t).await.into_iter().collect();
    assert_eq!(
        stored, referenced,
        "after gc exactly the referenced blocks remain"
    );
    assert!(!list.is_empty() || stored.is_empty());
}

async fn stored_blocks(t: &Target) -> HashSet<BlockHash> {
    t.list_blocks().await.unwrap().into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_create_delete_gc_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bk", dir.path().display());
    let t = Target::open(&url, &fast_lease(TargetOptions::default())).unwrap();
    for seed in [0x1234_5678_9abc_def1u64, 42, 7777] {
        random_gc(&t, seed, 12).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_create_delete_gc_s3() {
    let moto = Moto::start();
    moto.create_bucket("gcbucket");
    let t = Target::open(&moto.url("gcbucket", "r"), &fast_lease(moto_options())).unwrap();
    random_gc(&t, 99, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lock_expires_and_live_gc_blocks_backups() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bk", dir.path().display());
    let t = Target::open(&url, &fast_lease(TargetOptions::default())).unwrap();
    // A collector that died holding the lock: its record expires after ttl + skew.
    let lease = ironhorn_backup::lock::Lease::acquire(
        &t,
        ironhorn_backup::lock::LockKind::Gc,
        "test",
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    drop(lease); // stops renewing, leaves the record
    let start = std::time::Instant::now();
    let s = MemSource::new("s", 1, random_bytes(4 * BS as usize, 3), vec![]);
    t.create_backup(
        Arc::new(s),
        req("x"),
        Arc::new(Progress::new()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(3000),
        "backup waited for the stale gc lock ({waited:?})"
    );
    assert!(waited < Duration::from_secs(20), "{waited:?}");
}
