//! deploy/: the kustomize base renders with `kubectl kustomize`, every rendered object passes
//! `kubernetes-validate --strict`, the custom resources validate against the generated CRD
//! schemas (tests/deploy_validate.py), the external snapshot kinds against the schemas
//! vendored in tests/deploy_schemas/, and every ironhorn command line in the manifests is
//! one the real binary accepts.
//!
//! Needs kubectl (preinstalled on the CI machine), and kubernetes-validate, jsonschema and
//! PyYAML from PyPI (installed by .ci/run). A missing tool fails the test: it is never
//! skipped silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {shown}: {e} (is it installed? .ci/run installs it)"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl kustomize deploy/`.
fn render() -> String {
    let out = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy")));
    assert!(
        out.status.success(),
        "kubectl kustomize failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

/// The rendered documents, split on `---` lines.
fn documents(rendered: &str) -> Vec<String> {
    rendered
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n").to_string())
        .filter(|d| !d.trim().is_empty())
        .collect()
}

fn field<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    doc.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
        .map(str::trim)
}

/// Runs kubernetes-validate --strict on `path`; returns (success, output).
fn kubernetes_validate(path: &Path) -> (bool, String) {
    let out = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(path));
    (out.status.success(), text(&out))
}

/// Runs tests/deploy_validate.py with deploy/crds.yaml on `manifests`.
fn schema_validate(manifests: &[&Path]) -> (bool, String) {
    let out = run(Command::new("python3")
        .arg(repo().join("tests/deploy_validate.py"))
        .arg(repo().join("deploy/crds.yaml"))
        .args(manifests));
    (out.status.success(), text(&out))
}

#[test]
fn base_renders_with_every_part() {
    let rendered = render();
    let docs = documents(&rendered);
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                field(d, "kind").unwrap_or(""),
                field(d, "  name").unwrap_or(""),
            )
        })
        .collect();
    let count = |kind: &str| kinds.iter().filter(|(k, _)| *k == kind).count();
    assert_eq!(count("Namespace"), 1, "{kinds:?}");
    assert_eq!(
        count("CustomResourceDefinition"),
        9,
        "one CRD per resource kind: {kinds:?}"
    );
    assert_eq!(
        count("Deployment"),
        2,
        "manager + CSI controller: {kinds:?}"
    );
    assert_eq!(count("DaemonSet"), 1, "{kinds:?}");
    assert_eq!(count("CSIDriver"), 1, "{kinds:?}");
    assert_eq!(count("StorageClass"), 1, "{kinds:?}");
    assert_eq!(count("VolumeSnapshotClass"), 1, "{kinds:?}");
    assert_eq!(count("Service"), 1, "{kinds:?}");
    assert_eq!(count("ServiceAccount"), 3, "{kinds:?}");
    assert!(count("ClusterRole") >= 2 && count("Role") >= 2, "{kinds:?}");
    // Every namespaced object of ours lands in ironhorn-system.
    for d in &docs {
        if let Some(ns) = field(d, "  namespace") {
            assert_eq!(ns, "ironhorn-system", "{d}");
        }
    }
    // Sidecar images are pinned to a version tag.
    for line in rendered.lines().filter(|l| l.contains("image:")) {
        let image = line
            .trim()
            .trim_start_matches("- ")
            .trim_start_matches("image:")
            .trim();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "image not pinned: {image}"
        );
    }
}

#[test]
fn every_rendered_object_passes_strict_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rendered.yaml");
    let rendered = render();
    std::fs::write(&path, &rendered).expect("write rendered manifests");
    let (ok, out) = kubernetes_validate(&path);
    assert!(ok, "kubernetes-validate --strict failed:\n{out}");
    let docs = documents(&rendered);
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    // kubernetes-validate knows every kind but the external snapshot CRD's, which
    // deploy_validate.py checks against the vendored schema below.
    let external = docs
        .iter()
        .filter(|d| {
            field(d, "apiVersion").is_some_and(|v| v.starts_with("snapshot.storage.k8s.io/"))
        })
        .count();
    assert_eq!(external, 1, "the VolumeSnapshotClass");
    assert_eq!(
        passed,
        docs.len() - external,
        "every other object must be validated, not skipped:\n{out}"
    );
    println!(
        "kubernetes-validate --strict: {passed} objects passed; {external} snapshot.storage.k8s.io object(s) have no schema there and are checked by tests/deploy_validate.py against tests/deploy_schemas/"
    );
    let (ok, out) = schema_validate(&[&path]);
    assert!(ok, "schema validation failed:\n{out}");
    assert!(
        out.contains("VolumeSnapshotClass ironhorn-snapshot against its schema"),
        "{out}"
    );
    assert_eq!(out.matches("structural schema").count(), 9, "{out}");
}

#[test]
fn examples_validate() {
    let examples = repo().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("deploy/examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let body = std::fs::read_to_string(f).expect("read example");
        // Objects kubernetes-validate cannot know are checked by deploy_validate.py.
        let core_only: Vec<String> = documents(&format!("\n{body}"))
            .into_iter()
            .filter(|d| {
                field(d, "apiVersion").is_some_and(|v| {
                    !v.starts_with("ironhorn.io/") && !v.starts_with("snapshot.storage.k8s.io/")
                })
            })
            .collect();
        if !core_only.is_empty() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("core.yaml");
            std::fs::write(&path, core_only.join("\n---\n")).expect("write");
            let (ok, out) = kubernetes_validate(&path);
            assert!(
                ok,
                "{}: kubernetes-validate --strict failed:\n{out}",
                f.display()
            );
        }
    }
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, out) = schema_validate(&paths);
    assert!(ok, "{out}");
    assert!(
        out.contains("BackupTarget default against its schema"),
        "{out}"
    );
    assert!(out.contains("Volume scratch against its schema"), "{out}");
    assert!(
        out.contains("VolumeSnapshot ironhorn-demo-snap against its schema"),
        "{out}"
    );
}

/// The validators reject what a cluster would reject: the checks above can fail.
#[test]
fn validators_reject_bad_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_deployment = dir.path().join("bad-deployment.yaml");
    std::fs::write(
        &bad_deployment,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: 1\n  replica: 2\n  selector:\n    matchLabels: {a: b}\n  template:\n    metadata:\n      labels: {a: b}\n    spec:\n      containers:\n      - name: c\n        image: i:1\n",
    )
    .expect("write");
    let (ok, out) = kubernetes_validate(&bad_deployment);
    assert!(
        !ok,
        "an unknown field must fail --strict validation:\n{out}"
    );

    let bad_custom = dir.path().join("bad-custom.yaml");
    std::fs::write(
        &bad_custom,
        "apiVersion: ironhorn.io/v1beta1\nkind: Volume\nmetadata:\n  name: v\nspec:\n  size: 4096\n  numberOfReplica: 3\n---\napiVersion: ironhorn.io/v1beta1\nkind: Volume\nmetadata:\n  name: w\nspec:\n  size: \"big\"\n---\napiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata:\n  name: s\ndriver: d\ndeletionPolicy: Sometimes\n---\napiVersion: ironhorn.io/v1\nkind: Volume\nmetadata:\n  name: x\nspec: {}\n",
    )
    .expect("write");
    let (ok, out) = schema_validate(&[&bad_custom]);
    assert!(!ok, "{out}");
    // A CRD whose schema the API server would refuse (a field without a type).
    let bad_crd = dir.path().join("bad-crd.yaml");
    std::fs::write(
        &bad_crd,
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: things.ironhorn.io\nspec:\n  group: ironhorn.io\n  names: {kind: Thing, plural: things}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            properties:\n              size: {type: integer}\n",
    )
    .expect("write");
    let crd_out = run(Command::new("python3")
        .arg(repo().join("tests/deploy_validate.py"))
        .arg(&bad_crd)
        .arg(&bad_crd));
    assert!(!crd_out.status.success());
    assert!(
        text(&crd_out).contains("Thing.spec: no type"),
        "{}",
        text(&crd_out)
    );
    for name in [
        "Volume v:",
        "Volume w:",
        "VolumeSnapshotClass s:",
        "Volume x: no CRD serves",
    ] {
        assert!(
            out.contains(&format!("FAIL {}: {name}", bad_custom.display())),
            "{name} must fail:\n{out}"
        );
    }
}

/// Every ironhorn command line in the manifests parses with the real binary: each flag
/// exists and each value is one it accepts (clap checks them before it prints the help).
#[test]
fn manifest_command_lines_match_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, render()).expect("write rendered manifests");
    let out = run(Command::new("python3")
        .arg(repo().join("tests/deploy_validate.py"))
        .arg("--ironhorn-args")
        .arg(&path));
    assert!(out.status.success(), "{}", text(&out));
    let mut checked = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (container, args) = line.split_once('\t').expect("container TAB json");
        let args: Vec<String> = serde_json::from_str(args).expect("a JSON list of args");
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("$(NODE_NAME)", "node-a")
                    .replace("$(POD_IP)", "10.0.0.1")
                    .replace("$(POD_NAME)", "pod-a")
                    .replace("$(POD_NAMESPACE)", "ironhorn-system")
            })
            .collect();
        assert!(
            !args.iter().any(|a| a.contains("$(")),
            "{container}: unknown variable in {args:?}"
        );
        let out = run(Command::new(env!("CARGO_BIN_EXE_ironhorn"))
            .args(&args)
            .arg("--help"));
        assert!(
            out.status.success(),
            "{container}: `ironhorn {}` is not accepted by the binary:\n{}",
            args.join(" "),
            text(&out)
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "manager, agent, csi node, csi controller");
}

/// The CSIDriver, StorageClass and VolumeSnapshotClass name the driver the CSI plugin
/// reports, and their parameters are ones its controller accepts.
#[test]
fn driver_objects_match_the_csi_driver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, render()).expect("write rendered manifests");
    let out = run(Command::new("python3")
        .arg(repo().join("tests/deploy_validate.py"))
        .arg("--driver-objects")
        .arg(&path));
    assert!(out.status.success(), "{}", text(&out));
    let objects: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let driver = ironhorn_csi::identity::DRIVER_NAME;
    assert_eq!(objects["csidrivers"], serde_json::json!([driver]));
    let params = |v: &serde_json::Value| -> std::collections::HashMap<String, String> {
        serde_json::from_value(v["parameters"].clone()).expect("string parameters")
    };
    let classes = objects["storageclasses"].as_array().expect("list");
    assert_eq!(classes.len(), 1);
    for class in classes {
        assert_eq!(class["driver"], driver);
        let parsed = ironhorn_csi::controller::params::volume_params(&params(class));
        assert!(
            parsed.is_ok(),
            "StorageClass parameters refused: {parsed:?}"
        );
    }
    let snapshot_classes = objects["snapshotclasses"].as_array().expect("list");
    assert_eq!(snapshot_classes.len(), 1);
    for class in snapshot_classes {
        assert_eq!(class["driver"], driver);
        let kind = ironhorn_csi::controller::params::snapshot_kind(&params(class));
        assert!(
            kind.is_ok(),
            "VolumeSnapshotClass parameters refused: {kind:?}"
        );
    }
}
