//! `cargo xtask bench streamer`: moves the same data with a raw TCP pipe (socat),
//! `zstd -T0 | socat`, mbuffer, an ssh pipe (sshd on the receiving side) and `flocker-stream`
//! (pre-shared key: every frame encrypted, every byte verified), on two corpora (random bytes; a tar of /usr), over
//! loopback and over a veth pair between two network namespaces shaped to 1 Gbit/s with `tc`.
//! Then the peak RSS of both `flocker-stream` ends for a large stream.
//!
//! Arguments: `--size BYTES[K|M|G]` per corpus (default 1G), `--rss-size BYTES` for the memory
//! run (default 4G), `--repeat N` loopback runs per cell, median reported (default 3),
//! `--skip-netns`, `--out PATH` (default `bench/results/streamer.md`).
//! Each transfer ends on the receiver in /dev/null; MB/s counts uncompressed input bytes
//! (10^6 bytes) over the wall time from starting the sender to both ends exiting.

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
    netns: bool,
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
        netns: true,
        repeat: 3,
        out: workspace().join("bench/results/streamer.md"),
        bin: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size" => cfg.size = parse_size(it.next().context("--size BYTES")?)?,
            "--rss-size" => cfg.rss_size = parse_size(it.next().context("--rss-size BYTES")?)?,
            "--skip-netns" => cfg.netns = false,
            "--repeat" => cfg.repeat = it.next().context("--repeat N")?.parse()?,
            "--out" => cfg.out = it.next().context("--out PATH")?.into(),
            "--bin" => cfg.bin = Some(it.next().context("--bin PATH")?.into()),
            other => bail!(
                "unknown argument {other:?} (expected --size, --rss-size, --repeat, --skip-netns, --out, --bin)"
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
    let work = tempfile::Builder::new()
        .prefix("flocker-bench-streamer")
        .tempdir()?;
    let corpora = make_corpora(work.path(), cfg.size)?;
    let key = work.path().join("psk");
    std::fs::write(&key, [0x5au8; 32])?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let ssh = SshSetup::new(work.path())?;

    let mut rows = Vec::new();
    let mut nets = vec![Net::Loopback];
    let _lab = if cfg.netns {
        let lab = Lab::build()?;
        nets.push(Net::Shaped);
        Some(lab)
    } else {
        None
    };
    for net in &nets {
        for corpus in &corpora {
            let mut raw_rate = None;
            for method in Method::ALL {
                eprintln!("{} / {} / {}", net.name(), corpus.name, method.name());
                // Loopback runs are short and sensitive to other load on the machine: take the
                // median of several. Shaped runs are bound by the link: one is enough.
                let n = if *net == Net::Loopback {
                    cfg.repeat.max(1)
                } else {
                    1
                };
                let mut runs = Vec::new();
                for _ in 0..n {
                    runs.push(
                        measure(*net, method, corpus, &bin, &key, &ssh).with_context(|| {
                            format!("{} / {} / {}", net.name(), corpus.name, method.name())
                        })?,
                    );
                }
                runs.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
                let r = runs.swap_remove(runs.len() / 2);
                if method == Method::Raw {
                    raw_rate = Some(r.mbps);
                }
                rows.push(Row {
                    net: *net,
                    corpus: corpus.name,
                    method,
                    result: r,
                    raw: raw_rate,
                });
            }
        }
    }
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
    Shaped,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Loopback => "loopback",
            Net::Shaped => "veth 1 Gbit/s",
        }
    }

    /// Wraps a shell command to run on the sending or receiving side.
    fn side(self, receiver: bool, cmd: &str) -> Command {
        let mut c = match self {
            Net::Loopback => Command::new("sh"),
            Net::Shaped => {
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
            Net::Shaped => ADDR_B,
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
    FlockerInsecure,
}

impl Method {
    const ALL: [Method; 6] = [
        Method::Raw,
        Method::Zstd,
        Method::Mbuffer,
        Method::Ssh,
        Method::Flocker,
        Method::FlockerInsecure,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Raw => "raw TCP (socat -b 1M)",
            Method::Zstd => "zstd -T0 \\| socat",
            Method::Mbuffer => "mbuffer",
            Method::Ssh => "ssh pipe",
            Method::Flocker => "flocker-stream (PSK: AES-256-GCM, verified)",
            Method::FlockerInsecure => "flocker-stream (--insecure: cleartext, checksummed)",
        }
    }
}

struct Measured {
    mbps: f64,
    ratio: f64,
}

struct Row {
    net: Net,
    corpus: &'static str,
    method: Method,
    result: Measured,
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
) -> anyhow::Result<Measured> {
    let host = net.receiver_addr();
    let file = corpus.path.display();
    let (bin, key) = (bin.display(), key.display());
    let (recv_cmd, send_cmd, port) = match method {
        Method::Raw => (
            format!("socat -u -b 1048576 TCP-LISTEN:{PORT},reuseaddr - > /dev/null"),
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
                "{bin} recv --listen {host}:{PORT} --sink - --key-file {key} --progress none > /dev/null"
            ),
            format!(
                "{bin} send --source file:{file} --to {host}:{PORT} --key-file {key} --progress json"
            ),
            PORT,
        ),
        // The same pipeline without the cipher: what encrypting costs.
        Method::FlockerInsecure => (
            format!(
                "{bin} recv --listen {host}:{PORT} --sink - --insecure --progress none > /dev/null"
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
    let ratio = match method {
        Method::Zstd => corpus.size as f64 / corpus.zstd_size as f64,
        Method::Flocker | Method::FlockerInsecure => flocker_ratio(&send_err)?,
        _ => 1.0,
    };
    Ok(Measured { mbps, ratio })
}

fn flocker_ratio(stderr: &str) -> anyhow::Result<f64> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .and_then(|v| v["ratio"].as_f64())
        .with_context(|| format!("no summary from flocker-stream: {stderr}"))
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

/// Two namespaces joined by a veth pair, each end shaped to 1 Gbit/s; removed on drop.
struct Lab;

impl Lab {
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
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = sh("uname -r").unwrap_or_default();
    let _ = writeln!(s, "# Streamer benchmark\n");
    let _ = writeln!(
        s,
        "{} on {} cores ({}), kernel {}; {} MiB per corpus. Machine shared with other work, so \
         numbers are noisy. MB/s = 10^6 uncompressed bytes per second, wall time from sender \
         start to both ends exiting (loopback: median of {} runs; 1 Gbit/s link: one run), receiver writing to /dev/null. Ratio = input / bytes on \
         the wire. flocker-stream: default settings (1 MiB chunks, zstd level 1, all cores), \
         pre-shared key (wire format v2: every frame sealed with AES-256-GCM), every chunk \
         verified; its `--insecure` row is the same pipeline with no cipher (cleartext, keyed \
         BLAKE3 checksums), to show what encrypting costs; zstd pipe: `zstd -T0` (level 3); socat with 1 MiB \
         buffers (its default 8 KiB is about half as fast on loopback); mbuffer with 128 MiB; ssh \
         with Debian's default cipher.\n",
        date.trim(),
        cores,
        cpu.trim(),
        kernel.trim(),
        cfg.size >> 20,
        cfg.repeat,
    );
    let _ = writeln!(s, "| network | corpus | method | MB/s | ratio | vs raw |");
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|");
    for r in rows {
        let vs = r
            .raw
            .map(|raw| format!("{:.2}x", r.result.mbps / raw))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.2} | {} |",
            r.net.name(),
            r.corpus,
            r.method.name(),
            r.result.mbps,
            r.result.ratio,
            vs
        );
    }
    let _ = writeln!(s, "\n## Against the targets\n");
    let find = |net: Net, corpus: &str, m: Method| {
        rows.iter()
            .find(|r| r.net == net && r.corpus == corpus && r.method == m)
            .map(|r| r.result.mbps)
    };
    if let (Some(f), Some(raw)) = (
        find(Net::Loopback, "random", Method::Flocker),
        find(Net::Loopback, "random", Method::Raw),
    ) {
        let _ = writeln!(
            s,
            "- loopback, random data: flocker-stream {f:.0} MB/s = {:.2}x the raw pipe (target >= 0.9x): {}",
            f / raw,
            if f / raw >= 0.9 { "met" } else { "MISSED" }
        );
    }
    if let (Some(f), Some(ssh)) = (
        find(Net::Shaped, "/usr tar", Method::Flocker),
        find(Net::Shaped, "/usr tar", Method::Ssh),
    ) {
        let link = 125.0; // 1 Gbit/s in MB/s
        let _ = writeln!(
            s,
            "- 1 Gbit/s link, /usr tar: flocker-stream {f:.0} MB/s = {:.2}x the link rate (target >= 1.8x): {}; {:.2}x the ssh pipe (target >= 2x): {}",
            f / link,
            if f / link >= 1.8 { "met" } else { "MISSED" },
            f / ssh,
            if f / ssh >= 2.0 { "met" } else { "MISSED" }
        );
    }
    let limit = 256 * 1024;
    let _ = writeln!(
        s,
        "- peak RSS for a {} MiB stream (/usr tar repeated, loopback, {:.0} MB/s): sender {} MiB, receiver {} MiB (target < 256 MiB): {}",
        rss.total >> 20,
        rss.mbps,
        rss.sender_kib / 1024,
        rss.receiver_kib / 1024,
        if rss.sender_kib < limit && rss.receiver_kib < limit {
            "met"
        } else {
            "MISSED"
        }
    );
    s
}
