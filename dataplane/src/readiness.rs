//! Whether a started application is ready for traffic, and waiting until it is.
//!
//! Four probes, chosen from the application (`probe_for`):
//! - a health check (compose `healthcheck:`, native `health_check:`): Docker runs it inside
//!   the container and the agent reads Docker's verdict and the check's last output;
//! - an answer check (a health check with `expect`): the agent connects to the port inside
//!   the container's network namespace, sends, and reads the reply ([`crate::answer`]); tried
//!   as often as the port probe, so a move's clients wait no longer than the application does;
//! - otherwise, with ports: the first internal port has a listening TCP socket in the
//!   container's network namespace (read from `/proc/PID/net/tcp` and `tcp6`). A listening
//!   socket is exactly what makes the kernel accept a connection, and reading it works
//!   wherever the agent runs, whatever network namespace Docker's bridge lives in;
//! - otherwise (no ports, or `disable: true`): running is ready.
//!
//! A container that exited is unhealthy whatever its probe.

use std::time::Duration;

use flocker_wire::{Application, Health};

use crate::containers::{ContainerError, ContainerRuntime};

/// The first pause between two looks of a waiting start: a move's clients wait while its
/// application starts, so the first looks come quickly (a port usually listens within tens
/// of milliseconds of the start).
const FIRST_POLL: Duration = Duration::from_millis(5);
/// The longest pause between two looks: the pauses double from [`FIRST_POLL`] up to this.
const MAX_POLL: Duration = Duration::from_millis(200);

/// The pause after the `looks`-th look (counted from 0): 5 ms, 10, 20, ... up to 200 ms.
pub fn poll_delay(looks: u32) -> Duration {
    FIRST_POLL
        .checked_mul(1u32.checked_shl(looks).unwrap_or(u32::MAX))
        .map_or(MAX_POLL, |d| d.min(MAX_POLL))
}

/// Errors of a readiness wait.
#[derive(Debug, thiserror::Error)]
pub enum ReadinessError {
    #[error(
        "application {application} is not ready after {waited_s} s; its health check last said: {output}"
    )]
    TimedOut {
        application: String,
        waited_s: u64,
        output: String,
    },
    #[error("application {application} is unhealthy; its health check last said: {output}")]
    Unhealthy { application: String, output: String },
    #[error(transparent)]
    Container(#[from] ContainerError),
}

/// How readiness is judged for one application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Ready as soon as it runs.
    Running,
    /// Docker's health check verdict.
    DockerCheck,
    /// A listening TCP socket on this port inside the container (the first TCP port).
    Port(u16),
    /// A reply starting as expected on this port inside the container.
    Answer(u16),
}

/// The application's first TCP port inside the container.
fn first_tcp_port(app: &Application) -> Option<u16> {
    app.ports
        .iter()
        .find(|p| p.protocol == flocker_wire::Protocol::Tcp)
        .map(|p| p.internal)
}

pub fn probe_for(app: &Application) -> Probe {
    match &app.health_check {
        Some(check) if check.is_disabled() => Probe::Running,
        Some(check) if check.answer.is_some() => {
            match check
                .answer
                .as_ref()
                .and_then(|a| a.port)
                .or(first_tcp_port(app))
            {
                Some(port) => Probe::Answer(port),
                // Refused by the checks of every request (`checks::application_problems`).
                None => Probe::Running,
            }
        }
        Some(_) => Probe::DockerCheck,
        // The first TCP port: a UDP socket does not listen, so an application with only UDP
        // ports counts as ready once it runs.
        None => first_tcp_port(app).map_or(Probe::Running, Probe::Port),
    }
}

/// One look at a container's readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub health: Health,
    /// What the check (or the probe) said, when not healthy.
    pub output: Option<String>,
}

impl Verdict {
    fn new(health: Health, output: impl Into<String>) -> Self {
        Verdict {
            health,
            output: Some(output.into()),
        }
    }

    fn healthy() -> Self {
        Verdict {
            health: Health::Healthy,
            output: None,
        }
    }
}

/// Looks once at the readiness of `container`, which runs `app`.
pub async fn check(
    runtime: &dyn ContainerRuntime,
    container: &str,
    app: &Application,
) -> Result<Verdict, ContainerError> {
    let details = runtime.details(container).await?;
    if !details.running {
        let code = details
            .exit_code
            .map_or("unknown".to_string(), |c| c.to_string());
        return Ok(Verdict::new(
            Health::Unhealthy,
            format!("the container is not running (exit code {code})"),
        ));
    }
    match probe_for(app) {
        Probe::Running => Ok(Verdict::healthy()),
        Probe::DockerCheck => Ok(match details.health {
            Some(h) if h.status == "healthy" => Verdict::healthy(),
            Some(h) => Verdict {
                health: if h.status == "unhealthy" {
                    Health::Unhealthy
                } else {
                    Health::Starting
                },
                output: Some(
                    h.last_output
                        .map(|o| trim_output(&o))
                        .unwrap_or_else(|| "(no check has finished yet)".into()),
                ),
            },
            None => Verdict::new(Health::Starting, "(Docker reports no health yet)"),
        }),
        Probe::Answer(port) => {
            let (Some(check), Some(answer)) = (
                app.health_check.as_ref(),
                app.health_check.as_ref().and_then(|c| c.answer.as_ref()),
            ) else {
                return Ok(Verdict::healthy());
            };
            let Some(pid) = details.pid else {
                return Ok(Verdict::new(
                    Health::Starting,
                    "the container has no process",
                ));
            };
            let timeout = Duration::from_millis(check.timeout_ms);
            Ok(match runtime.answers(pid, port, answer, timeout).await? {
                Ok(()) => Verdict::healthy(),
                Err(why) => Verdict::new(Health::Starting, trim_output(&why)),
            })
        }
        Probe::Port(port) => Ok(if runtime.listens_on(container, port).await? {
            Verdict::healthy()
        } else {
            Verdict::new(
                Health::Starting,
                format!("nothing listens on port {port} in the container yet"),
            )
        }),
    }
}

/// Waits until `container` is ready, it turns unhealthy, or `timeout` passed. `waiting` is
/// called with the latest output every few seconds (to keep the caller informed).
pub async fn wait_ready(
    runtime: &dyn ContainerRuntime,
    container: &str,
    app: &Application,
    timeout: Duration,
    mut waiting: impl FnMut(&str),
) -> Result<(), ReadinessError> {
    let started = tokio::time::Instant::now();
    let mut last_report = started;
    let mut looks = 0u32;
    loop {
        let verdict = check(runtime, container, app).await?;
        let output = verdict.output.unwrap_or_default();
        match verdict.health {
            Health::Healthy => return Ok(()),
            Health::Unhealthy => {
                return Err(ReadinessError::Unhealthy {
                    application: app.name.clone(),
                    output,
                });
            }
            Health::Starting => {}
        }
        if started.elapsed() >= timeout {
            return Err(ReadinessError::TimedOut {
                application: app.name.clone(),
                waited_s: started.elapsed().as_secs(),
                output,
            });
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            waiting(&output);
            last_report = tokio::time::Instant::now();
        }
        // Never past the bound: the last look comes at the timeout, not a poll later.
        let left = timeout.saturating_sub(started.elapsed());
        tokio::time::sleep(poll_delay(looks).min(left)).await;
        looks = looks.saturating_add(1);
    }
}

/// The longest a start waits: the agent's bound, or longer when the health check itself
/// needs longer to reach a verdict (start period, then `retries` failed checks).
pub fn wait_bound(app: &Application, agent_bound: Duration) -> Duration {
    // An answer check is the agent's own, tried as often as the port probe: the agent's bound.
    let Some(check) = app
        .health_check
        .as_ref()
        .filter(|c| !c.is_disabled() && c.answer.is_none())
    else {
        return agent_bound;
    };
    let per_try = check.interval_ms.saturating_add(check.timeout_ms);
    let verdict_ms = check
        .start_period_ms
        .saturating_add(per_try.saturating_mul(u64::from(check.retries) + 1));
    agent_bound.max(Duration::from_millis(verdict_ms))
}

/// Whether the process `pid`'s network namespace has a TCP socket listening on `port`.
pub fn process_listens_on(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .any(|table| listens_on(&table, port))
}

/// Whether a `/proc/net/tcp`-style table has a socket listening on `port`.
pub fn listens_on(table: &str, port: u16) -> bool {
    crate::listeners::parse_listening(table).contains(&port)
}

/// Health check output is the application's: keep it short and on few lines.
fn trim_output(output: &str) -> String {
    const MAX: usize = 400;
    let trimmed = output.trim();
    match trimmed.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &trimmed[..cut]),
        None => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::{ContainerDetails, ContainerSpec, DockerHealth, ManagedContainer};
    use flocker_wire::{HealthCheck, Image, PortMap, RestartPolicy};
    use std::sync::Mutex;

    /// A container that starts listening (or turns healthy) at the `ready_at`-th look.
    struct Scripted {
        looks: Mutex<u32>,
        ready_at: Option<u32>,
        docker_verdict: Option<(&'static str, &'static str)>,
    }

    impl Scripted {
        fn look(&self) -> u32 {
            let mut n = self.looks.lock().expect("lock");
            *n += 1;
            *n
        }
    }

    #[async_trait::async_trait]
    impl ContainerRuntime for Scripted {
        async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
            Ok(vec![])
        }
        async fn ensure_image(&self, _: &str) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn create_and_start(&self, _: &ContainerSpec) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn create(&self, _: &ContainerSpec) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn start(&self, _: &str) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn stop_and_remove(&self, _: &str) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn stop(&self, _: &str) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn details(&self, _: &str) -> Result<ContainerDetails, ContainerError> {
            Ok(ContainerDetails {
                running: true,
                pid: Some(1),
                health: self.docker_verdict.map(|(status, output)| DockerHealth {
                    status: status.into(),
                    last_output: Some(output.into()),
                }),
                ..ContainerDetails::default()
            })
        }
        async fn disable_docker_restart(&self, _: &str) -> Result<(), ContainerError> {
            Ok(())
        }
        async fn listens_on(&self, _: &str, _: u16) -> Result<bool, ContainerError> {
            let n = self.look();
            Ok(self.ready_at.is_some_and(|at| n >= at))
        }
        /// Answers `-LOADING` until the `ready_at`-th look, then what the check expects.
        async fn answers(
            &self,
            _: u32,
            port: u16,
            check: &flocker_wire::AnswerCheck,
            _: Duration,
        ) -> Result<Result<(), String>, ContainerError> {
            let n = self.look();
            Ok(if self.ready_at.is_some_and(|at| n >= at) {
                Ok(())
            } else {
                Err(format!(
                    "port {port} answered \"-LOADING\" (expected {:?})",
                    check.expect
                ))
            })
        }
    }

    fn scripted(
        ready_at: Option<u32>,
        docker_verdict: Option<(&'static str, &'static str)>,
    ) -> Scripted {
        Scripted {
            looks: Mutex::new(0),
            ready_at,
            docker_verdict,
        }
    }

    #[tokio::test]
    async fn a_start_waits_until_the_port_listens() {
        let runtime = scripted(Some(3), None);
        let a = app(&[80], None);
        wait_ready(&runtime, "c", &a, Duration::from_secs(30), |_| {})
            .await
            .expect("ready at the third look");
        assert_eq!(*runtime.looks.lock().expect("lock"), 3);
    }

    #[tokio::test]
    async fn a_port_that_never_listens_times_out_saying_so() {
        let runtime = scripted(None, None);
        let err = wait_ready(
            &runtime,
            "c",
            &app(&[80], None),
            Duration::from_millis(300),
            |_| {},
        )
        .await
        .expect_err("never ready");
        assert!(
            err.to_string().contains("nothing listens on port 80"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unhealthy_check_fails_at_once_with_its_output() {
        let runtime = scripted(None, Some(("unhealthy", "not ready yet\n")));
        let check = HealthCheck::with_test(vec!["CMD-SHELL".into(), "exit 1".into()]);
        let err = wait_ready(
            &runtime,
            "c",
            &app(&[80], Some(check)),
            Duration::from_secs(30),
            |_| {},
        )
        .await
        .expect_err("unhealthy");
        assert!(
            matches!(err, ReadinessError::Unhealthy { ref output, .. } if output == "not ready yet"),
            "{err}"
        );
    }

    fn redis_check(port: Option<u16>) -> HealthCheck {
        HealthCheck::with_answer(flocker_wire::AnswerCheck {
            send: "PING\r\n".into(),
            expect: "+PONG".into(),
            port,
        })
    }

    #[tokio::test]
    async fn an_answer_check_waits_for_the_expected_reply_and_reports_the_last_one() {
        let runtime = scripted(Some(4), None);
        let a = app(&[6379], Some(redis_check(None)));
        wait_ready(&runtime, "c", &a, Duration::from_secs(30), |_| {})
            .await
            .expect("ready at the fourth look");
        assert_eq!(*runtime.looks.lock().expect("lock"), 4);
        let never = scripted(None, None);
        let err = wait_ready(&never, "c", &a, Duration::from_millis(300), |_| {})
            .await
            .expect_err("never answers");
        assert!(
            matches!(err, ReadinessError::TimedOut { ref output, .. } if output.contains("-LOADING")),
            "{err}"
        );
    }

    #[test]
    fn polls_start_fast_and_back_off_to_a_bound() {
        assert_eq!(poll_delay(0), Duration::from_millis(5));
        assert_eq!(poll_delay(1), Duration::from_millis(10));
        assert_eq!(poll_delay(3), Duration::from_millis(40));
        assert_eq!(poll_delay(6), Duration::from_millis(200));
        assert_eq!(poll_delay(40), Duration::from_millis(200));
        assert_eq!(poll_delay(u32::MAX), Duration::from_millis(200));
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:18EB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
";

    #[test]
    fn a_listening_socket_counts_and_a_connection_does_not() {
        assert!(listens_on(TCP, 8080));
        // 0x18EB = 6379 is an established connection's local port, not a listener.
        assert!(!listens_on(TCP, 6379));
        assert!(!listens_on("", 80));
        assert!(!listens_on("header\ngarbage line\n", 80));
    }

    fn app(ports: &[u16], check: Option<HealthCheck>) -> Application {
        Application {
            name: "a".into(),
            image: Image {
                repository: "x".into(),
                tag: "latest".into(),
            },
            ports: ports.iter().map(|&p| PortMap::tcp(p, p)).collect(),
            volumes: Default::default(),
            volume: None,
            environment: Default::default(),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: check,
        }
    }

    #[test]
    fn the_probe_follows_the_application() {
        assert_eq!(probe_for(&app(&[80, 443], None)), Probe::Port(80));
        assert_eq!(probe_for(&app(&[], None)), Probe::Running);
        assert_eq!(
            probe_for(&app(&[80], Some(HealthCheck::disabled()))),
            Probe::Running
        );
        assert_eq!(
            probe_for(&app(&[6379], Some(redis_check(None)))),
            Probe::Answer(6379)
        );
        assert_eq!(
            probe_for(&app(&[80], Some(redis_check(Some(9000))))),
            Probe::Answer(9000)
        );
        // An answer check's tries are the agent's: its bound, not one from Docker's timings.
        assert_eq!(
            wait_bound(
                &app(&[6379], Some(redis_check(None))),
                Duration::from_secs(7)
            ),
            Duration::from_secs(7)
        );
        let check = HealthCheck::with_test(vec!["CMD".into(), "true".into()]);
        assert_eq!(probe_for(&app(&[80], Some(check))), Probe::DockerCheck);
    }

    #[test]
    fn the_wait_outlasts_what_the_check_needs_for_a_verdict() {
        let mut check = HealthCheck::with_test(vec!["CMD".into(), "true".into()]);
        check.start_period_ms = 100_000;
        check.interval_ms = 10_000;
        check.timeout_ms = 5_000;
        check.retries = 3;
        let bound = wait_bound(&app(&[], Some(check)), Duration::from_secs(60));
        assert_eq!(bound, Duration::from_secs(100 + 15 * 4));
        assert_eq!(
            wait_bound(&app(&[80], None), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }
}
