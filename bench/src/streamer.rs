//! `cargo xtask bench streamer`: moves the same data with a raw TCP pipe (socat),
//! `zstd -T0 | socat`, mbuffer, an ssh pipe (sshd on the receiving side) and `flocker-stream`
//! (pre-shared key: every frame encrypted, every byte verified; adaptive compression by default,
//! and once with a fixed zstd level 1), on two corpora (random bytes; a tar of /usr), over
//! loopback and over a veth pair between two network namespaces shaped with `tc` to 1 Gbit/s,
//! then to 10 Gbit/s. Then the peak RSS of both `flocker-stream` ends for a large stream.
//!
//! Arguments: `--size BYTES[K|M|G]` per corpus (default 1G), `--rss-size BYTES` for the memory
//! run (default 4G), `--repeat N` runs per cell where the CPU is the limit (loopback, 10 Gbit/s),
//! median reported with the range (default 3), `--skip-netns` (loopback only), `--nets
//! loopback,1g,10g` (which networks; default all), `--out PATH` (default
//! `bench/results/streamer.md`).
//! Each transfer ends on the receiver in /dev/null; the raw pipe and the flocker-stream rows
//! also run into a file (the `file:` sink; socat's `> FILE`), the "to file" column. MB/s counts
//! uncompressed input bytes (10^6 bytes) over the wall time from starting the sender to both
//! ends exiting (for the file sink: after its fsync and rename).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

const NS_A: &str = "flkbench-snd";
const NS_B: &str = "flkbench-rcv";
const ADDR_A: &str = "198.18.250.1";
const ADDR_B: &str = "198.18.250.2";
const PORT: u16 = 17500;

struct Config {
    size: u64,
    rss_size: u64,
    nets: Vec<Net>,
    repeat: usize,
    out: PathBuf,
    bin: Option<PathBuf>,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (n, m) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>()
        .with_context(|| format!("bad size {s:?}"))?
        * m)
}

/// `loopback,1g,10g` (any subset, in the order given).
fn parse_nets(s: &str) -> anyhow::Result<Vec<Net>> {
    s.split(',')
        .map(|n| match n.trim() {
            "loopback" => Ok(Net::Loopback),
            "1g" => Ok(Net::Shaped1G),
            "10g" => Ok(Net::Shaped10G),
            other => bail!("unknown network {other:?} (expected loopback, 1g, 10g)"),
        })
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs the benchmark and prints its table.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut cfg = Config {
        size: 1 << 30,
        rss_size: 4 << 30,
        nets: vec![Net::Loopback, Net::Shaped1G, Net::Shaped10G],
        repeat: 3,
        out: workspace().join("bench/results/streamer.md"),
        bin: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size" => cfg.size = parse_size(it.next().context("--size BYTES")?)?,
            "--rss-size" => cfg.rss_size = parse_size(it.next().context("--rss-size BYTES")?)?,
            "--skip-netns" => cfg.nets = vec![Net::Loopback],
            "--nets" => cfg.nets = parse_nets(it.next().context("--nets LIST")?)?,
            "--repeat" => cfg.repeat = it.next().context("--repeat N")?.parse()?,
            "--out" => cfg.out = it.next().context("--out PATH")?.into(),
            "--bin" => cfg.bin = Some(it.next().context("--bin PATH")?.into()),
            other => bail!(
                "unknown argument {other:?} (expected --size, --rss-size, --repeat, --skip-netns, --nets, --out, --bin)"
            ),
        }
    }
    for tool in [
        "socat",
        "zstd",
        "mbuffer",
        "ssh",
        "ssh-keygen",
        "/usr/sbin/sshd",
        "tc",
        "ip",
        "tar",
    ] {
        ensure!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} is missing: run `cargo xtask deps`"
        );
    }
    let bin = match cfg.bin.clone() {
        Some(b) => b,
        None => build_streamer()?,
    };
    if !bin.is_file() {
        bail!(
            "--bin {}: not a file; give the flocker-stream binary itself",
            bin.display()
        );
    }
    let work = tempfile::Builder::new()
        .prefix("flocker-bench-streamer")
        .tempdir()?;
    let corpora = make_corpora(work.path(), cfg.size)?;
    let key = work.path().join("psk");
    std::fs::write(&key, [0x5au8; 32])?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let ssh = SshSetup::new(work.path())?;

    let mut rows = Vec::new();
    let nets = cfg.nets.clone();
    let lab = if nets.iter().any(|n| *n != Net::Loopback) {
        Some(Lab::build()?)
    } else {
        None
    };
    let out_file = work.path().join("sink.out");
    for net in &nets {
        if lab.is_some() {
            Lab::shape(*net)?;
        }
        for corpus in &corpora {
            let mut raw_rate = None;
            for method in Method::ALL {
                eprintln!("{} / {} / {}", net.name(), corpus.name, method.name());
                // Runs the CPU limits are short and sensitive to other load on the machine:
                // take the median of several. 1 Gbit/s runs are bound by the link: one is
                // enough.
                let n = if *net == Net::Shaped1G {
                    1
                } else {
                    cfg.repeat.max(1)
                };
                let what = || format!("{} / {} / {}", net.name(), corpus.name, method.name());
                let mut runs = Vec::new();
                let mut file_runs = Vec::new();
                for _ in 0..n {
                    runs.push(
                        measure(*net, method, corpus, &bin, &key, &ssh, None).with_context(what)?,
                    );
                    if method.has_file_column() {
                        let _ = std::fs::remove_file(&out_file);
                        file_runs.push(
                            measure(*net, method, corpus, &bin, &key, &ssh, Some(&out_file))
                                .with_context(|| format!("{} to a file", what()))?,
                        );
                        let _ = std::fs::remove_file(&out_file);
                    }
                }
                let r = Summary::of(runs);
                let file = (!file_runs.is_empty()).then(|| Summary::of(file_runs));
                if method == Method::Raw {
                    raw_rate = Some(r.median.mbps);
                }
                rows.push(Row {
                    net: *net,
                    corpus: corpus.name,
                    method,
                    result: r,
                    file,
                    raw: raw_rate,
                });
            }
        }
    }
    drop(lab);
    eprintln!("peak RSS run ({} bytes)", cfg.rss_size);
    let rss = measure_rss(&bin, &key, &corpora[1], cfg.rss_size)?;
    let table = render(&cfg, &rows, &rss);
    println!("{table}");
    if let Some(dir) = cfg.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.out, &table).with_context(|| format!("writing {}", cfg.out.display()))?;
    eprintln!("wrote {}", cfg.out.display());
    Ok(())
}

fn build_streamer() -> anyhow::Result<PathBuf> {
    let ok = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "flocker-stream",
            "--bin",
            "flocker-stream",
        ])
        .current_dir(workspace())
        .status()?;
    ensure!(ok.success(), "building flocker-stream failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace().join(target)
    };
    Ok(target.join("release/flocker-stream"))
}

struct Corpus {
    name: &'static str,
    path: PathBuf,
    size: u64,
    /// `zstd -T0` (level 3) output size, for the zstd pipe's ratio.
    zstd_size: u64,
}

fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "`{cmd}` failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn make_corpora(dir: &Path, size: u64) -> anyhow::Result<Vec<Corpus>> {
    let random = dir.join("random.bin");
    let usr = dir.join("usr.tar");
    sh(&format!(
        "head -c {size} /dev/urandom > {}",
        random.display()
    ))?;
    // /usr is ~5 GiB here; repeat the tar if it is smaller than the requested size.
    sh(&format!(
        "for i in 1 2 3 4 5 6 7 8; do tar cf - /usr 2>/dev/null; done | head -c {size} > {}",
        usr.display()
    ))?;
    let mut out = Vec::new();
    for (name, path) in [("random", random), ("/usr tar", usr)] {
        let zstd_size: u64 = sh(&format!("zstd -T0 -q -c {} | wc -c", path.display()))?
            .trim()
            .parse()?;
        out.push(Corpus {
            name,
            path,
            size,
            zstd_size,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    Loopback,
    Shaped1G,
    Shaped10G,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Shaped1G => "veth 1 Gbit/s",
            Net::Shaped10G => "veth 10 Gbit/s",
        }
    }

    /// The link rate in MB/s (10^6 bytes), for shaped links.
    fn link_mbps(self) -> Option<f64> {
        match self {
            Net::Loopback => None,
            Net::Shaped1G => Some(125.0),
            Net::Shaped10G => Some(1250.0),
        }
    }

    /// Wraps a shell command to run on the sending or receiving side.
    fn side(self, receiver: bool, cmd: &str) -> Command {
        let mut c = match self {
            Net::Loopback => Command::new("sh"),
            Net::Shaped1G | Net::Shaped10G => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", if receiver { NS_B } else { NS_A }, "sh"]);
                c
            }
        };
        c.arg("-c").arg(cmd);
        c
    }

    fn receiver_addr(self) -> &'static str {
        match self {
            Net::Loopback => "127.0.0.1",
            Net::Shaped1G | Net::Shaped10G => ADDR_B,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Raw,
    Zstd,
    Mbuffer,
    Ssh,
    Flocker,
    FlockerFixed,
    FlockerInsecure,
}

impl Method {
    const ALL: [Method; 7] = [
        Method::Raw,
        Method::Zstd,
        Method::Mbuffer,
        Method::Ssh,
        Method::Flocker,
        Method::FlockerFixed,
        Method::FlockerInsecure,
    ];

    /// Whether the method also runs into a file.
    fn has_file_column(self) -> bool {
        matches!(
            self,
            Method::Raw | Method::Flocker | Method::FlockerFixed | Method::FlockerInsecure
        )
    }

    fn name(self) -> &'static str {
        match self {
            Method::Raw => "raw TCP (socat -b 1M)",
            Method::Zstd => "zstd -T0 \\| socat",
            Method::Mbuffer => "mbuffer",
            Method::Ssh => "ssh pipe",
            Method::Flocker => "flocker-stream (PSK: AES-256-GCM, verified; adaptive)",
            Method::FlockerFixed => "flocker-stream (PSK, fixed --compress-level 1)",
            Method::FlockerInsecure => "flocker-stream (--insecure, adaptive)",
        }
    }
}

struct Measured {
    mbps: f64,
    ratio: f64,
    /// flocker-stream's bytes per mode, e.g. "raw 92%, zstd:-5 8%".
    modes: String,
}

/// The runs of one cell: the median and the range.
struct Summary {
    median: Measured,
    min: f64,
    max: f64,
    runs: usize,
}

impl Summary {
    fn of(mut runs: Vec<Measured>) -> Self {
        runs.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
        let min = runs.first().map_or(0.0, |r| r.mbps);
        let max = runs.last().map_or(0.0, |r| r.mbps);
        let n = runs.len();
        let median = runs.swap_remove(n / 2);
        Self {
            median,
            min,
            max,
            runs: n,
        }
    }

    fn cell(&self) -> String {
        if self.runs > 1 {
            format!("{:.0} ({:.0}-{:.0})", self.median.mbps, self.min, self.max)
        } else {
            format!("{:.0}", self.median.mbps)
        }
    }
}

struct Row {
    net: Net,
    corpus: &'static str,
    method: Method,
    result: Summary,
    /// The same into a file.
    file: Option<Summary>,
    raw: Option<f64>,
}

/// Waits until something listens on `port` on the receiving side.
fn wait_listening(net: Net, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = net
            .side(true, &format!("ss -Hltn 'sport = :{port}'"))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port}")
}

fn wait_ok(child: Child, what: &str) -> anyhow::Result<String> {
    let out = child
        .wait_with_output()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn measure(
    net: Net,
    method: Method,
    corpus: &Corpus,
    bin: &Path,
    key: &Path,
    ssh: &SshSetup,
    to_file: Option<&Path>,
) -> anyhow::Result<Measured> {
    let host = net.receiver_addr();
    let file = corpus.path.display();
    let (bin, key) = (bin.display(), key.display());
    let out = to_file.map(|p| p.display().to_string());
    let shell_out = out.clone().unwrap_or_else(|| "/dev/null".into());
    let sink = out.map_or_else(|| "-".to_owned(), |p| format!("file:{p}"));
    let (recv_cmd, send_cmd, port) = match method {
        Method::Raw => (
            format!("socat -u -b 1048576 TCP-LISTEN:{PORT},reuseaddr - > {shell_out}"),
            format!("socat -u -b 1048576 FILE:{file} TCP:{host}:{PORT}"),
            PORT,
        ),
        Method::Zstd => (
            format!(
                "socat -u -b 1048576 TCP-LISTEN:{PORT},reuseaddr - | zstd -d -q -c > /dev/null"
            ),
            format!("zstd -T0 -q -c {file} | socat -u -b 1048576 - TCP:{host}:{PORT}"),
            PORT,
        ),
        Method::Mbuffer => (
            format!("mbuffer -q -m 128M -I {PORT} -o /dev/null"),
            format!("mbuffer -q -m 128M -i {file} -O {host}:{PORT}"),
            PORT,
        ),
        Method::Ssh => (
            ssh.server_cmd(host),
            format!("{} 'cat > /dev/null' < {file}", ssh.client_cmd(host)),
            ssh.port,
        ),
        Method::Flocker => (
            format!(
                "{bin} recv --listen {host}:{PORT} --sink {sink} --key-file {key} --progress none > /dev/null"
            ),
            format!(
                "{bin} send --source file:{file} --to {host}:{PORT} --key-file {key} --progress json"
            ),
            PORT,
        ),
        Method::FlockerFixed => (
            format!(
                "{bin} recv --listen {host}:{PORT} --sink {sink} --key-file {key} --progress none > /dev/null"
            ),
            format!(
                "{bin} send --source file:{file} --to {host}:{PORT} --key-file {key} --progress json --compress-level 1"
            ),
            PORT,
        ),
        // The same pipeline without the cipher: what encrypting costs.
        Method::FlockerInsecure => (
            format!(
                "{bin} recv --listen {host}:{PORT} --sink {sink} --insecure --progress none > /dev/null"
            ),
            format!(
                "{bin} send --source file:{file} --to {host}:{PORT} --insecure --progress json"
            ),
            PORT,
        ),
    };
    let mut receiver = net
        .side(true, &recv_cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Err(e) = wait_listening(net, port) {
        let _ = receiver.kill();
        return Err(e);
    }
    let start = Instant::now();
    let sender = net
        .side(false, &send_cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let send_err = wait_ok(sender, "sender");
    let recv_result = if method == Method::Ssh {
        // sshd keeps listening after the session: stop it.
        let _ = Command::new("kill").arg(receiver.id().to_string()).status();
        let _ = receiver.wait();
        Ok(String::new())
    } else {
        wait_ok(receiver, "receiver")
    };
    let elapsed = start.elapsed();
    let send_err = send_err?;
    recv_result?;
    let mbps = corpus.size as f64 / elapsed.as_secs_f64() / 1e6;
    if let Some(p) = to_file {
        let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        ensure!(
            len == corpus.size,
            "{} holds {len} bytes, not {}",
            p.display(),
            corpus.size
        );
    }
    let (ratio, modes) = match method {
        Method::Zstd => (corpus.size as f64 / corpus.zstd_size as f64, String::new()),
        Method::Flocker | Method::FlockerFixed | Method::FlockerInsecure => {
            flocker_summary(&send_err)?
        }
        _ => (1.0, String::new()),
    };
    Ok(Measured { mbps, ratio, modes })
}

/// The ratio and the bytes per mode from flocker-stream's JSON summary.
fn flocker_summary(stderr: &str) -> anyhow::Result<(f64, String)> {
    let v = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .with_context(|| format!("no summary from flocker-stream: {stderr}"))?;
    let ratio = v["ratio"]
        .as_f64()
        .with_context(|| format!("no ratio in {v}"))?;
    let total = v["bytes_in"].as_f64().unwrap_or(0.0).max(1.0);
    let modes = v["modes"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    format!(
                        "{} {:.0}%",
                        m["mode"].as_str().unwrap_or("?"),
                        100.0 * m["bytes_in"].as_f64().unwrap_or(0.0) / total
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    Ok((ratio, modes))
}

/// Peak RSS (VmHWM) of both flocker-stream ends for a `total`-byte stream (the corpus repeated).
fn measure_rss(bin: &Path, key: &Path, corpus: &Corpus, total: u64) -> anyhow::Result<RssResult> {
    let (bin_s, key_s) = (bin.display(), key.display());
    let mut receiver = Command::new(bin)
        .args([
            "recv",
            "--listen",
            "127.0.0.1:17599",
            "--sink",
            "-",
            "--progress",
            "none",
            "--key-file",
        ])
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_listening(Net::Loopback, 17599)?;
    let start = Instant::now();
    let mut sender = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while cat {}; do :; done | head -c {total} | exec {bin_s} send --source - --to 127.0.0.1:17599 --key-file {key_s} --progress none",
            corpus.path.display()
        ))
        .stderr(Stdio::piped())
        .spawn()?;
    // The sender's pid is the shell's child after `exec`; find it by its parent.
    let mut peak = (0u64, 0u64);
    loop {
        peak.1 = peak.1.max(hwm(receiver.id()).unwrap_or(0));
        for pid in children_named(sender.id(), "flocker-stream") {
            peak.0 = peak.0.max(hwm(pid).unwrap_or(0));
        }
        if sender.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = start.elapsed();
    let ok = sender.wait()?.success();
    let _ = receiver.try_wait();
    let rok = receiver.wait()?.success();
    ensure!(
        ok && rok,
        "the RSS run failed (sender ok: {ok}, receiver ok: {rok})"
    );
    Ok(RssResult {
        total,
        sender_kib: peak.0,
        receiver_kib: peak.1,
        mbps: total as f64 / elapsed.as_secs_f64() / 1e6,
    })
}

struct RssResult {
    total: u64,
    sender_kib: u64,
    receiver_kib: u64,
    mbps: f64,
}

fn hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Descendants of `pid` whose command name is `name` (the sender sits under the shell).
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name) {
            out.push(p);
        }
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        stack.extend(
            kids.split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok()),
        );
    }
    out
}

/// A throwaway sshd configuration: host key, client key, authorized_keys.
struct SshSetup {
    dir: PathBuf,
    port: u16,
}

impl SshSetup {
    fn new(work: &Path) -> anyhow::Result<Self> {
        let dir = work.join("ssh");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all("/run/sshd")?; // privilege separation directory
        let d = dir.display();
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {d}/host_key"))?;
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {d}/client_key"))?;
        sh(&format!("cp {d}/client_key.pub {d}/authorized_keys"))?;
        Ok(Self { dir, port: 17522 })
    }

    fn server_cmd(&self, host: &str) -> String {
        let d = self.dir.display();
        let cfg = format!(
            "Port {}\nListenAddress {host}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd-{host}.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n",
            self.port
        );
        let _ = std::fs::write(self.dir.join(format!("sshd-{host}.conf")), cfg);
        format!("exec /usr/sbin/sshd -D -e -f {d}/sshd-{host}.conf")
    }

    fn client_cmd(&self, host: &str) -> String {
        format!(
            "ssh -i {}/client_key -p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR root@{host}",
            self.dir.display(),
            self.port
        )
    }
}

/// Two namespaces joined by a veth pair, each end shaped with `tc` (see [`Lab::shape`]);
/// removed on drop.
struct Lab;

impl Lab {
    /// Shapes both veth ends to `net`'s rate (a token bucket; the burst grows with the rate so
    /// that the bucket holds about 2 ms of traffic).
    fn shape(net: Net) -> anyhow::Result<()> {
        let (rate, burst) = match net {
            Net::Loopback => return Ok(()),
            Net::Shaped1G => ("1gbit", "256kb"),
            Net::Shaped10G => ("10gbit", "2560kb"),
        };
        for (ns, dev) in [(NS_A, "flkb-a"), (NS_B, "flkb-b")] {
            sh(&format!(
                "ip netns exec {ns} tc qdisc replace dev {dev} root tbf rate {rate} burst {burst} latency 20ms"
            ))?;
        }
        Ok(())
    }

    fn build() -> anyhow::Result<Self> {
        let _ = Self::teardown();
        let lab = Lab;
        for cmd in [
            format!("ip netns add {NS_A}"),
            format!("ip netns add {NS_B}"),
            format!("ip link add flkb-a netns {NS_A} type veth peer name flkb-b netns {NS_B}"),
            format!("ip -n {NS_A} addr add {ADDR_A}/24 dev flkb-a"),
            format!("ip -n {NS_B} addr add {ADDR_B}/24 dev flkb-b"),
            format!("ip -n {NS_A} link set lo up"),
            format!("ip -n {NS_B} link set lo up"),
            format!("ip -n {NS_A} link set flkb-a up"),
            format!("ip -n {NS_B} link set flkb-b up"),
            format!(
                "ip netns exec {NS_A} tc qdisc add dev flkb-a root tbf rate 1gbit burst 256kb latency 20ms"
            ),
            format!(
                "ip netns exec {NS_B} tc qdisc add dev flkb-b root tbf rate 1gbit burst 256kb latency 20ms"
            ),
        ] {
            sh(&cmd)?;
        }
        Ok(lab)
    }

    fn teardown() -> anyhow::Result<()> {
        let _ = sh(&format!(
            "ip netns del {NS_A} 2>/dev/null; ip netns del {NS_B} 2>/dev/null; true"
        ));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Self::teardown();
    }
}

fn render(cfg: &Config, rows: &[Row], rss: &RssResult) -> String {
    let mut s = String::new();
    let date = sh("date -u '+%Y-%m-%d %H:%M UTC'").unwrap_or_default();
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").unwrap_or_default();
    let load = sh("cut -d' ' -f1-3 /proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = sh("uname -r").unwrap_or_default();
    let _ = writeln!(s, "# Streamer benchmark\n");
    let _ = writeln!(
        s,
        "{} on {} cores ({}), kernel {}, load average at the end {}; {} MiB per corpus. Machine \
         shared with other work, so numbers are noisy: cells limited by the CPU (loopback, \
         10 Gbit/s) show the median of {} runs and their range. MB/s = 10^6 uncompressed bytes \
         per second, wall time from sender start to both ends exiting, receiver writing to \
         /dev/null; \"to file\": the same into a file on the root file system (flocker-stream's \
         `file:` sink, fsync and rename included; socat `> FILE`, no fsync). Ratio = input / \
         bytes on the wire. flocker-stream: 1 MiB chunks, all cores, pre-shared key (every \
         frame sealed with AES-256-GCM), every chunk verified, adaptive compression unless \
         the row says fixed; \"modes\" = share of the input each mode carried (median run); \
         `--insecure`: the same pipeline with no cipher; zstd pipe: `zstd -T0` (level 3); \
         socat with 1 MiB buffers; mbuffer with 128 MiB; ssh with Debian's default cipher.\n",
        date.trim(),
        cores,
        cpu.trim(),
        kernel.trim(),
        load.trim(),
        cfg.size >> 20,
        cfg.repeat,
    );
    let _ = writeln!(
        s,
        "| network | corpus | method | MB/s | vs raw | to file MB/s | file vs /dev/null | ratio | modes |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let vs = r
            .raw
            .map(|raw| format!("{:.2}x", r.result.median.mbps / raw))
            .unwrap_or_default();
        let (file, file_vs) = match &r.file {
            Some(f) => (
                f.cell(),
                format!("{:.2}x", f.median.mbps / r.result.median.mbps),
            ),
            None => (String::new(), String::new()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            r.net.name(),
            r.corpus,
            r.method.name(),
            r.result.cell(),
            vs,
            file,
            file_vs,
            r.result.median.ratio,
            r.result.median.modes,
        );
    }
    let _ = writeln!(s, "\n## Against the targets\n");
    let find = |net: Net, corpus: &str, m: Method| {
        rows.iter()
            .find(|r| r.net == net && r.corpus == corpus && r.method == m)
    };
    let mbps = |net, corpus, m| find(net, corpus, m).map(|r| r.result.median.mbps);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(f), Some(raw)) = (
        mbps(Net::Loopback, "/usr tar", Method::Flocker),
        mbps(Net::Loopback, "/usr tar", Method::Raw),
    ) {
        let _ = writeln!(
            s,
            "- loopback, /usr tar: flocker-stream {f:.0} MB/s = {:.2}x the raw pipe (target >= 0.9x): {}",
            f / raw,
            verdict(f / raw >= 0.9)
        );
    }
    if let Some(f) = mbps(Net::Shaped1G, "/usr tar", Method::Flocker) {
        let link = Net::Shaped1G.link_mbps().unwrap_or(125.0);
        let _ = writeln!(
            s,
            "- 1 Gbit/s, /usr tar: flocker-stream {f:.0} MB/s = {:.2}x the link (target >= 2x): {}",
            f / link,
            verdict(f / link >= 2.0)
        );
    }
    if let (Some(f), Some(raw), Some(fixed)) = (
        mbps(Net::Shaped10G, "/usr tar", Method::Flocker),
        mbps(Net::Shaped10G, "/usr tar", Method::Raw),
        mbps(Net::Shaped10G, "/usr tar", Method::FlockerFixed),
    ) {
        let best = raw.max(fixed);
        let _ = writeln!(
            s,
            "- 10 Gbit/s, /usr tar: flocker-stream {f:.0} MB/s; raw pipe {raw:.0}, fixed zstd level 1 {fixed:.0}: {:.2}x the better (target >= 1x): {}",
            f / best,
            verdict(f >= best)
        );
    }
    for net in [Net::Loopback, Net::Shaped1G, Net::Shaped10G] {
        if let (Some(f), Some(raw)) = (
            mbps(net, "random", Method::Flocker),
            mbps(net, "random", Method::Raw),
        ) {
            let _ = writeln!(
                s,
                "- {}, random: flocker-stream {f:.0} MB/s = {:.2}x the raw pipe (target >= 0.9x): {}",
                net.name(),
                f / raw,
                verdict(f / raw >= 0.9)
            );
        }
    }
    for r in rows.iter().filter(|r| r.method == Method::Flocker) {
        if let Some(file) = &r.file {
            let x = file.median.mbps / r.result.median.mbps;
            let _ = writeln!(
                s,
                "- {}, {}: to a file {:.0} MB/s = {x:.2}x the same stream to /dev/null (target >= 0.8x): {}",
                r.net.name(),
                r.corpus,
                file.median.mbps,
                verdict(x >= 0.8)
            );
        }
    }
    let limit = 256 * 1024;
    let _ = writeln!(
        s,
        "- peak RSS for a {} MiB stream (/usr tar repeated, loopback, {:.0} MB/s): sender {} MiB, receiver {} MiB (target < 256 MiB): {}",
        rss.total >> 20,
        rss.mbps,
        rss.sender_kib / 1024,
        rss.receiver_kib / 1024,
        verdict(rss.sender_kib < limit && rss.receiver_kib < limit)
    );
    s
}
