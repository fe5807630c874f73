//! The kernel data paths in a guest kernel: boots a stock Debian kernel (nbd.ko, ublk_drv.ko)
//! under qemu (tests/vm/run.sh) and runs the guest scripts of tests/vm/guest/ against this
//! build's `ironhorn` binary: kernel NBD attach, ext4, engine SIGKILL and restart under the
//! mounted file system, fsck, detach, fio verify; the same through the ublk frontend.
//!
//! Needs qemu-system-x86 and the unpacked kernel that tests/vm/setup.sh installs (.ci/run
//! runs it); without them the test fails and says so.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest scripts run, in order, in one boot.
const SCRIPTS: &[&str] = &["nbd", "ublk"];

/// Every check the scripts must report as passed: a script that stops early cannot pass.
const EXPECTED: &[&str] = &[
    "nbd-attach-idempotent",
    "nbd-discard-write-zeroes",
    "nbd-engine-restart-under-mount",
    "nbd-fsck-clean",
    "nbd-detach",
    "nbd-fio-verify",
    "ublk-discard-write-zeroes",
    "ublk-engine-restart-under-mount",
    "ublk-fsck-clean",
    "ublk-clean-removal",
    "ublk-fio-verify",
];

/// The whole guest run (boot, every script) must end within this; run.sh kills qemu earlier.
const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn guest_kernel_data_paths() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/run.sh");
    let started = Instant::now();
    let mut child = Command::new(script)
        .args(SCRIPTS)
        .env("IRONHORN_BIN", env!("CARGO_BIN_EXE_ironhorn"))
        .env("VM_TIMEOUT", (LIMIT.as_secs() - 60).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tests/vm/run.sh");
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let errs = std::thread::spawn(move || {
        let _ = se.read_to_string(&mut err);
        err
    });
    let _ = so.read_to_string(&mut out);
    let err = errs.join().expect("stderr reader");
    let status = child.wait().expect("wait for run.sh");
    println!("{out}");
    eprintln!("{err}");
    println!("guest run took {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        status.success(),
        "guest run failed ({status}); see the console log above. If qemu or the kernel is \
         missing, run tests/vm/setup.sh (.ci/run does)"
    );
    for name in EXPECTED {
        assert!(
            out.lines().any(|l| l.trim() == format!("@@PASS {name}")),
            "guest check {name} did not report a pass"
        );
    }
    assert!(started.elapsed() < LIMIT, "guest run exceeded {LIMIT:?}");
}
