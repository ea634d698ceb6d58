//! The agent's metrics in the Prometheus text exposition format (version 0.0.4), served on
//! an address of their own (`--metrics-listen`, off by default) as plain HTTP `GET /metrics`.
//!
//! The set is fixed and small, so it is written here rather than pulled from a metrics
//! crate: [`Metrics`] holds every series behind one mutex (a few updates per converge
//! action, never per packet), and [`Metrics::render`] writes the exposition.
//!
//! Series: converge actions by kind and result, move phase durations (histogram), volume
//! bytes sent and received, replication lag per volume and standby, routes programmed and
//! route apply latency (histogram), restarts made by the supervisor, readiness waits, and
//! build info. The eBPF backend's flow-map occupancy and translation-port exhaustion are
//! not exported: `flocker-routing` keeps no count of either, and walking an LRU map of
//! 64 Ki entries per scrape is not cheap.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Bucket bounds (seconds) for move phases: a handoff takes milliseconds, a first push of a
/// large volume many minutes.
const PHASE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Bucket bounds (seconds) for route table applies, which take about a millisecond.
const ROUTE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bound, observations at or below it (not cumulative; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Label pairs, in the order they are rendered.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default)]
struct Series {
    converge_actions: BTreeMap<(String, &'static str), u64>,
    move_phases: BTreeMap<String, Histogram>,
    ready_waits: BTreeMap<&'static str, Histogram>,
    sent_bytes: u64,
    received_bytes: u64,
    /// Per (volume, standby): the Unix time of the last push that reached it.
    replicated_at: BTreeMap<(String, String), f64>,
    routes_programmed: u64,
    route_applies: Option<Histogram>,
    route_apply_failures: u64,
    restarts: BTreeMap<String, u64>,
    /// The eBPF TC program's own figures, when it is the routing backend.
    dataplane: Option<flocker_routing::ebpf::DataplaneStats>,
}

/// Every metric of one agent.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<Series>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics::default())
    }

    fn with(&self, f: impl FnOnce(&mut Series)) {
        if let Ok(mut s) = self.series.lock() {
            f(&mut s);
        }
    }

    /// A converge action finished; `kind` is the action's wire name (`push-volume`, ...).
    pub fn converge_action(&self, kind: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.with(|s| {
            *s.converge_actions
                .entry((kind.to_string(), result))
                .or_default() += 1
        });
    }

    /// One phase of a move on this node: `pre-copy`, `final-push`, `handoff`, `receive`,
    /// `start` (until ready).
    pub fn move_phase(&self, phase: &str, took: Duration) {
        self.with(|s| {
            s.move_phases
                .entry(phase.to_string())
                .or_insert_with(|| Histogram::new(PHASE_BUCKETS))
                .observe(took.as_secs_f64());
        });
    }

    /// How long a start waited for its application to be ready, and how it ended.
    pub fn ready_wait(&self, ready: bool, took: Duration) {
        let result = if ready { "ready" } else { "not-ready" };
        self.with(|s| {
            s.ready_waits
                .entry(result)
                .or_insert_with(|| Histogram::new(PHASE_BUCKETS))
                .observe(took.as_secs_f64());
        });
    }

    pub fn sent(&self, bytes: u64) {
        self.with(|s| s.sent_bytes = s.sent_bytes.saturating_add(bytes));
    }

    pub fn received(&self, bytes: u64) {
        self.with(|s| s.received_bytes = s.received_bytes.saturating_add(bytes));
    }

    /// A replication push of `volume` reached `standby` now.
    pub fn replicated(&self, volume: &str, standby: &str) {
        let now = unix_now();
        self.with(|s| {
            s.replicated_at
                .insert((volume.to_string(), standby.to_string()), now);
        });
    }

    /// A route table was applied (or failed to be) in `took`.
    pub fn routes_applied(&self, routes: Option<usize>, took: Duration) {
        self.with(|s| {
            match routes {
                Some(n) => s.routes_programmed = n as u64,
                None => s.route_apply_failures += 1,
            }
            s.route_applies
                .get_or_insert_with(|| Histogram::new(ROUTE_BUCKETS))
                .observe(took.as_secs_f64());
        });
    }

    /// The supervisor restarted `application`'s container.
    pub fn restarted(&self, application: &str) {
        self.with(|s| *s.restarts.entry(application.to_string()).or_default() += 1);
    }

    /// The eBPF data plane's figures, sampled by the agent (see `daemon`).
    pub fn dataplane(&self, stats: flocker_routing::ebpf::DataplaneStats) {
        self.with(|s| s.dataplane = Some(stats));
    }

    /// The exposition, text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(s) = self.series.lock() else {
            return out;
        };
        family(
            &mut out,
            "flocker_build_info",
            "gauge",
            "The agent's version (always 1).",
        );
        sample(
            &mut out,
            "flocker_build_info",
            &vec![("version", env!("CARGO_PKG_VERSION").to_string())],
            1.0,
        );
        family(
            &mut out,
            "flocker_converge_actions_total",
            "counter",
            "Converge actions carried out, by kind and result.",
        );
        for ((kind, result), n) in &s.converge_actions {
            let labels = vec![("kind", kind.clone()), ("result", (*result).to_string())];
            sample(
                &mut out,
                "flocker_converge_actions_total",
                &labels,
                *n as f64,
            );
        }
        family(
            &mut out,
            "flocker_move_phase_duration_seconds",
            "histogram",
            "Duration of each phase of a move on this node.",
        );
        for (phase, h) in &s.move_phases {
            histogram(
                &mut out,
                "flocker_move_phase_duration_seconds",
                &vec![("phase", phase.clone())],
                h,
            );
        }
        family(
            &mut out,
            "flocker_ready_wait_duration_seconds",
            "histogram",
            "Time from starting an application's container to its readiness (or giving up).",
        );
        for (result, h) in &s.ready_waits {
            histogram(
                &mut out,
                "flocker_ready_wait_duration_seconds",
                &vec![("result", (*result).to_string())],
                h,
            );
        }
        counter(
            &mut out,
            "flocker_volume_sent_bytes_total",
            "Volume stream bytes pushed to peers (moves and replication).",
            s.sent_bytes,
        );
        counter(
            &mut out,
            "flocker_volume_received_bytes_total",
            "Volume stream bytes received from peers.",
            s.received_bytes,
        );
        family(
            &mut out,
            "flocker_replication_lag_seconds",
            "gauge",
            "Seconds since the last replication push of a volume reached a standby.",
        );
        let now = unix_now();
        for ((volume, standby), at) in &s.replicated_at {
            let labels = vec![("volume", volume.clone()), ("standby", standby.clone())];
            sample(
                &mut out,
                "flocker_replication_lag_seconds",
                &labels,
                (now - at).max(0.0),
            );
        }
        family(
            &mut out,
            "flocker_routes_programmed",
            "gauge",
            "Entries of this node's route table as last applied.",
        );
        sample(
            &mut out,
            "flocker_routes_programmed",
            &vec![],
            s.routes_programmed as f64,
        );
        family(
            &mut out,
            "flocker_route_apply_duration_seconds",
            "histogram",
            "Time to apply a route table to the routing backend.",
        );
        let empty = Histogram::new(ROUTE_BUCKETS);
        histogram(
            &mut out,
            "flocker_route_apply_duration_seconds",
            &vec![],
            s.route_applies.as_ref().unwrap_or(&empty),
        );
        counter(
            &mut out,
            "flocker_route_apply_failures_total",
            "Route table applies the routing backend refused.",
            s.route_apply_failures,
        );
        family(
            &mut out,
            "flocker_container_restarts_total",
            "counter",
            "Restarts of exited containers by the agent's supervisor, per application.",
        );
        for (app, n) in &s.restarts {
            sample(
                &mut out,
                "flocker_container_restarts_total",
                &vec![("application", app.clone())],
                *n as f64,
            );
        }
        if let Some(d) = s.dataplane {
            family(
                &mut out,
                "flocker_ebpf_flows",
                "gauge",
                "Connections the eBPF TC program tracks now (its flow map holds 262144).",
            );
            sample(&mut out, "flocker_ebpf_flows", &Vec::new(), d.flows as f64);
            family(
                &mut out,
                "flocker_ebpf_snat_exhausted_total",
                "counter",
                "New connections left to the kernel because no translated source port was free.",
            );
            sample(
                &mut out,
                "flocker_ebpf_snat_exhausted_total",
                &Vec::new(),
                d.snat_exhausted as f64,
            );
            family(
                &mut out,
                "flocker_ebpf_flows_started_total",
                "counter",
                "Flows from outside the eBPF TC program started (not left to nftables), per family and protocol.",
            );
            let started = d.started;
            for (family_label, protocol, n) in [
                ("ipv4", "tcp", started.ipv4_tcp),
                ("ipv4", "udp", started.ipv4_udp),
                ("ipv6", "tcp", started.ipv6_tcp),
                ("ipv6", "udp", started.ipv6_udp),
            ] {
                sample(
                    &mut out,
                    "flocker_ebpf_flows_started_total",
                    &vec![
                        ("family", family_label.to_owned()),
                        ("protocol", protocol.to_owned()),
                    ],
                    n as f64,
                );
            }
        }
        out
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    sample(out, name, &vec![], value as f64);
}

fn sample(out: &mut String, name: &str, labels: &Labels, value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", number(value));
}

fn histogram(out: &mut String, name: &str, labels: &Labels, h: &Histogram) {
    let mut cumulative = 0;
    for (bound, n) in h.bounds.iter().zip(&h.counts) {
        cumulative += n;
        let mut with_le = labels.clone();
        with_le.push(("le", number(*bound)));
        sample(out, &format!("{name}_bucket"), &with_le, cumulative as f64);
    }
    let mut inf = labels.clone();
    inf.push(("le", "+Inf".to_string()));
    sample(out, &format!("{name}_bucket"), &inf, h.count as f64);
    sample(out, &format!("{name}_sum"), labels, h.sum);
    sample(out, &format!("{name}_count"), labels, h.count as f64);
}

/// A sample value as Prometheus writes it (integers without a fraction).
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Binds the metrics address (before the agent reports itself started).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` over plain HTTP/1 until aborted. Anything else is 404. Each
/// connection is bounded: 10 s to send its request headers.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(Duration::from_secs(60), connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics connection cut after 60 s"),
            }
        });
    }
}

fn answer(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
            (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.render(),
            )
        } else {
            (
                404,
                "text/plain",
                "only GET /metrics is served here\n".to_string(),
            )
        };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_figures_appear_once_sampled() {
        let metrics = Metrics::new();
        assert!(!metrics.render().contains("flocker_ebpf"));
        metrics.dataplane(flocker_routing::ebpf::DataplaneStats {
            flows: 12,
            snat_exhausted: 3,
            started: flocker_routing::ebpf::FlowsStarted {
                ipv6_udp: 7,
                ..Default::default()
            },
        });
        let text = metrics.render();
        assert!(text.contains("\nflocker_ebpf_flows 12\n"), "{text}");
        assert!(
            text.contains("\nflocker_ebpf_snat_exhausted_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE flocker_ebpf_snat_exhausted_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nflocker_ebpf_flows_started_total{family=\"ipv6\",protocol=\"udp\"} 7\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn exposition_has_types_cumulative_buckets_and_escaped_labels() {
        let m = Metrics::default();
        m.converge_action("push-volume", true);
        m.converge_action("push-volume", true);
        m.converge_action("start", false);
        m.move_phase("handoff", Duration::from_millis(30));
        m.move_phase("handoff", Duration::from_secs(3));
        m.sent(1024);
        m.restarted("we\"b");
        m.routes_applied(Some(4), Duration::from_micros(700));
        let text = m.render();
        for line in [
            "# TYPE flocker_converge_actions_total counter",
            "flocker_converge_actions_total{kind=\"push-volume\",result=\"ok\"} 2",
            "flocker_converge_actions_total{kind=\"start\",result=\"failed\"} 1",
            "# TYPE flocker_move_phase_duration_seconds histogram",
            "flocker_move_phase_duration_seconds_bucket{phase=\"handoff\",le=\"0.05\"} 1",
            "flocker_move_phase_duration_seconds_bucket{phase=\"handoff\",le=\"2.5\"} 1",
            "flocker_move_phase_duration_seconds_bucket{phase=\"handoff\",le=\"5\"} 2",
            "flocker_move_phase_duration_seconds_bucket{phase=\"handoff\",le=\"+Inf\"} 2",
            "flocker_move_phase_duration_seconds_count{phase=\"handoff\"} 2",
            "flocker_move_phase_duration_seconds_sum{phase=\"handoff\"} 3.03",
            "flocker_volume_sent_bytes_total 1024",
            "flocker_container_restarts_total{application=\"we\\\"b\"} 1",
            "flocker_routes_programmed 4",
            "flocker_route_apply_duration_seconds_bucket{le=\"0.001\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
