//! Per-kind token requests and answers: what each partner expects on the wire and where its
//! answer keeps the token, the expiry and the refresh token.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use zeroize::Zeroizing;

use super::expiry::parse_expires_in;
use crate::pop::{self, SigningKey};
use crate::tenants::template::{self, TemplateError};
use crate::tenants::{AuthMethod, BodyType, IssuerKind, IssuerSpec, Tenant};

/// Which grant to ask for.
#[derive(Clone, Copy)]
pub enum Grant<'a> {
    /// The tenant's full grant (client credentials, password, recipe).
    Initial,
    /// `grant_type=refresh_token` with the last refresh token.
    Refresh(&'a SecretString),
}

/// A token request ready to send; the body holds secrets and is wiped when dropped.
pub struct Prepared {
    pub content_type: &'static str,
    pub body: Zeroizing<Vec<u8>>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// What an answer carried, before expiry is worked out.
#[derive(Debug)]
pub struct Extracted {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<i64>,
}

/// Why a tenant's recipe could not be turned into a request (never a value, only names).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecipeError {
    #[error("credential field {0} is missing")]
    MissingCredential(String),
    #[error("a header value is not valid")]
    BadHeaderValue,
    #[error("bad header name")]
    BadHeaderName,
    #[error("custom recipe has no request")]
    NoRequest,
    #[error("form bodies take string values only")]
    FormValueNotString,
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("the tenant's key cannot sign: {0}")]
    Key(String),
    #[error("jwt_bearer has no assertion")]
    NoAssertion,
}

/// Why a successful answer holds no usable token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("the answer is not a JSON object")]
    NotAnObject,
    #[error("token_type is not Bearer")]
    NotBearer,
    #[error("token_type is not DPoP: the partner did not bind the token to the tenant's DPoP key")]
    NotDpop,
    #[error("{what} at {pointer} is not a non-empty string")]
    NotAString { what: &'static str, pointer: String },
    #[error("the answer has no {what} at {pointer}")]
    Missing { what: &'static str, pointer: String },
    #[error("{0} is not a positive number of seconds")]
    BadExpiresIn(String),
    #[error("custom recipe has no response")]
    NoResponse,
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

fn cred<'a>(t: &'a Tenant, name: &str) -> Result<&'a str, RecipeError> {
    t.credentials
        .get(name)
        .ok_or_else(|| RecipeError::MissingCredential(name.to_owned()))
}

fn form(pairs: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        serde_urlencoded::to_string(pairs)
            .expect("string pairs always encode")
            .into_bytes(),
    )
}

fn sensitive(v: &str) -> Result<HeaderValue, RecipeError> {
    let mut hv = HeaderValue::from_str(v).map_err(|_| RecipeError::BadHeaderValue)?;
    hv.set_sensitive(true);
    Ok(hv)
}

fn basic_auth(id: &str, secret: &str) -> Result<(HeaderName, HeaderValue), RecipeError> {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = Zeroizing::new(format!("{}:{}", enc(id), enc(secret)));
    let value = Zeroizing::new(format!("Basic {}", B64.encode(raw.as_bytes())));
    Ok((reqwest::header::AUTHORIZATION, sensitive(&value)?))
}

/// Builds the request for `tenant` and `grant`. Errors name a problem, never a value.
pub fn prepare(tenant: &Tenant, grant: &Grant<'_>) -> Result<Prepared, RecipeError> {
    let spec = &tenant.issuer;
    match (spec.kind, grant) {
        (IssuerKind::SetuPartner, _) => Ok(Prepared {
            content_type: FORM,
            body: form(&[
                ("grant_type", "client_credentials"),
                ("client_id", cred(tenant, "client_id")?),
                ("client_secret", cred(tenant, "client_secret")?),
            ]),
            headers: vec![],
        }),
        (IssuerKind::Comm100Partner, Grant::Initial) => Ok(Prepared {
            content_type: FORM,
            body: form(&[
                ("client_id", cred(tenant, "client_id")?),
                ("grant_type", "password"),
                ("email", cred(tenant, "email")?),
                ("password", cred(tenant, "password")?),
            ]),
            headers: vec![],
        }),
        (IssuerKind::Comm100Partner, Grant::Refresh(rt)) => Ok(Prepared {
            content_type: FORM,
            body: form(&[
                ("client_id", cred(tenant, "client_id")?),
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.expose_secret()),
            ]),
            headers: vec![],
        }),
        (IssuerKind::Oauth2ClientCredentials | IssuerKind::Oauth2Password, _) => {
            oauth2(tenant, grant)
        }
        (IssuerKind::JwtBearer, _) => jwt_bearer(tenant),
        (IssuerKind::Custom, _) => custom(tenant),
    }
}

const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The tenant's `private_key`, ready to sign.
fn private_key(tenant: &Tenant) -> Result<SigningKey, RecipeError> {
    tenant
        .issuer
        .private_key(&tenant.credentials)
        .ok_or_else(|| RecipeError::MissingCredential("private_key".into()))?
        .map_err(|e| RecipeError::Key(e.to_string()))
}

/// The JWT bearer grant (RFC 7523 §2.1): `assertion` signed with `private_key`, its claims
/// templated from the credentials; `scope` also sent as a parameter.
fn jwt_bearer(tenant: &Tenant) -> Result<Prepared, RecipeError> {
    let spec = tenant
        .issuer
        .assertion
        .as_ref()
        .ok_or(RecipeError::NoAssertion)?;
    let render = |t: &str| template::render(t, &tenant.credentials);
    let (iss, sub, aud) = (render(&spec.iss)?, render(&spec.sub)?, render(&spec.aud)?);
    let claims = pop::assertion_claims(
        &iss,
        &sub,
        &aud,
        spec.scope.as_deref(),
        Some(spec.lifetime_seconds.unwrap_or(300) as i64),
    );
    let assertion = Zeroizing::new(
        private_key(tenant)?
            .grant_assertion(&claims)
            .map_err(|e| RecipeError::Key(e.to_string()))?,
    );
    let mut pairs = vec![
        ("grant_type", JWT_BEARER_GRANT),
        ("assertion", assertion.as_str()),
    ];
    if let Some(scope) = &spec.scope {
        pairs.push(("scope", scope));
    }
    // Client authentication when the partner wants it beside the grant (RFC 7523 §3.1 allows
    // none): Basic with a secret, else the client id alone.
    let mut headers = vec![];
    match (
        tenant.credentials.get("client_id"),
        tenant.credentials.get("client_secret"),
    ) {
        (Some(id), Some(secret)) => headers.push(basic_auth(id, secret)?),
        (Some(id), None) => pairs.push(("client_id", id)),
        _ => {}
    }
    Ok(Prepared {
        content_type: FORM,
        body: form(&pairs),
        headers,
    })
}

/// Long because the RFC 6749 form of every grant and client authentication method is in one
/// match, so each combination's fields are seen together.
fn oauth2(tenant: &Tenant, grant: &Grant<'_>) -> Result<Prepared, RecipeError> {
    let spec = &tenant.issuer;
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(6);
    match grant {
        Grant::Refresh(rt) => {
            pairs.push(("grant_type", "refresh_token"));
            pairs.push(("refresh_token", rt.expose_secret()));
        }
        Grant::Initial if spec.kind == IssuerKind::Oauth2Password => {
            pairs.push(("grant_type", "password"));
            pairs.push(("username", cred(tenant, "username")?));
            pairs.push(("password", cred(tenant, "password")?));
        }
        Grant::Initial => pairs.push(("grant_type", "client_credentials")),
    }
    if let Some(scope) = &spec.scope {
        pairs.push(("scope", scope));
    }
    if let (Some(aud), Grant::Initial) = (&spec.audience, grant) {
        pairs.push(("audience", aud));
    }
    let id = cred(tenant, "client_id")?;
    let secret = tenant.credentials.get("client_secret");
    let mut headers = vec![];
    // The client assertion's audience: the partner's choice, else its token endpoint.
    let aud = spec
        .assertion_audience
        .as_deref()
        .unwrap_or(&spec.token_url);
    let assertion: Zeroizing<String>;
    match (spec.auth_method.unwrap_or_default(), secret) {
        (AuthMethod::ClientSecretBasic, Some(secret)) => headers.push(basic_auth(id, secret)?),
        (AuthMethod::ClientSecretPost, Some(secret)) => {
            pairs.push(("client_id", id));
            pairs.push(("client_secret", secret));
        }
        (AuthMethod::ClientSecretJwt, Some(secret)) => {
            assertion = Zeroizing::new(
                pop::secret_assertion(id, secret, aud)
                    .map_err(|e| RecipeError::Key(e.to_string()))?,
            );
            pairs.extend([
                ("client_id", id),
                ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                ("client_assertion", assertion.as_str()),
            ]);
        }
        (AuthMethod::PrivateKeyJwt, _) => {
            assertion = Zeroizing::new(
                private_key(tenant)?
                    .client_assertion(id, aud)
                    .map_err(|e| RecipeError::Key(e.to_string()))?,
            );
            pairs.extend([
                ("client_id", id),
                ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                ("client_assertion", assertion.as_str()),
            ]);
        }
        // The certificate is presented by the tenant's own TLS client (RFC 8705 §2).
        (AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth, _) => {
            pairs.push(("client_id", id))
        }
        (AuthMethod::ClientSecretJwt, None) => {
            return Err(RecipeError::MissingCredential("client_secret".into()))
        }
        (AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost, None) => {
            pairs.push(("client_id", id))
        }
    }
    Ok(Prepared {
        content_type: FORM,
        body: form(&pairs),
        headers,
    })
}

fn render_value(v: &Value, tenant: &Tenant) -> Result<Value, RecipeError> {
    Ok(match v {
        Value::String(s) => Value::String(template::render(s, &tenant.credentials)?.to_string()),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| render_value(v, tenant))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, tenant)?)))
                .collect::<Result<_, RecipeError>>()?,
        ),
        other => other.clone(),
    })
}

fn custom(tenant: &Tenant) -> Result<Prepared, RecipeError> {
    let req = tenant
        .issuer
        .request
        .as_ref()
        .ok_or(RecipeError::NoRequest)?;
    let mut headers = Vec::with_capacity(req.headers.len());
    for (name, tpl) in &req.headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| RecipeError::BadHeaderName)?;
        let value = template::render(tpl, &tenant.credentials)?;
        headers.push((name, sensitive(&value)?));
    }
    let (content_type, body) = match req.content_type {
        BodyType::Json => {
            let rendered = render_value(&Value::Object(req.body.clone()), tenant)?;
            let bytes = serde_json::to_vec(&rendered).expect("JSON values serialise");
            wipe(rendered);
            (JSON, Zeroizing::new(bytes))
        }
        BodyType::Form => {
            let mut rendered: Vec<(String, Zeroizing<String>)> = Vec::new();
            for (k, v) in &req.body {
                let tpl = v.as_str().ok_or(RecipeError::FormValueNotString)?;
                rendered.push((k.clone(), template::render(tpl, &tenant.credentials)?));
            }
            let pairs: Vec<(&str, &str)> = rendered
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            (FORM, form(&pairs))
        }
    };
    Ok(Prepared {
        content_type,
        body,
        headers,
    })
}

/// Overwrites the strings of a rendered JSON body before it is freed.
fn wipe(v: Value) {
    match v {
        Value::String(s) => drop(Zeroizing::new(s)),
        Value::Array(a) => a.into_iter().for_each(wipe),
        Value::Object(o) => o.into_iter().for_each(|(_, v)| wipe(v)),
        _ => {}
    }
}

fn token_at(doc: &Value, pointer: &str, what: &'static str) -> Result<SecretString, AnswerError> {
    let pointer_owned = || pointer.to_owned();
    match doc.pointer(pointer) {
        Some(Value::String(s)) if !s.is_empty() => Ok(SecretString::from(s.clone())),
        Some(_) => Err(AnswerError::NotAString {
            what,
            pointer: pointer_owned(),
        }),
        None => Err(AnswerError::Missing {
            what,
            pointer: pointer_owned(),
        }),
    }
}

fn optional_token(doc: &Value, pointer: &str) -> Option<SecretString> {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_owned()))
}

fn expires_in_at(doc: &Value, pointer: &str) -> Result<Option<i64>, AnswerError> {
    match doc.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_expires_in(v)
            .map(Some)
            .ok_or_else(|| AnswerError::BadExpiresIn(pointer.to_owned())),
    }
}

/// Reads the token, expiry and refresh token out of a successful answer.
pub fn extract(spec: &IssuerSpec, doc: &Value) -> Result<Extracted, AnswerError> {
    if !doc.is_object() {
        return Err(AnswerError::NotAnObject);
    }
    match spec.kind {
        IssuerKind::SetuPartner => Ok(Extracted {
            access_token: token_at(doc, "/accessToken", "accessToken")?,
            // Setu documents refreshToken as "can be ignored until enabled".
            refresh_token: None,
            expires_in: expires_in_at(doc, "/expiresIn")?,
        }),
        IssuerKind::Comm100Partner
        | IssuerKind::Oauth2ClientCredentials
        | IssuerKind::Oauth2Password
        | IssuerKind::JwtBearer => {
            let token_type = doc.get("token_type").and_then(Value::as_str);
            if spec.dpop {
                // A DPoP tenant takes only bound tokens (RFC 9449 §5): an unbound one would
                // be handed out as if the key protected it.
                if !token_type.is_some_and(|t| t.eq_ignore_ascii_case("dpop")) {
                    return Err(AnswerError::NotDpop);
                }
            } else if token_type.is_some_and(|t| !t.eq_ignore_ascii_case("bearer")) {
                return Err(AnswerError::NotBearer);
            }
            Ok(Extracted {
                access_token: token_at(doc, "/access_token", "access_token")?,
                refresh_token: optional_token(doc, "/refresh_token"),
                expires_in: expires_in_at(doc, "/expires_in")?,
            })
        }
        IssuerKind::Custom => {
            let r = spec.response.as_ref().ok_or(AnswerError::NoResponse)?;
            Ok(Extracted {
                access_token: token_at(doc, &r.access_token, "access token")?,
                refresh_token: r
                    .refresh_token
                    .as_deref()
                    .and_then(|p| optional_token(doc, p)),
                expires_in: match &r.expires_in {
                    Some(p) => expires_in_at(doc, p)?,
                    None => None,
                },
            })
        }
    }
}

/// Whether this kind can renew with `grant_type=refresh_token`.
pub fn supports_refresh(kind: IssuerKind) -> bool {
    matches!(
        kind,
        IssuerKind::Comm100Partner
            | IssuerKind::Oauth2ClientCredentials
            | IssuerKind::Oauth2Password
            | IssuerKind::JwtBearer
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::{Credentials, TenantId};
    use secrecy::ExposeSecret;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn tenant(issuer: Value, creds: &[(&str, &str)]) -> Tenant {
        Tenant {
            id: TenantId::parse("t").unwrap(),
            display_name: "t".into(),
            issuer: serde_json::from_value(issuer).unwrap(),
            credentials: Credentials::new(
                creds
                    .iter()
                    .map(|(k, v)| (k.to_string(), SecretString::from(v.to_string())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            proxy: None,
            proxy_headers: Credentials::default(),
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn body(p: &Prepared) -> String {
        String::from_utf8(p.body.to_vec()).unwrap()
    }

    #[test]
    fn setu_form_and_answer() {
        let t = tenant(
            json!({"kind": "setu_partner", "token_url": "https://x/auth/token"}),
            &[("client_id", "Your.Client.ID"), ("client_secret", "s&cret")],
        );
        let p = prepare(&t, &Grant::Initial).unwrap();
        assert_eq!(p.content_type, FORM);
        assert_eq!(
            body(&p),
            "grant_type=client_credentials&client_id=Your.Client.ID&client_secret=s%26cret"
        );
        let e = extract(
            &t.issuer,
            &json!({"accessToken": "a.b.c", "refreshToken": "r"}),
        )
        .unwrap();
        assert_eq!(e.access_token.expose_secret(), "a.b.c");
        assert!(e.refresh_token.is_none() && e.expires_in.is_none());
        assert!(extract(&t.issuer, &json!({"access_token": "x"})).is_err());
    }

    #[test]
    fn comm100_password_and_refresh() {
        let t = tenant(
            json!({"kind": "comm100_partner", "token_url": "https://x/oauth/token"}),
            &[
                ("client_id", "client1"),
                ("email", "client1@company.com"),
                ("password", "pw"),
            ],
        );
        assert_eq!(
            body(&prepare(&t, &Grant::Initial).unwrap()),
            "client_id=client1&grant_type=password&email=client1%40company.com&password=pw"
        );
        let rt = SecretString::from("F137");
        assert_eq!(
            body(&prepare(&t, &Grant::Refresh(&rt)).unwrap()),
            "client_id=client1&grant_type=refresh_token&refresh_token=F137"
        );
        let e = extract(
            &t.issuer,
            &json!({"access_token": "a", "expires_in": 43200, "token_type": "Bearer",
                    "refresh_token": "F137", "scope": "comm100 offline_access"}),
        )
        .unwrap();
        assert_eq!(e.expires_in, Some(43200));
        assert_eq!(e.refresh_token.unwrap().expose_secret(), "F137");
    }

    #[test]
    fn oauth2_auth_methods() {
        let basic = tenant(
            json!({"kind": "oauth2_client_credentials", "token_url": "https://x/t", "scope": "a b", "audience": "api"}),
            &[("client_id", "id"), ("client_secret", "se:cret")],
        );
        let p = prepare(&basic, &Grant::Initial).unwrap();
        assert_eq!(
            body(&p),
            "grant_type=client_credentials&scope=a+b&audience=api"
        );
        assert_eq!(p.headers[0].0, reqwest::header::AUTHORIZATION);
        assert_eq!(
            p.headers[0].1.to_str().unwrap(),
            format!("Basic {}", B64.encode("id:se%3Acret"))
        );
        assert!(p.headers[0].1.is_sensitive());
        let post = tenant(
            json!({"kind": "oauth2_password", "token_url": "https://x/t", "auth_method": "client_secret_post"}),
            &[
                ("client_id", "id"),
                ("client_secret", "s"),
                ("username", "u"),
                ("password", "p"),
            ],
        );
        assert_eq!(
            body(&prepare(&post, &Grant::Initial).unwrap()),
            "grant_type=password&username=u&password=p&client_id=id&client_secret=s"
        );
        let e = extract(
            &post.issuer,
            &json!({"access_token": "a", "token_type": "DPoP"}),
        );
        assert!(e.is_err());
    }

    #[test]
    fn custom_json_recipe() {
        let t = tenant(
            json!({"kind": "custom", "token_url": "https://x/v2/token",
                "request": {"content_type": "json", "body": {"clientID": "{{client_id}}", "secret": "{{secret}}", "n": 1},
                            "headers": {"x-client-id": "{{client_id}}"}},
                "response": {"access_token": "/data/token", "expires_in": "/data/expiresIn"}}),
            &[("client_id", "cid"), ("secret", "sec")],
        );
        let p = prepare(&t, &Grant::Initial).unwrap();
        assert_eq!(p.content_type, JSON);
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent, json!({"clientID": "cid", "secret": "sec", "n": 1}));
        assert_eq!(p.headers[0].1.to_str().unwrap(), "cid");
        let e = extract(
            &t.issuer,
            &json!({"status": 200, "success": true, "data": {"expiresIn": "1800", "token": "tok"}}),
        )
        .unwrap();
        assert_eq!(e.access_token.expose_secret(), "tok");
        assert_eq!(e.expires_in, Some(1800));
        let missing = extract(&t.issuer, &json!({"data": {}})).unwrap_err();
        assert_eq!(
            missing,
            AnswerError::Missing {
                what: "access token",
                pointer: "/data/token".into()
            }
        );
        assert_eq!(
            missing.to_string(),
            "the answer has no access token at /data/token"
        );
    }
}
