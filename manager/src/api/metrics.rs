//! `GET /metrics`: Prometheus text format, computed from resource status (the controllers
//! fill it from engine and agent reports). Needs the bearer token like `/v1`.
//!
//! | metric | labels | from |
//! | --- | --- | --- |
//! | `ironhorn_volume_size_bytes` | volume | spec.size |
//! | `ironhorn_volume_actual_size_bytes` | volume | status.actualSize |
//! | `ironhorn_volume_robustness` | volume | status.robustness: 0 unknown, 1 healthy, 2 degraded, 3 faulted |
//! | `ironhorn_volume_state` | volume, state | 1 for the current state |
//! | `ironhorn_volume_read_iops`, `…_write_iops` | volume | status.stats |
//! | `ironhorn_volume_read_throughput_bytes`, `…_write_throughput_bytes` | volume | status.stats (per second) |
//! | `ironhorn_volume_read_latency_seconds`, `…_write_latency_seconds` | volume | status.stats (mean) |
//! | `ironhorn_volume_read_ops_total`, `…_write_ops_total`, `…_read_bytes_total`, `…_write_bytes_total` | volume | status.stats (counters) |
//! | `ironhorn_volume_rebuild_progress_percent` | volume | status.rebuildProgress |
//! | `ironhorn_replica_rebuild_progress_percent` | volume, replica | Replica status.rebuildProgress |
//! | `ironhorn_disk_storage_maximum_bytes`, `…_available_bytes`, `…_scheduled_bytes`, `…_reserved_bytes` | node, disk | Node status/spec |
//! | `ironhorn_node_ready` | node | Ready condition |
//! | `ironhorn_backup_progress_percent` | backup, volume | Backup status.progress |

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use kube::ResourceExt;

use super::ApiState;
use super::error::ApiResult;
use crate::resources::{Backup, ConditionStatus, Node, Replica, Robustness, Volume, get_condition};

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn help(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Renders the metrics of these resources.
pub fn render(
    volumes: &[Volume],
    replicas: &[Replica],
    nodes: &[Node],
    backups: &[Backup],
) -> String {
    let mut o = Out(String::new());
    let vols: Vec<(String, &Volume)> = volumes.iter().map(|v| (v.name_any(), v)).collect();
    let gauge = |o: &mut Out, name: &str, help: &str, f: &dyn Fn(&Volume) -> Option<f64>| {
        o.help(name, "gauge", help);
        for (n, v) in &vols {
            if let Some(x) = f(v) {
                o.sample(name, &[("volume", n)], x);
            }
        }
    };
    gauge(&mut o, "ironhorn_volume_size_bytes", "Volume size.", &|v| {
        Some(v.spec.size as f64)
    });
    gauge(
        &mut o,
        "ironhorn_volume_actual_size_bytes",
        "Bytes allocated by the largest replica.",
        &|v| v.status.as_ref().map(|s| s.actual_size as f64),
    );
    gauge(
        &mut o,
        "ironhorn_volume_robustness",
        "0 unknown, 1 healthy, 2 degraded, 3 faulted.",
        &|v| {
            Some(
                match v.status.as_ref().map(|s| s.robustness).unwrap_or_default() {
                    Robustness::Unknown => 0.0,
                    Robustness::Healthy => 1.0,
                    Robustness::Degraded => 2.0,
                    Robustness::Faulted => 3.0,
                },
            )
        },
    );
    o.help(
        "ironhorn_volume_state",
        "gauge",
        "1 for the volume's current state.",
    );
    for (n, v) in &vols {
        let state = v.status.as_ref().map(|s| s.state).unwrap_or_default();
        let state = serde_json::to_value(state)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default();
        o.sample(
            "ironhorn_volume_state",
            &[("volume", n), ("state", &state)],
            1.0,
        );
    }
    let stat = |f: fn(&crate::resources::VolumeStats) -> f64| {
        move |v: &Volume| v.status.as_ref().and_then(|s| s.stats.as_ref()).map(f)
    };
    gauge(
        &mut o,
        "ironhorn_volume_read_iops",
        "Reads per second.",
        &stat(|s| s.read_iops),
    );
    gauge(
        &mut o,
        "ironhorn_volume_write_iops",
        "Writes per second.",
        &stat(|s| s.write_iops),
    );
    gauge(
        &mut o,
        "ironhorn_volume_read_throughput_bytes",
        "Bytes read per second.",
        &stat(|s| s.read_bytes_per_second),
    );
    gauge(
        &mut o,
        "ironhorn_volume_write_throughput_bytes",
        "Bytes written per second.",
        &stat(|s| s.write_bytes_per_second),
    );
    gauge(
        &mut o,
        "ironhorn_volume_read_latency_seconds",
        "Mean read latency.",
        &stat(|s| s.read_latency_micros / 1e6),
    );
    gauge(
        &mut o,
        "ironhorn_volume_write_latency_seconds",
        "Mean write latency.",
        &stat(|s| s.write_latency_micros / 1e6),
    );
    let counter =
        |o: &mut Out, name: &str, help: &str, f: fn(&crate::resources::VolumeStats) -> u64| {
            o.help(name, "counter", help);
            for (n, v) in &vols {
                if let Some(s) = v.status.as_ref().and_then(|s| s.stats.as_ref()) {
                    o.sample(name, &[("volume", n)], f(s) as f64);
                }
            }
        };
    counter(
        &mut o,
        "ironhorn_volume_read_ops_total",
        "Reads since the engine started.",
        |s| s.read_ops_total,
    );
    counter(
        &mut o,
        "ironhorn_volume_write_ops_total",
        "Writes since the engine started.",
        |s| s.write_ops_total,
    );
    counter(
        &mut o,
        "ironhorn_volume_read_bytes_total",
        "Bytes read since the engine started.",
        |s| s.read_bytes_total,
    );
    counter(
        &mut o,
        "ironhorn_volume_write_bytes_total",
        "Bytes written since the engine started.",
        |s| s.write_bytes_total,
    );
    gauge(
        &mut o,
        "ironhorn_volume_rebuild_progress_percent",
        "Progress of the running rebuild.",
        &|v| {
            v.status
                .as_ref()
                .and_then(|s| s.rebuild_progress)
                .map(f64::from)
        },
    );

    o.help(
        "ironhorn_replica_rebuild_progress_percent",
        "gauge",
        "Rebuild progress of a replica.",
    );
    for r in replicas {
        if let Some(p) = r.status.as_ref().and_then(|s| s.rebuild_progress) {
            let name = r.name_any();
            o.sample(
                "ironhorn_replica_rebuild_progress_percent",
                &[("volume", &r.spec.volume_name), ("replica", &name)],
                f64::from(p),
            );
        }
    }

    type DiskF =
        fn(&crate::resources::DiskSpec, Option<&crate::resources::DiskStatus>) -> Option<u64>;
    let disk_metrics: [(&str, &str, DiskF); 4] = [
        (
            "ironhorn_disk_storage_maximum_bytes",
            "Size of the disk's file system.",
            |_, s| s.map(|s| s.storage_maximum),
        ),
        (
            "ironhorn_disk_storage_available_bytes",
            "Free bytes on the disk.",
            |_, s| s.map(|s| s.storage_available),
        ),
        (
            "ironhorn_disk_storage_scheduled_bytes",
            "Bytes promised to replicas on the disk.",
            |_, s| s.map(|s| s.storage_scheduled),
        ),
        (
            "ironhorn_disk_storage_reserved_bytes",
            "Bytes reserved for other uses.",
            |d, _| Some(d.storage_reserved),
        ),
    ];
    for (name, help, f) in disk_metrics {
        o.help(name, "gauge", help);
        for n in nodes {
            let node = n.name_any();
            for (disk, spec) in &n.spec.disks {
                let status = n.status.as_ref().and_then(|s| s.disks.get(disk));
                if let Some(x) = f(spec, status) {
                    o.sample(name, &[("node", &node), ("disk", disk)], x as f64);
                }
            }
        }
    }
    o.help(
        "ironhorn_node_ready",
        "gauge",
        "1 when the node's agent reports.",
    );
    for n in nodes {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| get_condition(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == ConditionStatus::True);
        o.sample(
            "ironhorn_node_ready",
            &[("node", &n.name_any())],
            if ready { 1.0 } else { 0.0 },
        );
    }
    o.help(
        "ironhorn_backup_progress_percent",
        "gauge",
        "Upload progress of a backup.",
    );
    for b in backups {
        let p = b.status.as_ref().map(|s| s.progress).unwrap_or(0);
        o.sample(
            "ironhorn_backup_progress_percent",
            &[("backup", &b.name_any()), ("volume", &b.spec.volume)],
            f64::from(p),
        );
    }
    o.0
}

/// `GET /metrics`
pub async fn metrics(State(state): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let body = render(
        &state.store.list().await?,
        &state.store.list().await?,
        &state.store.list().await?,
        &state.store.list().await?,
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{
        BackupSpec, BackupStatus, DiskSpec, DiskStatus, NodeSpec, NodeStatus, VolumeSpec,
        VolumeStats, VolumeStatus,
    };

    #[test]
    fn renders_volume_disk_and_backup_metrics_from_status() {
        let mut v = Volume::new("v\"1", VolumeSpec::with_size(4096));
        v.status = Some(VolumeStatus {
            robustness: Robustness::Degraded,
            rebuild_progress: Some(42),
            stats: Some(VolumeStats {
                write_iops: 1500.0,
                write_latency_micros: 250.0,
                write_ops_total: 9,
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut n = Node::new(
            "n1",
            NodeSpec {
                allow_scheduling: true,
                tags: vec![],
                zone: String::new(),
                disks: [(
                    "d1".to_owned(),
                    DiskSpec {
                        path: "/d".into(),
                        allow_scheduling: true,
                        storage_reserved: 7,
                        tags: vec![],
                    },
                )]
                .into(),
                eviction_requested: false,
            },
        );
        n.status = Some(NodeStatus {
            disks: [(
                "d1".to_owned(),
                DiskStatus {
                    storage_maximum: 100,
                    storage_available: 60,
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        });
        let mut b = Backup::new(
            "b1",
            BackupSpec {
                volume: "v\"1".into(),
                snapshot: None,
                labels: Default::default(),
            },
        );
        b.status = Some(BackupStatus {
            progress: 30,
            ..Default::default()
        });
        let text = render(&[v], &[], &[n], &[b]);
        for line in [
            "ironhorn_volume_size_bytes{volume=\"v\\\"1\"} 4096",
            "ironhorn_volume_robustness{volume=\"v\\\"1\"} 2",
            "ironhorn_volume_write_iops{volume=\"v\\\"1\"} 1500",
            "ironhorn_volume_write_latency_seconds{volume=\"v\\\"1\"} 0.00025",
            "ironhorn_volume_write_ops_total{volume=\"v\\\"1\"} 9",
            "ironhorn_volume_rebuild_progress_percent{volume=\"v\\\"1\"} 42",
            "ironhorn_disk_storage_maximum_bytes{node=\"n1\",disk=\"d1\"} 100",
            "ironhorn_disk_storage_available_bytes{node=\"n1\",disk=\"d1\"} 60",
            "ironhorn_disk_storage_reserved_bytes{node=\"n1\",disk=\"d1\"} 7",
            "ironhorn_node_ready{node=\"n1\"} 0",
            "ironhorn_backup_progress_percent{backup=\"b1\",volume=\"v\\\"1\"} 30",
            "# TYPE ironhorn_volume_write_ops_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
