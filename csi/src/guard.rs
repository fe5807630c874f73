//! Per-volume guards: one operation at a time on a volume; a second one fails with ABORTED
//! (the CO retries it) instead of racing the first.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::CsiError;

/// Volumes with an operation under way.
#[derive(Debug, Default)]
pub struct VolumeLocks(Mutex<HashSet<String>>);

/// Held while an operation on one volume runs.
pub struct VolumeGuard<'a> {
    locks: &'a VolumeLocks,
    volume: String,
}

impl VolumeLocks {
    /// Takes the guard of `volume`, or fails with ABORTED while another operation holds it.
    pub fn lock(&self, volume: &str) -> Result<VolumeGuard<'_>, CsiError> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !set.insert(volume.to_owned()) {
            return Err(CsiError::Aborted(format!(
                "an operation on volume {volume} is already in progress"
            )));
        }
        Ok(VolumeGuard {
            locks: self,
            volume: volume.to_owned(),
        })
    }
}

impl Drop for VolumeGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_per_volume() {
        let locks = VolumeLocks::default();
        let a = locks.lock("a").expect("free");
        assert!(matches!(locks.lock("a"), Err(CsiError::Aborted(_))));
        let _b = locks.lock("b").expect("another volume");
        drop(a);
        locks.lock("a").expect("released");
    }
}
