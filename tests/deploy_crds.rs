//! deploy/crds.yaml is exactly what `ironhorn crd` prints (regenerate with
//! `cargo run -- crd > deploy/crds.yaml`), and that YAML reads back (PyYAML) as the same
//! objects as `ironhorn crd --output json`.

use std::path::PathBuf;
use std::process::Command;

fn crd_output(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
        .arg("crd")
        .args(args)
        .output()
        .expect("run ironhorn crd");
    assert!(
        out.status.success(),
        "ironhorn crd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn deploy_crds_match_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/crds.yaml");
    let checked_in = std::fs::read_to_string(&path).expect("read deploy/crds.yaml");
    let generated = crd_output(&[]);
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "deploy/crds.yaml differs from `ironhorn crd` from line {}: run `cargo run -- crd > deploy/crds.yaml`\n  checked in: {:?}\n  generated:  {:?}",
            line + 1,
            checked_in.lines().nth(line),
            generated.lines().nth(line)
        );
    }
    for kind in [
        "Volume",
        "Engine",
        "Replica",
        "Node",
        "Snapshot",
        "Backup",
        "BackupTarget",
        "RecurringJob",
        "Setting",
    ] {
        assert!(
            generated.contains(&format!("    kind: {kind}\n")),
            "{kind} missing"
        );
    }
}

#[test]
fn yaml_reads_back_as_the_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = dir.path().join("crds.yaml");
    let json = dir.path().join("crds.json");
    std::fs::write(&yaml, crd_output(&[])).expect("write");
    std::fs::write(&json, crd_output(&["--output", "json"])).expect("write");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             want = json.load(open(sys.argv[2]))\n\
             assert len(docs) == 9, len(docs)\n\
             assert docs == want, 'YAML and JSON differ'\n\
             print('same', len(docs))",
        )
        .arg(&yaml)
        .arg(&json)
        .output()
        .expect("run python3 (PyYAML)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
