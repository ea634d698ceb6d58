//! Command-line arguments, security selection, and the send and receive commands.

mod progress;
mod signals;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use flocker_stream::backend::Spec;
use flocker_stream::listener::{self, ListenLimits};
use flocker_stream::transport::{self, TlsFiles};
use flocker_stream::{Auth, Compression, ReceiveOptions, SendOptions, Summary};

/// Pipelined, compressed, verified, authenticated volume streaming.
#[derive(Debug, Parser)]
#[command(name = "flocker-stream", version)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send SOURCE to a listening receiver.
    Send(SendArgs),
    /// Receive one stream into SINK: wait for the first sender that authenticates (stray or
    /// failed connections are cut and logged), then receive its stream.
    Recv(RecvArgs),
    /// Write a new random pre-shared key (64 hex digits) to FILE, readable by its owner only
    /// (mode 0600). Copy it to the other end over a channel you trust, e.g. `scp`.
    Keygen(KeygenArgs),
}

#[derive(Debug, ClapArgs)]
struct KeygenArgs {
    /// Where to write the key; an existing file is not overwritten.
    file: PathBuf,
}

#[derive(Debug, ClapArgs)]
struct Security {
    /// Pre-shared key file (32 raw bytes or 64 hex digits; `flocker-stream keygen` makes one).
    /// It must be readable by its owner only.
    #[arg(long, conflicts_with_all = ["tls_ca", "insecure"])]
    key_file: Option<PathBuf>,
    /// Use a key file that group or others can read (anyone who can read it can send and
    /// receive as you).
    #[arg(long, requires = "key_file")]
    allow_readable_key: bool,
    /// Cluster CA certificate (PEM); with --tls-cert and --tls-key enables mutual TLS.
    #[arg(long, requires_all = ["tls_cert", "tls_key"], conflicts_with = "insecure")]
    tls_ca: Option<PathBuf>,
    /// This end's certificate (PEM).
    #[arg(long, requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// No authentication at all. Sending: the stream goes to whoever listens at --to.
    /// Receiving: the first connection that speaks the format is accepted from any host that
    /// can reach the port, and what it sends is written into the target. Frames are still
    /// checksummed (this catches corruption, not an attacker). Only for trusted networks and
    /// tests.
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ProgressMode {
    /// A bar on a terminal, JSON lines otherwise.
    Auto,
    /// A one-line bar with rate and ETA.
    Bar,
    /// One JSON object per line on stderr.
    Json,
    /// Only the summary.
    None,
}

#[derive(Debug, ClapArgs)]
struct SendArgs {
    /// `-`, `file:PATH`, `zfs:POOL/FS@SNAP`, `btrfs:PATH` or `dir:PATH`.
    #[arg(long)]
    source: String,
    /// Receiver address, HOST:PORT.
    #[arg(long)]
    to: String,
    /// ZFS: send the delta from this snapshot (`@SNAP`).
    #[arg(long)]
    incremental_from: Option<String>,
    /// btrfs: send the delta from this parent snapshot.
    #[arg(long)]
    parent: Option<PathBuf>,
    #[command(flatten)]
    security: Security,
    /// TLS name to expect in the receiver's certificate (default: the host in --to).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// A fixed zstd level for every chunk (negative is faster, 0 disables compression).
    /// Default: adaptive, per chunk raw or the zstd level that moves the most bytes per second
    /// given the measured CPU and network.
    #[arg(long, allow_hyphen_values = true)]
    compress_level: Option<i32>,
    /// Chunk size in bytes (4096..=16777216).
    #[arg(long, default_value_t = flocker_stream::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Compression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Cap on the wire rate, bytes per second, with optional K/M/G suffix (1024-based).
    #[arg(long, value_parser = parse_rate)]
    limit_rate: Option<u64>,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Fail when the receiver accepts or sends nothing for this many seconds.
    #[arg(long, default_value_t = listener::DEFAULT_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
}

#[derive(Debug, ClapArgs)]
struct RecvArgs {
    /// Address to listen on, HOST:PORT (port 0 picks one; the address is printed).
    #[arg(long)]
    listen: String,
    /// `-`, `file:PATH`, `zfs:POOL/FS`, `btrfs:DIR` or `dir:PATH`.
    #[arg(long)]
    sink: String,
    /// ZFS: pass -F to zfs recv (roll back to the newest snapshot first).
    #[arg(long)]
    rollback: bool,
    #[command(flatten)]
    security: Security,
    /// Decompression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Cut a connection that has not completed its handshake after this many seconds (the
    /// receiver keeps listening for the real sender).
    #[arg(long, default_value_t = listener::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    handshake_timeout: u64,
    /// Fail the transfer when the sender sends nothing for this many seconds.
    #[arg(long, default_value_t = listener::DEFAULT_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Give up when no sender has authenticated after this many seconds (default: wait).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    deadline: Option<u64>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad rate {s:?}: expected e.g. 500K, 100M, 1G"))?;
    let rate = (n * mult as f64) as u64;
    if n.is_finite() && rate > 0 {
        Ok(rate)
    } else {
        Err(format!("rate {s:?} must be positive"))
    }
}

/// The error and its causes on one line, skipping causes the message above already quotes
/// (the library's messages include their source).
pub fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// A key file that group or others can read is refused unless the user says otherwise.
fn refuse_exposed_key(path: &std::path::Path, allowed: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 && !allowed {
        bail!(
            "key file {} is readable by group or others (mode {mode:o}): `chmod 600` it, or pass --allow-readable-key",
            path.display()
        );
    }
    Ok(())
}

/// Writes 32 random bytes as 64 hex digits to a new file of mode 0600.
fn keygen(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for the key: {e}"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    file.write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write key file {}", path.display()))?;
    eprintln!("flocker-stream: wrote a new key to {}", path.display());
    Ok(())
}

enum Chosen {
    Psk([u8; 32]),
    Tls(TlsFiles),
    Insecure,
}

fn choose(sec: &Security) -> anyhow::Result<Chosen> {
    if let Some(path) = &sec.key_file {
        refuse_exposed_key(path, sec.allow_readable_key)?;
        return Ok(Chosen::Psk(flocker_stream::read_key_file(path)?));
    }
    if let (Some(ca), Some(cert), Some(key)) = (&sec.tls_ca, &sec.tls_cert, &sec.tls_key) {
        return Ok(Chosen::Tls(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }));
    }
    if sec.insecure {
        return Ok(Chosen::Insecure);
    }
    bail!(
        "no authentication chosen: pass --key-file, or --tls-ca/--tls-cert/--tls-key, or --insecure explicitly"
    )
}

fn progress_mode(mode: ProgressMode) -> ProgressMode {
    use std::io::IsTerminal;
    match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Json,
        m => m,
    }
}

/// Runs one command.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Send(a) => send(a),
        Command::Recv(a) => recv(a),
        Command::Keygen(a) => keygen(&a.file),
    }
}

fn send(a: SendArgs) -> anyhow::Result<()> {
    let chosen = choose(&a.security)?;
    let spec: Spec = a.source.parse()?;
    let mut source = spec.source(a.incremental_from.as_deref(), a.parent.as_deref())?;
    let mode = progress_mode(a.progress);
    let reporter = Arc::new(progress::Reporter::new(
        mode == ProgressMode::Json,
        source.size_hint(),
    ));
    let mut opts = SendOptions {
        chunk_size: a.chunk_size,
        compression: a
            .compress_level
            .map_or(Compression::Adaptive, Compression::Fixed),
        limit_rate: a.limit_rate,
        ..SendOptions::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if mode != ProgressMode::None {
        let r = Arc::clone(&reporter);
        opts.progress = Some(Arc::new(move |p| r.update(p)));
    }
    let tls = match &chosen {
        Chosen::Tls(files) => Some((transport::client_config(files)?, a.tls_server_name.clone())),
        _ => None,
    };
    opts.auth = match chosen {
        Chosen::Psk(k) => Auth::PresharedKey(k),
        _ => Auth::None,
    };
    let guard = signals::Guard::install().context("installing signal handlers")?;
    let mut conn = transport::connect(&a.to, tls)?;
    listener::set_timeouts(conn.tcp(), Some(Duration::from_secs(a.idle_timeout)));
    guard.arm(conn.tcp());
    let result = flocker_stream::send_over(source.as_mut(), &mut conn, &opts);
    let _ = conn.finish();
    reporter.clear();
    if result.is_err() && signals::interrupted() {
        bail!("interrupted by a signal; the transfer was aborted");
    }
    let summary = result.context("send failed")?;
    reporter.summary("sent", &summary);
    Ok(())
}

fn recv(a: RecvArgs) -> anyhow::Result<()> {
    let chosen = choose(&a.security)?;
    let spec: Spec = a.sink.parse()?;
    let mut sink = spec.sink(a.rollback);
    let mode = progress_mode(a.progress);
    let reporter = Arc::new(progress::Reporter::new(mode == ProgressMode::Json, None));
    let mut opts = ReceiveOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    if mode != ProgressMode::None {
        let r = Arc::clone(&reporter);
        opts.progress = Some(Arc::new(move |p| r.update(p)));
    }
    let tls = match &chosen {
        Chosen::Tls(files) => Some(transport::server_config(files)?),
        _ => None,
    };
    opts.auth = match chosen {
        Chosen::Psk(k) => Auth::PresharedKey(k),
        _ => Auth::None,
    };
    let guard = signals::Guard::install().context("installing signal handlers")?;
    let socket = transport::listen(&a.listen)?;
    let local = socket.local_addr().context("listener address")?;
    reporter.listening(&local.to_string());
    let limits = ListenLimits {
        handshake_timeout: Duration::from_secs(a.handshake_timeout),
        idle_timeout: Duration::from_secs(a.idle_timeout),
        deadline: a.deadline.map(Duration::from_secs),
        ..ListenLimits::default()
    };
    let (mut conn, _peer, session) =
        listener::accept_authenticated(&socket, tls, &opts.auth, &limits)?;
    guard.arm(conn.tcp());
    let result = flocker_stream::receive_authenticated(&mut conn, sink.as_mut(), &opts, &session);
    let _ = conn.finish();
    reporter.clear();
    if result.is_err() && signals::interrupted() {
        bail!("interrupted by a signal; the sink was aborted and the target left as it was");
    }
    let summary: Summary = result.context("receive failed")?;
    reporter.summary("received", &summary);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100"), Ok(100));
        assert_eq!(parse_rate("1.5K"), Ok(1536));
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
