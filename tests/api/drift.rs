//! The documents cannot drift from the code: every environment variable the broker reads is
//! in README's configuration table (and every one there is read), every metric a running
//! broker exports and every metric the code defines is in README's metric table (and every
//! one there exists), and every problem code of the problem table is in openapi.yaml's
//! `Problem.code` list and in README (and every code listed there exists).

use std::collections::BTreeSet;

use serde_json::json;

use crate::backends;
use crate::helpers::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Every `"NAME"` string literal in `text` that looks like an environment variable the broker
/// reads (`BROKER_…`, `DATABASE_URL`, `REDIS_URL`, `RUST_LOG`).
fn env_literals(text: &str) -> BTreeSet<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            (s.starts_with("BROKER_") || ["DATABASE_URL", "REDIS_URL", "RUST_LOG"].contains(s))
                && s.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_owned)
        .collect()
}

/// The first cell of each row of README's tables whose first cell is a backticked name with
/// `prefix` (`| \`NAME\` | …`); a cell may hold several names (`\`a\`, \`b\``).
fn table_names(readme: &str, prefix: &str) -> BTreeSet<String> {
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" |").next())
        .flat_map(|cell| cell.split(", "))
        .filter_map(|n| n.strip_prefix('`')?.strip_suffix('`'))
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_environment_variable_is_documented() {
    // Every name the code reads is one constant of `config::env`; no other code spells one
    // (a literal outside that module would be a second source).
    let read_by_code: BTreeSet<String> = token_broker::config::env::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let config = read("src/config.rs");
    let code = config.split("#[cfg(test)]").next().unwrap();
    assert_eq!(
        env_literals(code),
        read_by_code,
        "config::env is the one list"
    );
    for file in ["src/main.rs", "src/cli/mod.rs", "src/app.rs"] {
        let stray = env_literals(&read(file));
        assert!(stray.is_empty(), "{file} spells {stray:?}: use config::env");
    }
    let readme = read("README.md");
    let mut documented = table_names(&readme, "BROKER_");
    documented.extend(table_names(&readme, "DATABASE_URL"));
    documented.extend(table_names(&readme, "REDIS_URL"));
    documented.extend(table_names(&readme, "RUST_LOG"));
    let undocumented: Vec<_> = read_by_code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&read_by_code).collect();
    assert!(
        undocumented.is_empty(),
        "read by the code but not in README's configuration table: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "in README's configuration table but read nowhere: {unknown:?}"
    );
}

#[test]
fn every_problem_code_is_in_the_spec_and_the_readme() {
    let codes: BTreeSet<String> = token_broker::api::problem::problems()
        .map(|(c, _, _)| c.to_string())
        .collect();
    let spec: serde_yaml::Value = serde_yaml::from_str(&read("openapi.yaml")).unwrap();
    let listed: BTreeSet<String> = spec["components"]["schemas"]["Problem"]["properties"]["code"]
        ["examples"]
        .as_sequence()
        .expect("Problem.code examples")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = codes.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&codes).collect();
    assert!(
        missing.is_empty(),
        "codes openapi.yaml's Problem.code lacks: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "codes in openapi.yaml that do not exist: {unknown:?}"
    );
    let readme = read("README.md");
    let absent: Vec<_> = codes
        .iter()
        .filter(|c| !readme.contains(&format!("`{c}`")))
        .collect();
    assert!(absent.is_empty(), "codes README never names: {absent:?}");
}

/// Metric names on a running broker's `/metrics` after some traffic, and every metric name the
/// code defines, against README's metric table.
async fn every_metric_is_documented(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    assert_eq!(app.get_token("acme", &key).await.status, 200);
    let text = app.get("/metrics").await.text;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let metrics_rs = ["src/metrics/mod.rs", "src/metrics/tenants.rs"]
        .map(|f| read(f).split("#[cfg(test)]").next().unwrap().to_owned())
        .concat();
    let defined: BTreeSet<String> = metrics_rs
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| (s.starts_with("broker_") || s.starts_with("http_")) && !s.contains(' '))
        .map(str::to_owned)
        .collect();
    let readme = read("README.md");
    let mut documented = table_names(&readme, "broker_");
    documented.extend(table_names(&readme, "process_"));
    documented.extend(table_names(&readme, "http_"));
    // `process_*` rows list each series in their meaning column.
    for name in exported.iter().filter(|n| n.starts_with("process_")) {
        if readme.contains(&format!("`{name}`")) {
            documented.insert(name.clone());
        }
    }
    let undocumented: Vec<_> = exported
        .union(&defined)
        .filter(|n| !documented.contains(*n))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics not in README's metric table: {undocumented:?}"
    );
    let gone: Vec<_> = documented
        .iter()
        .filter(|n| (n.starts_with("broker_") || n.starts_with("http_")) && !defined.contains(*n))
        .collect();
    assert!(
        gone.is_empty(),
        "README documents metrics the code does not define: {gone:?}"
    );
}
backends!(every_metric_is_documented: Sqlite);
