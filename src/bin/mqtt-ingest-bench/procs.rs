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
