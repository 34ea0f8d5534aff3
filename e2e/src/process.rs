//! Child processes that always die, scratch directories, free ports and bounded waits.
//!
//! A [`Proc`] runs in its own process group (so a signal reaches its children too), writes
//! stdout and stderr to one log file, and on drop gets SIGTERM, then SIGKILL after a short
//! grace. Every live group is also listed in a process-wide registry, so a Ctrl-C handler can
//! stop them all with [`kill_all_process_groups`] even while the main thread is blocked.
//! On Linux each child additionally gets `PR_SET_PDEATHSIG = SIGKILL`: if the thread that
//! spawned it dies without running destructors (the test binary is SIGKILLed), the kernel kills
//! the child. So spawn from a thread that lives as long as the handle (the test's or main thread).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

static LIVE_PROCESS_GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn register_group(pgid: i32) {
    if let Ok(mut groups) = LIVE_PROCESS_GROUPS.lock() {
        groups.insert(pgid);
    }
}

fn unregister_group(pgid: i32) {
    if let Ok(mut groups) = LIVE_PROCESS_GROUPS.lock() {
        groups.remove(&pgid);
    }
}

/// SIGKILL every process group a live [`Proc`] started. For signal handlers (Ctrl-C) that are
/// about to exit the process without running destructors.
pub fn kill_all_process_groups() {
    let groups: Vec<i32> = match LIVE_PROCESS_GROUPS.lock() {
        Ok(groups) => groups.iter().copied().collect(),
        Err(poisoned) => poisoned.into_inner().iter().copied().collect(),
    };
    for pgid in groups {
        signal_group(pgid, libc::SIGKILL);
    }
}

#[allow(unsafe_code)] // kill(2)
fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; a negative pid addresses the
        // process group we created for this child (never our own group, never pid 1).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// A running child process in its own process group, logging to a file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl Proc {
    /// Spawn `command` with stdin closed and stdout+stderr appended to `log_path`.
    #[allow(unsafe_code)] // pre_exec + prctl(2)
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> Result<Proc> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating log file handle")?;
        // Output goes to a file: no colour codes, unless the caller asked for them.
        if !command.get_envs().any(|(key, _)| key == "NO_COLOR") {
            command.env("NO_COLOR", "1");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr))
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                #[cfg(target_os = "linux")]
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        let pgid = child.id() as i32;
        register_group(pgid);
        tracing::debug!(name, pid = pgid, log = %log_path.display(), "started process");
        Ok(Proc {
            name: name.to_string(),
            child,
            log_path: log_path.to_path_buf(),
            exit_status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far (lossy UTF-8).
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        if self.exit_status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit_status = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// An error naming the process, its exit status and its last log lines if it has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        bail!(
            "{} exited ({}); last log lines of {}:\n{}",
            self.name,
            self.exit_status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into()),
            self.log_path.display(),
            self.log_tail(30)
        )
    }

    /// SIGTERM the process group, wait up to [`STOP_GRACE`], then SIGKILL it. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pgid = self.child.id() as i32;
        if self.is_running() {
            signal_group(pgid, libc::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() {
                tracing::warn!(name = %self.name, pid = pgid, "did not stop on SIGTERM; sending SIGKILL");
                signal_group(pgid, libc::SIGKILL);
                if let Ok(status) = self.child.wait() {
                    self.exit_status = Some(status);
                }
            }
        }
        if LIVE_PROCESS_GROUPS
            .lock()
            .map(|g| g.contains(&pgid))
            .unwrap_or(false)
        {
            // The leader is gone; make sure nothing it forked lingers in its group.
            signal_group(pgid, libc::SIGKILL);
            unregister_group(pgid);
            tracing::debug!(name = %self.name, pid = pgid, status = ?self.exit_status, "stopped process");
        }
        self.exit_status
    }

    /// Kill the whole process group with SIGKILL at once (a crash, not a shutdown) and reap it.
    pub fn kill_now(&mut self) -> Option<ExitStatus> {
        let pgid = self.child.id() as i32;
        signal_group(pgid, libc::SIGKILL);
        if let Ok(status) = self.child.wait() {
            self.exit_status = Some(status);
        }
        unregister_group(pgid);
        self.exit_status
    }

    /// Print the log as it grows, each line prefixed, until the returned handle is dropped.
    pub fn follow_log(&self, prefix: &str) -> LogFollower {
        LogFollower::start(self.log_path.clone(), prefix.to_string())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prints new lines of a log file to stdout with a prefix, from a background thread.
pub struct LogFollower {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogFollower {
    fn start(path: PathBuf, prefix: String) -> LogFollower {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut pending = String::new();
            loop {
                let stopping = stop_flag.load(Ordering::Relaxed);
                if let Ok(mut file) = File::open(&path) {
                    if file.seek(SeekFrom::Start(offset)).is_ok() {
                        let mut bytes = Vec::new();
                        if let Ok(read) = file.read_to_end(&mut bytes) {
                            offset += read as u64;
                            pending.push_str(&String::from_utf8_lossy(&bytes));
                        }
                    }
                }
                let mut out = std::io::stdout().lock();
                while let Some(newline) = pending.find('\n') {
                    let line: String = pending.drain(..=newline).collect();
                    let _ = writeln!(out, "{prefix}{}", line.trim_end());
                }
                if stopping {
                    if !pending.is_empty() {
                        let _ = writeln!(out, "{prefix}{}", pending.trim_end());
                    }
                    break;
                }
                drop(out);
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        LogFollower {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A directory for one component's files: a temporary directory removed on drop (kept when
/// `FLEDGE_E2E_KEEP=1`, for post-mortems), or a given directory that is left in place.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl ScratchDir {
    /// A fresh temporary directory whose name starts with `prefix`.
    pub fn temp(prefix: &str) -> Result<ScratchDir> {
        let temp = tempfile::Builder::new()
            .prefix(&format!("fledge-{prefix}-"))
            .tempdir()
            .context("creating a temporary directory")?;
        if std::env::var("FLEDGE_E2E_KEEP").is_ok_and(|v| v == "1") {
            let path = temp.keep();
            tracing::info!(dir = %path.display(), "keeping scratch directory (FLEDGE_E2E_KEEP=1)");
            return Ok(ScratchDir { path, _temp: None });
        }
        Ok(ScratchDir {
            path: temp.path().to_path_buf(),
            _temp: Some(temp),
        })
    }

    /// Use (and create) `path`; it is not removed on drop.
    pub fn at(path: &Path) -> Result<ScratchDir> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir {
            path: path.to_path_buf(),
            _temp: None,
        })
    }

    /// `at(path)` if given, else `temp(prefix)`.
    pub fn at_or_temp(path: Option<&Path>, prefix: &str) -> Result<ScratchDir> {
        match path {
            Some(path) => ScratchDir::at(path),
            None => ScratchDir::temp(prefix),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it; there is a small
/// window in which someone else could take it).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Poll `probe` every 50 ms until it returns `Ok(Some(value))`, for at most `timeout`.
///
/// `Ok(None)` and `Err(_)` both mean "not yet"; the last error is included in the timeout
/// message. Use [`Abort`] for errors that should stop waiting at once.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let started = Instant::now();
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) if error.is::<Abort>() => return Err(error),
            Err(error) => last_error = Some(error),
        }
        if started.elapsed() >= timeout {
            return Err(match last_error {
                Some(error) => {
                    anyhow!("timed out after {timeout:?} waiting for {what}; last error: {error:#}")
                }
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An error that makes [`wait_until`] give up immediately (e.g. the process died).
#[derive(Debug)]
pub struct Abort(pub String);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Abort {}

/// Turn "the process exited" into an [`Abort`] for use inside a [`wait_until`] probe.
pub fn abort_if_exited(proc: &mut Proc) -> Result<()> {
    proc.ensure_running()
        .map_err(|e| anyhow::Error::new(Abort(format!("{e:#}"))))
}
