//! Answer checks: one try of a health check the agent makes itself
//! ([`flocker_wire::AnswerCheck`]). A thread of its own enters the container's network
//! namespace (`setns` on `/proc/PID/ns/net`, which changes only the calling thread), connects
//! to `127.0.0.1:PORT` there, writes `send` and reads until the reply is as long as `expect`.
//! The thread ends with the try, so no thread of the agent's pools ever runs in a container's
//! namespace. Every step is bounded by the check's timeout.
//!
//! Why: a listening socket says the kernel accepts connections, not that the application
//! serves them. Redis listens before it has loaded its data and answers `-LOADING` meanwhile;
//! a move's held clients released then got that error.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use flocker_wire::AnswerCheck;

/// The most of a wrong reply a verdict quotes.
const QUOTED: usize = 120;

/// One try of `check` on `port` inside the network namespace of process `pid`: `Ok(())` when
/// the reply starts with `expect`, else what happened instead.
pub async fn ask(
    pid: u32,
    port: u16,
    check: &AnswerCheck,
    timeout: Duration,
) -> Result<(), String> {
    let (send, expect) = (check.send.clone(), check.expect.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("answer-check".into())
        .spawn(move || {
            let _ = tx.send(in_namespace(
                pid,
                port,
                send.as_bytes(),
                expect.as_bytes(),
                timeout,
            ));
        })
        .map_err(|e| format!("cannot start the check: {e}"))?;
    // The thread bounds connect, write and read by `timeout` each; this bound is a backstop.
    let backstop = timeout
        .saturating_mul(3)
        .saturating_add(Duration::from_secs(1));
    match tokio::time::timeout(backstop, rx).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(_)) => Err("the check ended without a verdict".into()),
        Err(_) => Err(format!("no verdict within {backstop:?}")),
    }
}

fn in_namespace(
    pid: u32,
    port: u16,
    send: &[u8],
    expect: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let path = format!("/proc/{pid}/ns/net");
    let namespace = std::fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot enter the container's network namespace: {e}"))?;
    exchange(
        SocketAddr::from(([127, 0, 0, 1], port)),
        send,
        expect,
        timeout,
    )
}

/// Connects to `addr`, writes `send`, and reads until the reply is as long as `expect`: `Ok`
/// when it starts with `expect`. Gives up at the first byte that differs, at the end of the
/// stream, or when `timeout` (from the start) has passed.
pub fn exchange(
    addr: SocketAddr,
    send: &[u8],
    expect: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let port = addr.port();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
    let _ = stream.set_nodelay(true);
    if !send.is_empty() {
        let left = left_until(deadline, timeout, &[])?;
        stream
            .set_write_timeout(Some(left))
            .and_then(|()| stream.write_all(send))
            .map_err(|e| format!("cannot send to port {port}: {e}"))?;
    }
    let mut reply = Vec::with_capacity(expect.len());
    let mut buf = [0u8; 512];
    while reply.len() < expect.len() {
        let left = left_until(deadline, timeout, &reply)?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("port {port}: {e}"))?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "port {port} closed the connection after answering {}",
                    quote(&reply)
                ));
            }
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(no_answer(timeout, &reply));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("port {port}: {e}")),
        }
        let n = reply.len().min(expect.len());
        if reply[..n] != expect[..n] {
            return Err(format!("port {port} answered {}", quote(&reply)));
        }
    }
    Ok(())
}

/// The time left until `deadline`, or the verdict of a check that ran out of it.
fn left_until(deadline: Instant, timeout: Duration, reply: &[u8]) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(no_answer(timeout, reply));
    }
    Ok(left)
}

fn no_answer(timeout: Duration, reply: &[u8]) -> String {
    if reply.is_empty() {
        format!("no answer within {timeout:?}")
    } else {
        format!("only {} within {timeout:?}", quote(reply))
    }
}

/// A reply as text, escaped and cut short.
fn quote(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    let cut: String = text.chars().take(QUOTED).collect();
    if cut.len() < text.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server on loopback that reads a request and writes `replies` (pausing between them),
    /// once per connection, for `connections` connections.
    fn server(replies: &'static [&'static [u8]], connections: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for _ in 0..connections {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut request = [0u8; 64];
                let _ = s.read(&mut request);
                for reply in replies {
                    let _ = s.write_all(reply);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        addr
    }

    const TRY: Duration = Duration::from_secs(5);

    #[test]
    fn a_reply_starting_as_expected_is_ready_even_in_pieces() {
        let addr = server(&[b"+PO", b"NG\r\n"], 1);
        assert_eq!(exchange(addr, b"PING\r\n", b"+PONG", TRY), Ok(()));
    }

    #[test]
    fn a_loading_database_is_not_ready_and_says_what_it_answered() {
        let addr = server(&[b"-LOADING Redis is loading the dataset in memory\r\n"], 1);
        let verdict = exchange(addr, b"PING\r\n", b"+PONG", TRY).expect_err("not ready");
        assert!(verdict.contains("-LOADING Redis is loading"), "{verdict}");
    }

    #[test]
    fn silence_closing_and_refusal_are_not_ready() {
        let silent = server(&[], 1);
        let verdict = exchange(silent, b"PING\r\n", b"+PONG", Duration::from_millis(200))
            .expect_err("no answer");
        assert!(
            verdict.contains("no answer") || verdict.contains("closed"),
            "{verdict}"
        );
        let short = server(&[b"+PO"], 1);
        let verdict = exchange(short, b"PING\r\n", b"+PONG", TRY).expect_err("closed early");
        assert!(
            verdict.contains("closed the connection after answering \"+PO\""),
            "{verdict}"
        );
        // A port nothing listens on: bind one, then free it.
        let free = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let verdict = exchange(free, b"PING\r\n", b"+PONG", TRY).expect_err("refused");
        assert!(verdict.contains("cannot connect"), "{verdict}");
    }

    #[test]
    fn a_greeting_is_read_without_sending() {
        // A server that greets first and reads nothing.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.write_all(b"220 mail ready\r\n");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        assert_eq!(exchange(addr, b"", b"220 ", TRY), Ok(()));
    }

    #[tokio::test]
    #[ignore = "privileged: needs root (setns); `cargo xtask ci` runs it"]
    async fn a_check_enters_the_namespace_of_the_process_it_names() {
        // This process's own namespace: the path through /proc and setns is the one a
        // container's takes (the seamless-move e2e tests take it into Redis containers).
        let addr = server(&[b"+PONG\r\n"], 1);
        let check = AnswerCheck {
            send: "PING\r\n".into(),
            expect: "+PONG".into(),
            port: None,
        };
        assert_eq!(
            ask(std::process::id(), addr.port(), &check, TRY).await,
            Ok(())
        );
        let verdict = ask(u32::MAX, addr.port(), &check, TRY)
            .await
            .expect_err("no such process");
        assert!(verdict.contains("cannot open /proc/"), "{verdict}");
    }
}
