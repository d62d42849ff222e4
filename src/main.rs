//! The `token-broker` command line: `serve`, `migrate`, `rekey`, `ready`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use token_broker::app::{open_store, rekey, Application};
use token_broker::config::Settings;
use token_broker::telemetry;

/// Mints, caches and hands out partner API bearer tokens per tenant.
/// Configuration comes from the environment (see README).
#[derive(Parser)]
#[command(name = "token-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (applies migrations first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Re-seal every stored credential with the active key, then report keys still in use.
    Rekey,
    /// Exit 0 if the broker's `/readyz` answers 200 (for container health checks in images
    /// without curl). Reads no other configuration.
    Ready {
        /// Default: http://127.0.0.1:<port of BROKER_LISTEN, else 8080>/readyz
        #[arg(long)]
        url: Option<String>,
    },
}

/// `token-broker ready`: one GET with a 3 s timeout.
fn ready(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var("BROKER_LISTEN")
            .ok()
            .and_then(|l| l.rsplit(':').next().map(str::to_owned))
            .unwrap_or_else(|| "8080".into());
        format!("http://127.0.0.1:{port}/readyz")
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let status = runtime.block_on(async {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(3))
            .build()
            .expect("the TLS backend initialises")
            .get(&url)
            .send()
            .await
            .map(|r| r.status())
    });
    match status {
        Ok(s) if s.is_success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("token-broker: {url} answered {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("token-broker: {url}: {}", e.without_url());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Ready { url } = cli.command {
        return ready(url);
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("token-broker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log_filter, settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                let app = Application::build(settings).await?;
                app.run_until_stopped().await?;
                tracing::info!("token-broker stopped");
            }
            Command::Migrate => {
                open_store(&settings).await?;
                tracing::info!("migrations applied");
            }
            Command::Rekey => {
                let (rows, tokens) = rekey(&settings).await?;
                let store = open_store(&settings).await?;
                let active = store.keys().active_id().to_owned();
                tracing::info!(rows, tokens, active_key = %active, "rekey done");
                println!("re-sealed {rows} credential row(s) and {tokens} cached token(s) with key {active}");
                for (key_id, n) in store.key_usage().await? {
                    println!("key {key_id}: {n} credential row(s)");
                }
            }
            Command::Ready { .. } => unreachable!("handled before the configuration is read"),
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "token-broker failed");
            eprintln!("token-broker: {e}");
            ExitCode::FAILURE
        }
    }
}
