//! A strict reader of the Prometheus text exposition format (0.0.4), written from the
//! format's description rather than from the agent's writer, so the tests check the
//! agent's output against the format and not against itself; and a scrape over plain HTTP.
//!
//! Strict means: every sample belongs to a family declared by `# TYPE` before it (a
//! histogram's samples are `_bucket` with an `le` label, `_sum` and `_count`), names and
//! label names are valid, label values are quoted with only `\\`, `\"` and `\n` escapes, no
//! series appears twice, and a histogram's buckets are cumulative with `+Inf` equal to its
//! count.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// Label pairs, sorted by label name.
pub type Labels = Vec<(String, String)>;
/// One series: the metric name and its labels.
pub type SeriesKey = (String, Labels);

/// A parsed exposition.
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<SeriesKey, f64>,
}

impl Exposition {
    /// The value of the series `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        self.samples.get(&(name.to_string(), l)).copied()
    }

    /// Like [`Exposition::get`], 0 when absent (a counter not incremented yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// `GET /metrics` from `addr` (`HOST:PORT`), parsed.
pub fn scrape(addr: &str) -> Result<Exposition> {
    let mut stream = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(3))
        .with_context(|| format!("connect to metrics at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("metrics answer without a header end")?;
    ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "metrics answered {head}"
    );
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "metrics content type: {head}"
    );
    parse(body)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Result<f64> {
    Ok(match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        t => t.parse().with_context(|| format!("bad value {t:?}"))?,
    })
}

/// Parses `{a="x",b="y"}` at the start of `text`; returns the labels and the rest.
fn parse_labels(text: &str) -> Result<(Labels, &str)> {
    let mut labels = Vec::new();
    let mut rest = text.strip_prefix('{').context("expected '{'")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').context("label without '='")?;
        let name = &rest[..eq];
        ensure!(valid_label_name(name), "bad label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .context("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => bail!("bad escape {other:?} in label {name}"),
                },
                Some((_, '\n')) => bail!("raw newline in label {name}"),
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value of {name}"),
            }
        };
        ensure!(
            !labels.iter().any(|(n, _)| n == name),
            "label {name} given twice"
        );
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            ensure!(rest.starts_with('}'), "expected ',' or '}}' after a label");
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram")
        {
            return Some(base);
        }
    }
    None
}

/// Parses an exposition strictly (see the module doc).
pub fn parse(text: &str) -> Result<Exposition> {
    let mut out = Exposition::default();
    for (number, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", number + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    ensure!(valid_name(name), "bad family name: {}", at());
                    ensure!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type: {}",
                        at()
                    );
                    ensure!(
                        out.types
                            .insert(name.to_string(), kind.to_string())
                            .is_none(),
                        "family typed twice: {}",
                        at()
                    );
                }
                (Some("HELP"), Some(name), _) => {
                    ensure!(valid_name(name), "bad family name: {}", at())
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).with_context(at)?;
        let name = &line[..name_end];
        ensure!(valid_name(name), "bad metric name: {}", at());
        let (mut labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).with_context(at)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().with_context(at)?).with_context(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().with_context(at)?;
        }
        ensure!(fields.next().is_none(), "trailing text: {}", at());
        let family = family_of(name, &out.types)
            .with_context(|| format!("sample before its # TYPE: {}", at()))?;
        let kind = out.types[family].as_str();
        if kind == "histogram" {
            let has_le = labels.iter().any(|(n, _)| n == "le");
            ensure!(
                name.ends_with("_bucket") == has_le,
                "le only and always on buckets: {}",
                at()
            );
        }
        if kind == "counter" {
            ensure!(value >= 0.0, "negative counter: {}", at());
        }
        labels.sort();
        ensure!(
            out.samples
                .insert((name.to_string(), labels), value)
                .is_none(),
            "series given twice: {}",
            at()
        );
    }
    check_histograms(&out)?;
    Ok(out)
}

/// Buckets are cumulative and `+Inf` equals `_count`.
fn check_histograms(e: &Exposition) -> Result<()> {
    for (family, kind) in &e.types {
        if kind != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        // Per label set (without `le`): (bound, cumulative count) of each bucket.
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), value) in &e.samples {
            if *name != bucket {
                continue;
            }
            let mut rest = labels.clone();
            let le = rest
                .iter()
                .position(|(n, _)| n == "le")
                .map(|i| rest.remove(i).1)
                .context("bucket without le")?;
            series
                .entry(rest)
                .or_default()
                .push((parse_value(&le)?, *value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            ensure!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets not cumulative"
            );
            let inf = buckets
                .last()
                .filter(|b| b.0.is_infinite())
                .map(|b| b.1)
                .with_context(|| format!("{family}{labels:?}: no +Inf bucket"))?;
            let count = e
                .samples
                .get(&(format!("{family}_count"), labels.clone()))
                .with_context(|| format!("{family}{labels:?}: no _count"))?;
            ensure!(
                inf == *count,
                "{family}{labels:?}: +Inf bucket {inf} != count {count}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_exposition_parses() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"x\\\"y\",r=\"ok\"} 3\n\
                    # TYPE h_seconds histogram\nh_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n\
                    h_seconds_sum 0.5\nh_seconds_count 2\n";
        let e = parse(text).expect("parse");
        assert_eq!(e.get("a_total", &[("r", "ok"), ("k", "x\"y")]), Some(3.0));
        assert_eq!(e.value("h_seconds_count", &[]), 2.0);
    }

    #[test]
    fn mistakes_are_refused() {
        for bad in [
            "a_total 1\n",                  // no TYPE
            "# TYPE a counter\na{k=x} 1\n", // unquoted
            "# TYPE a counter\na -1\n",     // negative counter
            "# TYPE a gauge\na 1\na 2\n",   // twice
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
            "# TYPE a gauge\na{k=\"\\t\"} 1\n", // bad escape
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
