//! The `token-broker` command line: `serve`, `migrate`, `rekey`, `ready`, `admin-token`, and
//! the admin CLI (`tenants`, `callers`, `audit`) that talks to a running broker.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use token_broker::app::{open_store, rekey, Application, BuildError};
use token_broker::auth::admin_token;
use token_broker::config::Settings;
use token_broker::{cli, telemetry};

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
    /// The embedded default's generated admin token: where its hash is kept; `--rotate`
    /// prints a new one (a running broker takes it with its next admin request).
    AdminToken {
        /// Generate a new admin token, print it once, and retire the old one.
        #[arg(long)]
        rotate: bool,
    },
    /// Tenants on a running broker (BROKER_URL, BROKER_ADMIN_TOKEN).
    Tenants(Box<cli::TenantsArgs>),
    /// Callers on a running broker (BROKER_URL, BROKER_ADMIN_TOKEN).
    Callers(cli::CallersArgs),
    /// The audit trail of a running broker (BROKER_URL, BROKER_ADMIN_TOKEN).
    Audit(cli::AuditArgs),
    /// Prints a shell completion script: `source <(token-broker completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff): `token-broker man > token-broker.1; man ./token-broker.1`.
    Man,
}

/// Shows a generated admin token once, with what to do next.
fn print_admin_token(token: &SecretString, settings: &Settings, port: u16) {
    let kept = match settings.admin_token_file() {
        Some(f) => format!("only its hash is kept, in {}", f.display()),
        None => "the database is in memory: it lasts as long as this process".into(),
    };
    let host = match settings.listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let url = format!("http://{host}:{port}");
    let t = token.expose_secret();
    println!(
        "\nAdmin token (shown once; {kept}):\n\n    {t}\n\nNext: export BROKER_ADMIN_TOKEN={t} BROKER_URL={url}, then `token-broker tenants list` or open {url}/admin/console; to set your own, start with BROKER_ADMIN_TOKEN set; for a new one, `token-broker admin-token --rotate`.\n"
    );
}

/// `token-broker admin-token [--rotate]`.
fn admin_token_command(settings: &Settings, rotate: bool) -> ExitCode {
    let Some(path) = settings.admin_token_file() else {
        eprintln!("token-broker: there is no generated admin token with this DATABASE_URL (Postgres or in-memory SQLite): set BROKER_ADMIN_TOKEN");
        return ExitCode::from(2);
    };
    if !rotate {
        return match admin_token::read_hash_file(&path) {
            Ok(_) => {
                println!("the generated admin token's hash is kept in {}; `token-broker admin-token --rotate` prints a new token and retires this one", path.display());
                ExitCode::SUCCESS
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("no admin token generated yet: the first `token-broker serve` without BROKER_ADMIN_TOKEN prints one (hash kept in {})", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("token-broker: {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    let token = admin_token::generate();
    if let Err(e) = admin_token::write_hash_file(&path, &token) {
        eprintln!("token-broker: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("{}", token.expose_secret());
    eprintln!("new admin token above (shown once); the old one stops working with the broker's next admin request");
    if settings.admin_token.is_some() {
        eprintln!("note: BROKER_ADMIN_TOKEN is set here; a broker started with it set uses that value, not this one");
    }
    ExitCode::SUCCESS
}

/// `token-broker ready`: one GET with a 3 s timeout.
fn ready(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var(token_broker::config::env::LISTEN)
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

/// Long because it is the command line's dispatch: one arm per subcommand, each a call.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        // These read no broker configuration.
        Command::Ready { url } => return ready(url),
        Command::Tenants(args) => return cli::tenants(*args),
        Command::Callers(args) => return cli::callers(args),
        Command::Audit(args) => return cli::audit(args),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "token-broker", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            return match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("token-broker: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        other => other,
    };
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("token-broker: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::AdminToken { rotate } = command {
        return admin_token_command(&settings, rotate);
    }
    telemetry::init(&settings.log_filter, settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => {
                let mut app = Application::build(settings.clone()).await?;
                if let Some(token) = app.take_generated_admin_token() {
                    print_admin_token(&token, &settings, app.port());
                }
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
            _ => unreachable!("handled before the runtime starts"),
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref(), Some(BuildError::Config(_))) => {
            eprintln!("token-broker: configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %e, "token-broker failed");
            eprintln!("token-broker: {e}");
            ExitCode::FAILURE
        }
    }
}
