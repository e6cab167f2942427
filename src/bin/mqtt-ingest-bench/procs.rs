//! Small process helpers: signals, peak RSS, free ports, names.

use std::net::TcpListener;

use anyhow::Context as _;

/// Sends SIGTERM to one process (one we started).
pub fn sigterm(pid: u32) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) with a pid of a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("kill(SIGTERM)");
    }
    Ok(())
}

/// The process's peak resident set size (VmHWM) in KiB, while it runs.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) the process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A short random lower-case hex tag for names (databases, client ids, topic prefixes).
pub fn tag() -> String {
    format!("{:010x}", fastrand::u64(..) & 0xff_ffff_ffff)
}
