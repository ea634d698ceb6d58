//! The `flocker-stream` binary end to end over loopback TCP: authentication choices, TLS, the
//! JSON progress/summary lines, and killing either end mid-stream.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_flocker-stream");

/// A receiver process, its address, and its stderr lines as they arrive.
struct Receiver {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
}

fn start_receiver(sink: &str, extra: &[&str]) -> Receiver {
    let mut child = Command::new(BIN)
        .args([
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--progress",
            "json",
            "--sink",
            sink,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn receiver");
    let stderr = child.stderr.take().expect("stderr");
    let mut out = child.stdout.take().expect("stdout");
    // Read stdout as it comes, so a receiver writing to `-` never blocks on a full pipe.
    let stdout = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("receiver printed nothing");
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|_| panic!("not JSON: {first}"));
    assert_eq!(v["event"], "listening", "{first}");
    let addr = v["addr"].as_str().expect("addr").to_owned();
    Receiver {
        child,
        addr,
        lines,
        stdout,
    }
}

impl Receiver {
    /// Waits for exit; returns success and all remaining stderr.
    fn finish(mut self) -> (bool, String, Vec<u8>) {
        let status = self.child.wait().expect("wait receiver");
        let text: Vec<String> = self.lines.iter().collect();
        let stdout = self.stdout.join().expect("stdout reader");
        (status.success(), text.join("\n"), stdout)
    }
}

fn send(source: &str, to: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["send", "--progress", "json", "--source", source, "--to", to])
        .args(extra)
        .output()
        .expect("run sender")
}

fn summary_hash(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .and_then(|v| v["blake3"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no summary in {stderr}"))
}

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, [byte; 32]).expect("key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

#[test]
fn keygen_writes_a_private_key_and_readable_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = tmp.path().join("key");
    let out = Command::new(BIN)
        .arg("keygen")
        .arg(&key)
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&key).expect("read");
    assert_eq!(text.trim().len(), 64, "{text}");
    assert!(text.trim().chars().all(|c| c.is_ascii_hexdigit()));
    // Never overwritten.
    let again = Command::new(BIN)
        .arg("keygen")
        .arg(&key)
        .output()
        .expect("keygen");
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&key).expect("read"), text);

    // A key others can read is refused, unless the user insists.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let refused = send(
        "-",
        "127.0.0.1:9",
        &["--key-file", &key.display().to_string()],
    );
    let said = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success());
    assert!(
        said.contains("readable by group or others") && said.contains("--allow-readable-key"),
        "{said}"
    );
    let insisted = send(
        "-",
        "127.0.0.1:9",
        &[
            "--key-file",
            &key.display().to_string(),
            "--allow-readable-key",
        ],
    );
    let said = String::from_utf8_lossy(&insisted.stderr).to_string();
    assert!(
        !said.contains("--allow-readable-key"),
        "past the check, fails later: {said}"
    );
}

#[test]
fn psk_round_trip_reports_matching_summaries() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    let mut data = common::text_bytes(5 << 20);
    data.extend(common::random_bytes(3 << 20, 4));
    std::fs::write(&src, &data).expect("write");
    let key = key_file(tmp.path(), "key", 1);
    let key = key.to_str().expect("utf8");
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(&format!("file:{}", dst.display()), &["--key-file", key]);
    let s = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &["--key-file", key, "--compress-level", "3"],
    );
    let (ok, rerr, _) = r.finish();
    let serr = String::from_utf8_lossy(&s.stderr).into_owned();
    assert!(s.status.success(), "sender: {serr}");
    assert!(ok, "receiver: {rerr}");
    assert_eq!(std::fs::read(&dst).expect("dst"), data);
    assert_eq!(summary_hash(&serr), summary_hash(&rerr));
    assert!(serr.contains("\"ratio\""), "{serr}");
}

#[test]
fn authentication_must_be_chosen_and_keys_must_match() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    std::fs::write(&src, b"hello").expect("write");
    let out = Command::new(BIN)
        .args(["recv", "--listen", "127.0.0.1:0", "--sink", "-"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--insecure"),
        "{:?}",
        out
    );

    let (k1, k2) = (key_file(tmp.path(), "k1", 1), key_file(tmp.path(), "k2", 2));
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(
        &format!("file:{}", dst.display()),
        &["--key-file", k1.to_str().expect("utf8")],
    );
    let s = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &["--key-file", k2.to_str().expect("utf8")],
    );
    let serr = String::from_utf8_lossy(&s.stderr);
    assert!(!s.status.success(), "a sender with the wrong key must fail");
    assert!(serr.contains("different pre-shared key"), "{serr}");
    assert!(!dst.exists());
    // The receiver logged the failed handshake and kept listening: the right key gets through.
    let s = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &["--key-file", k1.to_str().expect("utf8")],
    );
    let (ok, rerr, _) = r.finish();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(ok, "{rerr}");
    assert!(rerr.contains("different pre-shared key"), "{rerr}");
    assert_eq!(std::fs::read(&dst).expect("dst"), b"hello");

    // Explicit --insecure on both ends works, stdin to stdout.
    let r = start_receiver("-", &["--insecure"]);
    let mut sender = Command::new(BIN)
        .args([
            "send",
            "--insecure",
            "--progress",
            "none",
            "--source",
            "-",
            "--to",
            &r.addr,
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sender");
    let data = common::text_bytes(1 << 20);
    sender
        .stdin
        .take()
        .expect("stdin")
        .write_all(&data)
        .expect("feed");
    let s = sender.wait_with_output().expect("sender");
    let (ok, rerr, stdout) = r.finish();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(ok, "{rerr}");
    assert_eq!(stdout, data);
}

fn cert_pair(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    name: &str,
    dir: &Path,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    let cert = params.signed_by(&key, ca, ca_key).expect("sign");
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    (c, k)
}

fn ca(dir: &Path, name: &str) -> (rcgen::Certificate, rcgen::KeyPair, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("ca key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca");
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).expect("write ca");
    (cert, key, path)
}

#[test]
fn mutual_tls_round_trip_and_foreign_client_rejected() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (ca_cert, ca_key, ca_path) = ca(tmp.path(), "cluster-ca");
    let (srv_c, srv_k) = cert_pair(&ca_cert, &ca_key, "localhost", tmp.path());
    let (cli_c, cli_k) = cert_pair(&ca_cert, &ca_key, "node-a", tmp.path());
    let s = |p: &PathBuf| p.to_str().expect("utf8").to_owned();
    let src = tmp.path().join("src.bin");
    let data = common::random_bytes(2 << 20, 8);
    std::fs::write(&src, &data).expect("write");
    let dst = tmp.path().join("dst.bin");
    let srv_args = [
        "--tls-ca",
        &s(&ca_path),
        "--tls-cert",
        &s(&srv_c),
        "--tls-key",
        &s(&srv_k),
    ];
    let r = start_receiver(&format!("file:{}", dst.display()), &srv_args);
    let out = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &[
            "--tls-ca",
            &s(&ca_path),
            "--tls-cert",
            &s(&cli_c),
            "--tls-key",
            &s(&cli_k),
            "--tls-server-name",
            "localhost",
        ],
    );
    let (ok, rerr, _) = r.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "{rerr}");
    assert_eq!(std::fs::read(&dst).expect("dst"), data);

    // A client whose certificate comes from another CA is refused; nothing is written, and the
    // receiver keeps listening for a client of its own CA.
    let (other, other_key, _) = ca(tmp.path(), "other-ca");
    let (bad_c, bad_k) = cert_pair(&other, &other_key, "intruder", tmp.path());
    let dst2 = tmp.path().join("dst2.bin");
    let r = start_receiver(&format!("file:{}", dst2.display()), &srv_args);
    let out = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &[
            "--tls-ca",
            &s(&ca_path),
            "--tls-cert",
            &s(&bad_c),
            "--tls-key",
            &s(&bad_k),
            "--tls-server-name",
            "localhost",
        ],
    );
    assert!(!out.status.success(), "the foreign client must fail");
    assert!(!dst2.exists());
    let out = send(
        &format!("file:{}", src.display()),
        &r.addr,
        &[
            "--tls-ca",
            &s(&ca_path),
            "--tls-cert",
            &s(&cli_c),
            "--tls-key",
            &s(&cli_k),
            "--tls-server-name",
            "localhost",
        ],
    );
    let (ok, rerr, _) = r.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "{rerr}");
    assert!(
        rerr.to_lowercase().contains("certificate") && rerr.contains("handshake failed"),
        "{rerr}"
    );
    assert_eq!(std::fs::read(&dst2).expect("dst2"), data);
}

fn wait_for_progress(r: &Receiver) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = r
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("receiver made no progress");
        let is_progress = line.contains("\"progress\"");
        seen.push(line);
        if is_progress {
            return seen;
        }
    }
}

fn kill(child: &mut Child) {
    child.kill().expect("kill");
}

#[test]
fn killing_the_sender_mid_stream_fails_the_receiver_cleanly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    let data = common::random_bytes(32 << 20, 11);
    std::fs::write(&src, &data).expect("write");
    let key = key_file(tmp.path(), "key", 5);
    let key = key.to_str().expect("utf8");
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(&format!("file:{}", dst.display()), &["--key-file", key]);
    let mut sender = Command::new(BIN)
        .args([
            "send",
            "--progress",
            "none",
            "--key-file",
            key,
            "--limit-rate",
            "4M",
            "--to",
            &r.addr,
        ])
        .arg("--source")
        .arg(format!("file:{}", src.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("sender");
    wait_for_progress(&r);
    kill(&mut sender);
    let _ = sender.wait();
    let (ok, rerr, _) = r.finish();
    assert!(!ok, "receiver must fail");
    assert!(rerr.contains("truncated"), "{rerr}");
    assert!(!dst.exists(), "no target after a killed sender");
    assert!(
        !tmp.path().join("dst.bin.flocker-partial").exists(),
        "no staging file"
    );
    assert_eq!(std::fs::read(&src).expect("src"), data, "source untouched");
}

#[test]
fn killing_the_receiver_mid_stream_fails_the_sender_cleanly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    let data = common::random_bytes(32 << 20, 12);
    std::fs::write(&src, &data).expect("write");
    let key = key_file(tmp.path(), "key", 6);
    let key = key.to_str().expect("utf8");
    let dst = tmp.path().join("dst.bin");
    let mut r = start_receiver(&format!("file:{}", dst.display()), &["--key-file", key]);
    let sender = Command::new(BIN)
        .args([
            "send",
            "--progress",
            "none",
            "--key-file",
            key,
            "--limit-rate",
            "4M",
            "--to",
            &r.addr,
        ])
        .arg("--source")
        .arg(format!("file:{}", src.display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("sender");
    wait_for_progress(&r);
    kill(&mut r.child);
    let out = sender.wait_with_output().expect("sender");
    let serr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sender must fail");
    assert!(
        serr.contains("transport") || serr.contains("receiver"),
        "{serr}"
    );
    assert_eq!(std::fs::read(&src).expect("src"), data, "source untouched");
    assert!(
        !dst.exists(),
        "a killed receiver never renamed its staging file into place"
    );
}

#[test]
fn sigterm_to_the_receiver_aborts_the_sink_and_removes_staging() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    std::fs::write(&src, common::random_bytes(32 << 20, 13)).expect("write");
    let key = key_file(tmp.path(), "key", 7);
    let key = key.to_str().expect("utf8");
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(&format!("file:{}", dst.display()), &["--key-file", key]);
    let mut sender = Command::new(BIN)
        .args([
            "send",
            "--progress",
            "none",
            "--key-file",
            key,
            "--limit-rate",
            "4M",
            "--to",
            &r.addr,
        ])
        .arg("--source")
        .arg(format!("file:{}", src.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("sender");
    wait_for_progress(&r);
    let ok = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let (ok, rerr, _) = r.finish();
    let sent = sender.wait().expect("sender");
    assert!(!ok, "receiver must exit non-zero");
    assert!(rerr.contains("interrupted"), "{rerr}");
    assert!(!sent.success(), "sender must fail too");
    assert!(!dst.exists());
    assert!(
        !tmp.path().join("dst.bin.flocker-partial").exists(),
        "staging file must be removed on SIGTERM"
    );
}

/// Runs the sender, killing it if it has not finished within a (generous) bound, so a
/// receiver that never serves it fails the test instead of hanging it.
fn send_within(source: &str, to: &str, extra: &[&str], bound: Duration) -> (bool, String) {
    let mut child = Command::new(BIN)
        .args(["send", "--progress", "json", "--source", source, "--to", to])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sender");
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait sender") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status.success(), err);
        }
        if start.elapsed() > bound {
            kill(&mut child);
            let _ = child.wait();
            panic!("the sender was not served within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_receiver_serves_the_real_sender_despite_a_silent_client_and_a_port_scan() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src.bin");
    let data = common::random_bytes(2 << 20, 21);
    std::fs::write(&src, &data).expect("write");
    let key = key_file(tmp.path(), "key", 8);
    let key = key.to_str().expect("utf8");
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(&format!("file:{}", dst.display()), &["--key-file", key]);
    // A silent client that connects first and stays connected throughout.
    let silent = std::net::TcpStream::connect(&r.addr).expect("silent client");
    // A port scan: connect and close; connect, send garbage, close.
    drop(std::net::TcpStream::connect(&r.addr).expect("scan"));
    let mut garbage = std::net::TcpStream::connect(&r.addr).expect("scan");
    let _ = garbage.write_all(&common::random_bytes(4096, 22));
    drop(garbage);
    let (sent, serr) = send_within(
        &format!("file:{}", src.display()),
        &r.addr,
        &["--key-file", key],
        Duration::from_secs(120),
    );
    let (ok, rerr, _) = r.finish();
    drop(silent);
    assert!(sent, "sender: {serr}");
    assert!(ok, "receiver: {rerr}");
    assert_eq!(std::fs::read(&dst).expect("dst"), data);
    assert!(
        rerr.contains("handshake failed"),
        "the scan is logged: {rerr}"
    );
}

#[test]
fn the_receiver_gives_up_at_its_deadline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let key = key_file(tmp.path(), "key", 9);
    let dst = tmp.path().join("dst.bin");
    let r = start_receiver(
        &format!("file:{}", dst.display()),
        &["--key-file", key.to_str().expect("utf8"), "--deadline", "1"],
    );
    let (ok, rerr, _) = r.finish();
    assert!(!ok);
    assert!(rerr.contains("no sender authenticated"), "{rerr}");
    assert!(!dst.exists());
}
