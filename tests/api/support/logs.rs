//! Captured logs: the broker's tracing output, kept in memory for the secret checks.

use super::*;

pub(crate) static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a subscriber at trace level for the broker (debug elsewhere) that records into memory.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,token_broker=trace,wiremock=off,hyper=info,h2=info,tokio=info,runtime=info,mio=info",
        );
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

/// Everything logged so far by this test binary.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().expect("init_logs").lock().unwrap()).into_owned()
}

/// The captured lines of one request, by the `X-Request-Id` it was sent with: those logged in
/// its span, including a mint it started. Every test in this binary logs into one buffer, so a
/// check that something *was* logged asks for its own request's lines (another test's line
/// cannot satisfy it); a check that a secret was *not* logged reads everything.
pub fn logs_of_request(request_id: &str) -> String {
    let needle = format!("\"request_id\":\"{request_id}\"");
    captured_logs()
        .lines()
        .filter(|l| l.contains(&needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A request id no other request in this run uses.
pub fn unique_request_id(what: &str) -> String {
    format!("{what}-{:016x}", rand::random::<u64>())
}
