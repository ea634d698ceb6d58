//! The health check of an application, written the same way in both dialects: compose's
//! `healthcheck:` and the native `health_check:` take the keys `test`, `interval`,
//! `timeout`, `retries`, `start_period` and `disable`, with compose's meanings.
//!
//! `test` is a string (run by `/bin/sh -c` in the container, Docker's `CMD-SHELL`) or a list
//! starting with `CMD` (program and arguments, no shell), `CMD-SHELL` (one shell command) or
//! `NONE` (no check). `disable: true` is the same as `test: [NONE]`: the application counts
//! as ready as soon as it runs, instead of when its first port accepts connections.
//!
//! Instead of `test`, a Flocker extension: `expect` (with `send`, `port`, `timeout`) is an
//! answer check the agent makes itself (`flocker_wire::AnswerCheck`): ready once a connection
//! to the port inside the container, after `send`, reads a reply starting with `expect`.

use flocker_wire::checks::{MAX_ANSWER_BYTES, MAX_ANSWER_TIMEOUT_MS};
use flocker_wire::{AnswerCheck, HealthCheck};

use super::fields::{Sink, check_keys, expect_map, find, join};
use super::yaml::{Entry, Kind, Node, Resolved};

pub const HEALTH_KEYS: &[&str] = &[
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "disable",
    "send",
    "expect",
    "port",
];

/// The keys of an answer check (the agent connects and reads the reply).
const ANSWER_KEYS: &[&str] = &["send", "expect", "port"];
/// The keys that only a `test` command takes.
const COMMAND_ONLY_KEYS: &[&str] = &["test", "interval", "retries", "start_period", "disable"];

/// The longest interval, timeout or start period accepted (one hour): a check slower than
/// that would hold a deploy for hours.
const MAX_DURATION_MS: u64 = 3_600_000;
/// The most retries accepted.
const MAX_RETRIES: u32 = 100;

/// Parses a `healthcheck:` / `health_check:` mapping at `path`, of an application with a TCP
/// port or not (an answer check without `port` checks the first TCP port).
pub fn health_check(
    sink: &mut Sink<'_>,
    node: &Node,
    path: &str,
    has_tcp_port: bool,
) -> Option<HealthCheck> {
    let before = sink.diagnostics.len();
    let fields = expect_map(
        sink,
        node,
        path,
        "a mapping with `test` (and optionally interval, timeout, retries, start_period, disable), or with `expect` (and optionally send, port, timeout)",
    )?;
    check_keys(sink, fields, HEALTH_KEYS, path);
    if ANSWER_KEYS.iter().any(|k| find(fields, k).is_some()) {
        return answer_check(sink, node, fields, path, has_tcp_port);
    }
    let disable = match find(fields, "disable") {
        Some(e) => match e.value.as_scalar().map(|s| s.resolve()) {
            Some(Resolved::Bool(b)) => b,
            _ => {
                sink.error(
                    e.value.mark,
                    join(path, "disable"),
                    format!("expected true or false, found {}", e.value.describe()),
                );
                false
            }
        },
        None => false,
    };
    let test = match find(fields, "test") {
        Some(e) => test(sink, &e.value, &join(path, "test")),
        None if disable => Some(vec!["NONE".to_owned()]),
        None => {
            sink.error(
                node.mark,
                path,
                "missing key `test` (a command such as \"redis-cli ping\"), `expect` (an answer the agent reads), or `disable: true`",
            );
            None
        }
    };
    // Every key is checked even when `test` is wrong: all problems are reported at once.
    let mut check = HealthCheck::with_test(test.clone().unwrap_or_default());
    if disable {
        check.test = vec!["NONE".to_owned()];
    }
    duration(sink, fields, path, "interval", &mut check.interval_ms);
    duration(sink, fields, path, "timeout", &mut check.timeout_ms);
    duration(
        sink,
        fields,
        path,
        "start_period",
        &mut check.start_period_ms,
    );
    if let Some(e) = find(fields, "retries") {
        match e.value.as_int().and_then(|i| u32::try_from(i).ok()) {
            Some(n) if (1..=MAX_RETRIES).contains(&n) => check.retries = n,
            _ => sink.error(
                e.value.mark,
                join(path, "retries"),
                format!(
                    "expected an integer from 1 to {MAX_RETRIES}, found {}",
                    e.value.describe()
                ),
            ),
        }
    }
    for (key, value) in [
        ("interval", check.interval_ms),
        ("timeout", check.timeout_ms),
    ] {
        if value == 0 && find(fields, key).is_some() {
            let mark = find(fields, key).map_or(node.mark, |e| e.value.mark);
            sink.error(mark, join(path, key), "must be longer than 0");
        }
    }
    (sink.diagnostics.len() == before && test.is_some()).then_some(check)
}

/// An answer check: `expect` (required), `send`, `port` and `timeout` (one try's bound,
/// 1 s by default); the keys of a `test` command are refused beside them.
fn answer_check(
    sink: &mut Sink<'_>,
    node: &Node,
    fields: &[Entry],
    path: &str,
    has_tcp_port: bool,
) -> Option<HealthCheck> {
    let before = sink.diagnostics.len();
    for key in COMMAND_ONLY_KEYS {
        if let Some(e) = find(fields, key) {
            sink.error(
                e.key_mark,
                join(path, key),
                format!(
                    "`{key}` belongs to a `test` command; an answer check (`expect`) is made by the agent, every few milliseconds while the application starts"
                ),
            );
        }
    }
    let mut text = |key: &str| -> Option<String> {
        let e = find(fields, key)?;
        match e.value.as_str() {
            Some(t) => Some(t.to_owned()),
            None => {
                sink.error(
                    e.value.mark,
                    join(path, key),
                    format!("expected a string, found {}", e.value.describe()),
                );
                None
            }
        }
    };
    let send = text("send").unwrap_or_default();
    let expect = text("expect");
    match &expect {
        None if find(fields, "expect").is_none() => sink.error(
            node.mark,
            path,
            "missing key `expect`: what the application's reply starts with once it is ready, such as \"+PONG\"",
        ),
        Some(e) if e.is_empty() => {
            let mark = find(fields, "expect").map_or(node.mark, |e| e.value.mark);
            sink.error(mark, join(path, "expect"), "must not be empty");
        }
        _ => {}
    }
    for (key, value) in [("send", Some(&send)), ("expect", expect.as_ref())] {
        if let Some(value) = value
            && value.len() > MAX_ANSWER_BYTES
        {
            let mark = find(fields, key).map_or(node.mark, |e| e.value.mark);
            sink.error(
                mark,
                join(path, key),
                format!("longer than the {MAX_ANSWER_BYTES} bytes accepted"),
            );
        }
    }
    let port = find(fields, "port").and_then(|e| {
        let port = e
            .value
            .as_int()
            .and_then(|i| u16::try_from(i).ok())
            .filter(|p| *p > 0);
        if port.is_none() {
            sink.error(
                e.value.mark,
                join(path, "port"),
                format!(
                    "expected a port from 1 to 65535 inside the container, found {}",
                    e.value.describe()
                ),
            );
        }
        port
    });
    if find(fields, "port").is_none() && !has_tcp_port {
        sink.error(
            node.mark,
            path,
            "an answer check needs `port` here: the application has no TCP port to check",
        );
    }
    let mut check = HealthCheck::with_answer(AnswerCheck {
        send,
        expect: expect.unwrap_or_default(),
        port,
    });
    duration(sink, fields, path, "timeout", &mut check.timeout_ms);
    if find(fields, "timeout").is_some() && !(1..=MAX_ANSWER_TIMEOUT_MS).contains(&check.timeout_ms)
    {
        let mark = find(fields, "timeout").map_or(node.mark, |e| e.value.mark);
        sink.error(mark, join(path, "timeout"), "must be from 1ms to 10s");
    }
    (sink.diagnostics.len() == before).then_some(check)
}

/// Reads the duration at `key`, if present, into `slot`.
fn duration(sink: &mut Sink<'_>, fields: &[Entry], path: &str, key: &str, slot: &mut u64) {
    let Some(e) = find(fields, key) else {
        return;
    };
    let kpath = join(path, key);
    // A bare number gets the "no unit" hint rather than a type error.
    let text = e
        .value
        .as_str()
        .map(str::to_owned)
        .or_else(|| e.value.as_int().map(|i| i.to_string()));
    match text.as_deref().map(compose_duration_ms) {
        Some(Ok(ms)) if ms <= MAX_DURATION_MS => *slot = ms,
        Some(Ok(_)) => sink.error(e.value.mark, kpath, "longer than the 1h accepted"),
        Some(Err(problem)) => sink.error(e.value.mark, kpath, problem),
        None => sink.error(
            e.value.mark,
            kpath,
            format!(
                "expected a duration such as `5s` or `1m30s`, found {}",
                e.value.describe()
            ),
        ),
    }
}

fn test(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Vec<String>> {
    if let Some(text) = node.as_str() {
        if text.trim().is_empty() {
            sink.error(node.mark, path, "the command is empty");
            return None;
        }
        return Some(vec!["CMD-SHELL".to_owned(), text.to_owned()]);
    }
    let Kind::Seq(items) = &node.kind else {
        sink.error(
            node.mark,
            path,
            format!(
                "expected a command string or a list such as [\"CMD\", \"redis-cli\", \"ping\"], found {}",
                node.describe()
            ),
        );
        return None;
    };
    let mut words = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_scalar().map(|s| s.text.clone()) {
            Some(text) => words.push(text),
            None => {
                sink.error(
                    item.mark,
                    format!("{path}[{i}]"),
                    format!("expected a string, found {}", item.describe()),
                );
                return None;
            }
        }
    }
    let arity_ok = match words.first().map(String::as_str) {
        Some("NONE") => words.len() == 1,
        Some("CMD") => words.len() >= 2,
        Some("CMD-SHELL") => words.len() == 2,
        _ => {
            sink.error(
                node.mark,
                path,
                "a list must start with CMD (program and arguments), CMD-SHELL (one shell command) or NONE",
            );
            return None;
        }
    };
    if !arity_ok {
        sink.error(
            node.mark,
            path,
            "CMD takes a program and its arguments, CMD-SHELL exactly one command, NONE nothing",
        );
        return None;
    }
    Some(words)
}

/// A compose duration: one or more `NUMBER UNIT` with unit `ms`, `s`, `m` or `h`, as in
/// `500ms`, `10s`, `1m30s`.
pub fn compose_duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("expected a duration such as `5s` or `1m30s`, found {text:?}");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => {
                return Err(format!(
                    "{text:?} has no unit: write for example `{text}s` (ms, s, m and h are understood)"
                ));
            }
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}: use ms, s, m or h"
                ));
            }
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(factor)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| format!("the duration {text:?} is too long"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_durations() {
        assert_eq!(compose_duration_ms("500ms"), Ok(500));
        assert_eq!(compose_duration_ms("1m30s"), Ok(90_000));
        assert_eq!(compose_duration_ms("2h"), Ok(7_200_000));
        assert!(compose_duration_ms("10").is_err());
        assert!(compose_duration_ms("1.5s").is_err());
        assert!(compose_duration_ms("s").is_err());
        assert!(compose_duration_ms("5d").is_err());
    }
}
