//! The fault matrix's link delay (`chaos::delay`, NFQUEUE in place of netem): packets a
//! namespace receives from its peer are held for the delay, every byte still arrives, and
//! stopping the delayer removes its rule.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use flocker_e2e::chaos::delay::Delayer;
use flocker_e2e::netns::{Netns, veth};

const DELAY: Duration = Duration::from_millis(150);

#[test]
#[ignore = "privileged: needs root, network namespaces and iptables with NFQUEUE"]
fn packets_to_the_peer_are_held_for_the_delay_and_all_delivered() -> Result<()> {
    let a = Netns::create("dly-a")?;
    let b = Netns::create("dly-b")?;
    veth(&a, "eth0", &b, "eth0")?;
    for (ns, address) in [(&a, "198.18.9.1/24"), (&b, "198.18.9.2/24")] {
        ns.ip(&["addr", "add", address, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
    }
    let listener = b.run(|| TcpListener::bind("198.18.9.2:0"))??;
    let server: SocketAddr = listener.local_addr()?;
    let received = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got)?;
        Ok(got)
    });
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();

    let delayer = Delayer::start(&b.path(), "198.18.9.1", 7, DELAY)?;
    let sent = data.clone();
    let connected_after = a.run(move || -> std::io::Result<Duration> {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        let connected = started.elapsed();
        stream.write_all(&sent)?;
        stream.shutdown(Shutdown::Write)?;
        Ok(connected)
    })??;
    let got = received
        .join()
        .map_err(|_| anyhow::anyhow!("the server panicked"))??;
    let delayed = delayer.stop()?;

    ensure!(
        connected_after >= DELAY,
        "the SYN was held for the delay: connected after {connected_after:?}"
    );
    ensure!(
        got == data,
        "every byte arrived, in order ({} of {})",
        got.len(),
        data.len()
    );
    ensure!(
        delayed > 3,
        "the connection's packets went through the queue: {delayed}"
    );
    let rules = a
        .command("iptables")
        .args(["-t", "mangle", "-S"])
        .output()?;
    let rules = String::from_utf8(rules.stdout).context("iptables output")?;
    ensure!(!rules.contains("NFQUEUE"), "the rule is gone: {rules}");
    Ok(())
}
