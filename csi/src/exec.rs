//! Running the system tools the node service needs (nbdfuse, losetup, blkid, mkfs, mount,
//! resize2fs, …) with a deadline, so a hung device cannot hold a volume's guard forever.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Deadline of quick commands (losetup, blkid, mount, umount).
pub const QUICK: Duration = Duration::from_secs(60);
/// Deadline of commands that touch the whole device (mkfs, resize2fs, xfs_growfs).
pub const LONG: Duration = Duration::from_secs(600);

/// A command that could not run, timed out or failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// It could not be started (not installed?).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// Its deadline.
        timeout: Duration,
    },
    /// It exited with a failure status.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// Its standard error (or output when stderr was empty), trimmed.
        stderr: String,
        /// Exit code, when it exited normally.
        code: Option<i32>,
    },
}

impl ExecError {
    /// Exit code of a command that ran and failed.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExecError::Failed { code, .. } => *code,
            _ => None,
        }
    }
}

/// The command line of `program args…`, for messages.
pub fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args…` (stdin from /dev/null, output captured) for at most `timeout`;
/// returns its output when it exits with status 0.
pub fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let output = run_unchecked(program, args, timeout)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failed(program, args, &output))
    }
}

/// Like [`run`] but returns the output whatever the exit status (for tools such as blkid
/// whose exit code carries an answer).
pub fn run_unchecked<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let command = describe(program, args);
    tracing::debug!(%command, "running");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ExecError::Spawn {
            command: command.clone(),
            source,
        })?;
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let result = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            // Reaped by the waiting thread; its output no longer matters.
            let _ = rx.recv_timeout(Duration::from_secs(10));
            return Err(ExecError::Timeout { command, timeout });
        }
    };
    result.map_err(|source| ExecError::Spawn { command, source })
}

/// The error of a command that exited with a failure status.
pub fn failed<S: AsRef<OsStr>>(program: &str, args: &[S], output: &Output) -> ExecError {
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    ExecError::Failed {
        command: describe(program, args),
        status: output.status.to_string(),
        stderr,
        code: output.status.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_failure_and_timeout() {
        let out = run("sh", &["-c", "echo hi"], QUICK).expect("echo runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
        let err = run("sh", &["-c", "echo oops >&2; exit 3"], QUICK).expect_err("exit 3");
        assert_eq!(err.code(), Some(3));
        assert!(err.to_string().contains("oops"), "{err}");
        let err = run("sleep", &["30"], Duration::from_millis(200)).expect_err("times out");
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        let err = run("/nonexistent/tool", &["x"], QUICK).expect_err("missing");
        assert!(matches!(err, ExecError::Spawn { .. }), "{err}");
    }
}
