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
