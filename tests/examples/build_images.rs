//! Builds the example images into a Docker daemon: `build_images unix:///path/to/docker.sock`.

fn main() -> anyhow::Result<()> {
    let host = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    flocker_e2e::images::ensure_images(&host)
}
