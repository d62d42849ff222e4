// token-broker admin console. Plain DOM, no dependencies. Everything shown is built with
// textContent (never innerHTML), the admin token lives in sessionStorage only, and secret
// form fields are write-only: the admin API never returns credentials.
'use strict';

const TOKEN_KEY = 'token-broker-admin-token';
// The issuer kinds and their credential fields, as the broker states them
// (GET /admin/v1/kinds), loaded once per sign-in: kind → { label, form, fields, methods }.
let KINDS = null;
// Labels for the client authentications the oauth2 kinds offer.
const METHOD_LABELS = {
  client_secret_basic: 'client_secret_basic (default)',
  client_secret_jwt: 'client_secret_jwt (HS256 assertion)',
  private_key_jwt: 'private_key_jwt (signed assertion)',
  tls_client_auth: 'tls_client_auth (client certificate)',
};

async function loadKinds() {
  if (KINDS) return KINDS;
  const answer = await api('GET', '/admin/v1/kinds');
  const asFields = (list) => (list || []).map((f) => [f.name, f.input, !f.required]);
  KINDS = {};
  for (const k of answer.kinds) {
    if (!k.form) continue;
    const methods = {};
    for (const m of k.auth_methods) methods[m.method] = asFields(m.credentials);
    KINDS[k.kind] = { label: k.label, fields: asFields(k.credentials), methods, scope: k.auth_methods.length > 0 };
  }
  return KINDS;
}
const REFRESH_MS = 5000;

let timer = null;
const $ = (id) => document.getElementById(id);

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value' || k === 'max') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

class Problem extends Error {
  constructor(status, body) {
    const code = (body && body.code) || 'http_' + status;
    const detail = (body && (body.detail || body.title)) || 'the broker answered ' + status;
    super(code + ': ' + detail);
    this.status = status;
    this.code = code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = { authorization: 'Bearer ' + token(), accept: 'application/json' };
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 204) return null;
  const data = await r.json().catch(() => null);
  if (r.status === 401) {
    signOut('The admin token was not accepted (' + ((data && data.detail) || 'unauthorized') + '): sign in again.');
  }
  if (!r.ok) throw new Problem(r.status, data);
  return data;
}

// ---- time and health ------------------------------------------------------------------------

function ago(iso) {
  if (!iso) return '—';
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 5) return 'just now';
  if (s < 90) return s + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' days ago';
}

function span(secs) {
  secs = Math.max(0, secs | 0);
  const hh = Math.floor(secs / 3600), mm = Math.floor((secs % 3600) / 60), ss = secs % 60;
  if (hh) return hh + 'h ' + mm + 'm';
  if (mm) return mm + 'm ' + ss + 's';
  return ss + 's';
}

// The broker's one-word health (health.state) as a badge class and its text.
function healthState(health) {
  switch (health.state) {
    case 'circuit_open': return ['open', 'circuit open'];
    case 'error': return ['error', (health.last_error && health.last_error.code) || 'error'];
    case 'ok': return ['ok', 'healthy'];
    default: return ['', 'not minted yet'];
  }
}

function badge(health) {
  const [cls, text] = healthState(health);
  return h('span', { class: 'badge ' + cls, 'data-health': cls || 'none' }, text);
}

function tokenBar(health) {
  const t = health.token;
  if (!t) return h('span', { class: 'muted' }, 'none held');
  const life = Math.max(1, t.lifetime_seconds || t.expires_in);
  return h('span', { title: 'expires ' + t.expires_at },
    h('progress', { max: life, value: Math.max(0, t.expires_in) }), span(t.expires_in));
}

function circuitText(c) {
  if (!c) return 'closed';
  if (c.open && c.probed) return 'open, probed each second a token is needed';
  if (c.open) return 'open, retry in ' + c.retry_after + ' s';
  return c.failures ? 'closed (' + c.failures + ' recent failures)' : 'closed';
}

function mints(health) {
  const failed = health.failed_mints_last_hour || 0;
  return [String(health.mints_last_hour || 0), failed ? h('span', { class: 'muted' }, ' (+' + failed + ' failed)') : null];
}

// ---- views ----------------------------------------------------------------------------------

function show(...nodes) {
  const view = $('view');
  view.replaceChildren(...nodes);
  view.hidden = false;
}

function every(fn) {
  clearInterval(timer);
  timer = setInterval(fn, REFRESH_MS);
}

function errorLine(id) { return h('p', { class: 'error', id, role: 'alert' }); }

async function tenantsView() {
  const tbody = h('tbody', { id: 'tenant-rows' });
  const status = errorLine('tenants-error');
  show(
    h('div', { class: 'heading' }, h('h2', {}, 'Tenants'),
      h('a', { href: '#/tenants/new', id: 'new-tenant', class: 'button primary' }, 'Register a tenant')),
    h('table', {}, h('thead', {}, h('tr', {}, ['Tenant', 'Kind', 'Health', 'Last success', 'Last error', 'Circuit', 'Token left', 'Mints (1 h)'].map((c) => h('th', {}, c)))), tbody),
    status);
  async function load() {
    try {
      let all = [], after = null;
      do {
        const page = await api('GET', '/admin/v1/tenants?limit=1000' + (after ? '&after=' + encodeURIComponent(after) : ''));
        all = all.concat(page.tenants);
        after = page.next_after;
      } while (after);
      tbody.replaceChildren(...(all.length ? all.map(tenantRow) : [h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No tenants yet: register one.'))]));
      status.textContent = '';
    } catch (e) { status.textContent = e.message; }
  }
  await load();
  every(load);
}

function tenantRow(t) {
  const hl = t.health || {};
  const err = hl.last_error;
  return h('tr', { 'data-tenant': t.id },
    h('td', {}, h('a', { href: '#/tenants/' + encodeURIComponent(t.id) }, t.id),
      t.display_name !== t.id ? h('div', { class: 'muted' }, t.display_name) : null),
    h('td', {}, t.issuer.kind),
    h('td', {}, badge(hl)),
    h('td', { title: hl.last_success_at || '' }, ago(hl.last_success_at)),
    h('td', { title: err ? err.detail || '' : '' }, err ? [h('code', {}, err.code), ' ', h('span', { class: 'muted' }, ago(err.at))] : '—'),
    h('td', {}, circuitText(hl.circuit)),
    h('td', {}, tokenBar(hl)),
    h('td', { class: 'num' }, mints(hl)));
}

// The credential fields of a kind under a client authentication (the kind's default when
// none is chosen); null for a kind registered from a spec.
function credentialFields(kind, method) {
  const spec = KINDS[kind];
  if (!spec) return null;
  return (method && spec.methods[method]) || spec.fields;
}

function credentialInputs(kind, prefix, method) {
  const fields = credentialFields(kind, method);
  if (!fields) return [h('p', { class: 'muted' }, 'This kind takes its credentials as JSON: use the spec box below.')];
  return fields.map(([name, type, optional]) => {
    const label = name + (optional ? ' (optional)' : '');
    if (type !== 'pem') {
      return h('label', {}, label,
        h('input', { type, name: 'cred-' + name, id: prefix + name, required: !optional, autocomplete: type === 'password' ? 'new-password' : 'off', spellcheck: 'false' }));
    }
    const area = h('textarea', { name: 'cred-' + name, id: prefix + name, required: !optional, spellcheck: 'false', autocomplete: 'off', placeholder: '-----BEGIN …-----' });
    const file = h('input', { type: 'file', id: prefix + name + '-file', accept: '.pem,.key,.crt', onchange: async (ev) => {
      const f = ev.target.files[0];
      if (f) area.value = await f.text();
    } });
    return h('label', {}, label + ' (PEM: paste it or pick the file)', area, file);
  });
}

function readCredentials(form, kind, method) {
  const out = {};
  for (const [name, , optional] of credentialFields(kind, method)) {
    const v = form.elements['cred-' + name].value;
    if (v || !optional) out[name] = v;
  }
  return out;
}

async function newTenantView() {
  await loadKinds();
  const creds = h('div', { id: 'cred-fields' });
  const scope = h('label', { id: 'scope-field' }, 'Scope (optional)', h('input', { name: 'scope', id: 't-scope' }));
  const methods = Object.keys(Object.values(KINDS).find((k) => k.scope).methods);
  const method = h('select', { name: 'auth_method', id: 't-auth-method' }, methods.map((m) => h('option', { value: m }, METHOD_LABELS[m] || m)));
  const pop = h('fieldset', { id: 'pop-fields' }, h('legend', {}, 'Client authentication and proof of possession'),
    h('label', {}, 'How the broker authenticates at the partner', method),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'dpop', id: 't-dpop' }), ' Bind tokens with DPoP (the broker keeps the key)'),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'publish_jwks', id: 't-publish-jwks' }), ' Publish the public keys at /v1/tenants/<id>/jwks.json'),
    h('label', { id: 'tls-ca-field' }, 'Partner CA certificates (PEM, optional)', h('textarea', { name: 'tls_ca', id: 't-tls-ca', spellcheck: 'false' })));
  const kind = h('select', { name: 'kind', id: 't-kind' }, Object.entries(KINDS).map(([k, v]) => h('option', { value: k }, v.label + ' (' + k + ')')));
  const status = errorLine('new-tenant-error');
  const json = h('textarea', { name: 'spec', id: 't-spec', spellcheck: 'false', placeholder: '{"id": "…", "issuer": {"kind": "custom", …}, "credentials": {…}}' });
  function onKind() {
    const oauth = !!KINDS[kind.value].scope;
    creds.replaceChildren(...credentialInputs(kind.value, 't-cred-', oauth ? method.value : null));
    scope.hidden = !oauth;
    pop.hidden = !oauth;
  }
  kind.addEventListener('change', onKind);
  method.addEventListener('change', onKind);
  const form = h('form', { class: 'card', id: 'new-tenant-form', autocomplete: 'off', onsubmit: async (ev) => {
    ev.preventDefault();
    let spec;
    if (json.value.trim()) {
      try { spec = JSON.parse(json.value); } catch (e) { status.textContent = 'The spec is not JSON: ' + e.message; return; }
    } else {
      const f = form.elements;
      const m = pop.hidden ? null : method.value;
      spec = { id: f.id.value.trim(), issuer: { kind: kind.value, token_url: f.token_url.value.trim() }, credentials: readCredentials(form, kind.value, m) };
      if (f.display_name.value.trim()) spec.display_name = f.display_name.value.trim();
      if (f.ttl.value) spec.issuer.default_ttl_seconds = Number(f.ttl.value);
      if (!scope.hidden && f.scope.value.trim()) spec.issuer.scope = f.scope.value.trim();
      if (m && m !== 'client_secret_basic') spec.issuer.auth_method = m;
      if (m && f.dpop.checked) spec.issuer.dpop = true;
      if (m && f.publish_jwks.checked) spec.issuer.publish_jwks = true;
      if (m && f.tls_ca.value.trim()) spec.issuer.tls_ca = f.tls_ca.value;
    }
    try {
      const t = await api('POST', '/admin/v1/tenants', spec);
      form.reset();
      json.value = '';
      location.hash = '#/tenants/' + encodeURIComponent(t.id);
    } catch (e) { status.textContent = e.message; }
  } },
    h('label', {}, 'Tenant id', h('input', { name: 'id', id: 't-id', placeholder: 'acme-setu' })),
    h('label', {}, 'Display name (optional)', h('input', { name: 'display_name', id: 't-name' })),
    h('label', {}, 'Kind', kind),
    h('label', {}, 'Token URL', h('input', { name: 'token_url', id: 't-token-url', type: 'url', placeholder: 'https://partner.example.com/auth/token' })),
    h('label', {}, 'Default lifetime in seconds, when the partner states none (optional)', h('input', { name: 'ttl', id: 't-ttl', type: 'number', min: 1 })),
    scope, pop, creds,
    h('details', {}, h('summary', {}, 'Or paste a whole tenant spec as JSON (any kind, including custom, jwt_bearer)'), h('label', {}, 'Spec', json)),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 't-submit' }, 'Register tenant'), h('a', { href: '#/tenants' }, 'Cancel')),
    status);
  onKind();
  show(h('h2', {}, 'Register a tenant'), h('p', { class: 'muted' }, 'The broker does not call the partner until a token is needed or you test the credentials.'), form);
}

async function tenantView(id) {
  await loadKinds();
  const path = '/admin/v1/tenants/' + encodeURIComponent(id);
  let t;
  try { t = await api('GET', path); } catch (e) { show(h('h2', {}, id), h('p', { class: 'error' }, e.message), h('a', { href: '#/tenants' }, 'Back to tenants')); return; }
  const details = h('div', { id: 'tenant-details' });
  const result = h('p', { id: 'tenant-result', role: 'status' });
  function render(t) {
    const hl = t.health || {};
    const err = hl.last_error;
    details.replaceChildren(h('dl', {},
      h('dt', {}, 'Display name'), h('dd', {}, t.display_name),
      h('dt', {}, 'Kind'), h('dd', {}, t.issuer.kind),
      h('dt', {}, 'Token URL'), h('dd', {}, h('code', {}, t.issuer.token_url || '—')),
      h('dt', {}, 'Credentials'), h('dd', {}, (t.credential_fields || []).join(', '), h('span', { class: 'muted' }, ' (write-only: never shown)')),
      h('dt', {}, 'Health'), h('dd', { id: 'tenant-health' }, badge(hl)),
      h('dt', {}, 'Last success'), h('dd', { title: hl.last_success_at || '' }, ago(hl.last_success_at)),
      h('dt', {}, 'Last error'), h('dd', {}, err ? [h('code', {}, err.code), ' ', ago(err.at), h('div', { class: 'muted' }, err.detail || '')] : '—'),
      h('dt', {}, 'Circuit'), h('dd', {}, circuitText(hl.circuit)),
      h('dt', {}, 'Current token'), h('dd', {}, tokenBar(hl)),
      h('dt', {}, 'Mints (1 h)'), h('dd', {}, mints(hl)),
      h('dt', {}, 'Version'), h('dd', {}, String(t.version) + ', updated ' + ago(t.updated_at))));
  }
  render(t);
  const rotate = h('form', { class: 'card', id: 'rotate-form', autocomplete: 'off', hidden: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const creds = KINDS[t.issuer.kind] ? readCredentials(rotate, t.issuer.kind, t.issuer.auth_method) : JSON.parse(rotate.elements.creds_json.value || '{}');
    try {
      await api('PUT', path + '/credentials', creds);
      rotate.reset();
      rotate.hidden = true;
      result.className = 'success';
      result.textContent = 'Credentials replaced; the cached token was dropped. Test them to mint a new one.';
      render(await api('GET', path));
    } catch (e) { result.className = 'error'; result.textContent = e.message; }
  } },
    h('h3', {}, 'New credentials'),
    KINDS[t.issuer.kind] ? credentialInputs(t.issuer.kind, 'r-cred-', t.issuer.auth_method) : h('label', {}, 'Credentials (JSON object)', h('textarea', { name: 'creds_json', id: 'r-creds-json' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'rotate-submit' }, 'Replace credentials'),
      h('button', { type: 'button', onclick: () => { rotate.reset(); rotate.hidden = true; } }, 'Cancel')));
  const actions = h('div', { class: 'actions' },
    h('button', { type: 'button', id: 'test-credentials', class: 'primary', onclick: async () => {
      result.className = 'muted';
      result.textContent = 'Asking the partner…';
      try {
        const r = await api('POST', path + '/test');
        result.className = 'success';
        result.textContent = 'The partner accepted the credentials: a token valid for ' + span(r.expires_in) + '.';
      } catch (e) { result.className = 'error'; result.textContent = e.message; }
      try { render(await api('GET', path)); } catch (e) { /* shown on the next refresh */ }
    } }, 'Test credentials'),
    h('button', { type: 'button', id: 'rotate-credentials', onclick: () => { rotate.hidden = false; } }, 'Rotate credentials'),
    h('button', { type: 'button', id: 'delete-tenant', class: 'danger', onclick: async () => {
      if (!confirm('Delete tenant ' + id + '? Callers stop getting its tokens at once.')) return;
      try { await api('DELETE', path); location.hash = '#/tenants'; } catch (e) { result.className = 'error'; result.textContent = e.message; }
    } }, 'Delete tenant'));
  show(h('p', {}, h('a', { href: '#/tenants' }, '← Tenants')), h('h2', { id: 'tenant-title' }, t.id), details, actions, result, rotate);
  every(async () => { try { t = await api('GET', path); render(t); } catch (e) { /* keep the last view */ } });
}

async function callersView() {
  const tbody = h('tbody', { id: 'caller-rows' });
  const status = errorLine('callers-error');
  const once = h('div', { id: 'caller-key' });
  async function load() {
    try {
      const v = await api('GET', '/admin/v1/callers');
      tbody.replaceChildren(...(v.callers.length ? v.callers.map((c) => h('tr', { 'data-caller': c.id },
        h('td', {}, h('code', {}, c.id)), h('td', {}, c.name),
        h('td', {}, Array.isArray(c.tenants) ? c.tenants.join(', ') : String(c.tenants)),
        h('td', { title: c.created_at }, ago(c.created_at)),
        h('td', {}, h('button', { type: 'button', class: 'danger', onclick: async () => {
          if (!confirm('Delete caller ' + c.name + '? Its key stops working.')) return;
          try { await api('DELETE', '/admin/v1/callers/' + encodeURIComponent(c.id)); once.replaceChildren(); await load(); } catch (e) { status.textContent = e.message; }
        } }, 'Delete')))) : [h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No callers yet.'))]));
    } catch (e) { status.textContent = e.message; }
  }
  const form = h('form', { class: 'card', id: 'new-caller-form', autocomplete: 'off', onsubmit: async (ev) => {
    ev.preventDefault();
    const tenants = form.elements.tenants.value.split(',').map((s) => s.trim()).filter(Boolean);
    try {
      const scope = tenants.length === 1 && tenants[0] === '*' ? '*' : tenants;
      const c = await api('POST', '/admin/v1/callers', { name: form.elements.name.value.trim(), tenants: scope });
      form.reset();
      status.textContent = '';
      once.replaceChildren(h('div', { class: 'once' },
        h('strong', {}, 'API key for ' + c.name + ' (' + c.id + '), shown once:'),
        h('code', { id: 'new-api-key' }, c.api_key),
        h('span', { class: 'muted' }, 'Store it in the calling service\'s secret store now; it cannot be shown again.'),
        h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => once.replaceChildren() }, 'Done'))));
      await load();
    } catch (e) { status.textContent = e.message; }
  } },
    h('h3', {}, 'New caller'),
    h('label', {}, 'Name', h('input', { name: 'name', id: 'c-name', required: true, placeholder: 'billing' })),
    h('label', {}, 'Tenants it may fetch (comma-separated ids, or *)', h('input', { name: 'tenants', id: 'c-tenants', required: true, placeholder: 'acme-setu' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'c-submit' }, 'Create caller')));
  show(h('h2', {}, 'Callers'), once, h('table', {}, h('thead', {}, h('tr', {}, ['Id', 'Name', 'Tenants', 'Created', ''].map((c) => h('th', {}, c)))), tbody), status, form);
  await load();
}

async function auditView() {
  const tbody = h('tbody', { id: 'audit-rows' });
  const status = errorLine('audit-error');
  let before = null;
  const more = h('button', { type: 'button', id: 'audit-more', hidden: true, onclick: () => load(false) }, 'Older entries');
  const filters = h('form', { class: 'toolbar', id: 'audit-filters', onsubmit: (ev) => { ev.preventDefault(); load(true); } },
    h('label', {}, 'Tenant', h('input', { name: 'tenant', id: 'a-tenant' })),
    h('label', {}, 'Caller', h('input', { name: 'caller', id: 'a-caller' })),
    h('button', { type: 'submit', id: 'a-apply' }, 'Filter'));
  async function load(fresh) {
    const q = new URLSearchParams({ limit: '100' });
    for (const k of ['tenant', 'caller']) if (filters.elements[k].value.trim()) q.set(k, filters.elements[k].value.trim());
    if (!fresh && before) q.set('before', before);
    try {
      const v = await api('GET', '/admin/v1/audit?' + q);
      const rows = v.entries.map((e) => h('tr', { 'data-action': e.action },
        h('td', { title: e.at }, e.at.replace('T', ' ').replace('Z', '')),
        h('td', {}, e.action), h('td', {}, e.outcome), h('td', {}, e.caller || '—'),
        h('td', {}, e.auth_method || ''), h('td', {}, e.tenant || '—'),
        h('td', { class: 'num' }, e.count > 1 ? '×' + e.count : ''), h('td', {}, e.detail || '')));
      if (fresh) tbody.replaceChildren(...rows); else tbody.append(...rows);
      if (fresh && !rows.length) tbody.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No entries.')));
      before = v.next_before;
      more.hidden = !before;
      status.textContent = '';
    } catch (e) { status.textContent = e.message; }
  }
  show(h('h2', {}, 'Audit trail'), filters,
    h('table', {}, h('thead', {}, h('tr', {}, ['At (UTC)', 'Action', 'Outcome', 'By', 'Method', 'Tenant', 'Count', 'Detail'].map((c) => h('th', {}, c)))), tbody),
    h('div', { class: 'actions' }, more), status);
  await load(true);
}

// ---- sign-in and routing --------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  KINDS = null;
  clearInterval(timer);
  $('view').hidden = true;
  $('view').replaceChildren();
  $('nav').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
}

async function signIn(ev) {
  ev.preventDefault();
  const value = $('signin-token').value.trim();
  $('signin-token').value = '';
  const r = await fetch('/admin/v1/tenants?limit=1', { headers: { authorization: 'Bearer ' + value }, cache: 'no-store', credentials: 'omit' });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    $('signin-error').textContent = (body && body.code ? body.code + ': ' + body.detail : 'sign-in failed (' + r.status + ')');
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  route();
}

function route() {
  clearInterval(timer);
  if (!token()) { signOut(); return; }
  $('signin').hidden = true;
  $('nav').hidden = false;
  const parts = (location.hash || '#/tenants').slice(2).split('/');
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.id === 'nav-' + parts[0]);
  if (parts[0] === 'callers') return callersView();
  if (parts[0] === 'audit') return auditView();
  if (parts[0] === 'tenants' && parts[1] === 'new') return newTenantView();
  if (parts[0] === 'tenants' && parts[1]) return tenantView(decodeURIComponent(parts[1]));
  return tenantsView();
}

document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', route);
  route();
});
