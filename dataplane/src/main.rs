//! `flocker-agent`: the per-node daemon (filled by the agent issue).

fn main() {
    eprintln!("flocker-agent: not built yet");
    std::process::exit(2);
}
