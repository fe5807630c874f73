//! I/O statistics of attached volumes: rates from the difference of two samples of the
//! engine's cumulative counters (`EngineInfo.io`), for `VolumeStatus.stats`.
//!
//! A new sample is taken at most every [`SAMPLE_PERIOD`] per volume, so the volume status is
//! written at most that often; an idle volume whose numbers do not change is not rewritten.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ironhorn_proto::engine::IoStats;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::resources::volume::VolumeStats;

/// Shortest interval between two samples of one volume.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(2);

/// Last sample of each attached volume.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Mutex<HashMap<String, (Instant, IoStats)>>,
}

impl Sampler {
    /// Takes the engine's counters `io` of `volume` seen at `now`. Returns new stats when a
    /// sample period has passed since the last sample (none on the first sample, nor when
    /// the counters went back, i.e. the engine restarted: that sample starts over).
    pub fn observe(&self, volume: &str, io: &IoStats, now: Instant) -> Option<VolumeStats> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some((at, prev)) = last.get(volume) else {
            last.insert(volume.to_owned(), (now, *io));
            return None;
        };
        let went_back = io.read_ops < prev.read_ops || io.write_ops < prev.write_ops;
        if went_back {
            last.insert(volume.to_owned(), (now, *io));
            return None;
        }
        let secs = now.saturating_duration_since(*at).as_secs_f64();
        if secs < SAMPLE_PERIOD.as_secs_f64() {
            return None;
        }
        let stats = rates(prev, io, secs);
        last.insert(volume.to_owned(), (now, *io));
        Some(stats)
    }

    /// Forgets a volume that is no longer attached.
    pub fn forget(&self, volume: &str) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
    }
}

/// Stats over `secs` seconds between the counters `a` and `b`.
fn rates(a: &IoStats, b: &IoStats, secs: f64) -> VolumeStats {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64;
    let per_op = |lat: f64, ops: f64| if ops > 0.0 { lat / ops } else { 0.0 };
    let (reads, writes) = (d(a.read_ops, b.read_ops), d(a.write_ops, b.write_ops));
    VolumeStats {
        read_iops: reads / secs,
        write_iops: writes / secs,
        read_bytes_per_second: d(a.read_bytes, b.read_bytes) / secs,
        write_bytes_per_second: d(a.write_bytes, b.write_bytes) / secs,
        read_latency_micros: per_op(d(a.read_latency_us, b.read_latency_us), reads),
        write_latency_micros: per_op(d(a.write_latency_us, b.write_latency_us), writes),
        read_ops_total: b.read_ops,
        write_ops_total: b.write_ops,
        read_bytes_total: b.read_bytes,
        write_bytes_total: b.write_bytes,
        sampled_at: Some(Time(jiff::Timestamp::now())),
    }
}

/// Whether `new` says something `old` does not (the sample time alone does not count).
pub fn changed(old: Option<&VolumeStats>, new: &VolumeStats) -> bool {
    match old {
        None => true,
        Some(o) => {
            let strip = |s: &VolumeStats| VolumeStats {
                sampled_at: None,
                ..s.clone()
            };
            strip(o) != strip(new)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(reads: u64, writes: u64) -> IoStats {
        IoStats {
            read_ops: reads,
            read_bytes: reads * 4096,
            read_latency_us: reads * 100,
            write_ops: writes,
            write_bytes: writes * 65536,
            write_latency_us: writes * 500,
            ..Default::default()
        }
    }

    #[test]
    fn rates_from_two_samples() {
        let s = Sampler::default();
        let t0 = Instant::now();
        assert_eq!(s.observe("v", &io(10, 10), t0), None);
        // Too soon: no sample, the first one stays the base.
        assert_eq!(
            s.observe("v", &io(20, 20), t0 + Duration::from_secs(1)),
            None
        );
        let st = s
            .observe("v", &io(410, 210), t0 + Duration::from_secs(4))
            .expect("a sample after the period");
        assert_eq!(st.read_iops, 100.0);
        assert_eq!(st.write_iops, 50.0);
        assert_eq!(st.read_bytes_per_second, 100.0 * 4096.0);
        assert_eq!(st.write_bytes_per_second, 50.0 * 65536.0);
        assert_eq!(st.read_latency_micros, 100.0);
        assert_eq!(st.write_latency_micros, 500.0);
        assert_eq!(
            (st.read_ops_total, st.write_bytes_total),
            (410, 210 * 65536)
        );
        // Idle: zero rates, and a second idle sample changes nothing worth writing.
        let idle = s
            .observe("v", &io(410, 210), t0 + Duration::from_secs(7))
            .expect("sample");
        assert_eq!((idle.write_iops, idle.write_latency_micros), (0.0, 0.0));
        assert!(changed(Some(&st), &idle));
        let idle2 = s
            .observe("v", &io(410, 210), t0 + Duration::from_secs(10))
            .expect("sample");
        assert!(!changed(Some(&idle), &idle2));
        // Engine restarted: counters went back, the sampling starts over.
        assert_eq!(
            s.observe("v", &io(1, 1), t0 + Duration::from_secs(13)),
            None
        );
        s.forget("v");
        assert_eq!(
            s.observe("v", &io(5, 5), t0 + Duration::from_secs(20)),
            None
        );
    }
}
