//! The admin API over HTTP, as the CLI speaks it: one blocking request at a time (on a
//! current-thread runtime of its own), the admin token as a bearer header, problem+json
//! answers turned into `Failure`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// Why a command failed; `exit_code` is what the process exits with.
#[derive(Debug)]
pub enum Failure {
    /// The command cannot run as given (a bad flag value, an unreadable file, no admin token).
    Usage(String),
    /// The broker answered with a problem (its stable `code` and `detail`).
    Refused {
        status: u16,
        code: String,
        detail: String,
    },
    /// The broker could not be reached, or answered something that is not the admin API.
    Unreachable(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Refused { .. } | Self::Unreachable(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(m) => write!(f, "{m}"),
            Self::Refused {
                status,
                code,
                detail,
            } => write!(
                f,
                "{} ({status}): {}",
                super::output::printable(code),
                super::output::printable(detail)
            ),
            Self::Unreachable(m) => write!(f, "unreachable: {}", super::output::printable(m)),
        }
    }
}

/// An error with its causes (`error sending request: … Connection refused`), without the URL.
fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    if let Some(u) = e.url() {
        out = out.replace(&format!(" for url ({u})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Loopback: `localhost`, 127.0.0.0/8, `::1`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The signals that end a `--follow`.
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

/// A connection to one broker's admin API.
pub struct Client {
    base: String,
    token: SecretString,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// `insecure`: allow `http://` to a host other than loopback.
    pub fn new(base: &str, token: SecretString, insecure: bool) -> Result<Self, Failure> {
        let base = base.trim_end_matches('/').to_owned();
        let parsed = url::Url::parse(&base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        let Some(parsed) = parsed else {
            return Err(Failure::Usage(format!(
                "BROKER_URL: expected the broker's base URL such as http://127.0.0.1:8080, got {:?}",
                super::output::printable(&base)
            )));
        };
        if parsed.scheme() == "http" && !insecure && !is_loopback(&parsed) {
            return Err(Failure::Usage(format!(
                "BROKER_URL: http:// to {} would send the admin token unencrypted; use https://, or --insecure if this network is trusted",
                parsed.host_str().unwrap_or_default()
            )));
        }
        // No redirects: a redirect would re-send the admin token, and a body with a partner's
        // secret, to wherever the answer points.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("the TLS backend initialises");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Ok(Self {
            base,
            token,
            http,
            runtime,
        })
    }

    /// One request; `Ok(None)` for 204.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<Value>, Failure> {
        self.runtime.block_on(self.send(method, path, query, body))
    }

    /// Long because it maps every way one request can end (a problem answer, a refused
    /// redirect, unreachable, not the admin API) to an exit code.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<Value>, Failure> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose_secret())
            .query(query);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).expect("serialises"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Unreachable(format!("{}: {}", self.base, chain(&e))))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere");
            return Err(Failure::Unreachable(format!(
                "{} answered {status} redirecting to {}: not followed (the admin token would go with it); point BROKER_URL at the broker itself",
                self.base,
                super::output::printable(location)
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Failure::Unreachable(e.without_url().to_string()))?;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return json.map(Some).ok_or_else(|| {
                Failure::Unreachable(format!(
                    "{} answered {status} without JSON: is BROKER_URL the broker?",
                    self.base
                ))
            });
        }
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Err(Failure::Refused {
            status: status.as_u16(),
            code: field("code").unwrap_or_else(|| "http_error".into()),
            detail: field("detail")
                .or_else(|| field("title"))
                .unwrap_or_else(|| format!("{} answered {status}", self.base)),
        })
    }

    /// SIGINT and SIGTERM, watched from now on (handlers installed, whatever the parent set).
    pub fn interrupts(&self) -> std::io::Result<Interrupts> {
        use tokio::signal::unix::{signal, SignalKind};
        let _in_runtime = self.runtime.enter();
        Ok(Interrupts {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Sleeps `d`; true if interrupted (SIGINT or SIGTERM) instead.
    pub fn sleep_unless_interrupted(&self, d: Duration, i: &mut Interrupts) -> bool {
        self.runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(d) => false,
                _ = i.int.recv() => true,
                _ = i.term.recv() => true,
            }
        })
    }

    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        Ok(self
            .call(Method::GET, path, query, None)?
            .unwrap_or(Value::Null))
    }
}
