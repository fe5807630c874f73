//! The manager's REST API through the real binary (`ironhorn manager` on free ports):
//! CRUD, a table of bad requests (each a 4xx with a clear message and nothing changed),
//! auth, the event stream, the OpenAPI document, metrics, and the CLI client.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironhorn_manager::client::{Client, CreateVolume};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A running `ironhorn manager`, killed on drop.
struct Manager {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start() -> Manager {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
        .args(["manager", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--token", TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ironhorn manager");
    let m = Manager {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/v1/openapi.json", m.url)).await
            && r.status().is_success()
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "manager did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn call(m: &Manager, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = http()
        .request(method, format!("{}{path}", m.url))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn allow_shared_nodes(m: &Manager) {
    let (s, _) = call(
        m,
        "PUT",
        "/v1/settings/replica-soft-anti-affinity",
        Some(r#"{"value":"true"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn volume_crud_and_actions() {
    let m = start().await;
    let c = Client::new(&m.url, TOKEN).expect("client");
    allow_shared_nodes(&m).await;
    let mut req = CreateVolume::named("vol-a", 1 << 30);
    req.number_of_replicas = Some(2);
    let v = c.create_volume(&req).await.expect("create");
    assert_eq!(v.spec.size, 1 << 30);
    assert_eq!(v.spec.number_of_replicas, 2);
    assert_eq!(c.list_volumes().await.expect("list").len(), 1);
    let v = c.expand_volume("vol-a", 2 << 30).await.expect("expand");
    assert_eq!(v.spec.size, 2 << 30);
    let s = c
        .create_snapshot(
            "vol-a",
            &ironhorn_manager::client::CreateSnapshot {
                name: Some("s1".into()),
                ..Default::default()
            },
        )
        .await
        .expect("snapshot");
    assert_eq!(s.spec.volume, "vol-a");
    assert_eq!(c.list_snapshots("vol-a").await.expect("snapshots").len(), 1);
    let v = c.revert_snapshot("vol-a", "s1").await.expect("revert");
    assert_eq!(v.spec.revert_to_snapshot.as_deref(), Some("s1"));
    let b = c
        .create_backup(
            "vol-a",
            &ironhorn_manager::client::CreateBackup {
                name: Some("b1".into()),
                ..Default::default()
            },
        )
        .await
        .expect("backup");
    assert_eq!(b.spec.volume, "vol-a");
    assert_eq!(
        c.list_backups(Some("vol-a")).await.expect("backups").len(),
        1
    );
    assert_eq!(
        c.list_backups(Some("other")).await.expect("backups").len(),
        0
    );
    let t = c
        .set_backup_target(&ironhorn_manager::client::SetBackupTarget {
            url: "file:///tmp/ih-backups".into(),
            ..Default::default()
        })
        .await
        .expect("target");
    assert_eq!(t.spec.url, "file:///tmp/ih-backups");
    assert_eq!(
        c.get_backup_target().await.expect("target").spec.url,
        "file:///tmp/ih-backups"
    );
    let s = c
        .set_setting("storage-over-provisioning-percentage", "200")
        .await
        .expect("set");
    assert_eq!(s.value, "200");
    assert_eq!(s.default, "100");
    let job = c
        .create_recurring_job(&ironhorn_manager::client::RecurringJobBody {
            name: Some("hourly".into()),
            task: ironhorn_manager::resources::RecurringTask::Snapshot,
            cron: "0 * * * *".into(),
            retain: 3,
            concurrency: None,
            volumes: vec!["vol-a".into()],
        })
        .await
        .expect("job");
    assert_eq!(job.spec.retain, 3);
    c.delete_recurring_job("hourly").await.expect("delete job");
    c.delete_volume("vol-a").await.expect("delete");
    // Gone, or marked for deletion while the controllers clean up.
    match c.get_volume("vol-a").await {
        Err(e) => assert!(e.is_not_found(), "{e}"),
        Ok(v) => assert!(v.metadata.deletion_timestamp.is_some()),
    }
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_message_and_change_nothing() {
    let m = start().await;
    let c = Client::new(&m.url, TOKEN).expect("client");
    // Hard anti-affinity (the default) and no nodes: 3 replicas cannot be placed.
    let (s, body) = call(
        &m,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"v","size":4096,"numberOfReplicas":3}"#),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("more than the 0 nodes"),
        "{body}"
    );
    allow_shared_nodes(&m).await;
    c.create_volume(&CreateVolume::named("keep", 8192))
        .await
        .expect("create");
    let cases: &[(&str, &str, Option<&str>, StatusCode, &str)] = &[
        (
            "POST",
            "/v1/volumes",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":4097}"#),
            StatusCode::BAD_REQUEST,
            "multiple of 4096",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":0}"#),
            StatusCode::BAD_REQUEST,
            "multiple of 4096",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"Bad Name","size":4096}"#),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":4096,"numberOfReplicas":0}"#),
            StatusCode::BAD_REQUEST,
            "numberOfReplicas",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":4096,"bogus":1}"#),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":"big"}"#),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":4096,"fromBackup":"nope"}"#),
            StatusCode::BAD_REQUEST,
            "not found",
        ),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"keep","size":4096}"#),
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            "GET",
            "/v1/volumes/missing",
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "DELETE",
            "/v1/volumes/missing",
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "POST",
            "/v1/volumes/keep/expand",
            Some(r#"{"size":4096}"#),
            StatusCode::BAD_REQUEST,
            "only grow",
        ),
        (
            "POST",
            "/v1/volumes/keep/expand",
            Some(r#"{"size":12289}"#),
            StatusCode::BAD_REQUEST,
            "multiple of 4096",
        ),
        (
            "POST",
            "/v1/volumes/keep/attach",
            Some(r#"{"node":"nowhere"}"#),
            StatusCode::BAD_REQUEST,
            "node \"nowhere\" not found",
        ),
        (
            "POST",
            "/v1/volumes/keep/snapshots/nope/revert",
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "DELETE",
            "/v1/volumes/keep/replicas/nope",
            None,
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            "PUT",
            "/v1/settings/no-such-setting",
            Some(r#"{"value":"1"}"#),
            StatusCode::NOT_FOUND,
            "unknown setting",
        ),
        (
            "PUT",
            "/v1/settings/storage-over-provisioning-percentage",
            Some(r#"{"value":"5"}"#),
            StatusCode::BAD_REQUEST,
            "100..=1000",
        ),
        (
            "PUT",
            "/v1/settings/replica-soft-anti-affinity",
            Some(r#"{"value":"maybe"}"#),
            StatusCode::BAD_REQUEST,
            "true or false",
        ),
        (
            "PUT",
            "/v1/backuptarget",
            Some(r#"{"url":"ftp://x"}"#),
            StatusCode::BAD_REQUEST,
            "s3://",
        ),
        (
            "POST",
            "/v1/recurringjobs",
            Some(r#"{"name":"j","task":"snapshot","cron":"61 * * * *","retain":1}"#),
            StatusCode::BAD_REQUEST,
            "minute",
        ),
        (
            "POST",
            "/v1/recurringjobs",
            Some(r#"{"name":"j","task":"snapshot","cron":"* * * * *","retain":0}"#),
            StatusCode::BAD_REQUEST,
            "retain",
        ),
        (
            "GET",
            "/v1/events?kind=Nope",
            None,
            StatusCode::BAD_REQUEST,
            "unknown resource kind",
        ),
        (
            "GET",
            "/v1/nope",
            None,
            StatusCode::NOT_FOUND,
            "no such route",
        ),
        (
            "PATCH",
            "/v1/nodes/nope",
            Some("{}"),
            StatusCode::NOT_FOUND,
            "not found",
        ),
    ];
    let before = c.list_volumes().await.expect("list");
    let settings_before = c.list_settings().await.expect("settings");
    for (method, path, body, want, needle) in cases {
        let (status, answer) = call(&m, method, path, *body).await;
        assert_eq!(status, *want, "{method} {path} {body:?} → {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            answer["error"].is_string(),
            "{method} {path}: no error code in {answer}"
        );
        assert!(
            message.contains(needle),
            "{method} {path}: message {message:?} lacks {needle:?}"
        );
    }
    // Controllers write status and finalizers meanwhile: compare what users own.
    let desired = |vols: &[ironhorn_manager::resources::Volume]| -> Vec<Value> {
        vols.iter()
            .map(|v| json!([v.metadata.name, v.metadata.generation, v.spec]))
            .collect()
    };
    let after = c.list_volumes().await.expect("list");
    assert_eq!(
        desired(&before),
        desired(&after),
        "bad requests changed the volumes"
    );
    let settings_after = c.list_settings().await.expect("settings");
    assert_eq!(
        serde_json::to_value(&settings_before).expect("json"),
        serde_json::to_value(&settings_after).expect("json")
    );
    // Missing content type.
    let r = http()
        .post(format!("{}/v1/volumes", m.url))
        .bearer_auth(TOKEN)
        .body(r#"{"name":"x","size":4096}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn every_call_needs_the_token() {
    let m = start().await;
    for path in [
        "/v1/volumes",
        "/v1/settings",
        "/metrics",
        "/v1/nodes",
        "/v1/events",
        "/v1/nope",
    ] {
        let r = http()
            .get(format!("{}{path}", m.url))
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} without a token"
        );
        let body: Value = r.json().await.expect("json");
        assert!(
            body["message"].as_str().unwrap_or("").contains("Bearer"),
            "{body}"
        );
        let r = http()
            .get(format!("{}{path}", m.url))
            .bearer_auth("wrong-token-0000000000")
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong token"
        );
    }
    let r = http()
        .post(format!("{}/v1/volumes", m.url))
        .json(&json!({"name": "x", "size": 4096}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = Client::new(&m.url, TOKEN).expect("client");
    assert!(
        c.list_volumes().await.expect("list").is_empty(),
        "an unauthenticated create went through"
    );
}

#[tokio::test]
async fn the_event_stream_reports_a_new_volume() {
    let m = start().await;
    allow_shared_nodes(&m).await;
    let addr = m.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/events?kind=Volume HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    );
    sock.write_all(request.as_bytes()).await.expect("write");
    // Wait for the response head so the watch is in place before the change.
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .expect("head in time")
            .expect("read");
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    let c = Client::new(&m.url, TOKEN).expect("client");
    c.create_volume(&CreateVolume::named("watched", 4096))
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(seen.contains("event: Added") && seen.contains("\"watched\"")) {
        assert!(
            Instant::now() < deadline,
            "no Added event for the volume: {seen}"
        );
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .expect("event in time")
            .expect("read");
        assert!(n > 0, "stream closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn openapi_document_is_served_and_describes_every_route() {
    let m = start().await;
    let doc: Value = reqwest::get(format!("{}/v1/openapi.json", m.url))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/v1/volumes",
        "/v1/volumes/{name}/attach",
        "/v1/nodes/{name}",
        "/v1/backups/{name}/restore",
        "/v1/settings/{name}",
        "/v1/recurringjobs/{name}",
        "/v1/events",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for s in ["Volume", "CreateVolume", "Node", "Backup", "ErrorBody"] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    // Every operation's documented path answers something other than "no such route".
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{name}", "nope")
            .replace("{snapshot}", "nope")
            .replace("{replica}", "nope");
        for method in ops.as_object().expect("ops").keys() {
            if concrete == "/v1/events" {
                continue;
            }
            let (status, body) = call(&m, &method.to_uppercase(), &concrete, Some("{}")).await;
            assert!(
                status.is_client_error() || status.is_success(),
                "{method} {path}: {status}"
            );
            assert_ne!(
                body["message"].as_str(),
                Some("no such route; see /v1/openapi.json"),
                "{method} {path} is not routed"
            );
        }
    }
}

#[tokio::test]
async fn metrics_show_volume_size_and_state() {
    let m = start().await;
    allow_shared_nodes(&m).await;
    let c = Client::new(&m.url, TOKEN).expect("client");
    c.create_volume(&CreateVolume::named("mvol", 1 << 20))
        .await
        .expect("create");
    let text = c.metrics().await.expect("metrics");
    assert!(
        text.contains("ironhorn_volume_size_bytes{volume=\"mvol\"} 1048576"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE ironhorn_volume_robustness gauge"),
        "{text}"
    );
    assert!(
        text.contains("ironhorn_volume_state{volume=\"mvol\""),
        "{text}"
    );
}

#[tokio::test]
async fn the_cli_creates_lists_and_sets() {
    let m = start().await;
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ironhorn"))
            .args(args)
            .env("IRONHORN_MANAGER", &m.url)
            .env("IRONHORN_TOKEN", TOKEN)
            .output()
            .expect("run ironhorn");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["setting", "set", "replica-soft-anti-affinity", "true"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("replica-soft-anti-affinity") && out.contains("true"),
        "{out}"
    );
    let (ok, out, err) = run(&[
        "volume",
        "create",
        "cli-vol",
        "--size",
        "10GiB",
        "--replicas",
        "2",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("NAME"), "{out}");
    let (ok, out, err) = run(&["volume", "ls", "--json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list[0]["metadata"]["name"], "cli-vol");
    assert_eq!(list[0]["spec"]["size"], 10u64 << 30);
    let (ok, out, err) = run(&["volume", "create", "bad", "--size", "4097"]);
    assert!(!ok, "{out}");
    assert!(err.contains("multiple of 4096"), "{err}");
    let (ok, out, _) = run(&["setting", "ls"]);
    assert!(ok);
    assert!(
        out.contains("storage-over-provisioning-percentage") && out.contains("100..=1000"),
        "{out}"
    );
    let (ok, _, err) = run(&["volume", "ls", "--token", "wrong-token-00000000"]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
}
