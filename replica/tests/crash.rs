//! Crash test: a child process (this test binary again, running `crash_child`) works through
//! a scripted sequence of writes, flushes, snapshots, remove + purge, revert, expand and
//! checksum computations, and dies part way: aborted at a named failpoint (every failpoint,
//! with growing skip counts) or SIGKILLed at a random time. After each step it appends
//! `done <step>` to a log file and fsyncs it. The parent then reopens the replica and checks
//! it against the states the script allows at that point:
//!
//! - the replica opens, and holds no temp or orphan files;
//! - the layer tree and size are those after the last logged step or the one after it;
//! - every snapshot reads exactly as the volume read when it was taken;
//! - every sector of the head holds its content as of the last flush (or snapshot, or
//!   revert) or any write after it (unflushed writes may or may not be there);
//! - checksums match the layers' data (no stale cache), and a purge then finishes the job.
//!
//! Needs the `failpoints` feature:
//! `cargo test -p ironhorn-replica --features failpoints --test crash`.
//! `IRONHORN_CRASH_KILLS` sets the number of random-kill runs (default 24).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{assert_no_leftovers, sums_from_chunks, view_from_chunks};
use ironhorn_replica::{SECTOR_SIZE, Store};

mod common;

const CHILD_ENV: &str = "IRONHORN_CRASH_CHILD";
const INITIAL_SIZE: u64 = 256 << 10;
const MAX_SIZE: u64 = 1 << 20;
const SCRIPT_STEPS: usize = 70;
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
const FAILPOINTS: &[&str] = &[
    "meta::save::before",
    "meta::save::before_rename",
    "meta::save::after",
    "layer::write",
    "layer::sync",
    "snapshot::after_create_file",
    "purge::after_copy",
    "purge::after_commit",
    "revert::before_save",
    "expand::before_save",
];

// ---------------------------------------------------------------------------------------
// The script and its model.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Content of sector `sector` as written by write number `tag` (0: zeros).
fn sector_data(tag: u64, sector: u64) -> [u8; SECTOR_SIZE as usize] {
    let mut out = [0u8; SECTOR_SIZE as usize];
    if tag != 0 {
        let mut x = ((tag << 24) ^ sector).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for c in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Step {
    /// Sectors `[sector, sector + count)` get the content of write `tag` (0: write zeroes,
    /// or a discard when `discard`).
    Write {
        sector: u64,
        count: u64,
        tag: u64,
        discard: bool,
    },
    Flush,
    Snapshot(String),
    Remove(String),
    Purge,
    Revert(String),
    Expand(u64),
    Checksums,
}

#[derive(Debug, Clone)]
struct Snap {
    /// Write tag of each sector when the snapshot was taken.
    image: Vec<u64>,
    parent: Option<String>,
    removed: bool,
}

/// What the replica may hold after some prefix of the script.
#[derive(Debug, Clone)]
struct State {
    sectors: u64,
    /// Newest write tag of each head sector.
    latest: Vec<u64>,
    /// Tags each head sector may show after a crash: the one as of the last durable point,
    /// and every one written since.
    cands: Vec<BTreeSet<u64>>,
    head_parent: Option<String>,
    snaps: BTreeMap<String, Snap>,
}

impl State {
    fn new() -> State {
        let sectors = INITIAL_SIZE / SECTOR_SIZE;
        State {
            sectors,
            latest: vec![0; sectors as usize],
            cands: vec![BTreeSet::from([0]); sectors as usize],
            head_parent: None,
            snaps: BTreeMap::new(),
        }
    }

    fn durable(&mut self) {
        for (c, t) in self.cands.iter_mut().zip(&self.latest) {
            *c = BTreeSet::from([*t]);
        }
    }

    fn children(&self, name: &str) -> usize {
        self.snaps
            .values()
            .filter(|s| s.parent.as_deref() == Some(name))
            .count()
            + usize::from(self.head_parent.as_deref() == Some(name))
    }

    /// Purge as the store does it; returns the purged names.
    fn purge(&mut self) -> BTreeSet<String> {
        let mut purged = BTreeSet::new();
        loop {
            let next = self
                .snaps
                .iter()
                .filter(|(n, s)| s.removed && self.children(n) <= 1)
                .map(|(n, _)| n.clone())
                .next();
            let Some(name) = next else { break };
            let parent = self.snaps.remove(&name).unwrap().parent;
            if self.head_parent.as_deref() == Some(name.as_str()) {
                self.head_parent = parent;
            } else if let Some(c) = self
                .snaps
                .values_mut()
                .find(|s| s.parent.as_deref() == Some(name.as_str()))
            {
                c.parent = parent;
            }
            purged.insert(name);
        }
        purged
    }

    fn apply(&mut self, step: &Step) {
        match step {
            Step::Write {
                sector, count, tag, ..
            } => {
                for s in *sector..sector + count {
                    self.latest[s as usize] = *tag;
                    self.cands[s as usize].insert(*tag);
                }
            }
            Step::Flush => self.durable(),
            Step::Snapshot(name) => {
                self.durable();
                let snap = Snap {
                    image: self.latest.clone(),
                    parent: self.head_parent.clone(),
                    removed: false,
                };
                self.snaps.insert(name.clone(), snap);
                self.head_parent = Some(name.clone());
            }
            Step::Remove(name) => self.snaps.get_mut(name).unwrap().removed = true,
            Step::Purge => {
                self.purge();
            }
            Step::Revert(name) => {
                let mut image = self.snaps[name].image.clone();
                image.resize(self.sectors as usize, 0);
                self.latest = image;
                self.durable();
                self.head_parent = Some(name.clone());
            }
            Step::Expand(size) => {
                self.sectors = size / SECTOR_SIZE;
                self.latest.resize(self.sectors as usize, 0);
                self.cands
                    .resize(self.sectors as usize, BTreeSet::from([0]));
            }
            Step::Checksums => {}
        }
    }
}

/// The script for `seed`, and the states after each prefix: `states[i]` is the state after
/// `i` steps (`states[0]`: the freshly created replica).
fn script(seed: u64) -> (Vec<Step>, Vec<State>) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut st = State::new();
    let mut states = vec![st.clone()];
    let mut steps = Vec::new();
    let mut tag = 0;
    let mut snap_no = 0;
    while steps.len() < SCRIPT_STEPS {
        let live: Vec<String> = st
            .snaps
            .iter()
            .filter(|(_, s)| !s.removed)
            .map(|(n, _)| n.clone())
            .collect();
        // Removable: purged at once by the Purge that follows (at most one child).
        let removable: Vec<&String> = live.iter().filter(|n| st.children(n) <= 1).collect();
        let mut batch = Vec::new();
        match rng.below(20) {
            0..=7 => {
                let long = rng.below(3) == 0;
                let count = 1 + rng.below(if long { 40 } else { 9 });
                let count = count.min(st.sectors);
                let sector = rng.below(st.sectors - count + 1);
                let zero = rng.below(6) == 0;
                let t = if zero {
                    0
                } else {
                    tag += 1;
                    tag
                };
                batch.push(Step::Write {
                    sector,
                    count,
                    tag: t,
                    discard: zero && rng.below(2) == 0,
                });
            }
            8..=9 => batch.push(Step::Flush),
            10..=12 => {
                batch.push(Step::Snapshot(format!("c{snap_no}")));
                snap_no += 1;
            }
            13..=14 if !removable.is_empty() => {
                let name = removable[rng.below(removable.len() as u64) as usize].clone();
                batch.push(Step::Remove(name));
                batch.push(Step::Purge);
            }
            15..=16 if !live.is_empty() => {
                let name = live[rng.below(live.len() as u64) as usize].clone();
                batch.push(Step::Revert(name));
            }
            17 if st.sectors * SECTOR_SIZE < MAX_SIZE => {
                batch.push(Step::Expand(st.sectors * SECTOR_SIZE + (64 << 10)));
            }
            18 => batch.push(Step::Checksums),
            _ => {}
        }
        for step in batch {
            st.apply(&step);
            states.push(st.clone());
            steps.push(step);
        }
    }
    (steps, states)
}

fn run_step(store: &Store, step: &Step) {
    match step {
        Step::Write {
            sector,
            count,
            tag,
            discard,
        } => {
            let (off, len) = (sector * SECTOR_SIZE, count * SECTOR_SIZE);
            if *tag == 0 {
                if *discard {
                    store.discard(off, len).unwrap();
                } else {
                    store.write_zeroes(off, len).unwrap();
                }
            } else {
                let data: Vec<u8> = (*sector..sector + count)
                    .flat_map(|s| sector_data(*tag, s))
                    .collect();
                store.write(off, &data).unwrap();
            }
        }
        Step::Flush => store.flush().unwrap(),
        Step::Snapshot(name) => {
            store.snapshot(name, BTreeMap::new()).unwrap();
        }
        Step::Remove(name) => store.remove_snapshot(name).unwrap(),
        Step::Purge => {
            store.purge().unwrap();
        }
        Step::Revert(name) => store.revert(name).unwrap(),
        Step::Expand(size) => store.expand(*size).unwrap(),
        Step::Checksums => {
            for l in store.layers() {
                store.checksums(&l.name).unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The child.

/// Runs the script when started by a parent test; does nothing in a normal test run.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '\n');
    let (seed, dir, log) = (
        parts.next().unwrap().parse::<u64>().unwrap(),
        PathBuf::from(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    let (steps, _) = script(seed);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut note = |i: usize| {
        log.write_all(format!("done {i}\n").as_bytes()).unwrap();
        log.sync_data().unwrap();
    };
    let store = Store::open_or_create(&dir, Some(INITIAL_SIZE)).unwrap();
    note(0);
    for (i, step) in steps.iter().enumerate() {
        run_step(&store, step);
        note(i + 1);
    }
}

// ---------------------------------------------------------------------------------------
// The parent.

struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    log: PathBuf,
    seed: u64,
}

impl Run {
    fn new(seed: u64) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        Run {
            dir: tmp.path().join("replica"),
            log: tmp.path().join("log"),
            _tmp: tmp,
            seed,
        }
    }

    fn spawn(&self, failpoint: Option<(&str, u64)>) -> Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!(
                    "{}\n{}\n{}",
                    self.seed,
                    self.dir.display(),
                    self.log.display()
                ),
            )
            .env_remove("IRONHORN_FAILPOINT")
            .env_remove("IRONHORN_FAILPOINT_SKIP")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((name, skip)) = failpoint {
            cmd.env("IRONHORN_FAILPOINT", name)
                .env("IRONHORN_FAILPOINT_SKIP", skip.to_string());
        }
        cmd.spawn().unwrap()
    }

    /// Last step the child logged as done.
    fn last_done(&self) -> Option<usize> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("done ")?.parse().ok())
            .next_back()
    }

    /// Reopens the replica and checks it against the states allowed after the crash.
    fn check(&self, what: &str) {
        let (steps, states) = script(self.seed);
        let done = self.last_done();
        let k = done.unwrap_or(0);
        let allowed: Vec<usize> = (k..=(k + 1).min(steps.len())).collect();
        let store = Store::open_or_create(&self.dir, Some(INITIAL_SIZE))
            .unwrap_or_else(|e| panic!("{what}: reopen after the crash failed: {e}"));
        assert_no_leftovers(&self.dir, &store);
        let mut errors = Vec::new();
        let mut matched = None;
        for &i in &allowed {
            match matches_state(&store, &states[i]) {
                Ok(()) => {
                    matched = Some(i);
                    break;
                }
                Err(e) => errors.push(format!("state after {i} steps: {e}")),
            }
        }
        let Some(i) = matched else {
            let next = steps.get(k).map(|s| format!("{s:?}")).unwrap_or_default();
            panic!(
                "{what}: seed {}, last logged step {done:?}, next step {next}: the replica \
                 matches no allowed state:\n{}",
                self.seed,
                errors.join("\n")
            );
        };
        for l in store.layers() {
            let got = store.checksums(&l.name).unwrap();
            let want = sums_from_chunks(&store, &l.name, store.size());
            assert_eq!(
                *got, want,
                "{what}: checksums of {} after the crash",
                l.name
            );
        }
        // The replica carries on: a pending purge completes, new writes land.
        let mut st = states[i].clone();
        let want_purged = st.purge();
        let purged: BTreeSet<String> = store.purge().unwrap().into_iter().collect();
        assert_eq!(purged, want_purged, "{what}: purge after the crash");
        let data: Vec<u8> = (0..8).flat_map(|s| sector_data(u64::MAX, s)).collect();
        store.write(0, &data).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(&self.dir).unwrap();
        let mut buf = vec![0u8; data.len()];
        store.read(0, &mut buf).unwrap();
        assert!(buf == data, "{what}: write after recovery lost");
        for s in &mut st.cands[..8] {
            *s = BTreeSet::from([u64::MAX]);
        }
        st.latest[..8].fill(u64::MAX);
        matches_state(&store, &st).unwrap_or_else(|e| panic!("{what}: after recovery: {e}"));
        assert_no_leftovers(&self.dir, &store);
    }
}

fn matches_state(store: &Store, st: &State) -> Result<(), String> {
    let size = st.sectors * SECTOR_SIZE;
    if store.size() != size {
        return Err(format!("size {} != {size}", store.size()));
    }
    let layers = store.layers();
    let head = layers.iter().find(|l| l.is_head).ok_or("no head layer")?;
    if head.parent != st.head_parent {
        return Err(format!(
            "head parent {:?} != {:?}",
            head.parent, st.head_parent
        ));
    }
    let names: BTreeSet<&str> = layers
        .iter()
        .filter(|l| !l.is_head)
        .map(|l| l.name.as_str())
        .collect();
    let want: BTreeSet<&str> = st.snaps.keys().map(String::as_str).collect();
    if names != want {
        return Err(format!("snapshots {names:?} != {want:?}"));
    }
    for l in layers.iter().filter(|l| !l.is_head) {
        let s = &st.snaps[&l.name];
        if l.parent != s.parent || l.removed != s.removed {
            return Err(format!(
                "{}: parent {:?} removed {} != {:?} {}",
                l.name, l.parent, l.removed, s.parent, s.removed
            ));
        }
        let view = view_from_chunks(store, &layers, &l.name, size);
        for (i, got) in view.chunks(SECTOR_SIZE as usize).enumerate() {
            let tag = s.image.get(i).copied().unwrap_or(0);
            if got != sector_data(tag, i as u64) {
                return Err(format!(
                    "snapshot {}: sector {i} is not write {tag}",
                    l.name
                ));
            }
        }
    }
    let mut buf = vec![0u8; size as usize];
    store.read(0, &mut buf).map_err(|e| e.to_string())?;
    for (i, got) in buf.chunks(SECTOR_SIZE as usize).enumerate() {
        let cands = &st.cands[i];
        if !cands.iter().any(|t| got == sector_data(*t, i as u64)) {
            return Err(format!("head sector {i} is none of writes {cands:?}"));
        }
    }
    Ok(())
}

fn wait_timeout(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + CHILD_TIMEOUT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: child did not finish in {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills and reaps the child when a check panics.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const SEED: u64 = 7;

#[test]
fn script_covers_every_failpoint_kind() {
    let (steps, states) = script(SEED);
    let has = |f: fn(&Step) -> bool| steps.iter().any(f);
    assert!(has(|s| matches!(s, Step::Snapshot(_))));
    assert!(has(|s| matches!(s, Step::Revert(_))));
    assert!(has(|s| matches!(s, Step::Expand(_))));
    assert!(has(|s| matches!(s, Step::Checksums)));
    // A purge that merges into a child (not only deletions of leaves).
    let merges = steps.iter().enumerate().any(|(i, s)| {
        matches!(s, Step::Purge)
            && states[i]
                .snaps
                .iter()
                .any(|(n, sn)| sn.removed && states[i].children(n) == 1)
    });
    assert!(merges, "script {SEED} has no merging purge");
}

#[test]
fn crash_at_every_failpoint() {
    let t0 = Instant::now();
    let mut runs = 0;
    for fp in FAILPOINTS {
        let mut fired = 0;
        let mut skip = 0;
        loop {
            let run = Run::new(SEED);
            let what = format!("failpoint {fp} skip {skip}");
            let mut child = Reap(Some(run.spawn(Some((fp, skip)))));
            let status = wait_timeout(child.0.as_mut().unwrap(), &what);
            child.0 = None;
            runs += 1;
            let aborted = status.signal() == Some(libc::SIGABRT);
            assert!(
                aborted || status.success(),
                "{what}: child failed: {status}"
            );
            if !aborted {
                assert_eq!(run.last_done(), Some(script(SEED).0.len()), "{what}");
            }
            run.check(&what);
            if !aborted {
                break;
            }
            fired += 1;
            skip = if skip < 4 { skip + 1 } else { skip * 2 };
        }
        assert!(
            fired > 0,
            "failpoint {fp} never fired: the script does not reach it"
        );
        eprintln!("{fp}: crashed {fired} times");
    }
    eprintln!("{runs} failpoint runs in {:?}", t0.elapsed());
}

#[test]
fn crash_at_random_times() {
    let kills: u64 = std::env::var("IRONHORN_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let t0 = Instant::now();
    let mut rng = Rng(0x1234_5678);
    let mut early = 0;
    let mut reached = BTreeSet::new();
    for i in 0..kills {
        let seed = SEED + i;
        let run = Run::new(seed);
        // Wait until the child has logged a random step, then kill it a moment later.
        let target = rng.below(SCRIPT_STEPS as u64 + 1) as usize;
        let delay = Duration::from_micros(rng.below(3000));
        let what = format!("kill {i} (seed {seed}) {delay:?} after step {target}");
        let mut child = Reap(Some(run.spawn(None)));
        let c = child.0.as_mut().unwrap();
        let deadline = Instant::now() + CHILD_TIMEOUT;
        while run.last_done().is_none_or(|d| d < target)
            && c.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(delay);
        let _ = c.kill();
        let status = wait_timeout(c, &what);
        child.0 = None;
        if status.success() {
            early += 1;
        }
        reached.insert(run.last_done());
        run.check(&what);
    }
    eprintln!(
        "{kills} random kills in {:?}, {early} finished before the kill; last logged steps {reached:?}",
        t0.elapsed()
    );
}
