//! systemd's readiness protocol (`sd_notify`): `READY=1` once interception is live,
//! `STOPPING=1` when the agent starts shutting down.
//!
//! A few lines over a Unix datagram socket rather than a crate: the protocol is one datagram
//! of `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an
//! abstract socket). Without `$NOTIFY_SOCKET` (not started by systemd as `Type=notify`)
//! every call does nothing.

use std::os::unix::net::UnixDatagram;

/// A failed notification: systemd would then treat the start as failed (`Type=notify`), so it
/// is logged, never fatal to the agent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET `{0}` is neither an absolute path nor an abstract `@name`")]
    BadAddress(String),
    #[error("cannot send `{state}` to $NOTIFY_SOCKET `{socket}`: {source}")]
    Send {
        state: String,
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// Send `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET`; `Ok(false)` when it is unset.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(false),
        Some(socket) => send_to(&socket.to_string_lossy(), state).map(|()| true),
    }
}

/// Send one datagram to the notification socket `socket` (path or `@abstract`).
pub fn send_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    let send_err = |source| NotifyError::Send {
        state: state.to_owned(),
        socket: socket.to_owned(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(send_err)?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(send_err)?;
        sock.send_to_addr(state.as_bytes(), &addr)
            .map_err(send_err)?;
    } else if socket.starts_with('/') {
        sock.send_to(state.as_bytes(), socket).map_err(send_err)?;
    } else {
        return Err(NotifyError::BadAddress(socket.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_path_socket_receives_the_state() {
        let dir = std::env::temp_dir().join(format!("airlock-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_abstract_socket_receives_the_state() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("airlock-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn a_relative_address_is_refused() {
        assert!(matches!(
            send_to("notify.sock", "READY=1"),
            Err(NotifyError::BadAddress(_))
        ));
    }
}
