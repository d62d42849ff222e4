//! A newcomer's path with the real binary: the first start prints an admin token once, later
//! starts reuse it, `admin-token --rotate` replaces it on a running broker, Postgres insists
//! on an explicit one; and the admin CLI drives a live broker end to end.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::helpers::*;

const SECRET: &str = "cli-planted-secret-Zq81";

fn admin_token_in(stdout: &str) -> Option<String> {
    stdout
        .split_whitespace()
        .map(|w| w.trim_start_matches("BROKER_ADMIN_TOKEN="))
        .find(|w| w.starts_with("tbadmin_") && w.len() == "tbadmin_".len() + 43)
        .map(str::to_owned)
}

async fn admin_status(broker: &BrokerProcess, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}/admin/v1/tenants", broker.address))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The binary with `args`, the given environment only (plus PATH) and `stdin` piped in.
fn run(args: &[&str], envs: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_first_start_prints_an_admin_token_once_and_rotation_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = BrokerProcess::start_in(dir.path(), &[]).await;
    let printed = first.stdout();
    let token =
        admin_token_in(&printed).unwrap_or_else(|| panic!("no admin token printed: {printed}"));
    assert!(
        printed.contains("Next: export BROKER_ADMIN_TOKEN="),
        "{printed}"
    );
    assert!(
        !first.stderr().contains(&token),
        "the token reached a log line"
    );
    let hash_file = dir.path().join("broker.db.admin-token");
    let stored = std::fs::read_to_string(&hash_file).unwrap();
    assert!(stored.starts_with("sha256:") && !stored.contains(&token));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&hash_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert_eq!(admin_status(&first, &token).await, 200);
    assert_eq!(admin_status(&first, "tbadmin_guess").await, 401);
    drop(first);

    // A later start reuses the stored hash and prints nothing.
    let second = BrokerProcess::start_in(dir.path(), &[]).await;
    assert_eq!(admin_status(&second, &token).await, 200);
    assert!(admin_token_in(&second.stdout()).is_none(), "printed again");
    let said = format!("{}{}", second.stdout(), second.stderr());
    assert!(
        said.contains("admin-token --rotate"),
        "says how to get a new one: {said}"
    );

    // Rotation on the command line takes effect on the running broker.
    let db = format!("sqlite://{}/broker.db", dir.path().display());
    let rotated = run(&["admin-token", "--rotate"], &[("DATABASE_URL", &db)], "");
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let new = admin_token_in(&text(&rotated.stdout)).expect("a new token printed");
    assert_ne!(new, token);
    assert_eq!(admin_status(&second, &token).await, 401);
    assert_eq!(admin_status(&second, &new).await, 200);
    let status = run(&["admin-token"], &[("DATABASE_URL", &db)], "");
    assert!(status.status.success() && admin_token_in(&text(&status.stdout)).is_none());

    // An explicit BROKER_ADMIN_TOKEN wins over the generated one.
    drop(second);
    let explicit = BrokerProcess::start_in(
        dir.path(),
        &[("BROKER_ADMIN_TOKEN", "my-own-admin-token-0123456789abcdef")],
    )
    .await;
    assert_eq!(
        admin_status(&explicit, "my-own-admin-token-0123456789abcdef").await,
        200
    );
    assert_eq!(admin_status(&explicit, &new).await, 401);
    assert!(explicit.stdout().is_empty());
}

#[test]
fn postgres_without_an_admin_token_refuses_to_start_naming_the_variable() {
    // Refused before any connection, so no Postgres is needed here.
    let out = run(
        &["serve"],
        &[
            ("DATABASE_URL", "postgres://broker@127.0.0.1:1/broker"),
            (
                "BROKER_ENCRYPTION_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
            ("BROKER_LISTEN", "127.0.0.1:0"),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("BROKER_ADMIN_TOKEN") && err.contains("Postgres"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// A first start that fails after generating the admin token (here: a key file others may
/// read) removes the hash file it created, so the start after the fix prints a token instead
/// of locking the operator out.
#[cfg(unix)]
#[test]
fn a_failed_first_start_leaves_no_admin_token_file_behind() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("broker.db.key");
    std::fs::write(&key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let db = format!("sqlite://{}/broker.db?mode=rwc", dir.path().display());
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("BROKER_LISTEN", "127.0.0.1:0"),
    ];
    let failed = run(&["serve"], &env, "");
    assert!(!failed.status.success());
    assert!(
        text(&failed.stderr).contains("chmod 600"),
        "{}",
        text(&failed.stderr)
    );
    assert!(admin_token_in(&text(&failed.stdout)).is_none());
    let hash_file = dir.path().join("broker.db.admin-token");
    assert!(
        !hash_file.exists(),
        "the failed start left its admin token file"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_weak_admin_token_refuses_to_start_naming_the_variable_never_the_value() {
    for weak in ["a", "change-me-admin", "short-but-not-placeholder-29ch"] {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/b.db?mode=rwc", dir.path().display());
        let out = run(
            &["serve"],
            &[
                ("DATABASE_URL", &db),
                ("BROKER_ADMIN_TOKEN", weak),
                ("BROKER_LISTEN", "127.0.0.1:0"),
            ],
            "",
        );
        assert_eq!(out.status.code(), Some(2), "{weak}");
        let err = text(&out.stderr);
        assert!(
            err.contains("BROKER_ADMIN_TOKEN") && err.contains("at least 32"),
            "{err}"
        );
        assert!(weak.len() < 3 || !err.contains(weak), "{err}");
    }
}

/// A broker process, a fake partner, and the CLI pointed at them.
struct Cli {
    broker: BrokerProcess,
    partner: wiremock::MockServer,
}

impl Cli {
    async fn start() -> Self {
        Self {
            broker: BrokerProcess::start(&[]).await,
            partner: setu_partner(300, 0).await,
        }
    }

    fn run(&self, args: &[&str], stdin: &str) -> Output {
        let env = [
            ("BROKER_URL", self.broker.address.as_str()),
            ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN),
        ];
        run(args, &env, stdin)
    }

    /// The JSON a successful command printed.
    fn json(&self, args: &[&str], stdin: &str) -> Value {
        let o = self.run(args, stdin);
        assert!(o.status.success(), "{}", text(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// `tenants create acme` for a Setu-style tenant from flags (the secret goes on stdin).
    fn create_args(&self) -> Vec<String> {
        let token_url = format!("{}/auth/token", self.partner.uri());
        [
            "tenants",
            "create",
            "acme",
            "--kind",
            "setu_partner",
            "--token-url",
            &token_url,
            "--client-id",
            "acme-client",
            "--display-name",
            "Acme",
            "-o",
            "json",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn create_acme(&self) -> Value {
        let args = self.create_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.json(&args, &format!("{SECRET}\n"))
    }

    /// Nothing secret reached the broker's log.
    fn assert_logs_hold_none_of(&self, secrets: &[&str]) {
        let logs = self.broker.stderr();
        for secret in secrets {
            assert!(!logs.contains(secret), "a secret reached the broker's log");
        }
    }
}

/// Tenants through the CLI: create with the secret on stdin (the partner receives it), test,
/// list (health, token left, mints), show, update, new credentials, delete.
#[tokio::test]
async fn the_cli_registers_tests_updates_and_deletes_a_tenant() {
    let t = Cli::start().await;
    let created = t.create_acme();
    assert_eq!(created["id"], "acme");
    assert_eq!(created["credential_fields"][1], "client_secret");
    assert!(
        t.partner.received_requests().await.unwrap().is_empty(),
        "created without a partner call"
    );

    let tested = t.json(&["tenants", "test", "acme", "-o", "json"], "");
    assert_eq!(tested["ok"], true);
    let sent = t.partner.received_requests().await.unwrap();
    let form = form_of(sent.last().unwrap());
    assert_eq!(
        form["client_secret"], SECRET,
        "the secret from stdin reached the partner"
    );
    assert_eq!(form["client_id"], "acme-client");

    // The mint's health row is written off the caller's path: read it again for up to 5 s.
    let mut list = t.json(&["tenants", "list"], "");
    for _ in 0..50 {
        if list["tenants"][0]["health"]["mints_last_hour"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        list = t.json(&["tenants", "list"], "");
    }
    let health = &list["tenants"][0]["health"];
    assert_eq!(list["tenants"][0]["id"], "acme");
    assert_eq!(health["mints_last_hour"], 1, "{health}");
    assert!(
        health["token"]["expires_in"].as_i64().unwrap() > 250,
        "{health}"
    );
    let table = t.run(&["tenants", "list", "-o", "table"], "");
    let table = text(&table.stdout);
    assert!(
        table.starts_with("ID") && table.contains("acme") && table.contains(" ok "),
        "{table}"
    );
    let shown = t.run(&["tenants", "show", "acme", "-o", "table"], "");
    assert!(text(&shown.stdout).contains("client_id, client_secret (write-only)"));

    let updated = t.json(
        &[
            "tenants",
            "update",
            "acme",
            "--display-name",
            "Acme Corp",
            "-o",
            "json",
        ],
        "",
    );
    assert_eq!(updated["display_name"], "Acme Corp");
    let rotated = t.run(
        &[
            "tenants",
            "update",
            "acme",
            "--client-id",
            "acme-2",
            "-o",
            "json",
        ],
        "rotated-secret\n",
    );
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    t.json(&["tenants", "test", "acme", "-o", "json"], "");
    let form = form_of(t.partner.received_requests().await.unwrap().last().unwrap());
    assert_eq!(
        (form["client_id"].as_str(), form["client_secret"].as_str()),
        ("acme-2", "rotated-secret")
    );

    assert!(t.run(&["tenants", "delete", "acme"], "").status.success());
    assert_eq!(
        t.run(&["tenants", "show", "acme"], "").status.code(),
        Some(1)
    );
    t.assert_logs_hold_none_of(&[SECRET, "rotated-secret"]);
}

/// Callers through the CLI (the key it prints once fetches a token), and the audit trail,
/// read and followed.
#[tokio::test]
async fn the_cli_manages_callers_and_follows_the_audit_trail() {
    let t = Cli::start().await;
    t.create_acme();
    t.json(
        &["tenants", "update", "acme", "--display-name", "Acme Corp"],
        "",
    );
    let caller = t.json(
        &[
            "callers", "create", "--name", "billing", "--tenant", "acme", "-o", "json",
        ],
        "",
    );
    let key = caller["api_key"].as_str().unwrap().to_owned();
    let fetched = reqwest::Client::new()
        .get(format!("{}/v1/tenants/acme/token", t.broker.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    // `audit --follow` prints entries as they arrive, one JSON object per line.
    // Started the way a background job of a non-interactive shell is: SIGINT ignored.
    let mut follow = Command::new("sh")
        .args([
            "-c",
            &format!(
                "trap '' INT; exec {} audit --follow --limit 1 -o json",
                env!("CARGO_BIN_EXE_token-broker")
            ),
        ])
        .env_clear()
        .env("BROKER_URL", &t.broker.address)
        .env("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the latest entry");
    assert!(serde_json::from_str::<Value>(&first).is_ok(), "{first}");
    t.json(
        &[
            "callers", "create", "--name", "followed", "--tenant", "*", "-o", "json",
        ],
        "",
    );
    let arrived = (0..3).find_map(|_| {
        let line = rx.recv_timeout(std::time::Duration::from_secs(5)).ok()?;
        let e: Value = serde_json::from_str(&line).unwrap();
        (e["action"] == "caller.create").then_some(e)
    });
    // SIGINT ends it cleanly (exit 0) although the shell ignored it.
    let interrupted = Command::new("kill")
        .args(["-INT", &follow.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let mut status = None;
    for _ in 0..50 {
        if let Some(s) = follow.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let Some(status) = status else {
        let _ = follow.kill();
        panic!("audit --follow ignored SIGINT");
    };
    assert_eq!(status.code(), Some(0), "a clean stop");
    assert!(arrived.is_some_and(|e| e["detail"].as_str().unwrap().contains("followed")));

    // Change a caller and rotate its key from the CLI; YAML output.
    let id = caller["id"].as_str().unwrap();
    let updated = t.json(
        &[
            "callers",
            "update",
            id,
            "--name",
            "billing-v2",
            "-o",
            "json",
        ],
        "",
    );
    assert_eq!(updated["name"], "billing-v2");
    assert_eq!(updated["tenants"], serde_json::json!(["acme"]));
    let rotated = t.json(
        &[
            "callers",
            "rotate-key",
            id,
            "--grace-seconds",
            "60",
            "-o",
            "json",
        ],
        "",
    );
    let new_key = rotated["api_key"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with("tbk_") && new_key != key);
    assert!(rotated["previous_key_expires_at"].is_string());
    let nothing = t.run(&["callers", "update", id], "");
    assert_eq!(nothing.status.code(), Some(2));
    let yaml = t.run(&["callers", "list", "-o", "yaml"], "");
    assert!(yaml.status.success());
    let doc: serde_yaml::Value = serde_yaml::from_slice(&yaml.stdout).unwrap();
    assert!(
        doc["callers"].as_sequence().is_some_and(|c| c.len() == 2),
        "{}",
        text(&yaml.stdout)
    );

    // Completion scripts and the manual page.
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completion", shell], &[], "");
        assert!(
            out.status.success() && text(&out.stdout).contains("rotate-key"),
            "{shell}"
        );
    }
    let man = run(&["man"], &[], "");
    assert!(
        man.status.success() && text(&man.stdout).starts_with(".ie"),
        "{}",
        text(&man.stdout)
    );

    let callers = t.json(&["callers", "list"], "");
    let names: Vec<&str> = callers["callers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"billing-v2") && names.contains(&"followed"),
        "{names:?}"
    );

    let audit = t.json(&["audit", "--tenant", "acme", "-o", "json"], "");
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in ["tenant.create", "tenant.update", "token.fetch"] {
        assert!(actions.contains(&want), "{want} not in {actions:?}");
    }

    let deleted = t.run(&["callers", "delete", caller["id"].as_str().unwrap()], "");
    assert!(deleted.status.success());
    t.assert_logs_hold_none_of(&[SECRET, &key, &new_key]);
}

/// Any kind from a spec file (`-f`, or `-f -` for standard input), and a merge-patch file.
#[tokio::test]
async fn the_cli_takes_specs_and_patches_from_files() {
    let t = Cli::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = serde_json::json!({
        "id": "from-file",
        "issuer": {"kind": "comm100_partner", "token_url": format!("{}/oauth/token", t.partner.uri())},
        "credentials": {"client_id": "c1", "email": "a@b.c", "password": SECRET}
    });
    let file = dir.path().join("spec.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    let created = t.json(
        &[
            "tenants",
            "create",
            "-f",
            file.to_str().unwrap(),
            "-o",
            "json",
        ],
        "",
    );
    assert_eq!(created["issuer"]["kind"], "comm100_partner");
    let mut piped = spec.clone();
    piped["id"] = "from-stdin".into();
    let created = t.json(
        &["tenants", "create", "-f", "-", "-o", "json"],
        &piped.to_string(),
    );
    assert_eq!(created["id"], "from-stdin");
    let patch = dir.path().join("patch.json");
    std::fs::write(
        &patch,
        r#"{"display_name": "Patched", "issuer": {"timeout_ms": 2500}}"#,
    )
    .unwrap();
    let updated = t.json(
        &[
            "tenants",
            "update",
            "from-file",
            "-f",
            patch.to_str().unwrap(),
            "-o",
            "json",
        ],
        "",
    );
    assert_eq!(updated["display_name"], "Patched");
    assert_eq!(updated["issuer"]["timeout_ms"], 2500);
    std::fs::write(&patch, "not json").unwrap();
    let bad = t.run(
        &[
            "tenants",
            "update",
            "from-file",
            "-f",
            patch.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("not JSON"),
        "{}",
        text(&bad.stderr)
    );
    t.assert_logs_hold_none_of(&[SECRET]);
}

/// Failures: the problem code and exit 1 when the broker refuses or cannot be reached; exit 2
/// when the command itself is wrong.
#[tokio::test]
async fn the_cli_says_what_failed_with_its_exit_code() {
    let t = Cli::start().await;
    // Failures: the problem code and exit 1; usage errors exit 2; nothing secret on any output.
    let missing = t.run(&["tenants", "show", "nope"], "");
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("tenant_not_found"));
    let invalid = t.run(
        &[
            "tenants",
            "create",
            "bad",
            "--kind",
            "setu_partner",
            "--token-url",
            "ftp://x",
            "--client-id",
            "c",
        ],
        "s\n",
    );
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        text(&invalid.stderr).contains("invalid_spec"),
        "{}",
        text(&invalid.stderr)
    );
    assert_eq!(t.run(&["tenants", "frobnicate"], "").status.code(), Some(2));
    let args = t.create_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let no_secret = t.run(&args, "");
    assert_eq!(no_secret.status.code(), Some(2));
    let no_token = run(
        &["tenants", "list"],
        &[("BROKER_URL", &t.broker.address)],
        "",
    );
    assert_eq!(no_token.status.code(), Some(2));
    assert!(text(&no_token.stderr).contains("BROKER_ADMIN_TOKEN"));
    let unreachable = run(
        &["tenants", "list"],
        &[
            ("BROKER_URL", "http://127.0.0.1:1"),
            ("BROKER_ADMIN_TOKEN", "x"),
        ],
        "",
    );
    assert_eq!(unreachable.status.code(), Some(1));
}

/// The CLI sends the admin token (and partner secrets) only where BROKER_URL points: a redirect
/// is an error naming its location, never followed; plain http only to loopback unless
/// `--insecure`; what the broker answers is shown with terminal escapes defused.
#[tokio::test]
async fn the_cli_follows_no_redirect_and_keeps_http_on_loopback() {
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let elsewhere = MockServer::start().await;
    let redirector = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("{}/stolen", elsewhere.uri()).as_str()),
        )
        .mount(&redirector)
        .await;
    let url = redirector.uri();
    let created = tokio::task::spawn_blocking(move || {
        run(
            &[
                "tenants",
                "create",
                "acme",
                "--kind",
                "setu_partner",
                "--token-url",
                "https://partner.example.com/token",
                "--client-id",
                "acme",
            ],
            &[("BROKER_URL", &url), ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)],
            &format!("{SECRET}\n"),
        )
    })
    .await
    .unwrap();
    assert_eq!(created.status.code(), Some(1));
    let err = text(&created.stderr);
    assert!(
        err.contains("307") && err.contains("/stolen") && err.contains("not followed"),
        "{err}"
    );
    assert!(
        elsewhere.received_requests().await.unwrap().is_empty(),
        "followed the redirect"
    );

    let remote = run(
        &["tenants", "list"],
        &[
            ("BROKER_URL", "http://192.0.2.1:8080"),
            ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
        "",
    );
    assert_eq!(remote.status.code(), Some(2));
    assert!(
        text(&remote.stderr).contains("--insecure"),
        "{}",
        text(&remote.stderr)
    );

    // A fake broker whose answer carries a terminal escape in a field.
    let tenant = serde_json::json!({"id": "acme", "display_name": "Acme\u{1b}[2J",
        "issuer": {"kind": "setu_partner", "token_url": "https://x.example.com/\u{1b}[2J"},
        "credential_fields": ["client_id", "client_secret"], "version": 1,
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "health": {"state": "ok", "last_success_at": null, "last_error": null, "circuit": null,
            "token": null, "mints_last_hour": 2, "failed_mints_last_hour": 0}});
    let listed = list_from_fake_broker(serde_json::json!({ "tenants": [tenant.clone()] })).await;
    let out = text(&listed.stdout);
    assert!(listed.status.success(), "{out}{}", text(&listed.stderr));
    assert!(
        !out.contains('\u{1b}') && out.contains("\\u{1b}[2J"),
        "{out}"
    );
    // A broker whose answer lacks a field the table shows (renamed in another version): the
    // CLI fails naming it instead of printing a default.
    let mut renamed = tenant;
    let health = renamed["health"].as_object_mut().unwrap();
    let mints = health.remove("mints_last_hour").unwrap();
    health.insert("mints".into(), mints);
    let listed = list_from_fake_broker(serde_json::json!({ "tenants": [renamed] })).await;
    let err = text(&listed.stderr);
    assert_eq!(listed.status.code(), Some(1), "{err}");
    assert!(err.contains("mints_last_hour"), "{err}");
    assert!(text(&listed.stdout).is_empty());
}

/// `tenants list -o table` against a fake broker answering `page`.
async fn list_from_fake_broker(page: serde_json::Value) -> Output {
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let fake = MockServer::start().await;
    Mock::given(wiremock::matchers::path("/admin/v1/tenants"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page))
        .mount(&fake)
        .await;
    let url = fake.uri().replace("127.0.0.1", "localhost");
    tokio::task::spawn_blocking(move || {
        run(
            &["tenants", "list", "-o", "table"],
            &[("BROKER_URL", &url), ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)],
            "",
        )
    })
    .await
    .unwrap()
}

/// A Postgres database that does not exist: the start says which and how to create it (before:
/// only "the database is unavailable").
#[test]
fn a_missing_postgres_database_is_named() {
    let Some(admin) = postgres_admin_url() else {
        skip("Postgres");
        return;
    };
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path("/tb_missing_database_x");
    let out = run(
        &["serve"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("BROKER_ADMIN_TOKEN", ADMIN_TOKEN),
            (
                "BROKER_ENCRYPTION_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
            ("BROKER_LISTEN", "127.0.0.1:0"),
        ],
        "",
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("\"tb_missing_database_x\" does not exist") && err.contains("createdb"),
        "{err}"
    );
}
