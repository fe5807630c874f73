//! Filesystems on a volume's device: probe (blkid), create (mkfs), grow (resize2fs,
//! xfs_growfs).

use std::path::Path;

use crate::exec::{self, ExecError};

/// What `blkid` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing: the device is blank (as far as blkid can tell).
    Blank,
    /// A filesystem (or other signature) of this type.
    Found(String),
}

/// Probes `device` with `blkid -p` (low level, no cache).
pub fn probe(device: &Path) -> Result<Probe, ExecError> {
    let args = [
        "-p".as_ref(),
        "-o".as_ref(),
        "export".as_ref(),
        device.as_os_str(),
    ];
    let out = exec::run_unchecked("blkid", &args, exec::QUICK)?;
    match out.status.code() {
        // Exit code 2: no signature found.
        Some(2) => Ok(Probe::Blank),
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let ty = text
                .lines()
                .find_map(|l| l.strip_prefix("TYPE="))
                .or_else(|| text.lines().find_map(|l| l.strip_prefix("PTTYPE=")))
                .unwrap_or("unknown");
            Ok(Probe::Found(ty.to_owned()))
        }
        _ => Err(exec::failed("blkid", &args, &out)),
    }
}

/// Creates a `fs_type` filesystem on `device` with extra mkfs options `params`.
pub fn make(device: &Path, fs_type: &str, params: &[String]) -> Result<(), ExecError> {
    let program = format!("mkfs.{fs_type}");
    let mut args: Vec<String> = Vec::new();
    if fs_type.starts_with("ext") {
        args.push("-q".into());
    }
    args.extend(params.iter().cloned());
    args.push(device.to_string_lossy().into_owned());
    exec::run(&program, &args, exec::LONG)?;
    Ok(())
}

/// Grows the filesystem of type `fs_type` on `device`, mounted at `mount_point`, to fill
/// the device.
pub fn grow(device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), ExecError> {
    match fs_type {
        "xfs" => exec::run("xfs_growfs", &[mount_point.as_os_str()], exec::LONG)?,
        _ => exec::run("resize2fs", &[device.as_os_str()], exec::LONG)?,
    };
    Ok(())
}

/// Grows an unmounted ext2/3/4 filesystem on `device` to fill it, when it is smaller:
/// `e2fsck -f -p` (resize2fs insists on a checked filesystem), then `resize2fs`.
pub fn grow_offline(device: &Path) -> Result<(), ExecError> {
    let info = exec::run(
        "dumpe2fs",
        &["-h".as_ref(), device.as_os_str()],
        exec::QUICK,
    )?;
    let text = String::from_utf8_lossy(&info.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(blocks), Some(block_size)) = (field("Block count:"), field("Block size:")) else {
        return Ok(());
    };
    let device_bytes = crate::device::device_size(device).unwrap_or(0);
    if blocks * block_size + block_size > device_bytes {
        return Ok(());
    }
    tracing::info!(device = %device.display(), fs_bytes = blocks * block_size, device_bytes, "growing the filesystem to the device");
    // e2fsck exits 1 when it fixed something, which is fine here.
    match exec::run(
        "e2fsck",
        &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
        exec::LONG,
    ) {
        Err(e) if e.code() != Some(1) => return Err(e),
        _ => {}
    }
    exec::run("resize2fs", &[device.as_os_str()], exec::LONG)?;
    Ok(())
}

/// Splits StorageClass `mkfsParams` into arguments (whitespace separated, no quoting).
pub fn split_params(params: &str) -> Vec<String> {
    params.split_whitespace().map(str::to_owned).collect()
}
