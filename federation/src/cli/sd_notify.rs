//! The systemd readiness protocol (`sd_notify`) for `Type=notify` units:
//! one datagram (`READY=1`, `STOPPING=1`, `STATUS=…`) to the unix socket
//! named by `$NOTIFY_SOCKET`; nothing at all when it is unset.

use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;

/// The variable systemd (or a test) sets to the socket's path; a leading
/// `@` names a Linux abstract socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET`.
/// Returns `Ok(false)` when the variable is unset (not run by systemd).
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    send_to(&path, state)?;
    Ok(true)
}

/// Sends `state` to the notify socket `path` (`@name`: abstract).
pub fn send_to(path: &OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract NOTIFY_SOCKET needs Linux",
            ));
        }
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// [`notify`], logging a failure instead of returning it: readiness
/// reporting never stops the controller.
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state = %state.replace('\n', " "), "sd_notify sent"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, state = %state.replace('\n', " "), "sd_notify failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let patience = Some(std::time::Duration::from_secs(30));
        server.set_read_timeout(patience).expect("timeout");
        send_to(path.as_os_str(), "READY=1\nSTATUS=serving").expect("send");
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("federation-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract name");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        server.set_read_timeout(patience).expect("timeout");
        send_to(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
