//! Admin input for tenants: deserialised strictly, then validated per issuer kind, every
//! failure naming the offending field. Error messages never repeat submitted values.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::proxy::ProxySpec;
use super::template;
use super::{Credentials, TenantId};
use crate::egress as guard;

/// A spec that does not validate: `field` is a dotted path into the submitted JSON.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    SetuPartner,
    Comm100Partner,
    Oauth2ClientCredentials,
    Oauth2Password,
    /// The JWT bearer grant (RFC 7523 §2.1): a signed `issuer.assertion` instead of a secret.
    JwtBearer,
    Custom,
}

impl IssuerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SetuPartner => "setu_partner",
            Self::Comm100Partner => "comm100_partner",
            Self::Oauth2ClientCredentials => "oauth2_client_credentials",
            Self::Oauth2Password => "oauth2_password",
            Self::JwtBearer => "jwt_bearer",
            Self::Custom => "custom",
        }
    }

    fn is_oauth2(self) -> bool {
        matches!(self, Self::Oauth2ClientCredentials | Self::Oauth2Password)
    }

    /// Kinds that speak OAuth 2.0 at the token endpoint (and so may bind tokens with DPoP).
    fn speaks_oauth(self) -> bool {
        self.is_oauth2() || self == Self::JwtBearer
    }
}

/// One credential field as a form shows it: `pem` for keys and certificates (a text area and
/// a file picker), `password` for secrets (write-only), `text` otherwise.
#[derive(Clone, Debug, Serialize)]
pub struct FieldInfo {
    pub name: &'static str,
    pub input: &'static str,
    pub required: bool,
}

/// A client authentication and the credentials it takes.
#[derive(Clone, Debug, Serialize)]
pub struct AuthMethodInfo {
    pub method: AuthMethod,
    pub credentials: Vec<FieldInfo>,
}

/// What `GET /admin/v1/kinds` says of a kind: the one source of the credential fields the
/// console's forms and the CLI's flags offer.
#[derive(Clone, Debug, Serialize)]
pub struct KindInfo {
    pub kind: IssuerKind,
    pub label: &'static str,
    /// Registrable from a form of fields (custom and jwt_bearer need a spec).
    pub form: bool,
    /// With the default client authentication; `None`: any names its templates use.
    pub credentials: Option<Vec<FieldInfo>>,
    /// The oauth2 kinds' client authentications, each with its credentials (else empty).
    pub auth_methods: Vec<AuthMethodInfo>,
}

const ALL_KINDS: [IssuerKind; 6] = [
    IssuerKind::SetuPartner,
    IssuerKind::Comm100Partner,
    IssuerKind::Oauth2ClientCredentials,
    IssuerKind::Oauth2Password,
    IssuerKind::JwtBearer,
    IssuerKind::Custom,
];

const ALL_AUTH_METHODS: [AuthMethod; 6] = [
    AuthMethod::ClientSecretBasic,
    AuthMethod::ClientSecretPost,
    AuthMethod::ClientSecretJwt,
    AuthMethod::PrivateKeyJwt,
    AuthMethod::TlsClientAuth,
    AuthMethod::SelfSignedTlsClientAuth,
];

impl IssuerKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::SetuPartner => "Setu partner",
            Self::Comm100Partner => "Comm100 partner",
            Self::Oauth2ClientCredentials => "OAuth 2.0 client credentials",
            Self::Oauth2Password => "OAuth 2.0 password",
            Self::JwtBearer => "JWT bearer grant (RFC 7523)",
            Self::Custom => "Custom recipe",
        }
    }
}

fn field_infos(spec: &IssuerSpec) -> Option<Vec<FieldInfo>> {
    let (required, optional) = spec.credential_fields()?;
    let input = |name: &str| match name {
        n if KEY_FIELDS.contains(&n) || n == "tls_certificate" => "pem",
        "client_secret" | "password" => "password",
        _ => "text",
    };
    let fields = required
        .into_iter()
        .map(|name| (name, true))
        .chain(optional.into_iter().map(|name| (name, false)))
        // A DPoP key is the broker's own unless an admin brings one: not asked for here.
        .filter(|(name, _)| *name != "dpop_private_key")
        .map(|(name, required)| FieldInfo {
            name,
            input: input(name),
            required,
        });
    Some(fields.collect())
}

/// Every kind, its credential fields and (oauth2 kinds) its client authentications.
pub fn catalogue() -> Vec<KindInfo> {
    let spec = |kind: IssuerKind, method: Option<AuthMethod>| {
        let mut s: IssuerSpec =
            serde_json::from_value(serde_json::json!({"kind": kind, "token_url": "https://x"}))
                .expect("a minimal spec");
        s.auth_method = method;
        s
    };
    ALL_KINDS
        .into_iter()
        .map(|kind| KindInfo {
            kind,
            label: kind.label(),
            form: !matches!(kind, IssuerKind::Custom | IssuerKind::JwtBearer),
            credentials: field_infos(&spec(kind, None)),
            auth_methods: if kind.is_oauth2() {
                ALL_AUTH_METHODS
                    .into_iter()
                    .map(|m| AuthMethodInfo {
                        method: m,
                        credentials: field_infos(&spec(kind, Some(m))).unwrap_or_default(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect()
}

/// Credential fields holding private keys: sealed like the rest, checked to parse at write.
pub const KEY_FIELDS: [&str; 3] = ["private_key", "tls_private_key", "dpop_private_key"];

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// HTTP Basic with the form-urlencoded client id and secret (RFC 6749 §2.3.1); the default.
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
    /// An HS256 client assertion made with `client_secret` (RFC 7523, OIDC Core §9).
    ClientSecretJwt,
    /// A client assertion signed with `private_key` (RFC 7523 §2.2, OIDC Core §9).
    PrivateKeyJwt,
    /// The TLS client certificate `tls_certificate` (PKI-bound, RFC 8705 §2.1).
    TlsClientAuth,
    /// A self-signed TLS client certificate (RFC 8705 §2.2).
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    pub fn is_tls(self) -> bool {
        matches!(self, Self::TlsClientAuth | Self::SelfSignedTlsClientAuth)
    }
}

/// The JWT bearer grant's assertion (kind `jwt_bearer`): string values may hold `{{field}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssertionSpec {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Life of each assertion, 1-3600 s (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BodyType {
    #[default]
    Form,
    Json,
}

/// How a `custom` issuer's token request is built; string values may hold `{{field}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomRequest {
    #[serde(default)]
    pub content_type: BodyType,
    #[serde(default)]
    pub body: serde_json::Map<String, Value>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// JSON pointers (RFC 6901) into a `custom` issuer's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomResponse {
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// Where and how a tenant's tokens are minted. Holds no secrets; shown to admins as is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    pub kind: IssuerKind,
    pub token_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ttl_seconds: Option<u64>,
    /// Whole-request timeout of one partner call (default `BROKER_UPSTREAM_TIMEOUT_MS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// At most one partner call per this many ms (partners that allow one token request per
    /// second per client id); applies to every path that mints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval_ms: Option<u64>,
    /// A token younger than this is dropped by callers' reports at most once per this window
    /// (default: 10 s or 5 % of the token's lifetime, whichever is longer; 0 honours every
    /// report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidate_min_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<AuthMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<CustomRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<CustomResponse>,
    /// `private_key_jwt` and `jwt_bearer` with an RSA key: RS256 (default) or PS256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_alg: Option<crate::pop::AssertionAlg>,
    /// The client assertion's `aud` (default: the token endpoint), e.g. the partner's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_audience: Option<String>,
    /// Kind `jwt_bearer`: the assertion's claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<AssertionSpec>,
    /// Bind tokens to the tenant's DPoP key (RFC 9449).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dpop: bool,
    /// Serve the tenant's public keys at `GET /v1/tenants/{id}/jwks.json`, unauthenticated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_jwks: bool,
    /// PEM certificates trusted for this tenant's partner (a private CA), beside the usual roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
}

const MAX_TTL_SECONDS: u64 = 366 * 24 * 3600;
const MAX_TEXT: usize = 512;

impl IssuerSpec {
    /// Checks everything that does not depend on the credentials.
    ///
    /// Long because it is one check per issuer field, in the spec's order, each two or three lines.
    pub fn validate(&self, allow_insecure: bool) -> Result<(), SpecError> {
        guard::check_token_url(&self.token_url, allow_insecure)
            .map_err(|e| SpecError::new("issuer.token_url", e.to_string()))?;
        if let Some(ttl) = self.default_ttl_seconds {
            if ttl == 0 || ttl > MAX_TTL_SECONDS {
                return Err(SpecError::new(
                    "issuer.default_ttl_seconds",
                    format!("must be between 1 and {MAX_TTL_SECONDS}"),
                ));
            }
        }
        if self
            .timeout_ms
            .is_some_and(|t| !(100..=60_000).contains(&t))
        {
            return Err(SpecError::new(
                "issuer.timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if self.invalidate_min_age_ms.is_some_and(|t| t > 3_600_000) {
            return Err(SpecError::new(
                "issuer.invalidate_min_age_ms",
                "must be between 0 and 3600000",
            ));
        }
        if self.min_interval_ms.is_some_and(|t| t > 3_600_000) {
            return Err(SpecError::new(
                "issuer.min_interval_ms",
                "must be between 0 and 3600000",
            ));
        }
        let oauth_only = [
            ("auth_method", self.auth_method.is_some()),
            ("scope", self.scope.is_some()),
            ("audience", self.audience.is_some()),
        ];
        for (name, set) in oauth_only {
            if set && !self.kind.is_oauth2() {
                return Err(SpecError::new(
                    format!("issuer.{name}"),
                    format!("only oauth2 kinds take {name}"),
                ));
            }
        }
        for (name, value) in [("scope", &self.scope), ("audience", &self.audience)] {
            if value
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.len() > MAX_TEXT)
            {
                return Err(SpecError::new(
                    format!("issuer.{name}"),
                    format!("must be 1-{MAX_TEXT} characters"),
                ));
            }
        }
        self.validate_proof_settings()?;
        match (self.kind, &self.request, &self.response) {
            (IssuerKind::Custom, Some(req), Some(resp)) => validate_custom(req, resp),
            (IssuerKind::Custom, None, _) => {
                Err(SpecError::new("issuer.request", "required for kind custom"))
            }
            (IssuerKind::Custom, _, None) => Err(SpecError::new(
                "issuer.response",
                "required for kind custom",
            )),
            (_, Some(_), _) => Err(SpecError::new(
                "issuer.request",
                "only kind custom takes a request recipe",
            )),
            (_, _, Some(_)) => Err(SpecError::new(
                "issuer.response",
                "only kind custom takes a response recipe",
            )),
            _ => Ok(()),
        }
    }

    /// The proof-of-possession settings: each only where it means something.
    fn validate_proof_settings(&self) -> Result<(), SpecError> {
        let method = self.auth_method.unwrap_or_default();
        let signs = self.kind == IssuerKind::JwtBearer || method == AuthMethod::PrivateKeyJwt;
        let asserts = signs || method == AuthMethod::ClientSecretJwt;
        let rules = [
            ("assertion_alg", self.assertion_alg.is_some() && !signs, "only private_key_jwt and jwt_bearer sign with a private key"),
            ("assertion_audience", self.assertion_audience.is_some() && !asserts, "only client assertions (client_secret_jwt, private_key_jwt) and jwt_bearer take an audience"),
            ("dpop", self.dpop && !self.kind.speaks_oauth(), "only oauth2 kinds and jwt_bearer bind tokens with DPoP"),
            ("assertion", self.assertion.is_some() != (self.kind == IssuerKind::JwtBearer), "kind jwt_bearer needs an assertion, and only it takes one"),
        ];
        for (name, broken, why) in rules {
            if broken {
                return Err(SpecError::new(format!("issuer.{name}"), why));
            }
        }
        if self
            .assertion_audience
            .as_ref()
            .is_some_and(|a| a.is_empty() || a.len() > MAX_TEXT)
        {
            return Err(SpecError::new(
                "issuer.assertion_audience",
                format!("must be 1-{MAX_TEXT} characters"),
            ));
        }
        if let Some(a) = &self.assertion {
            for (name, text) in [("iss", &a.iss), ("sub", &a.sub), ("aud", &a.aud)] {
                if text.is_empty() || text.len() > MAX_TEXT {
                    return Err(SpecError::new(
                        format!("issuer.assertion.{name}"),
                        format!("must be 1-{MAX_TEXT} characters"),
                    ));
                }
                template::placeholders(text).map_err(|e| {
                    SpecError::new(format!("issuer.assertion.{name}"), e.to_string())
                })?;
            }
            if a.lifetime_seconds.is_some_and(|l| !(1..=3600).contains(&l)) {
                return Err(SpecError::new(
                    "issuer.assertion.lifetime_seconds",
                    "must be between 1 and 3600",
                ));
            }
        }
        if let Some(ca) = &self.tls_ca {
            let parsed = reqwest::Certificate::from_pem_bundle(ca.as_bytes());
            if ca.len() > 65_536 || !parsed.is_ok_and(|c| !c.is_empty()) {
                return Err(SpecError::new(
                    "issuer.tls_ca",
                    "must be one or more PEM certificates (at most 64 KiB)",
                ));
            }
        }
        Ok(())
    }

    /// (required, optional) credential fields for this kind and client authentication;
    /// `None` for `custom` (any names its templates use).
    pub fn credential_fields(&self) -> Option<(Vec<&'static str>, Vec<&'static str>)> {
        let method = self.auth_method.unwrap_or_default();
        let client: (&[&'static str], &[&'static str]) = match method {
            AuthMethod::ClientSecretBasic
            | AuthMethod::ClientSecretPost
            | AuthMethod::ClientSecretJwt => (&["client_id", "client_secret"], &[]),
            AuthMethod::PrivateKeyJwt => (&["client_id", "private_key"], &["key_id"]),
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                (&["client_id", "tls_certificate", "tls_private_key"], &[])
            }
        };
        let (mut required, mut optional): (Vec<&str>, Vec<&str>) = match self.kind {
            IssuerKind::SetuPartner => (vec!["client_id", "client_secret"], vec![]),
            IssuerKind::Comm100Partner => (vec!["client_id", "email", "password"], vec![]),
            IssuerKind::Oauth2ClientCredentials => (client.0.to_vec(), client.1.to_vec()),
            IssuerKind::Oauth2Password => {
                let mut required = vec!["client_id", "username", "password"];
                let mut optional = vec![];
                match method {
                    // The secret is optional for basic/post (public clients).
                    AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => {
                        optional.push("client_secret")
                    }
                    _ => {
                        required.extend(client.0.iter().filter(|f| **f != "client_id"));
                        optional.extend(client.1);
                    }
                }
                (required, optional)
            }
            IssuerKind::JwtBearer => (
                vec!["private_key"],
                vec!["key_id", "client_id", "client_secret"],
            ),
            IssuerKind::Custom => return None,
        };
        if self.dpop {
            // Generated and sealed at write when not given.
            required.push("dpop_private_key");
        } else if self.kind.speaks_oauth() {
            // Kept when DPoP is turned off, reused if it is turned on again.
            optional.push("dpop_private_key");
        }
        optional.retain(|f| !required.contains(f));
        Some((required, optional))
    }

    /// Fills in what the broker makes itself: a fresh P-256 `dpop_private_key` for a DPoP
    /// tenant that brought none. True when something was added.
    pub fn complete_credentials(&self, creds: &mut Credentials) -> bool {
        if self.dpop && creds.get("dpop_private_key").is_none() {
            let pem = crate::pop::SigningKey::generate_p256_pem();
            creds.insert(
                "dpop_private_key",
                SecretString::from(pem.as_str().to_owned()),
            );
            return true;
        }
        false
    }

    /// The tenant's `private_key`, ready to sign (with `assertion_alg` and `key_id`); `None`
    /// when it has none. The one reading of it: validation, assertions, the JWK set.
    pub fn private_key(
        &self,
        creds: &Credentials,
    ) -> Option<Result<crate::pop::SigningKey, crate::pop::KeyError>> {
        let pem = creds.get("private_key")?;
        Some(crate::pop::SigningKey::from_pem(
            pem,
            self.assertion_alg,
            creds.get("key_id"),
        ))
    }

    /// The tenant's `dpop_private_key`, ready to sign; `None` when it has none.
    pub fn dpop_key(
        creds: &Credentials,
    ) -> Option<Result<crate::pop::SigningKey, crate::pop::KeyError>> {
        let pem = creds.get("dpop_private_key")?;
        Some(crate::pop::SigningKey::from_pem(pem, None, None))
    }

    /// Checks that every key in `creds` can do its job (never saying what it holds).
    fn validate_keys(&self, creds: &Credentials) -> Result<(), SpecError> {
        if let Some(Err(e)) = self.private_key(creds) {
            return Err(SpecError::new("credentials.private_key", e.to_string()));
        }
        if let Some(Err(e)) = Self::dpop_key(creds) {
            return Err(SpecError::new(
                "credentials.dpop_private_key",
                e.to_string(),
            ));
        }
        match (creds.get("tls_certificate"), creds.get("tls_private_key")) {
            (Some(cert), Some(key)) => {
                let pem = zeroize::Zeroizing::new(format!("{cert}\n{key}\n"));
                reqwest::Identity::from_pem(pem.as_bytes()).map_err(|_| {
                    SpecError::new(
                        "credentials.tls_certificate",
                        "tls_certificate and tls_private_key must be a PEM certificate chain and its PEM private key",
                    )
                })?;
            }
            (None, None) => {}
            (_, None) => {
                return Err(SpecError::new(
                    "credentials.tls_private_key",
                    "required with tls_certificate",
                ))
            }
            (None, _) => {
                return Err(SpecError::new(
                    "credentials.tls_certificate",
                    "required with tls_private_key",
                ))
            }
        }
        Ok(())
    }

    /// Checks that `creds` carry exactly what this kind needs (and what the templates use).
    pub fn validate_credentials(&self, creds: &Credentials) -> Result<(), SpecError> {
        self.validate_keys(creds)?;
        if self.publish_jwks
            && creds.get("private_key").is_none()
            && creds.get("dpop_private_key").is_none()
        {
            return Err(SpecError::new(
                "issuer.publish_jwks",
                "the tenant has no key to publish (private_key or dpop)",
            ));
        }
        match self.credential_fields() {
            Some((required, optional)) => {
                for name in &required {
                    if creds.get(name).is_none() {
                        return Err(SpecError::new(
                            format!("credentials.{name}"),
                            format!("required for kind {}", self.kind.as_str()),
                        ));
                    }
                }
                if let Some(extra) = creds
                    .names()
                    .find(|n| !required.contains(n) && !optional.contains(n))
                {
                    return Err(SpecError::new(
                        format!("credentials.{extra}"),
                        format!("not a credential field of kind {}", self.kind.as_str()),
                    ));
                }
            }
            None => {
                let req = self.request.as_ref().expect("validated custom spec");
                for (path, text) in custom_templates(req) {
                    for name in template::placeholders(text)
                        .map_err(|e| SpecError::new(&path, e.to_string()))?
                    {
                        if creds.get(name).is_none() {
                            return Err(SpecError::new(
                                &path,
                                format!("uses {{{{{name}}}}} but credentials has no field {name}"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn custom_templates(req: &CustomRequest) -> Vec<(String, &str)> {
    fn walk<'a>(path: String, v: &'a Value, out: &mut Vec<(String, &'a str)>) {
        match v {
            Value::String(s) => out.push((path, s)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| walk(format!("{path}.{i}"), v, out)),
            Value::Object(o) => o
                .iter()
                .for_each(|(k, v)| walk(format!("{path}.{k}"), v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, v) in &req.body {
        walk(format!("issuer.request.body.{k}"), v, &mut out);
    }
    for (k, v) in &req.headers {
        out.push((format!("issuer.request.headers.{k}"), v.as_str()));
    }
    out
}

fn validate_custom(req: &CustomRequest, resp: &CustomResponse) -> Result<(), SpecError> {
    if req.body.is_empty() && req.headers.is_empty() {
        return Err(SpecError::new(
            "issuer.request",
            "needs a body or headers carrying the credentials",
        ));
    }
    if req.content_type == BodyType::Form {
        if let Some((k, _)) = req.body.iter().find(|(_, v)| !v.is_string()) {
            return Err(SpecError::new(
                format!("issuer.request.body.{k}"),
                "form bodies take string values only",
            ));
        }
    }
    for name in req.headers.keys() {
        let lower = name.to_ascii_lowercase();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || matches!(
                lower.as_str(),
                "host" | "content-length" | "transfer-encoding" | "connection" | "content-type"
            )
        {
            return Err(SpecError::new(
                format!("issuer.request.headers.{name}"),
                "not a header the broker can set",
            ));
        }
    }
    for (path, text) in custom_templates(req) {
        template::placeholders(text).map_err(|e| SpecError::new(path, e.to_string()))?;
    }
    let pointers = [
        ("access_token", Some(&resp.access_token)),
        ("expires_in", resp.expires_in.as_ref()),
        ("refresh_token", resp.refresh_token.as_ref()),
    ];
    for (name, ptr) in pointers {
        if let Some(p) = ptr {
            if !p.starts_with('/') || p.len() > MAX_TEXT {
                return Err(SpecError::new(
                    format!("issuer.response.{name}"),
                    "must be a JSON pointer such as /data/token",
                ));
            }
        }
    }
    Ok(())
}

/// `POST /admin/v1/tenants` input.
#[derive(Debug)]
pub struct TenantSpec {
    pub id: TenantId,
    pub display_name: String,
    pub issuer: IssuerSpec,
    pub credentials: Credentials,
    /// Proxy settings and their fixed header values.
    pub proxy: Option<(ProxySpec, Credentials)>,
}

/// `PATCH /admin/v1/tenants/{id}` input: each present part replaces (issuer is merge-patched).
#[derive(Debug, Default)]
pub struct TenantPatch {
    pub display_name: Option<String>,
    pub issuer: Option<Value>,
    pub credentials: Option<Credentials>,
    /// The `proxy` member as sent (`null` removes the proxy); see `proxy::apply`.
    pub proxy: Option<Value>,
}

/// Deserialises `v` into `T`, reporting the path of the first error without echoing input.
pub fn from_value<T: serde::de::DeserializeOwned>(v: Value, prefix: &str) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = dotted_path(e.path());
        let mut message = describe_serde_error(&e.inner().to_string());
        if let Some(name) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            // A missing field's name is the type's own, not input: name it as the field.
            path = match path.as_str() {
                "." | "" => name.to_owned(),
                p => format!("{p}.{name}"),
            };
            message = "missing field".into();
        } else if message.starts_with("unknown field") {
            // The last segment is the submitted (unknown) name: report its parent.
            path = path
                .rsplit_once('.')
                .map_or(String::new(), |(p, _)| p.to_owned());
        }
        let field = match (prefix.is_empty(), path.as_str()) {
            (_, ".") | (_, "") => prefix.to_owned(),
            (true, p) => p.to_owned(),
            (false, p) => format!("{prefix}.{p}"),
        };
        SpecError::new(field, message)
    })
}

/// A deserialisation error's place, dotted like every other field name here (`tenants.3`, not
/// `tenants[3]`); `.` for the document itself.
pub fn dotted_path(path: &serde_path_to_error::Path) -> String {
    let dotted = path
        .iter()
        .map(|s| match s {
            serde_path_to_error::Segment::Seq { index } => index.to_string(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".");
    if dotted.is_empty() {
        ".".into()
    } else {
        dotted
    }
}

/// Turns a serde message into one that names the problem but repeats nothing submitted.
fn describe_serde_error(msg: &str) -> String {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let expected = rest.split_once(", ").map(|(_, e)| e).unwrap_or("");
        return format!("unknown value, {expected}");
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let expected = rest.split_once(", ").map(|(_, e)| e).unwrap_or("");
        return format!("unknown field, {expected}");
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let expected = rest.split_once(", ").map(|(_, e)| e).unwrap_or("");
        return format!("wrong type, {expected}");
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        let expected = rest.split_once(", ").map(|(_, e)| e).unwrap_or("");
        return format!("invalid value, {expected}");
    }
    // A type's own refusal (`TryFrom` behind `#[serde(try_from)]`) says what the value must
    // be and repeats nothing submitted: passed on as written.
    if msg.starts_with("missing field ") || msg.starts_with("must ") {
        return msg.to_owned();
    }
    "invalid value".to_owned()
}

fn take_object(v: Value, field: &str) -> Result<serde_json::Map<String, Value>, SpecError> {
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(SpecError::new(field, "must be a JSON object")),
    }
}

fn valid_credential_name(n: &str) -> bool {
    let b = n.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Parses a credentials object: string values only, never echoed back in errors.
pub fn parse_credentials(v: Value, field: &str) -> Result<Credentials, SpecError> {
    let obj = take_object(v, field)?;
    if obj.is_empty() || obj.len() > 32 {
        return Err(SpecError::new(field, "must hold 1-32 fields"));
    }
    let mut out = BTreeMap::new();
    for (name, value) in obj {
        if !valid_credential_name(&name) {
            return Err(SpecError::new(
                field,
                "field names must match [A-Za-z_][A-Za-z0-9_]{0,63}",
            ));
        }
        match value {
            Value::String(s) if !s.is_empty() && s.len() <= 8192 => {
                out.insert(name, SecretString::from(s));
            }
            _ => {
                return Err(SpecError::new(
                    format!("{field}.{name}"),
                    "must be a non-empty string of at most 8192 bytes",
                ))
            }
        }
    }
    Ok(Credentials::new(out))
}

fn parse_display_name(v: Value) -> Result<String, SpecError> {
    match v {
        Value::String(s)
            if !s.trim().is_empty()
                && s.chars().count() <= 200
                && !s.chars().any(char::is_control) =>
        {
            Ok(s)
        }
        _ => Err(SpecError::new(
            "display_name",
            "must be 1-200 printable characters",
        )),
    }
}

fn parse_id(v: Option<Value>) -> Result<TenantId, SpecError> {
    match v {
        Some(Value::String(s)) => {
            TenantId::parse(&s).map_err(|e| SpecError::new("id", e.to_string()))
        }
        Some(_) => Err(SpecError::new("id", "must be a string")),
        None => Err(SpecError::new("id", "missing field")),
    }
}

impl TenantSpec {
    /// Parses and fully validates a create request body.
    pub fn parse(v: Value, allow_insecure: bool) -> Result<Self, SpecError> {
        let mut obj = take_object(v, "")?;
        let id = parse_id(obj.remove("id"))?;
        let display_name = match obj.remove("display_name") {
            Some(Value::Null) | None => id.to_string(),
            Some(v) => parse_display_name(v)?,
        };
        let issuer: IssuerSpec = from_value(
            obj.remove("issuer")
                .ok_or_else(|| SpecError::new("issuer", "missing field"))?,
            "issuer",
        )?;
        let mut credentials = parse_credentials(
            obj.remove("credentials")
                .ok_or_else(|| SpecError::new("credentials", "missing field"))?,
            "credentials",
        )?;
        let proxy = match obj.remove("proxy") {
            None | Some(Value::Null) => None,
            Some(v) => super::proxy::apply(None, &v, allow_insecure)?,
        };
        if let Some(k) = obj.keys().next() {
            return Err(SpecError::new(
                k.chars().take(64).collect::<String>(),
                "unknown field; expected id, display_name, issuer, credentials, proxy",
            ));
        }
        issuer.validate(allow_insecure)?;
        issuer.complete_credentials(&mut credentials);
        issuer.validate_credentials(&credentials)?;
        Ok(Self {
            id,
            display_name,
            issuer,
            credentials,
            proxy,
        })
    }
}

impl TenantPatch {
    /// Parses a patch body (shape only; the merged result is validated by the caller).
    pub fn parse(v: Value) -> Result<Self, SpecError> {
        let mut patch = Self::default();
        for (k, v) in take_object(v, "")? {
            match k.as_str() {
                "display_name" => patch.display_name = Some(parse_display_name(v)?),
                "issuer" => patch.issuer = Some(Value::Object(take_object(v, "issuer")?)),
                "credentials" => patch.credentials = Some(parse_credentials(v, "credentials")?),
                "proxy" => patch.proxy = Some(v),
                "id" => return Err(SpecError::new("id", "a tenant id cannot change")),
                other => {
                    return Err(SpecError::new(
                        other.chars().take(64).collect::<String>(),
                        "unknown field; expected display_name, issuer, credentials, proxy",
                    ))
                }
            }
        }
        Ok(patch)
    }

    /// Applies the issuer part as an RFC 7386 merge patch onto `current` and validates it.
    pub fn merged_issuer(
        &self,
        current: &IssuerSpec,
        allow_insecure: bool,
    ) -> Result<Option<IssuerSpec>, SpecError> {
        let Some(patch) = &self.issuer else {
            return Ok(None);
        };
        let mut doc = serde_json::to_value(current).expect("spec serialises");
        merge_patch(&mut doc, patch);
        let spec: IssuerSpec = from_value(doc, "issuer")?;
        spec.validate(allow_insecure)?;
        Ok(Some(spec))
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        let t = target.as_object_mut().expect("object");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn setu() -> Value {
        json!({"id": "acme-setu", "display_name": "Acme (Setu)",
            "issuer": {"kind": "setu_partner", "token_url": "https://partner.example.com/auth/token", "default_ttl_seconds": 900},
            "credentials": {"client_id": "id", "client_secret": "TOPSECRET"}})
    }

    fn err(v: Value) -> SpecError {
        TenantSpec::parse(v, false).unwrap_err()
    }

    #[test]
    fn accepts_setu_and_comm100() {
        let s = TenantSpec::parse(setu(), false).unwrap();
        assert_eq!(s.issuer.kind, IssuerKind::SetuPartner);
        let c = json!({"id": "acme-comm100",
            "issuer": {"kind": "comm100_partner", "token_url": "https://partner.comm100.io/oauth/token"},
            "credentials": {"client_id": "c", "email": "a@b.c", "password": "pw"}});
        let s = TenantSpec::parse(c, false).unwrap();
        assert_eq!(s.display_name, "acme-comm100");
    }

    #[test]
    fn names_the_bad_field() {
        let mut v = setu();
        v["issuer"]["kind"] = json!("nope");
        assert_eq!(err(v).field, "issuer.kind");
        let mut v = setu();
        v["credentials"]
            .as_object_mut()
            .unwrap()
            .remove("client_secret");
        assert_eq!(err(v).field, "credentials.client_secret");
        let mut v = setu();
        v["issuer"]["token_url"] = json!("ftp://x");
        assert_eq!(err(v.clone()).field, "issuer.token_url");
        for bad in [
            "https://partner.example.com/\u{1b}[2J",
            "https://partner.example.com/a\tb",
            "https://partner.example.com/a\nb",
            "https://partner.example.com/a b",
        ] {
            v["issuer"]["token_url"] = json!(bad);
            assert_eq!(err(v.clone()).field, "issuer.token_url", "{bad:?}");
        }
        let mut v = setu();
        v["id"] = json!("Bad Id");
        assert_eq!(err(v).field, "id");
        let mut v = setu();
        v["issuer"]["scope"] = json!("x");
        assert_eq!(err(v).field, "issuer.scope");
        let mut v = setu();
        v["credentials"]["email"] = json!("x");
        assert_eq!(err(v).field, "credentials.email");
    }

    #[test]
    fn errors_never_echo_values() {
        let mut v = setu();
        v["issuer"]["default_ttl_seconds"] = json!("TOPSECRET");
        let e = err(v);
        assert_eq!(e.field, "issuer.default_ttl_seconds");
        assert!(!e.to_string().contains("TOPSECRET"), "{e}");
        let mut v = setu();
        v["issuer"]["kind"] = json!("TOPSECRET");
        assert!(!err(v).to_string().contains("TOPSECRET"));
        let mut v = setu();
        v["issuer"]["TOPSECRET"] = json!(1);
        assert!(!err(v).to_string().contains("TOPSECRET"));
        let mut v = setu();
        v["credentials"]["client_secret"] = json!(["TOPSECRET"]);
        assert!(!err(v).to_string().contains("TOPSECRET"));
    }

    #[test]
    fn custom_recipe_checks_templates() {
        let v = json!({"id": "v2",
            "issuer": {"kind": "custom", "token_url": "https://x.example.com/token",
              "request": {"content_type": "json", "body": {"clientID": "{{client_id}}", "secret": "{{secret}}"}},
              "response": {"access_token": "/data/token", "expires_in": "/data/expiresIn"}},
            "credentials": {"client_id": "a", "secret": "b"}});
        TenantSpec::parse(v.clone(), false).unwrap();
        let mut missing = v.clone();
        missing["credentials"]
            .as_object_mut()
            .unwrap()
            .remove("secret");
        assert_eq!(err(missing).field, "issuer.request.body.secret");
        let mut bad_ptr = v.clone();
        bad_ptr["issuer"]["response"]["access_token"] = json!("data.token");
        assert_eq!(err(bad_ptr).field, "issuer.response.access_token");
        let mut no_resp = v;
        no_resp["issuer"]
            .as_object_mut()
            .unwrap()
            .remove("response");
        assert_eq!(err(no_resp).field, "issuer.response");
    }

    #[test]
    fn patch_merges_issuer() {
        let s = TenantSpec::parse(setu(), false).unwrap();
        let p = TenantPatch::parse(json!({"issuer": {"default_ttl_seconds": null}})).unwrap();
        let merged = p.merged_issuer(&s.issuer, false).unwrap().unwrap();
        assert_eq!(merged.default_ttl_seconds, None);
        assert_eq!(merged.token_url, s.issuer.token_url);
        let p = TenantPatch::parse(json!({"issuer": {"kind": "bogus"}})).unwrap();
        assert_eq!(
            p.merged_issuer(&s.issuer, false).unwrap_err().field,
            "issuer.kind"
        );
        assert_eq!(
            TenantPatch::parse(json!({"id": "x"})).unwrap_err().field,
            "id"
        );
    }
}
