//! Free loopback ports for child processes to bind.

use std::net::SocketAddr;

use anyhow::Context as _;

/// A free loopback port for a child process to bind.
///
/// The port is probed (bound, then released) and the child binds it later,
/// so it must not be taken in between. Ports the kernel hands out by itself
/// (`bind(0)`, and the source port of every outgoing connection, which tests
/// running side by side make by the thousand) come from
/// `ip_local_port_range`; this picks ports *below* that range, where the
/// kernel never allocates, and never hands the same port out twice in one
/// process. Where the range leaves no room below it, it falls back to
/// `bind(0)`.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    use std::sync::Mutex;
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const SPAN: u16 = 12_000;
    if low > SPAN + 1024 {
        let first = low - SPAN;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..200 {
            let port = first + rand::random_range(0..SPAN);
            if given.contains(&port) {
                continue;
            }
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                given.insert(port);
                return Ok(l.local_addr()?);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}
