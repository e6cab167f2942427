//! Child processes, temp dirs, ports and log files for the private servers.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tokio::time::Instant;

/// A free TCP port on 127.0.0.1.
///
/// Ports are picked at random *below* the kernel's ephemeral range (and
/// checked by binding 127.0.0.1:port), because outgoing connections take their
/// local port from the ephemeral range: a server that is stopped and restarted
/// on the same port could otherwise find it taken by some client socket in
/// the meantime. A port is never handed out twice by one process. Falls back
/// to binding port 0 if no port is found that way.
pub fn free_port() -> u16 {
    static ISSUED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    let issued = issued.get_or_insert_with(HashSet::new);
    let (low, high) = (15_000u16, ephemeral_range_start());
    // No room below the ephemeral range: go straight to the fallback.
    let attempts = if high > low + 1_000 { 500 } else { 0 };
    for _ in 0..attempts {
        let port = fastrand::u16(low..high);
        if issued.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            issued.insert(port);
            return port;
        }
    }
    loop {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if issued.insert(port) {
            return port;
        }
    }
}

fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Does something accept TCP connections on 127.0.0.1:`port`?
pub(crate) async fn tcp_accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Whether this process runs as root (servers then need `user root` to write our temp dirs).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sends SIGTERM to a process (one we started).
pub fn sigterm(pid: u32) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) with the pid of a child we spawned and have not reaped yet.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error()).context("kill(SIGTERM)");
    }
    Ok(())
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), while the process runs.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The process's resident set size now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// The process's peak resident set size so far (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// The processes whose command name (`/proc/<pid>/comm`) is one of `names`: a server the kit did
/// not start, such as the machine's own MariaDB, found for its CPU share.
pub fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| names.contains(&c.trim_end()))
        })
        .collect()
}

/// CPU time (user + system) the process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

const TMP_PREFIX: &str = "mi-test-";

/// A fresh private temp dir named `mi-test-<pid>-<kind>-XXXXXX`, under
/// `$MI_TEST_TMPDIR`, else `/dev/shm` (tmpfs: fsync is free, which makes
/// MariaDB bootstrap ~8x faster), else the system temp dir. Leftovers of test
/// processes that no longer exist are removed (once per process).
pub(crate) fn make_tmpdir(kind: &str) -> anyhow::Result<TempDir> {
    let base = tmp_base();
    sweep_stale(base);
    let prefix = format!("{TMP_PREFIX}{}-{kind}-", std::process::id());
    let mut dir = TempDir::with_prefix_in(&prefix, base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))?;
    if std::env::var_os("MI_TEST_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0") {
        dir.disable_cleanup(true);
        eprintln!("[test harness] keeping {}", dir.path().display());
    }
    Ok(dir)
}

fn tmp_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("MI_TEST_TMPDIR").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && TempDir::with_prefix_in("mi-probe-", shm).is_ok() {
            return shm.to_path_buf();
        }
        std::env::temp_dir()
    })
}

/// Removes `mi-test-<pid>-*` dirs whose process is gone (killed test runs).
fn sweep_stale(base: &Path) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// The last `max_lines` lines of a (possibly large) text file, or a note
/// saying why it could not be read.
pub(crate) fn file_tail(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(max_lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Opens `path` for appending (stdout/stderr of a child).
pub(crate) fn append_file(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the child gets SIGKILL if this test process dies
/// without running destructors (nextest timeout, abort, ...).
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// so every child is forked from one helper thread that lives as long as the
/// process (tokio worker threads may come and go).
pub(crate) fn spawn(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_death_signal(&mut cmd));
                }
            })
            .expect("starting the child spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("child spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("child spawner thread is gone"))?
}

fn spawn_with_death_signal(cmd: &mut Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec; it only makes
    // async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A running child process; SIGKILLed and reaped on drop.
pub(crate) struct Proc {
    child: Child,
    exit: Option<ExitStatus>,
    label: String,
}

impl Proc {
    /// Spawns `program args...` with stdin closed and stdout+stderr appended
    /// to `output`.
    pub(crate) fn spawn<I, S>(
        label: &str,
        program: &Path,
        args: I,
        output: &Path,
    ) -> anyhow::Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = append_file(output)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = spawn(cmd).with_context(|| format!("spawning {}", program.display()))?;
        Ok(Proc {
            child,
            exit: None,
            label: label.to_string(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (reaps it).
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `signal` unless the process has already exited.
    pub(crate) fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid belongs to
        // our not-yet-reaped child, so it cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits (without blocking the runtime) up to `timeout` for the exit.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status and
    /// whether the process exited by itself within the grace period.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        let _ = self.signal(libc::SIGTERM);
        if let Some(status) = self.wait_exit(grace).await {
            return (Some(status), true);
        }
        eprintln!(
            "[test harness] {} (pid {}) did not exit within {grace:?} of SIGTERM; sending SIGKILL",
            self.label,
            self.pid()
        );
        (self.kill().await, false)
    }

    /// SIGKILL and reap.
    pub(crate) async fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(30)).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a short-lived command to completion (async wait), with its output
/// appended to `output`. Fails on timeout or non-zero exit, quoting the output.
pub(crate) async fn run_to_completion<I, S>(
    label: &str,
    program: &Path,
    args: I,
    output: &Path,
    timeout: Duration,
) -> anyhow::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut proc = Proc::spawn(label, program, args, output)?;
    match proc.wait_exit(timeout).await {
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!(
            "{label} failed ({status}); output:\n{}",
            file_tail(output, 40)
        ),
        None => {
            proc.kill().await;
            anyhow::bail!(
                "{label} did not finish within {timeout:?}; output:\n{}",
                file_tail(output, 40)
            )
        }
    }
}

/// A program path: `$env_var` if set, else `default` if it exists, else the
/// bare name (looked up in PATH).
pub(crate) fn program(env_var: &str, default: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let path = Path::new(default);
    if path.exists() {
        return path.to_path_buf();
    }
    PathBuf::from(path.file_name().unwrap_or(path.as_os_str()))
}

/// Why a server did not come up.
pub(crate) struct LaunchError {
    /// The process exited by itself (e.g. port taken): worth another try.
    pub(crate) exited_early: bool,
    pub(crate) error: anyhow::Error,
}

impl LaunchError {
    pub(crate) fn fatal(error: anyhow::Error) -> Self {
        LaunchError {
            exited_early: false,
            error,
        }
    }
}

/// Stops a private server cleanly: SIGTERM, then SIGKILL if it has not gone within `grace`,
/// saying so with its log tail (`what` names the server).
pub(crate) async fn stop_server(
    proc: Option<Proc>,
    grace: Duration,
    what: std::fmt::Arguments<'_>,
    log_tail: impl FnOnce() -> String,
) {
    if let Some(mut proc) = proc {
        let (status, clean) = proc.terminate(grace).await;
        if !clean {
            eprintln!(
                "[test harness] {what} needed SIGKILL (status {status:?}); log:\n{}",
                log_tail()
            );
        }
    }
}

/// Launches a stopped server again until `deadline`: a launch whose process exited by itself
/// (its port briefly held by someone else) is tried again after a moment.
pub(crate) async fn relaunch(
    deadline: Instant,
    mut launch: impl AsyncFnMut() -> Result<(), LaunchError>,
) -> anyhow::Result<()> {
    loop {
        match launch().await {
            Ok(()) => return Ok(()),
            Err(e) if !e.exited_early || Instant::now() >= deadline => return Err(e.error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
