//! schemathesis (PyPI, installed by .ci/run) fuzzes the manager's API from its OpenAPI
//! document: thousands of generated requests, valid and invalid, and not one may get a 5xx.
//! Bounded to 60 s of fuzzing; `/v1/events` (an endless stream) is left out.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "schemathesis-token-0123456789";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn schemathesis_finds_no_server_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut manager = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
        .args(["manager", "--data-dir"])
        .arg(dir.path().join("manager"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--token", TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ironhorn manager");
    let url = format!("http://127.0.0.1:{port}/v1/openapi.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "manager did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new("schemathesis")
        .current_dir(dir.path())
        .args(["run", &url, "--checks", "not_a_server_error"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--exclude-path", "/v1/events"])
        .args([
            "--max-examples",
            "20",
            "--max-time",
            "60",
            "--request-timeout",
            "10",
        ])
        .args(["--seed", "1", "--wait-for-schema", "30"])
        .output();
    let _ = manager.kill();
    let _ = manager.wait();
    let out = out.expect(
        "run schemathesis (pip install --break-system-packages schemathesis; .ci/run does)",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("passed"),
        "schemathesis ran no cases:\n{stdout}"
    );
}
