//! A minimal HTTP/1.1 client over `std::net::TcpStream` for the end-to-end tests: JSON requests, chunked and
//! content-length bodies, and server-sent events read one at a time so a test can hang up mid-stream.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// Response headers, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// The first value of a header (`name` in lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    BufReader::new(s)
}

/// The status, whether the body is chunked, its length if given, and every header (names lowercased).
type Head = (u16, bool, Option<usize>, Vec<(String, String)>);

/// Reads the status line and headers.
fn head(r: &mut BufReader<TcpStream>) -> Head {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let (mut chunked, mut len, mut headers) = (false, None, Vec::new());
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            return (status, chunked, len, headers);
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
    }
}

/// A body reader that undoes chunked encoding.
pub struct Body {
    r: BufReader<TcpStream>,
    chunked: bool,
    left: usize,
    done: bool,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.chunked {
            return self.r.read(buf);
        }
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.r.read_line(&mut line)?;
            if line.trim().is_empty() {
                line.clear();
                self.r.read_line(&mut line)?;
            }
            self.left = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let n = self.r.read(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

pub fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Reply {
    request_with_headers(addr, method, path, &[], body)
}

/// [`request`] with extra request headers.
pub fn request_with_headers(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut r = send(addr, method, path, headers, body);
    let (status, chunked, len, response_headers) = head(&mut r);
    let mut body = Body {
        r,
        chunked,
        left: 0,
        done: false,
    };
    let mut out = Vec::new();
    match (chunked, len) {
        (false, Some(n)) => {
            out.resize(n, 0);
            body.read_exact(&mut out).unwrap();
        }
        _ => {
            body.read_to_end(&mut out).unwrap();
        }
    }
    Reply {
        status,
        body: String::from_utf8(out).unwrap(),
        headers: response_headers,
    }
}

pub fn post(addr: &str, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, body.to_string().as_bytes())
}

/// An open server-sent-event stream.
pub struct Events {
    pub status: u16,
    lines: BufReader<Body>,
}

impl Events {
    /// The next `data:` payload, or `None` at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Every remaining payload up to and including `[DONE]`.
    pub fn collect(mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(d) = self.next_data() {
            let done = d == "[DONE]";
            v.push(d);
            if done {
                break;
            }
        }
        v
    }
}

pub fn stream(addr: &str, path: &str, body: &Value) -> Events {
    let mut r = send(addr, "POST", path, &[], body.to_string().as_bytes());
    let (status, chunked, _, _) = head(&mut r);
    Events {
        status,
        lines: BufReader::new(Body {
            r,
            chunked,
            left: 0,
            done: false,
        }),
    }
}
