//! The store under concurrent use, as the data server uses it: writer threads that read back
//! what they wrote, while control operations (snapshot, remove + purge) run beside them.
//! Each writer owns a region, so every read has one right answer.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{assert_no_leftovers, view_from_chunks};
use ironhorn_replica::{BLOCK_SIZE, CHUNK_SIZE, SECTOR_SIZE, Store};

mod common;

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// A write must be visible to the next read while a purge merges a large snapshot into the
/// head chunk by chunk.
#[test]
fn writes_read_back_during_a_purge_into_the_head() {
    const SIZE: u64 = 64 * CHUNK_SIZE;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(dir.path(), SIZE).unwrap());
    // A snapshot that holds every block, then removed: the purge copies 64 chunks.
    let mut big = vec![0u8; CHUNK_SIZE as usize];
    for c in 0..SIZE / CHUNK_SIZE {
        fill(&mut big, 1000 + c);
        store.write(c * CHUNK_SIZE, &big).unwrap();
    }
    store.snapshot("base", BTreeMap::new()).unwrap();
    store.remove_snapshot("base").unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let purger = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let r = store.purge();
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let mut x: u64 = 99;
    let mut n = 0u64;
    let mut stale = Vec::new();
    let mut expect = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n += 1;
        let block = x % (SIZE / BLOCK_SIZE);
        // Whole blocks and single sectors, both straight into blocks the head may hold.
        let (off, len) = if n.is_multiple_of(2) {
            (block * BLOCK_SIZE, BLOCK_SIZE)
        } else {
            (
                block * BLOCK_SIZE + (x >> 40) % 8 * SECTOR_SIZE,
                SECTOR_SIZE,
            )
        };
        let mut data = vec![0u8; len as usize];
        fill(&mut data, n);
        store.write(off, &data).unwrap();
        let mut back = vec![0u8; len as usize];
        store.read(off, &mut back).unwrap();
        if back != data {
            stale.push((off, len));
        }
        expect.insert(off, data);
    }
    let purged = purger.join().unwrap().unwrap();
    assert_eq!(purged, vec!["base".to_owned()]);
    assert!(
        stale.is_empty(),
        "{} of {n} writes read back stale during the purge, first at {:?}",
        stale.len(),
        stale.first()
    );
    // And after it, everything reads as last written (later writes overwrite earlier ones
    // at the same offset; sector and block writes at overlapping offsets are rare enough
    // to check only exact offsets that were written once).
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (off, data) in &expect {
        let b = &mut buf[..data.len()];
        store.read(*off, b).unwrap();
        let overlapped = expect
            .range(off.saturating_sub(BLOCK_SIZE - 1)..off + data.len() as u64)
            .count()
            > 1;
        if !overlapped {
            assert!(b == data.as_slice(), "at {off} after the purge");
        }
    }
    eprintln!("{n} writes during the purge");
}

const REGION: u64 = 4 * CHUNK_SIZE;
const WRITERS: u64 = 3;

/// One write of a writer: offset, length, and the seed of its data (`None`: zeros).
type Logged = (u64, u64, Option<u64>);

fn replay(region: &mut [u8], base: u64, w: &Logged) {
    let (off, len, seed) = *w;
    let dst = &mut region[(off - base) as usize..(off - base + len) as usize];
    match seed {
        Some(s) => fill(dst, s),
        None => dst.fill(0),
    }
}

/// Writers own a region each and read back every write; a control thread takes snapshots
/// and removes + purges older ones meanwhile. Afterwards (and after reopening) the head
/// holds every region's last writes, and each snapshot holds, per region, the writes up to
/// some point between the start and the end of its `snapshot` call.
#[test]
fn writers_snapshots_and_purges_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(dir.path(), WRITERS * REGION).unwrap());
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(20);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, versions, stop) = (store.clone(), versions.clone(), stop.clone());
            std::thread::spawn(move || {
                let base = w * REGION;
                let mut x = 77 + w;
                let mut log: Vec<Logged> = Vec::new();
                let mut image = vec![0u8; REGION as usize];
                while log.len() < 3000 && !stop.load(Ordering::SeqCst) && Instant::now() < deadline
                {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let sectors = REGION / SECTOR_SIZE;
                    let len = (1 + x % 16).min(sectors);
                    let start = (x >> 20) % (sectors - len + 1);
                    let (off, len) = (base + start * SECTOR_SIZE, len * SECTOR_SIZE);
                    let entry = if x.is_multiple_of(7) {
                        store.write_zeroes(off, len).unwrap();
                        (off, len, None)
                    } else {
                        let seed = (w << 32) | log.len() as u64;
                        let mut data = vec![0u8; len as usize];
                        fill(&mut data, seed);
                        store.write(off, &data).unwrap();
                        (off, len, Some(seed))
                    };
                    replay(&mut image, base, &entry);
                    log.push(entry);
                    versions[w as usize].store(log.len() as u64, Ordering::SeqCst);
                    let mut back = vec![0u8; len as usize];
                    store.read(off, &mut back).unwrap();
                    let want = &image[(off - base) as usize..(off - base + len) as usize];
                    assert!(
                        back == want,
                        "writer {w}: write {} at {off}+{len} read back stale",
                        log.len()
                    );
                }
                log
            })
        })
        .collect();

    // Snapshots: name -> per writer (versions before the call, versions after it + 1).
    let mut taken: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    let mut live: Vec<String> = Vec::new();
    let mut n: usize = 0;
    let mut purged = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let before: Vec<u64> = versions.iter().map(|v| v.load(Ordering::SeqCst)).collect();
        let name = format!("c{n}");
        n += 1;
        store.snapshot(&name, BTreeMap::new()).unwrap();
        let after: Vec<u64> = versions
            .iter()
            .map(|v| v.load(Ordering::SeqCst) + 1)
            .collect();
        taken.insert(name.clone(), before.into_iter().zip(after).collect());
        live.push(name);
        if n.is_multiple_of(3) && live.len() > 2 {
            // Sometimes the newest, which merges into the head while the writers write.
            let victim = live.remove((n / 3) % live.len());
            store.remove_snapshot(&victim).unwrap();
            purged += store.purge().unwrap().len();
            taken.remove(&victim);
        }
        if n.is_multiple_of(5) {
            store.checksums(&live[0]).unwrap();
        }
        // Short and long gaps: long ones give a snapshot many blocks, so its merge into
        // the head takes many steps with writes between them.
        let gap = if n.is_multiple_of(4) { 40 } else { 2 };
        std::thread::sleep(Duration::from_millis(gap));
    }
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<Vec<Logged>> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    let check = |store: &Store, what: &str| {
        let size = store.size();
        let mut head = vec![0u8; size as usize];
        store.read(0, &mut head).unwrap();
        let layers = store.layers();
        let names: Vec<&String> = layers
            .iter()
            .filter(|l| !l.is_head)
            .map(|l| &l.name)
            .collect();
        assert_eq!(names.len(), taken.len(), "{what}: snapshots {names:?}");
        for (w, log) in logs.iter().enumerate() {
            let base = w as u64 * REGION;
            let region = |img: &[u8]| img[base as usize..(base + REGION) as usize].to_vec();
            let mut image = vec![0u8; REGION as usize];
            for e in log {
                replay(&mut image, base, e);
            }
            assert!(region(&head) == image, "{what}: head region {w}");
            for (name, ranges) in &taken {
                let view = region(&view_from_chunks(store, &layers, name, size));
                let (lo, hi) = ranges[w];
                let hi = hi.min(log.len() as u64);
                let mut image = vec![0u8; REGION as usize];
                for e in &log[..lo as usize] {
                    replay(&mut image, base, e);
                }
                let mut ok = view == image;
                for e in &log[lo as usize..hi as usize] {
                    if ok {
                        break;
                    }
                    replay(&mut image, base, e);
                    ok = view == image;
                }
                assert!(
                    ok,
                    "{what}: snapshot {name}, region {w}: not the writes up to any point in {lo}..={hi}"
                );
            }
        }
    };
    check(&store, "live");
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    check(&store, "reopened");
    assert_no_leftovers(dir.path(), &store);
    eprintln!(
        "{} writes, {n} snapshots, {purged} purged",
        logs.iter().map(Vec::len).sum::<usize>()
    );
}
