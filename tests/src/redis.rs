//! A minimal Redis client (RESP over TCP) for the tests and the demo: enough to write keys
//! through one node's address and read them back through another's.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// One connection to a Redis server (or to any node routing to one).
pub struct Redis {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Redis {
    pub fn connect(addr: &str, timeout: Duration) -> Result<Redis> {
        let target: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        let stream = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Redis {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one command and returns its reply: a simple string, an integer as text, a bulk
    /// string, or `None` for a nil bulk string.
    pub fn command(&mut self, args: &[&str]) -> Result<Option<String>> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.writer.write_all(request.as_bytes())?;
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" | ":" => Ok(Some(rest.to_string())),
            "-" => bail!("redis error: {rest}"),
            "$" => {
                let len: i64 = rest.parse().context("bulk length")?;
                if len < 0 {
                    return Ok(None);
                }
                let value = self.line()?;
                Ok(Some(value))
            }
            _ => bail!("unexpected redis reply {line:?}"),
        }
    }

    /// `MGET keys...`: each key's value, `None` where it is missing.
    pub fn mget(&mut self, keys: &[&str]) -> Result<Vec<Option<String>>> {
        let mut request = format!("*{}\r\n$4\r\nMGET\r\n", keys.len() + 1);
        for key in keys {
            request.push_str(&format!("${}\r\n{key}\r\n", key.len()));
        }
        self.writer.write_all(request.as_bytes())?;
        let header = self.line()?;
        let Some(count) = header.strip_prefix('*') else {
            bail!("unexpected MGET reply {header:?}");
        };
        let count: usize = count.parse().context("MGET reply length")?;
        if count != keys.len() {
            bail!("MGET of {} keys answered {count} values", keys.len());
        }
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let len = self.line()?;
            let len: i64 = len
                .strip_prefix('$')
                .with_context(|| format!("MGET value {len:?}"))?
                .parse()
                .context("MGET value length")?;
            values.push(if len < 0 { None } else { Some(self.line()?) });
        }
        Ok(values)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("redis closed the connection");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}
