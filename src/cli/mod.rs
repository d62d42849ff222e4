//! The admin CLI (`token-broker tenants|callers|audit`): talks to a running broker over its
//! admin API (`BROKER_URL`, `BROKER_ADMIN_TOKEN`), prints tables on a terminal and JSON for
//! scripts. Secrets are read from standard input or a prompt, never from the command line
//! (where `ps` and shell history would keep them). Exit codes: 0 done, 1 the broker refused or
//! could not be reached (the problem `code` and detail are printed), 2 the command itself is
//! wrong (clap's usage errors, an unreadable file, no admin token).

mod client;
mod output;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

use client::Client;
pub use client::Failure;
use output::Output;

/// Where the broker is and how to print; accepted before or after the subcommand.
#[derive(Args, Debug)]
pub struct Common {
    /// The broker's base URL.
    #[arg(
        long,
        env = "BROKER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// `table` (default on a terminal) or `json` (default when piped).
    #[arg(long, short = 'o', global = true)]
    output: Option<Output>,
    /// Allow a plain http:// URL to a host other than loopback (the admin token and any
    /// partner secret would cross the network unencrypted).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Args, Debug)]
pub struct TenantsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand, Debug)]
enum TenantsCommand {
    /// Every tenant with its health at a glance.
    List,
    /// One tenant: its spec (never its credentials) and health.
    Show { id: String },
    /// Register a tenant from a spec file (`-f spec.json`, `-f -` for stdin) or from flags;
    /// with flags the secret (client_secret or password) is read from stdin or a prompt.
    Create(CreateArgs),
    /// Change a tenant: a JSON merge patch file, flags, and/or new credentials (the client id
    /// flags with the secret read from stdin or a prompt).
    Update(UpdateArgs),
    /// Delete a tenant and forget its cached token.
    Delete { id: String },
    /// A dry-run mint: does the partner accept the credentials? (never shows the token)
    Test { id: String },
}

/// The partner-side identity flags shared by `create` and `update`.
#[derive(Args, Debug, Default)]
struct CredentialFlags {
    /// client_id (every kind).
    #[arg(long)]
    client_id: Option<String>,
    /// email (comm100_partner).
    #[arg(long)]
    email: Option<String>,
    /// username (oauth2_password).
    #[arg(long)]
    username: Option<String>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// The tenant id (with flags; a spec file carries its own).
    id: Option<String>,
    /// A tenant spec as JSON (see openapi.yaml); `-` reads standard input.
    #[arg(long, short = 'f', conflicts_with_all = ["kind", "token_url"])]
    file: Option<String>,
    /// setu_partner, comm100_partner, oauth2_client_credentials or oauth2_password (custom
    /// kinds need a spec file).
    #[arg(long, requires = "token_url")]
    kind: Option<String>,
    /// The partner's token endpoint (https; plain http and internal addresses only with
    /// BROKER_ALLOW_INSECURE_ISSUERS=true on the broker).
    #[arg(long)]
    token_url: Option<String>,
    /// A name for people (default: the id).
    #[arg(long)]
    display_name: Option<String>,
    /// The lifetime assumed when the partner's answer states none.
    #[arg(long)]
    default_ttl_seconds: Option<u64>,
    /// OAuth 2.0 scope to ask for (oauth2 kinds).
    #[arg(long)]
    scope: Option<String>,
    #[command(flatten)]
    credentials: CredentialFlags,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    id: String,
    /// A JSON merge patch (see openapi.yaml); `-` reads standard input.
    #[arg(long, short = 'f')]
    file: Option<String>,
    /// A new name for people.
    #[arg(long)]
    display_name: Option<String>,
    /// A new token endpoint of the partner.
    #[arg(long)]
    token_url: Option<String>,
    #[command(flatten)]
    credentials: CredentialFlags,
}

#[derive(Args, Debug)]
pub struct CallersArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: CallersCommand,
}

#[derive(Subcommand, Debug)]
enum CallersCommand {
    /// Every caller and the tenants it may fetch.
    List,
    /// A new caller; its API key is printed once.
    Create {
        /// A name for the calling service (unique).
        #[arg(long)]
        name: String,
        /// A tenant it may fetch (repeat, or `*` for all).
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
    },
    /// Change a caller's name and/or the tenants it may fetch; its key stays.
    Update {
        id: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// The tenants it may fetch from now on (repeat, or `*` for all); replaces the list.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Give a caller a new API key (printed once); the old one keeps working for
    /// `--grace-seconds` (default 0) so services can roll.
    RotateKey {
        id: String,
        /// How long the old key keeps working (at most 7 days).
        #[arg(long, default_value_t = 0)]
        grace_seconds: u64,
    },
    /// Delete a caller: its key stops working.
    Delete { id: String },
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    common: Common,
    /// Only entries about this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only entries by this caller (its name).
    #[arg(long)]
    caller: Option<String>,
    /// How many of the latest entries to show.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// Keep printing new entries as they arrive (every 2 s) until interrupted.
    #[arg(long)]
    follow: bool,
}

/// Runs one CLI command to its exit code, printing failures as `token-broker: <code>: …`.
pub fn run(command: impl FnOnce(&Runner) -> Result<(), Failure>, common: &Common) -> ExitCode {
    let result = Runner::new(common).and_then(|r| command(&r));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("token-broker: {f}");
            ExitCode::from(f.exit_code())
        }
    }
}

pub fn tenants(args: TenantsArgs) -> ExitCode {
    run(|r| r.tenants(args.command), &args.common)
}

pub fn callers(args: CallersArgs) -> ExitCode {
    run(|r| r.callers(args.command), &args.common)
}

pub fn audit(args: AuditArgs) -> ExitCode {
    run(|r| r.audit(&args), &args.common)
}

/// `--tenant` values as the API's scope: `*` alone is "every tenant", a string in the API.
fn scope_json(tenants: &[String]) -> Value {
    if tenants == ["*"] {
        json!("*")
    } else {
        json!(tenants)
    }
}

/// One command's client and output mode.
pub struct Runner {
    client: Client,
    output: Output,
}

impl Runner {
    fn new(common: &Common) -> Result<Self, Failure> {
        let token = std::env::var("BROKER_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Failure::Usage(
                "BROKER_ADMIN_TOKEN is not set: export the admin token the broker printed at its first start (or `token-broker admin-token --rotate` for a new one)".into(),
            ))?;
        Ok(Self {
            client: Client::new(&common.url, SecretString::from(token), common.insecure)?,
            output: common.output.unwrap_or_else(Output::detect),
        })
    }

    /// Prints `json` as is for scripts, else what `table` makes of it.
    fn print(&self, json: &Value, table: impl FnOnce(&Value) -> String) {
        match self.output {
            Output::Json => println!("{}", output::pretty_json(json)),
            Output::Yaml => print!("{}", output::yaml(json)),
            Output::Table => println!("{}", table(json)),
        }
    }

    fn tenants(&self, command: TenantsCommand) -> Result<(), Failure> {
        match command {
            TenantsCommand::List => {
                let mut all = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let mut q = vec![("limit", "1000".to_owned())];
                    q.extend(after.take().map(|a| ("after", a)));
                    let page = self.client.get("/admin/v1/tenants", &q)?;
                    all.extend(page["tenants"].as_array().cloned().unwrap_or_default());
                    match page["next_after"].as_str() {
                        Some(next) => after = Some(next.to_owned()),
                        None => break,
                    }
                }
                self.print(&json!({ "tenants": all }), tenant_table);
            }
            TenantsCommand::Show { id } => {
                let t = self.client.get(&tenant_path(&id), &[])?;
                self.print(&t, tenant_fields);
            }
            TenantsCommand::Create(args) => {
                let spec = create_spec(&args)?;
                let t = self
                    .client
                    .call(Method::POST, "/admin/v1/tenants", &[], Some(&spec))?
                    .unwrap_or_default();
                self.print(&t, |t| {
                    format!(
                        "tenant {} created; check the credentials with `token-broker tenants test {}`",
                        output::text(t, "id"),
                        output::text(t, "id")
                    )
                });
            }
            TenantsCommand::Update(args) => {
                let patch = self.update_patch(&args)?;
                let t = self
                    .client
                    .call(Method::PATCH, &tenant_path(&args.id), &[], Some(&patch))?
                    .unwrap_or_default();
                self.print(&t, |t| {
                    format!(
                        "tenant {} updated (version {})",
                        output::text(t, "id"),
                        output::text(t, "version")
                    )
                });
            }
            TenantsCommand::Delete { id } => {
                self.client
                    .call(Method::DELETE, &tenant_path(&id), &[], None)?;
                self.print(&json!({ "deleted": id }), |_| {
                    format!("tenant {id} deleted")
                });
            }
            TenantsCommand::Test { id } => {
                let r = self
                    .client
                    .call(
                        Method::POST,
                        &format!("{}/test", tenant_path(&id)),
                        &[],
                        None,
                    )?
                    .unwrap_or_default();
                self.print(&r, |r| {
                    format!(
                        "ok: the partner minted a token for {id} valid for {} (until {})",
                        output::duration(r["expires_in"].as_i64().unwrap_or(0)),
                        output::text(r, "expires_at")
                    )
                });
            }
        }
        Ok(())
    }

    /// The merge patch `tenants update` sends: the file's, then the flags on top.
    fn update_patch(&self, args: &UpdateArgs) -> Result<Value, Failure> {
        let mut patch = match &args.file {
            Some(f) => read_json_file(f)?,
            None => json!({}),
        };
        let Some(obj) = patch.as_object_mut() else {
            return Err(Failure::Usage(
                "the patch file must hold a JSON object".into(),
            ));
        };
        if let Some(n) = &args.display_name {
            obj.insert("display_name".into(), json!(n));
        }
        if let Some(u) = &args.token_url {
            obj.entry("issuer")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or_else(|| Failure::Usage("issuer in the patch must be an object".into()))?
                .insert("token_url".into(), json!(u));
        }
        if args.credentials.client_id.is_some() {
            // The kind decides which fields the credentials have and which one is secret.
            let current = self.client.get(&tenant_path(&args.id), &[])?;
            let kind = current["issuer"]["kind"].as_str().unwrap_or_default();
            obj.insert(
                "credentials".into(),
                credentials_for(kind, &args.credentials, &args.id)?,
            );
        } else if args.credentials.email.is_some() || args.credentials.username.is_some() {
            return Err(Failure::Usage(
                "new credentials start with --client-id (all fields are replaced together)".into(),
            ));
        }
        if obj.is_empty() {
            return Err(Failure::Usage(
                "nothing to change: give -f patch.json, --display-name, --token-url or --client-id"
                    .into(),
            ));
        }
        Ok(patch)
    }

    fn callers(&self, command: CallersCommand) -> Result<(), Failure> {
        match command {
            CallersCommand::List => {
                let v = self.client.get("/admin/v1/callers", &[])?;
                self.print(&v, caller_table);
            }
            CallersCommand::Create { name, tenants } => {
                let scope = scope_json(&tenants);
                let body = json!({"name": name, "tenants": scope});
                let c = self
                    .client
                    .call(Method::POST, "/admin/v1/callers", &[], Some(&body))?
                    .unwrap_or_default();
                self.print(&c, |c| {
                    format!(
                        "{}\n\nThe API key is shown once: store it in the caller's secret store now.",
                        output::fields(&[
                            ("id", output::text(c, "id")),
                            ("name", output::text(c, "name")),
                            ("tenants", scope_text(&c["tenants"])),
                            ("api_key", output::text(c, "api_key")),
                        ])
                    )
                });
            }
            CallersCommand::Update { id, name, tenants } => {
                let mut body = serde_json::Map::new();
                if let Some(n) = name {
                    body.insert("name".into(), json!(n));
                }
                if !tenants.is_empty() {
                    body.insert("tenants".into(), scope_json(&tenants));
                }
                if body.is_empty() {
                    return Err(Failure::Usage(
                        "nothing to change: give --name and/or --tenant".into(),
                    ));
                }
                let path = format!("/admin/v1/callers/{}", segment(&id));
                let c = self
                    .client
                    .call(Method::PATCH, &path, &[], Some(&Value::Object(body)))?
                    .unwrap_or_default();
                self.print(&c, |c| {
                    output::fields(&[
                        ("id", output::text(c, "id")),
                        ("name", output::text(c, "name")),
                        ("tenants", scope_text(&c["tenants"])),
                    ])
                });
            }
            CallersCommand::RotateKey { id, grace_seconds } => {
                let path = format!("/admin/v1/callers/{}/rotate-key", segment(&id));
                let body = json!({ "grace_seconds": grace_seconds });
                let c = self
                    .client
                    .call(Method::POST, &path, &[], Some(&body))?
                    .unwrap_or_default();
                self.print(&c, |c| {
                    format!(
                        "{}\n\nThe new API key is shown once: store it in the caller's secret store now.",
                        output::fields(&[
                            ("id", output::text(c, "id")),
                            ("name", output::text(c, "name")),
                            ("api_key", output::text(c, "api_key")),
                            ("old key valid until", output::text(c, "previous_key_expires_at")),
                        ])
                    )
                });
            }
            CallersCommand::Delete { id } => {
                let path = format!("/admin/v1/callers/{}", segment(&id));
                self.client.call(Method::DELETE, &path, &[], None)?;
                self.print(&json!({ "deleted": id }), |_| {
                    format!("caller {id} deleted")
                });
            }
        }
        Ok(())
    }

    fn audit(&self, args: &AuditArgs) -> Result<(), Failure> {
        let mut query = vec![("limit", args.limit.to_string())];
        query.extend(args.tenant.clone().map(|t| ("tenant", t)));
        query.extend(args.caller.clone().map(|c| ("caller", c)));
        let page = self.client.get("/admin/v1/audit", &query)?;
        let mut entries = page["entries"].as_array().cloned().unwrap_or_default();
        if !args.follow {
            self.print(&page, |_| {
                entries.reverse();
                audit_table(&entries, true)
            });
            return Ok(());
        }
        // Following: oldest first, then each new entry as it arrives (JSON: one per line).
        entries.reverse();
        let mut last = entries
            .iter()
            .filter_map(|e| e["id"].as_i64())
            .max()
            .unwrap_or(0);
        self.print_entries(&entries, true);
        // SIGINT and SIGTERM end it cleanly (exit 0), also when the shell that started it
        // ignores SIGINT (a background job): the handlers are installed here, not inherited.
        let mut interrupts = self
            .client
            .interrupts()
            .map_err(|e| Failure::Usage(format!("cannot watch for interrupts: {e}")))?;
        loop {
            if self
                .client
                .sleep_unless_interrupted(Duration::from_secs(2), &mut interrupts)
            {
                return Ok(());
            }
            let fresh = self.entries_after(&query, last)?;
            if let Some(max) = fresh.iter().filter_map(|e| e["id"].as_i64()).max() {
                last = max;
                self.print_entries(&fresh, false);
            }
        }
    }

    /// Entries newer than `last`, oldest first (paging back while a whole page is new).
    fn entries_after(&self, query: &[(&str, String)], last: i64) -> Result<Vec<Value>, Failure> {
        let mut fresh = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let mut q = query.to_vec();
            q[0] = ("limit", "1000".into());
            q.extend(before.map(|b| ("before", b.to_string())));
            let page = self.client.get("/admin/v1/audit", &q)?;
            let entries = page["entries"].as_array().cloned().unwrap_or_default();
            let full = entries.len() == 1000;
            let new: Vec<Value> = entries
                .into_iter()
                .filter(|e| e["id"].as_i64().is_some_and(|id| id > last))
                .collect();
            let all_new = full && new.len() == 1000;
            before = new.last().and_then(|e| e["id"].as_i64());
            fresh.extend(new);
            if !all_new {
                break;
            }
        }
        fresh.reverse();
        Ok(fresh)
    }

    fn print_entries(&self, entries: &[Value], header: bool) {
        match self.output {
            Output::Json => {
                for e in entries {
                    println!("{e}");
                }
            }
            // One YAML document per entry, so a follower can split the stream.
            Output::Yaml => {
                for e in entries {
                    print!("---\n{}", output::yaml(e));
                }
            }
            Output::Table if entries.is_empty() => {}
            Output::Table => println!("{}", audit_table(entries, header)),
        }
    }
}

/// `/admin/v1/tenants/<id>` with the id percent-encoded.
fn tenant_path(id: &str) -> String {
    format!("/admin/v1/tenants/{}", segment(id))
}

fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn read_json_file(name: &str) -> Result<Value, Failure> {
    let mut text = String::new();
    let read = if name == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(name).map(|t| text = t)
    };
    read.map_err(|e| Failure::Usage(format!("{name}: {e}")))?;
    let value =
        serde_json::from_str(&text).map_err(|e| Failure::Usage(format!("{name}: not JSON ({e})")));
    zeroize::Zeroize::zeroize(&mut text);
    value
}

/// The secret: a line from standard input when it is piped, else a prompt that does not echo.
fn read_secret(label: &str) -> Result<SecretString, Failure> {
    let mut value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("{label}: "))
            .map_err(|e| Failure::Usage(format!("reading {label}: {e}")))?
    } else {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("reading {label} from standard input: {e}")))?;
        s
    };
    let trimmed = value.trim_end_matches(['\r', '\n']).to_owned();
    zeroize::Zeroize::zeroize(&mut value);
    if trimmed.is_empty() {
        return Err(Failure::Usage(format!(
            "{label} is empty: pipe it on standard input or type it at the prompt"
        )));
    }
    Ok(SecretString::from(trimmed))
}

/// The credentials object for `kind` from the flags and the secret read from stdin or a prompt.
fn credentials_for(kind: &str, flags: &CredentialFlags, tenant: &str) -> Result<Value, Failure> {
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| Failure::Usage(format!("{kind} needs --{flag}")))
    };
    let client_id = need(&flags.client_id, "client-id")?;
    let (extra, secret_field) = match kind {
        "setu_partner" | "oauth2_client_credentials" => (None, "client_secret"),
        "comm100_partner" => (Some(("email", need(&flags.email, "email")?)), "password"),
        "oauth2_password" => (
            Some(("username", need(&flags.username, "username")?)),
            "password",
        ),
        other => {
            return Err(Failure::Usage(format!(
                "kind {other:?} takes its credentials from a spec file (-f); flags cover setu_partner, comm100_partner, oauth2_client_credentials and oauth2_password"
            )))
        }
    };
    let secret = read_secret(&format!("{secret_field} for {tenant}"))?;
    let mut creds = Map::new();
    creds.insert("client_id".into(), json!(client_id));
    if let Some((k, v)) = extra {
        creds.insert(k.into(), json!(v));
    }
    creds.insert(secret_field.into(), json!(secret.expose_secret()));
    Ok(Value::Object(creds))
}

/// The spec `tenants create` sends: the file, or one built from the flags.
fn create_spec(args: &CreateArgs) -> Result<Value, Failure> {
    if let Some(f) = &args.file {
        return read_json_file(f);
    }
    let (Some(id), Some(kind), Some(token_url)) = (&args.id, &args.kind, &args.token_url) else {
        return Err(Failure::Usage(
            "give -f spec.json, or the tenant id with --kind and --token-url".into(),
        ));
    };
    let mut issuer = json!({"kind": kind, "token_url": token_url});
    if let Some(ttl) = args.default_ttl_seconds {
        issuer["default_ttl_seconds"] = json!(ttl);
    }
    if let Some(scope) = &args.scope {
        issuer["scope"] = json!(scope);
    }
    let mut spec = json!({
        "id": id,
        "issuer": issuer,
        "credentials": credentials_for(kind, &args.credentials, id)?,
    });
    if let Some(n) = &args.display_name {
        spec["display_name"] = json!(n);
    }
    Ok(spec)
}

fn tenant_table(v: &Value) -> String {
    let rows = v["tenants"].as_array().into_iter().flatten().map(|t| {
        let h = &t["health"];
        vec![
            output::text(t, "id"),
            output::text(&t["issuer"], "kind"),
            output::health_summary(h),
            output::text(h, "last_success_at"),
            output::token_left(h),
            h["mints_last_hour"]
                .as_i64()
                .map_or_else(|| "-".into(), |n| n.to_string()),
            output::text(t, "display_name"),
        ]
    });
    output::table(
        &[
            "ID",
            "KIND",
            "HEALTH",
            "LAST SUCCESS",
            "TOKEN LEFT",
            "MINTS 1H",
            "NAME",
        ],
        rows,
    )
}

fn tenant_fields(t: &Value) -> String {
    let h = &t["health"];
    let last_error = match h["last_error"].as_object() {
        Some(e) => format!(
            "{} at {}: {}",
            output::text(&h["last_error"], "code"),
            e.get("at").and_then(Value::as_str).unwrap_or("-"),
            output::text(&h["last_error"], "detail")
        ),
        None => "-".into(),
    };
    let circuit = match h["circuit"].as_object() {
        Some(_) if h["circuit"]["open"].as_bool() == Some(true) => format!(
            "open ({} failures, {})",
            output::text(&h["circuit"], "failures"),
            if h["circuit"]["probed"].as_bool() == Some(true) {
                "probed each second a token is needed".to_string()
            } else {
                format!("retry in {} s", output::text(&h["circuit"], "retry_after"))
            }
        ),
        Some(_) => format!(
            "closed ({} recent failures)",
            output::text(&h["circuit"], "failures")
        ),
        None => "closed".into(),
    };
    let fields: Vec<String> = t["credential_fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    output::fields(&[
        ("id", output::text(t, "id")),
        ("display name", output::text(t, "display_name")),
        ("kind", output::text(&t["issuer"], "kind")),
        ("token url", output::text(&t["issuer"], "token_url")),
        ("credentials", format!("{} (write-only)", fields.join(", "))),
        ("version", output::text(t, "version")),
        ("updated", output::text(t, "updated_at")),
        ("health", output::health_summary(h)),
        ("last success", output::text(h, "last_success_at")),
        ("last error", last_error),
        ("circuit", circuit),
        ("token left", output::token_left(h)),
        (
            "mints (1 h)",
            h["mints_last_hour"]
                .as_i64()
                .map_or_else(|| "-".into(), |n| n.to_string()),
        ),
    ])
}

fn scope_text(v: &Value) -> String {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|t| t.as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join(","),
        other => other.as_str().unwrap_or("-").to_owned(),
    }
}

fn caller_table(v: &Value) -> String {
    let rows = v["callers"].as_array().into_iter().flatten().map(|c| {
        vec![
            output::text(c, "id"),
            output::text(c, "name"),
            scope_text(&c["tenants"]),
            output::text(c, "created_at"),
        ]
    });
    output::table(&["ID", "NAME", "TENANTS", "CREATED"], rows)
}

fn audit_table(entries: &[Value], header: bool) -> String {
    let rows = entries.iter().map(|e| {
        let count = e["count"].as_i64().unwrap_or(1);
        vec![
            output::text(e, "at"),
            output::text(e, "action"),
            output::text(e, "outcome"),
            output::text(e, "caller"),
            output::text(e, "tenant"),
            if count > 1 {
                format!("×{count}")
            } else {
                String::new()
            },
            output::text(e, "detail"),
        ]
    });
    let t = output::table(
        &["AT", "ACTION", "OUTCOME", "BY", "TENANT", "COUNT", "DETAIL"],
        rows,
    );
    if header {
        t
    } else {
        t.lines().skip(1).collect::<Vec<_>>().join("\n")
    }
}
