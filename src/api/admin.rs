//! The admin API: tenants, their credentials, dry-run mints, and callers. Answers never
//! contain credential values or API keys (the key is shown once, at creation).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::problem::ApiError;
use super::AppState;
use super::{read_json, read_typed_or, request_id_of};
use crate::audit::{AlsoWrite, Entry, InSameTransaction, Kind};
use crate::auth::api_keys::ApiKey;
use crate::auth::Admin;
use crate::auth::{CallerRecord, Scope};
use crate::tenants::spec::parse_credentials;
use crate::tenants::store::{Change, TenantRecord, WriteError};
use crate::tenants::{SpecError, StoreError, TenantId, TenantPatch, TenantSpec};
use crate::time::{now_ms, rfc3339};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/admin/v1/tenants")
            .route(web::post().to(create_tenant))
            .route(web::get().to(list_tenants)),
    )
    .service(
        web::resource("/admin/v1/tenants/{tenant_id}")
            .route(web::get().to(get_tenant))
            .route(web::patch().to(patch_tenant))
            .route(web::delete().to(delete_tenant)),
    )
    .service(
        web::resource("/admin/v1/tenants/{tenant_id}/credentials")
            .route(web::put().to(put_credentials)),
    )
    .service(web::resource("/admin/v1/tenants/{tenant_id}/test").route(web::post().to(test_tenant)))
    .service(
        web::resource("/admin/v1/callers")
            .route(web::post().to(create_caller))
            .route(web::get().to(list_callers)),
    )
    .service(
        web::resource("/admin/v1/callers/{caller_id}")
            .route(web::patch().to(patch_caller))
            .route(web::delete().to(delete_caller)),
    )
    .service(
        web::resource("/admin/v1/callers/{caller_id}/rotate-key")
            .route(web::post().to(rotate_caller_key)),
    )
    .service(web::resource("/admin/v1/audit").route(web::get().to(read_audit)))
    .service(web::resource("/admin/v1/kinds").route(web::get().to(kinds)));
}

/// Every issuer kind with its credential fields (per client authentication for the oauth2
/// kinds): what the console's forms and other clients offer, from the rules the broker
/// validates with.
async fn kinds(_: Admin) -> HttpResponse {
    answer(HttpResponse::Ok()).json(json!({ "kinds": crate::tenants::spec::catalogue() }))
}

/// An admin answer: never kept by caches on the way (it names tenants, callers, keys).
fn answer(mut builder: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    builder.insert_header((header::CACHE_CONTROL, "no-store"));
    builder
}

/// An admin mutation's audit row, committed in the mutation's own transaction: an
/// acknowledged change is on the record, a change whose row cannot be written did not happen.
fn admin_row(
    admin: &Admin,
    req: &HttpRequest,
    action: &'static str,
    tenant: Option<&str>,
    detail: Option<String>,
) -> InSameTransaction {
    let mut e = Entry::new(Kind::Admin, action, "ok");
    e.caller = Some(admin.name.clone());
    e.auth_method = Some(admin.method);
    e.tenant = tenant.map(Into::into);
    e.detail = detail;
    e.request_id = request_id_of(req);
    InSameTransaction(e)
}

/// Records an admin action that changes no row of its own (the dry-run mint).
async fn audit_admin(
    state: &AppState,
    admin: &Admin,
    req: &HttpRequest,
    action: &'static str,
    outcome: &'static str,
    tenant: Option<&str>,
) {
    let mut row = admin_row(admin, req, action, tenant, None);
    row.0.outcome = outcome.into();
    let now = now_ms();
    if let Err(err) = crate::audit::store::insert(state.store.db(), &[(row.0, (now, now, 1))]).await
    {
        tracing::error!(action, error = %err, "admin action not audited");
    }
}

#[derive(Serialize)]
struct TenantView<'a> {
    id: &'a str,
    display_name: &'a str,
    issuer: &'a crate::tenants::IssuerSpec,
    credential_fields: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<&'a crate::tenants::proxy::ProxySpec>,
    version: i64,
    created_at: String,
    updated_at: String,
}

fn tenant_view(r: &TenantRecord) -> TenantView<'_> {
    TenantView {
        id: r.id.as_str(),
        display_name: &r.display_name,
        issuer: &r.issuer,
        credential_fields: &r.credential_fields,
        proxy: r.proxy.as_ref(),
        version: r.version,
        created_at: rfc3339(r.created_at_ms),
        updated_at: rfc3339(r.updated_at_ms),
    }
}

fn tenant_response(mut builder: actix_web::HttpResponseBuilder, r: &TenantRecord) -> HttpResponse {
    builder
        .insert_header((header::ETAG, format!("\"v{}\"", r.version)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(tenant_view(r))
}

/// An `If-Match` header: `*`, or ETags of the form `"v<version>"` (weak or strong).
struct IfMatch {
    present: bool,
    any: bool,
    versions: Vec<i64>,
}

impl IfMatch {
    /// 400 `invalid_request` for a header that is not `*` or a list of entity tags (RFC 9110
    /// §13.1.1): an empty value, a bare word, an unquoted tag. A well-formed tag that is not one
    /// of this tenant's versions matches nothing (412 on the write).
    fn parse(req: &HttpRequest) -> Result<Self, ApiError> {
        let mut m = Self {
            present: false,
            any: false,
            versions: Vec::new(),
        };
        let malformed = || {
            ApiError::invalid(
                "If-Match must be * or a list of entity tags (\"v<version>\", from ETag)",
                Some("If-Match"),
            )
        };
        for value in req.headers().get_all(header::IF_MATCH) {
            m.present = true;
            let tags = entity_tags(value.as_bytes()).ok_or_else(malformed)?;
            for tag in tags {
                match tag {
                    None => m.any = true,
                    Some(opaque) => {
                        if let Some(v) = opaque.strip_prefix('v').and_then(|n| n.parse().ok()) {
                            m.versions.push(v);
                        }
                    }
                }
            }
        }
        Ok(m)
    }

    fn is_set(&self) -> bool {
        self.present
    }

    /// The single version asked for, if exactly one.
    fn version(&self) -> Option<i64> {
        (self.versions.len() == 1 && !self.any).then(|| self.versions[0])
    }

    /// 412 unless the header is absent, `*`, or names `current`.
    fn check(&self, current: i64) -> Result<(), ApiError> {
        if !self.present || self.any || self.versions.contains(&current) {
            Ok(())
        } else {
            Err(ApiError::PreconditionFailed(format!("\"v{current}\"")))
        }
    }
}

/// An `If-Match` value as RFC 9110 writes it: `*` (`None`) or a non-empty, comma-separated
/// list of entity tags, `W/` allowed, each opaque tag's characters `%x21 / %x23-7E`; `None`
/// for anything else. Returns each opaque tag without its quotes.
fn entity_tags(value: &[u8]) -> Option<Vec<Option<&str>>> {
    let mut rest = std::str::from_utf8(value).ok()?;
    let mut tags = Vec::new();
    loop {
        // Empty list elements are skipped (RFC 9110 §5.6.1.2).
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        if let Some(r) = rest.strip_prefix('*') {
            tags.push(None);
            rest = r;
        } else {
            let r = rest.strip_prefix("W/").unwrap_or(rest).strip_prefix('"')?;
            let end = r.find('"')?;
            let opaque = &r[..end];
            if !opaque
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b))
            {
                return None;
            }
            tags.push(Some(opaque));
            rest = &r[end + 1..];
        }
        rest = rest.trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return None;
        }
    }
    // Not empty, and `*` stands alone.
    let ok = tags.len() == 1 || (!tags.is_empty() && tags.iter().all(Option::is_some));
    ok.then_some(tags)
}

/// A tenant id from the path; one that cannot exist is simply not found.
fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(|_| ApiError::TenantNotFound)
}

async fn create_tenant(
    admin: Admin,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let spec = TenantSpec::parse(body, state.settings.allow_insecure_issuers)?;
    let record = state
        .store
        .create_tenant(
            &spec.id,
            &spec.display_name,
            &spec.issuer,
            &spec.credentials,
            spec.proxy.as_ref().map(|(p, h)| (p, h)),
            &admin_row(&admin, &req, "tenant.create", Some(spec.id.as_str()), None),
        )
        .await
        .map_err(|e| match e {
            crate::tenants::StoreError::Conflict => {
                ApiError::Conflict("a tenant with this id already exists")
            }
            other => other.into(),
        })?;
    // A token cached under this id by an earlier tenant of the same name must not survive.
    state.broker.forget(&spec.id).await;
    tracing::info!(tenant = %spec.id, kind = spec.issuer.kind.as_str(), "tenant created");
    let mut builder = HttpResponse::Created();
    builder.insert_header((header::LOCATION, format!("/admin/v1/tenants/{}", spec.id)));
    Ok(tenant_response(builder, &record))
}

/// A page size: 1-1000, default 100.
fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(100),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("limit must be a whole number from 1 to 1000", Some("limit"))
            }),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
}

async fn list_tenants(
    _: Admin,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = parse_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().filter(|a| !a.is_empty());
    if after.is_some_and(|a| TenantId::parse(a).is_err()) {
        return Err(ApiError::invalid(
            "after must be a tenant id",
            Some("after"),
        ));
    }
    let records = state.store.list_tenants(after, limit).await?;
    let next_after = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    let now = now_ms();
    let healths =
        futures_util::future::join_all(records.iter().map(|r| health_view(&state, &r.id, now)))
            .await;
    let mut views = Vec::with_capacity(records.len());
    for (r, health) in records.iter().zip(healths) {
        let mut view = serde_json::to_value(tenant_view(r)).expect("serialises");
        view["health"] = health?;
        views.push(view);
    }
    Ok(answer(HttpResponse::Ok()).json(json!({"tenants": views, "next_after": next_after})))
}

async fn get_tenant(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let record = state.store.tenant_record(&id).await?;
    let mut view = serde_json::to_value(tenant_view(&record)).expect("serialises");
    view["health"] = health_view(&state, &id, now_ms()).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, format!("\"v{}\"", record.version)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(view))
}

/// A tenant's health in one word, as the console's badge and the CLI's list show it:
/// `circuit_open`, `error` (the last outcome was a failure), `ok`, or `never_minted`.
fn health_state(
    circuit_open: bool,
    success_at: Option<i64>,
    error_at: Option<i64>,
) -> &'static str {
    match (circuit_open, success_at, error_at) {
        (true, _, _) => "circuit_open",
        (_, s, Some(e)) if s.map_or(true, |s| e > s) => "error",
        (_, Some(_), _) => "ok",
        _ => "never_minted",
    }
}

/// A tenant's last partner outcomes and circuit, as the tenant views show them.
async fn health_view(state: &AppState, id: &TenantId, now: i64) -> Result<Value, ApiError> {
    let (health, circuit, token) = tokio::join!(
        state.health.get(id),
        state.broker.circuit_state(id),
        state.broker.held_token(id)
    );
    let health = health?;
    let state = health_state(
        circuit.as_ref().is_some_and(|c| c.is_open(now)),
        health.last_success_at_ms,
        health.last_error_at_ms,
    );
    Ok(json!({
        "state": state,
        "last_success_at": health.last_success_at_ms.map(rfc3339),
        "last_error": health.last_error_at_ms.map(|at| json!({
            "at": rfc3339(at),
            "code": health.last_error_code,
            "detail": health.last_error_detail,
        })),
        "circuit": circuit.map(|c| json!({
            "open": c.is_open(now),
            "failures": c.failures,
            "retry_after": c.next_call_in_s(now),
            "probed": c.probed(),
            "cooldown_remaining": c.is_open(now).then(|| c.retry_after_s(now)),
        })),
        "token": token.map(|(issued_at, expires_at)| json!({
            "issued_at": rfc3339(issued_at),
            "expires_at": rfc3339(expires_at),
            "expires_in": (expires_at - now) / 1000,
            "lifetime_seconds": (expires_at - issued_at).max(0) / 1000,
        })),
        "mints_last_hour": health.mints_last_hour,
        "failed_mints_last_hour": health.failed_mints_last_hour,
    }))
}

/// A fenced tenant write (`TenantStore::write_tenant`) with `If-Match` checked on every read:
/// a lost race is retried unless the client sent `If-Match`, which then gets 412. PATCH and PUT
/// `/credentials` both write through here.
async fn write_tenant(
    state: &AppState,
    id: &TenantId,
    if_match: &IfMatch,
    change: impl Fn(&crate::tenants::Tenant) -> Result<Change, ApiError>,
    audit: impl Fn(&Change) -> InSameTransaction,
) -> Result<(TenantRecord, Change), ApiError> {
    let result = state
        .store
        .write_tenant(
            id,
            if_match.is_set(),
            |current| {
                if_match.check(current.version)?;
                change(current)
            },
            |c| Box::new(audit(c)) as Box<dyn AlsoWrite>,
        )
        .await;
    result.map_err(|e| match e {
        WriteError::Store(e) => e.into(),
        WriteError::Refused(e) => e,
        WriteError::LostRace => ApiError::PreconditionFailed("changed concurrently".into()),
    })
}

/// Long because it is a merge patch in order: parse, If-Match, merge, validate, the fenced
/// write with its audit row, the caches dropped, the answer.
async fn patch_tenant(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let if_match = IfMatch::parse(&req)?;
    let body = read_json(&req, payload).await?;
    let patch = TenantPatch::parse(body)?;
    let allow_insecure = state.settings.allow_insecure_issuers;
    let change = |current: &crate::tenants::Tenant| {
        let issuer = patch.merged_issuer(&current.issuer, allow_insecure)?;
        let effective_issuer = issuer.as_ref().unwrap_or(&current.issuer);
        let mut creds = patch
            .credentials
            .clone()
            .unwrap_or_else(|| current.credentials.clone());
        let completed = effective_issuer.complete_credentials(&mut creds);
        effective_issuer.validate_credentials(&creds)?;
        let proxy = match &patch.proxy {
            None => None,
            Some(p) => Some(crate::tenants::proxy::apply(
                current.proxy.as_ref().map(|s| (s, &current.proxy_headers)),
                p,
                allow_insecure,
            )?),
        };
        Ok(Change {
            display_name: patch.display_name.clone(),
            issuer,
            credentials: (patch.credentials.is_some() || completed).then_some(creds),
            proxy,
        })
    };
    let audit = |change: &Change| {
        let changed: Vec<&str> = [
            ("display_name", change.display_name.is_some()),
            ("issuer", change.issuer.is_some()),
            ("credentials", change.credentials.is_some()),
            ("proxy", change.proxy.is_some()),
        ]
        .iter()
        .filter_map(|(n, c)| c.then_some(*n))
        .collect();
        let detail = format!("changed: {}", changed.join(", "));
        admin_row(
            &admin,
            &req,
            "tenant.update",
            Some(id.as_str()),
            Some(detail),
        )
    };
    let (record, change) = write_tenant(&state, &id, &if_match, change, audit).await?;
    if change.issuer.is_some() || change.credentials.is_some() {
        state.broker.forget(&id).await;
    }
    // Proxy targets and signing keys hold the issuer's and the credentials' keys too.
    if change.proxy.is_some() || change.issuer.is_some() || change.credentials.is_some() {
        state.proxy.forget(&id);
    }
    tracing::info!(tenant = %id, "tenant updated");
    Ok(tenant_response(HttpResponse::Ok(), &record))
}

async fn delete_tenant(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let if_match = IfMatch::parse(&req)?;
    let expected = match if_match.version() {
        Some(v) => Some(v),
        None if if_match.is_set() && !if_match.any => {
            return Err(ApiError::PreconditionFailed("unrecognised ETag".into()))
        }
        None => None,
    };
    let row = admin_row(&admin, &req, "tenant.delete", Some(id.as_str()), None);
    match state.store.delete_tenant(&id, expected, &row).await {
        Ok(true) => {}
        Ok(false) => return Err(ApiError::TenantNotFound),
        Err(StoreError::VersionConflict) => {
            return Err(ApiError::PreconditionFailed(
                "a newer version exists".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    state.broker.forget_deleted(&id).await;
    state.proxy.forget(&id);
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(HttpResponse::NoContent().finish())
}

async fn put_credentials(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let body = read_json(&req, payload).await?;
    let creds = parse_credentials(body, "credentials")?;
    let if_match = IfMatch::parse(&req)?;
    // The kind cannot change between the read and the write: the write is fenced on the version.
    let fields: Vec<&str> = creds.names().collect();
    let detail = format!("fields: {}", fields.join(", "));
    let (record, _) = write_tenant(
        &state,
        &id,
        &if_match,
        |current| {
            let mut creds = creds.clone();
            current.issuer.complete_credentials(&mut creds);
            current.issuer.validate_credentials(&creds)?;
            Ok(Change {
                display_name: None,
                issuer: None,
                credentials: Some(creds),
                proxy: None,
            })
        },
        |_| {
            admin_row(
                &admin,
                &req,
                "tenant.credentials",
                Some(id.as_str()),
                Some(detail.clone()),
            )
        },
    )
    .await?;
    state.broker.forget(&id).await;
    state.proxy.forget(&id);
    tracing::info!(tenant = %id, "tenant credentials rotated");
    Ok(HttpResponse::NoContent()
        .insert_header((header::ETAG, format!("\"v{}\"", record.version)))
        .finish())
}

async fn test_tenant(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    // The minted token replaces the cached one: some partners revoke the previous token.
    let result = state.broker.mint_now(&id).await.map_err(ApiError::from);
    let outcome = result.as_ref().map_or_else(|e| e.code().as_str(), |_| "ok");
    if !matches!(result, Err(ApiError::TenantNotFound)) {
        audit_admin(
            &state,
            &admin,
            &req,
            "tenant.test",
            outcome,
            Some(id.as_str()),
        )
        .await;
    }
    let token = result?;
    Ok(answer(HttpResponse::Ok()).json(json!({
        "ok": true,
        "expires_at": rfc3339(token.expires_at_ms),
        "expires_in": ((token.expires_at_ms - now_ms()) / 1000).max(0),
    })))
}

fn caller_view(c: &CallerRecord) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "tenants": c.scope.to_json(),
        "created_at": rfc3339(c.created_at_ms),
    })
}

fn caller_error(field: &str, message: &str) -> ApiError {
    ApiError::InvalidCaller(SpecError::new(field, message))
}

/// `POST /admin/v1/callers`: a name and a scope, both required.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCaller {
    name: CallerName,
    tenants: CallerScope,
}

/// `PATCH /admin/v1/callers/{id}`: a new name and/or a new scope.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerPatch {
    #[serde(default, deserialize_with = "present")]
    name: Option<CallerName>,
    #[serde(default, deserialize_with = "present")]
    tenants: Option<CallerScope>,
}

/// A field that may be left out but not sent as `null` (nothing here can be removed): the
/// value is read as `T`, so `null` fails `T`'s own rule.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A caller's name: 1-64 characters of `[A-Za-z0-9._-]`.
#[derive(Deserialize)]
#[serde(try_from = "Value")]
struct CallerName(String);

impl TryFrom<Value> for CallerName {
    type Error = &'static str;
    fn try_from(v: Value) -> Result<Self, Self::Error> {
        match v {
            Value::String(n)
                if (1..=64).contains(&n.len())
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
            {
                Ok(Self(n))
            }
            _ => Err("must be 1-64 characters of [A-Za-z0-9._-]"),
        }
    }
}

/// A caller's scope as sent: `"*"`, or 1-1000 tenant ids (sorted, duplicates dropped). A bad
/// entry is named by its index (`tenants.3`).
struct CallerScope(Scope);

const SCOPE_RULE: &str = "must be \"*\" or an array of 1-1000 tenant ids";

impl<'de> Deserialize<'de> for CallerScope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Scope;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(&SCOPE_RULE["must be ".len()..])
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<Scope, E> {
                match s {
                    "*" => Ok(Scope::All),
                    _ => Err(E::custom(SCOPE_RULE)),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Scope, A::Error> {
                let mut ids = Vec::new();
                while let Some(ScopeEntry(id)) = seq.next_element()? {
                    if ids.len() == 1000 {
                        return Err(A::Error::custom(SCOPE_RULE));
                    }
                    ids.push(id);
                }
                if ids.is_empty() {
                    return Err(A::Error::custom(SCOPE_RULE));
                }
                ids.sort();
                ids.dedup();
                Ok(Scope::Tenants(ids))
            }
        }
        d.deserialize_any(Visit).map(Self)
    }
}

/// One tenant id in a caller's scope.
#[derive(Deserialize)]
#[serde(try_from = "Value")]
struct ScopeEntry(String);

impl TryFrom<Value> for ScopeEntry {
    type Error = &'static str;
    fn try_from(v: Value) -> Result<Self, Self::Error> {
        match v.as_str().map(TenantId::parse) {
            Some(Ok(id)) => Ok(Self(id.to_string())),
            _ => Err("must be a tenant id"),
        }
    }
}

/// 422 unless every tenant in the scope is registered (`*` is always allowed).
async fn check_scope(state: &AppState, scope: &Scope) -> Result<(), ApiError> {
    let Scope::Tenants(ids) = scope else {
        return Ok(());
    };
    let known = state.store.existing_tenants(ids).await?;
    match ids.iter().position(|id| !known.contains(id)) {
        None => Ok(()),
        Some(i) => Err(caller_error(
            &format!("tenants.{i}"),
            &format!("no tenant with id {}", ids[i]),
        )),
    }
}

fn name_taken(e: crate::tenants::StoreError) -> ApiError {
    match e {
        crate::tenants::StoreError::Conflict => {
            ApiError::Conflict("a caller with this name already exists")
        }
        other => other.into(),
    }
}

async fn create_caller(
    admin: Admin,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let NewCaller {
        name: CallerName(name),
        tenants: CallerScope(scope),
    } = read_typed_or(&req, payload, ApiError::InvalidCaller).await?;
    check_scope(&state, &scope).await?;
    let key = ApiKey::generate();
    let id = format!("cl_{}", crate::crypto::random_hex::<8>());
    let row = admin_row(
        &admin,
        &req,
        "caller.create",
        None,
        Some(format!("caller {name} ({id})")),
    );
    let record = state
        .callers
        .create_caller(&id, &name, &key.hash(), &scope, &row)
        .await
        .map_err(name_taken)?;
    tracing::info!(caller = %record.name, caller_id = %record.id, "caller created");
    let mut view = caller_view(&record);
    view["api_key"] = Value::String(key.expose().to_owned());
    Ok(answer(HttpResponse::Created())
        .insert_header((header::LOCATION, format!("/admin/v1/callers/{}", record.id)))
        .json(view))
}

async fn list_callers(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let callers = state.callers.list_callers().await?;
    let views: Vec<Value> = callers.iter().map(caller_view).collect();
    Ok(answer(HttpResponse::Ok()).json(json!({ "callers": views })))
}

/// `PATCH /admin/v1/callers/{id}`: a new name and/or scope; the key stays.
async fn patch_caller(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if path.len() > 64 {
        return Err(ApiError::CallerNotFound);
    }
    let CallerPatch { name, tenants } =
        read_typed_or(&req, payload, ApiError::InvalidCaller).await?;
    let (name, scope) = (name.map(|n| n.0), tenants.map(|s| s.0));
    if name.is_none() && scope.is_none() {
        return Err(caller_error(
            "",
            "nothing to change; send name and/or tenants",
        ));
    }
    if let Some(scope) = &scope {
        check_scope(&state, scope).await?;
    }
    let changed: Vec<&str> = [
        name.as_ref().map(|_| "name"),
        scope.as_ref().map(|_| "tenants"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let audit = |record: &CallerRecord| -> Box<dyn AlsoWrite> {
        let detail = format!(
            "caller {} ({}): {}",
            record.name,
            record.id,
            changed.join(", ")
        );
        Box::new(admin_row(&admin, &req, "caller.update", None, Some(detail)))
    };
    let record = state
        .callers
        .update_caller(&path, name.as_deref(), scope.as_ref(), audit)
        .await
        .map_err(name_taken)?;
    state.auth.forget_all();
    Ok(answer(HttpResponse::Ok()).json(caller_view(&record)))
}

/// Longest grace period for a rotated key (7 days).
pub const MAX_KEY_GRACE_S: u64 = 7 * 86_400;

/// `POST /admin/v1/callers/{id}/rotate-key`'s body (optional: no body means no grace).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    #[serde(default)]
    grace_seconds: GraceSeconds,
}

/// How long a rotated key keeps working: a whole number of seconds up to `MAX_KEY_GRACE_S`.
#[derive(serde::Deserialize, Default)]
#[serde(try_from = "Value")]
struct GraceSeconds(u64);

impl TryFrom<Value> for GraceSeconds {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        v.as_u64()
            .filter(|g| *g <= MAX_KEY_GRACE_S)
            .map(Self)
            .ok_or_else(|| format!("must be a whole number of seconds from 0 to {MAX_KEY_GRACE_S}"))
    }
}

/// `POST /admin/v1/callers/{id}/rotate-key`: a new key, shown once; the old one keeps working
/// for `grace_seconds` (default 0) so services can roll.
async fn rotate_caller_key(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if path.len() > 64 {
        return Err(ApiError::CallerNotFound);
    }
    // The body is optional: no body (Content-Length 0) means no grace.
    let headers = req.headers();
    let has_body = headers.contains_key(header::CONTENT_TYPE)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let grace_s = if has_body {
        read_typed_or::<RotateKey>(&req, payload, ApiError::InvalidCaller)
            .await?
            .grace_seconds
            .0
    } else {
        0
    };
    let key = ApiKey::generate();
    let audit = |record: &CallerRecord| -> Box<dyn AlsoWrite> {
        let detail = format!(
            "caller {} ({}): old key valid for {grace_s} s more",
            record.name, record.id
        );
        Box::new(admin_row(
            &admin,
            &req,
            "caller.rotate_key",
            None,
            Some(detail),
        ))
    };
    let record = state
        .callers
        .rotate_caller_key(&path, &key.hash(), grace_s as i64 * 1000, audit)
        .await
        .map_err(name_taken)?;
    state.auth.forget_all();
    tracing::info!(caller = %record.name, caller_id = %record.id, grace_s, "caller key rotated");
    let mut view = caller_view(&record);
    view["api_key"] = Value::String(key.expose().to_owned());
    view["previous_key_expires_at"] = if grace_s > 0 {
        Value::String(rfc3339(now_ms() + grace_s as i64 * 1000))
    } else {
        Value::Null
    };
    Ok(answer(HttpResponse::Ok()).json(view))
}

async fn delete_caller(
    admin: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let row = admin_row(
        &admin,
        &req,
        "caller.delete",
        None,
        Some(format!("caller {}", path.as_str())),
    );
    if path.len() > 64 || !state.callers.delete_caller(&path, &row).await? {
        return Err(ApiError::CallerNotFound);
    }
    state.auth.forget_all();
    tracing::info!(caller_id = %path, "caller deleted");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
struct AuditQuery {
    tenant: Option<String>,
    caller: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

async fn read_audit(
    _: Admin,
    state: web::Data<AppState>,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = parse_limit(query.limit.as_deref())?;
    let before = match query.before.as_deref() {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::invalid("before must be an entry id", Some("before")))?,
        ),
    };
    for (name, v) in [("tenant", &query.tenant), ("caller", &query.caller)] {
        if v.as_ref().is_some_and(|v| v.len() > 256) {
            return Err(ApiError::invalid(format!("{name} is too long"), Some(name)));
        }
    }
    let rows = crate::audit::store::query(
        state.store.db(),
        query.tenant.as_deref().filter(|t| !t.is_empty()),
        query.caller.as_deref().filter(|c| !c.is_empty()),
        before,
        limit,
    )
    .await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let entries: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "at": rfc3339(r.at_ms),
                "last_at": rfc3339(r.last_at_ms),
                "count": r.count,
                "kind": r.entry.kind.as_str(),
                "action": r.entry.action,
                "outcome": r.entry.outcome,
                "caller": r.entry.caller.as_deref(),
                "auth_method": r.entry.auth_method.map(|m| m.as_str()),
                "tenant": r.entry.tenant.as_deref(),
                "source": r.entry.source.map(|s| s.as_str()),
                "fingerprint": r.entry.fingerprint.as_deref(),
                "detail": r.entry.detail,
                "request_id": r.entry.request_id,
            })
        })
        .collect();
    Ok(answer(HttpResponse::Ok()).json(json!({"entries": entries, "next_before": next_before})))
}

#[cfg(test)]
mod if_match_tests {
    use super::{entity_tags, health_state};

    #[test]
    fn health_in_one_word() {
        assert_eq!(health_state(false, None, None), "never_minted");
        assert_eq!(health_state(false, Some(10), None), "ok");
        assert_eq!(health_state(false, Some(10), Some(20)), "error");
        assert_eq!(health_state(false, None, Some(20)), "error");
        assert_eq!(health_state(false, Some(30), Some(20)), "ok", "recovered");
        assert_eq!(health_state(true, Some(30), Some(20)), "circuit_open");
    }

    #[test]
    fn entity_tag_lists_as_rfc_9110_writes_them() {
        assert_eq!(entity_tags(b"*"), Some(vec![None]));
        assert_eq!(entity_tags(b"\"v3\""), Some(vec![Some("v3")]));
        assert_eq!(
            entity_tags(b"W/\"v1\" ,\t\"h,yvK\", ,\"v2\""),
            Some(vec![Some("v1"), Some("h,yvK"), Some("v2")])
        );
        for bad in [
            &b""[..],
            b" , ",
            b"v3",
            b"\"v3",
            b"\"v3\" x",
            b"*, \"v3\"",
            b"\"a b\"",
            b"\"\xc3\xa9\"",
        ] {
            assert_eq!(entity_tags(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
