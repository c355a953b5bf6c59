// berth dashboard: a small single-page app over berth's JSON API.
//
// No framework and no build step: the DOM is built with `h()` (text is
// always set as text, never parsed as HTML), pages are hash routes, and
// live state arrives over Server-Sent Events read with fetch() (so the
// token travels in the Authorization header, never in a URL; EventSource
// cannot set headers). Every page owns an AbortController that ends its
// streams when the user navigates away.
'use strict';

const TOKEN_KEY = 'berth.token';
const $ = (sel, root = document) => root.querySelector(sel);

// ---------- DOM ----------
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
// replaceChildren() that takes nested arrays and skips empty parts, like h().
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity)
    .filter((c) => c !== undefined && c !== null && c !== false && c !== '')
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}
const svgNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs) {
  const e = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
const enc = encodeURIComponent;
function fmtTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  return d.toLocaleString(undefined, { hour12: false });
}
function fmtClock(ms) {
  return new Date(ms).toLocaleTimeString(undefined, { hour12: false });
}
function fmtDuration(s) {
  if (s == null) return '';
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
}
function fmtBytes(n) {
  if (n == null) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
function toast(msg, bad) {
  const t = h('div', { class: 'toast' + (bad ? ' bad' : '') }, msg);
  $('#toasts').append(t);
  setTimeout(() => t.remove(), bad ? 9000 : 6000);
}
function setLive(on, text) {
  const l = $('#live');
  l.textContent = text;
  l.classList.toggle('on', on);
}

// ---------- API ----------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const t = sessionStorage.getItem(TOKEN_KEY);
  if (t) headers.Authorization = 'Bearer ' + t;
  return headers;
}
async function api(method, path, body, raw) {
  const headers = authHeaders({ Accept: 'application/json' });
  let payload;
  if (raw !== undefined) { payload = raw; headers['Content-Type'] = 'application/octet-stream'; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers['Content-Type'] = 'application/json'; }
  const r = await fetch(path, { method, headers, body: payload, credentials: 'omit', cache: 'no-store' });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (r.status === 401) { showLogin('The token was refused or is missing.'); throw new ApiError(401, 'unauthorized'); }
  if (!r.ok) {
    const msg = (data && data.error) ? data.error + (data.hint ? ` (${data.hint})` : '') : `${r.status} ${r.statusText}`;
    throw new ApiError(r.status, msg);
  }
  return data;
}

// Reads a streamed response line by line until it ends or `signal` aborts.
async function readLines(resp, onLine) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).replace(/\r$/, '');
      buf = buf.slice(i + 1);
      onLine(line);
    }
  }
}

async function openStream(path, accept, signal) {
  const r = await fetch(path, { headers: authHeaders({ Accept: accept }), signal, credentials: 'omit', cache: 'no-store' });
  if (r.status === 401) { showLogin('The token was refused or is missing.'); throw new ApiError(401, 'unauthorized'); }
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { const j = await r.json(); if (j.error) msg = j.error; } catch { /* not JSON */ }
    throw new ApiError(r.status, msg);
  }
  return r;
}

// Follows an SSE endpoint, reconnecting with back-off until `signal`
// aborts. `onEvent(type, data, id)` gets each event; returns false from
// `onOpenError(err)` to stop retrying (e.g. on 404).
async function sse(path, signal, onEvent, onOpenError) {
  let delay = 500;
  while (!signal.aborted) {
    try {
      const r = await openStream(path, 'text/event-stream', signal);
      delay = 500;
      let type = 'message', data = [], id = null;
      await readLines(r, (line) => {
        if (line === '') {
          if (data.length) onEvent(type, data.join('\n'), id);
          type = 'message'; data = []; id = null;
        } else if (line.startsWith(':')) {
          // keep-alive comment
        } else {
          const c = line.indexOf(':');
          const field = c < 0 ? line : line.slice(0, c);
          const value = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
          if (field === 'event') type = value;
          else if (field === 'data') data.push(value);
          else if (field === 'id') id = value;
        }
      });
    } catch (e) {
      if (signal.aborted) return;
      if (onOpenError && onOpenError(e) === false) return;
      if (e.status === 401) return;
    }
    if (signal.aborted) return;
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// ---------- auth ----------
function showLogin(message) {
  $('#login').hidden = false;
  $('#main').hidden = true;
  $('#logout').hidden = true;
  $('#login-error').textContent = message || '';
  setLive(false, 'signed out');
  $('#token').focus();
}
function hideLogin() {
  $('#login').hidden = true;
  $('#main').hidden = false;
}
async function login(ev) {
  ev.preventDefault();
  const t = $('#token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    await api('GET', '/v1/health');
    await api('GET', '/v1/stacks');
    $('#token').value = '';
    hideLogin();
    $('#logout').hidden = false;
    Events.start();
    route();
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (e.status !== 401) $('#login-error').textContent = e.message;
  }
}

// ---------- confirmation ----------
function confirmAction(title, body, okLabel) {
  const d = $('#confirm');
  $('#confirm-title').textContent = title;
  $('#confirm-body').textContent = body;
  $('#confirm-ok').textContent = okLabel || 'Confirm';
  d.returnValue = '';
  return new Promise((resolve) => {
    d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
    d.showModal();
    $('#confirm-cancel').focus();
  });
}

// ---------- events ----------
// The server's event log (`GET /v1/events`, SSE) when it has one; otherwise
// events derived here from the stack snapshots the pages watch.
const Events = {
  mode: null, // 'server' | 'derived'
  list: [],
  listeners: new Set(),
  previous: new Map(), // stack id -> Map(instance -> {state, health, release})
  controller: null,
  push(e) {
    this.list.push(e);
    if (this.list.length > 200) this.list.splice(0, this.list.length - 200);
    for (const l of this.listeners) l();
  },
  start() {
    if (this.controller) this.controller.abort();
    this.controller = new AbortController();
    this.mode = null;
    const signal = this.controller.signal;
    sse('/v1/events?follow=true&limit=50', signal, (type, data) => {
      this.mode = 'server';
      if (type !== 'message') return;
      try {
        const e = JSON.parse(data);
        this.push({ at: e.at, kind: e.kind, text: e.message, namespace: e.namespace, stack: e.stack, service: e.service });
      } catch { /* not an event */ }
    }, (err) => {
      if (err.status === 404) {
        this.mode = 'derived';
        for (const l of this.listeners) l();
        return false;
      }
      return true;
    });
    // The stream's first bytes decide the mode; until then (or when there
    // is no event log) derive events from snapshots.
    setTimeout(() => { if (!this.mode) this.mode = 'derived'; }, 3000);
  },
  // Called with every stack snapshot a page receives.
  observe(detail) {
    const rec = detail.record;
    const id = `${rec.namespace}/${rec.name}`;
    const now = Date.now();
    const cur = new Map();
    for (const i of detail.instances) cur.set(i.instance, { state: i.state, health: i.health, release: i.release, service: i.service, exit: i.last_exit });
    const prev = this.previous.get(id);
    this.previous.set(id, cur);
    if (!prev || this.mode === 'server') return;
    const base = { at: now, namespace: rec.namespace, stack: rec.name };
    for (const [name, s] of cur) {
      const p = prev.get(name);
      if (!p) this.push({ ...base, service: s.service, kind: 'instance_added', text: `${name} added (${s.state})` });
      else if (p.state !== s.state) {
        const code = s.state === 'exited' && s.exit && s.exit.code != null ? ` with code ${s.exit.code}` : '';
        this.push({ ...base, service: s.service, kind: `instance_${s.state}`, text: `${name} ${p.state} → ${s.state}${code}` });
      } else if (p.health !== s.health && s.health !== 'none') {
        this.push({ ...base, service: s.service, kind: `instance_${s.health}`, text: `${name} is ${s.health}` });
      }
    }
    for (const [name, p] of prev) {
      if (!cur.has(name)) this.push({ ...base, service: p.service, kind: 'instance_removed', text: `${name} removed` });
    }
  },
  render(filter) {
    const ul = h('ul', { class: 'events', 'aria-label': 'Recent events' });
    const draw = () => {
      const items = this.list.filter(filter || (() => true)).slice(-30).reverse();
      fill(ul, ...(items.length ? items.map((e) => h('li', {},
        h('time', { datetime: new Date(e.at).toISOString() }, fmtClock(e.at)),
        h('span', {}, e.stack ? h('span', { class: 'muted' }, `${e.stack}: `) : '', e.text))) : [h('li', { class: 'muted' }, 'Nothing yet.')]));
      const src = ul.previousElementSibling;
      if (src && src.classList.contains('events-src')) {
        src.textContent = this.mode === 'server' ? 'from the server\'s event log' : 'seen by this page (the server has no event log)';
      }
    };
    draw();
    this.listeners.add(draw);
    page.signal.addEventListener('abort', () => this.listeners.delete(draw));
    return [h('p', { class: 'events-src muted' }), ul];
  },
};

// ---------- health ----------
function healthOf(i) {
  if (i.state === 'running' && (i.health === 'healthy' || i.health === 'none')) return ['healthy', 'ok'];
  if (i.state === 'running' && i.health === 'starting') return ['starting', 'warn'];
  if (i.state === 'running') return [i.health, 'bad'];
  if (['pending', 'starting', 'stopping', 'stopped'].includes(i.state)) return [i.state, 'warn'];
  return [i.state, 'bad'];
}
function pill(text, cls) { return h('span', { class: `pill ${cls}` }, text); }
function serviceHealth(s) {
  if (s.stopped) return pill('stopped', 'muted');
  if (s.replicas === 0) return pill('scaled to 0', 'muted');
  if (s.healthy >= s.replicas) return pill('healthy', 'ok');
  if (s.running > 0) return pill('degraded', 'warn');
  return pill('down', 'bad');
}

// ---------- pages ----------
let page = new AbortController();

function watchStack(ns, stack, onState) {
  return sse(`/v1/stacks/${enc(ns)}/${enc(stack)}/watch`, page.signal, (type, data) => {
    if (type === 'state') {
      const d = JSON.parse(data);
      Events.observe(d);
      setLive(true, `live · ${fmtClock(Date.now())}`);
      onState(d);
    } else if (type === 'removed') {
      toast(`Stack ${stack} was removed.`);
      location.hash = '#/';
    }
  }, (e) => { setLive(false, `reconnecting… (${e.message})`); return e.status !== 404; });
}

function summarize(detail) {
  const services = {};
  for (const [name, d] of Object.entries(detail.record.services)) {
    services[name] = { replicas: d.replicas, stopped: d.stopped, running: 0, healthy: 0 };
  }
  for (const i of detail.instances) {
    const s = services[i.service];
    if (!s || i.state !== 'running' || i.current === false) continue;
    s.running++;
    if (i.health === 'healthy' || i.health === 'none') s.healthy++;
  }
  return services;
}

async function overview(main) {
  const stacks = await api('GET', '/v1/stacks');
  const byNs = new Map();
  for (const s of stacks) {
    if (!byNs.has(s.namespace)) byNs.set(s.namespace, []);
    byNs.get(s.namespace).push(s);
  }
  let total = 0, healthy = 0;
  const cards = new Map();
  const card = (s) => {
    const rows = Object.entries(s.services).map(([name, v]) => {
      total++; if (!v.stopped && v.healthy >= v.replicas) healthy++;
      return h('tr', { 'data-service': name },
        h('td', {}, h('a', { href: `#/service/${enc(s.namespace)}/${enc(s.name)}/${enc(name)}` }, name)),
        h('td', {}, `${v.healthy}/${v.replicas}`), h('td', {}, serviceHealth(v)));
    });
    return h('article', { class: 'card', 'data-stack': s.name },
      h('h3', {}, h('a', { href: `#/stack/${enc(s.namespace)}/${enc(s.name)}` }, s.name), ' ', h('span', { class: 'muted' }, `v${s.release}`)),
      h('table', {}, h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'service'), h('th', { scope: 'col' }, 'healthy'), h('th', { scope: 'col' }, 'state'))), h('tbody', {}, rows)));
  };
  const sections = [];
  for (const [ns, list] of byNs) {
    sections.push(h('h2', {}, `Namespace ${ns}`), h('div', { class: 'grid' }, list.map((s) => { const c = card(s); cards.set(`${ns}/${s.name}`, c); return c; })));
  }
  const summary = h('div', { class: 'summary', id: 'health-summary' });
  const drawSummary = () => {
    fill(summary, pill(`${stacks.length} stacks`, 'muted'), pill(`${healthy}/${total} services healthy`, healthy === total ? 'ok' : 'warn'));
  };
  drawSummary();
  fill(main, h('h1', {}, 'Overview'), summary,
    stacks.length ? sections : h('p', {}, 'No stacks yet. Run ', h('code', {}, 'berth up'), ' in a directory with a compose.yaml or Procfile.'),
    h('h2', {}, 'Recent events'), Events.render());
  // Live: one watch per stack keeps its card current.
  for (const s of stacks) {
    watchStack(s.namespace, s.name, (d) => {
      const fresh = { namespace: s.namespace, name: s.name, release: d.record.release, services: summarize(d) };
      total = 0; healthy = 0;
      const old = cards.get(`${s.namespace}/${s.name}`);
      Object.assign(s, fresh);
      const replacement = card(s);
      old.replaceWith(replacement);
      cards.set(`${s.namespace}/${s.name}`, replacement);
      total = 0; healthy = 0;
      for (const st of stacks) for (const v of Object.values(st.services)) { total++; if (!v.stopped && v.healthy >= v.replicas) healthy++; }
      drawSummary();
    });
  }
}

function instanceTable(instances, withService) {
  return h('div', { class: 'table-wrap' }, h('table', { class: 'instances' },
    h('caption', { class: 'muted', style: 'text-align:left;padding:6px 10px' }, `${instances.length} instances`),
    h('thead', {}, h('tr', {}, withService && h('th', { scope: 'col' }, 'service'), h('th', { scope: 'col' }, 'instance'), h('th', { scope: 'col' }, 'state'),
      h('th', { scope: 'col' }, 'health check'), h('th', { scope: 'col', class: 'hide-sm' }, 'address'), h('th', { scope: 'col', class: 'hide-sm' }, 'pid'),
      h('th', { scope: 'col' }, 'restarts'), h('th', { scope: 'col', class: 'hide-sm' }, 'release'), h('th', { scope: 'col', class: 'hide-sm' }, 'up'), h('th', { scope: 'col', class: 'hide-sm' }, 'node'))),
    h('tbody', {}, instances.map((i) => {
      const [label, cls] = healthOf(i);
      const up = i.started_at && i.state === 'running' ? fmtDuration(Math.max(0, Math.floor((Date.now() - i.started_at) / 1000))) : '';
      const exit = i.last_exit ? ` (last exit ${i.last_exit.code != null ? 'code ' + i.last_exit.code : i.last_exit.signal || ''})` : '';
      return h('tr', { 'data-instance': i.instance, 'data-state': i.state, 'data-health': label },
        withService && h('td', {}, i.service),
        h('td', { class: 'mono' }, i.instance, i.current === false ? h('span', { class: 'muted' }, ' (outdated)') : ''),
        h('td', {}, pill(label, cls), i.message ? h('div', { class: 'muted' }, i.message) : ''),
        h('td', {}, i.health_output ? h('pre', {}, i.health_output.slice(-400)) : h('span', { class: 'muted' }, i.health === 'none' ? 'no check' : i.health)),
        // The row's address is already `ip:port` when the instance has a port.
        h('td', { class: 'mono hide-sm' }, i.address || ''),
        h('td', { class: 'mono hide-sm' }, i.pid || ''),
        h('td', {}, String(i.restarts), h('span', { class: 'muted' }, exit)),
        h('td', { class: 'hide-sm' }, `v${i.release}`),
        h('td', { class: 'hide-sm' }, up),
        h('td', { class: 'hide-sm' }, i.node));
    }))));
}

function crumbs(...parts) {
  return h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, parts.map((p, n) => [n ? ' / ' : '', p]));
}

async function stackPage(main, ns, stack) {
  const services = h('div');
  const instances = h('div');
  const releases = h('div');
  const rollbackBtn = h('button', { type: 'button', class: 'danger', id: 'rollback' }, 'Roll back…');
  const rolloutBox = h('p', { id: 'rollout', 'aria-live': 'polite' });
  fill(main, 
    crumbs(h('a', { href: '#/' }, 'Overview'), `${ns}`),
    h('h1', {}, `Stack ${stack}`),
    h('h2', {}, 'Services'), services,
    h('h2', {}, 'Instances'), instances,
    h('h2', {}, 'Releases'), h('div', { class: 'controls' }, rollbackBtn), rolloutBox, releases,
    h('h2', {}, 'Events'), Events.render((e) => e.stack === stack && (!e.namespace || e.namespace === ns)));
  let current = null;
  const drawReleases = async () => {
    const r = await api('GET', `/v1/stacks/${enc(ns)}/${enc(stack)}/releases`);
    const list = r.releases.slice().reverse();
    const from = h('select', { id: 'diff-from' }, list.map((x, n) => h('option', { value: x.version, selected: n === 1 }, `v${x.version}`)));
    const to = h('select', { id: 'diff-to' }, list.map((x, n) => h('option', { value: x.version, selected: n === 0 }, `v${x.version}`)));
    const out = h('div', { class: 'diff', id: 'diff', hidden: true });
    const showDiff = async () => {
      const [a, b] = await Promise.all([from.value, to.value].map((v) => api('GET', `/v1/stacks/${enc(ns)}/${enc(stack)}/releases/${v}`)));
      out.hidden = false;
      fill(out, diffView(releaseText(a), releaseText(b)));
    };
    fill(releases, 
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'release'), h('th', { scope: 'col' }, 'created'), h('th', { scope: 'col', class: 'hide-sm' }, 'author'), h('th', { scope: 'col' }, 'message'), h('th', { scope: 'col' }, 'changed'))),
        h('tbody', {}, list.map((x) => h('tr', { 'data-release': x.version },
          h('td', {}, `v${x.version}`, x.current ? [' ', pill('current', 'ok')] : ''),
          h('td', {}, fmtTime(x.created_at)), h('td', { class: 'hide-sm' }, x.author), h('td', {}, x.message),
          h('td', {}, x.services_changed.join(', '))))))),
      list.length > 1 ? h('div', { class: 'controls' }, h('label', { for: 'diff-from' }, 'Diff'), from, h('label', { for: 'diff-to' }, 'against'), to,
        h('button', { type: 'button', class: 'secondary', onclick: () => showDiff().catch((e) => toast(e.message, true)) }, 'Show diff')) : '',
      out);
    rollbackBtn.disabled = list.length < 2 || r.current <= 1;
  };
  rollbackBtn.addEventListener('click', async () => {
    if (!await confirmAction(`Roll back ${stack}?`, `This makes the release before v${current ? current.record.release : '?'} current again and replaces instances whose spec changes.`, 'Roll back')) return;
    try {
      const r = await api('POST', `/v1/stacks/${enc(ns)}/${enc(stack)}/rollback`, { author: 'dashboard' });
      toast(`Rolled back: ${stack} is now at release v${r.release}.`);
      Events.push({ at: Date.now(), namespace: ns, stack, kind: 'rolled_back', text: `rolled back (now v${r.release})` });
      await drawReleases();
    } catch (e) { toast(`Rollback failed: ${e.message}`, true); }
  });
  await drawReleases();
  let lastRelease = null;
  watchStack(ns, stack, (d) => {
    current = d;
    const sums = summarize(d);
    fill(services, h('div', { class: 'table-wrap' }, h('table', { class: 'services' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'service'), h('th', { scope: 'col' }, 'replicas'), h('th', { scope: 'col' }, 'running'), h('th', { scope: 'col' }, 'healthy'), h('th', { scope: 'col' }, 'state'))),
      h('tbody', {}, Object.entries(sums).map(([name, s]) => h('tr', { 'data-service': name },
        h('td', {}, h('a', { href: `#/service/${enc(ns)}/${enc(stack)}/${enc(name)}` }, name)),
        h('td', {}, s.replicas), h('td', {}, s.running), h('td', {}, s.healthy), h('td', {}, serviceHealth(s))))))));
    fill(instances, instanceTable(d.instances, true));
    const ro = d.record.rollout;
    fill(rolloutBox, ro ? [`Rollout of v${ro.release}: `,
      pill(ro.state.replace(/_/g, ' '), ro.state === 'complete' ? 'ok' : ro.state === 'in_progress' ? 'warn' : 'bad'),
      ro.message ? ` ${ro.message}` : ''] : []);
    if (lastRelease !== null && lastRelease !== d.record.release) drawReleases().catch(() => {});
    lastRelease = d.record.release;
  });
}

// A release as stable, diffable text: its spec and config vars.
function releaseText(r) {
  return JSON.stringify({ spec: r.spec, config: r.config || {} }, null, 2).split('\n');
}
// Line diff (LCS), unchanged runs longer than 6 lines collapsed.
function diffView(a, b) {
  const n = a.length, m = b.length;
  const dp = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  const ops = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { ops.push([' ', a[i]]); i++; j++; }
    else if (j < m && (i === n || dp[i][j + 1] >= dp[i + 1][j])) { ops.push(['+', b[j]]); j++; }
    else { ops.push(['-', a[i]]); i++; }
  }
  const out = [];
  let run = [];
  const flush = () => {
    if (run.length > 6) out.push(...run.slice(0, 2), [' ', `  … ${run.length - 4} unchanged lines …`], ...run.slice(-2));
    else out.push(...run);
    run = [];
  };
  for (const op of ops) { if (op[0] === ' ') run.push(op); else { flush(); out.push(op); } }
  flush();
  if (!ops.some((o) => o[0] !== ' ')) return h('p', {}, 'No differences.');
  return h('pre', {}, out.map(([k, line]) => h('div', { class: k === '+' ? 'add' : k === '-' ? 'del' : '' }, `${k} ${line}`)));
}

async function servicePage(main, ns, stack, svc) {
  const instances = h('div');
  const replicas = h('input', { id: 'replicas', type: 'number', min: 0, max: 1000, value: 1, inputmode: 'numeric', style: 'width:6em' });
  const scaleBtn = h('button', { type: 'button', id: 'scale' }, 'Scale');
  const restartBtn = h('button', { type: 'button', class: 'danger', id: 'restart' }, 'Restart…');
  const charts = h('div', { class: 'charts', id: 'charts' });
  const logBox = h('div', { class: 'logs', id: 'logs', role: 'log', 'aria-live': 'off', tabindex: 0, 'aria-label': 'Live logs' });
  const search = h('input', { id: 'log-search', type: 'search', placeholder: 'filter lines', autocomplete: 'off' });
  const follow = h('input', { id: 'log-follow', type: 'checkbox', checked: true });
  const older = h('button', { id: 'log-older', type: 'button', class: 'secondary' }, 'Load older');
  const logStatus = h('p', { id: 'log-status', class: 'muted', 'aria-live': 'polite' });
  fill(main, 
    crumbs(h('a', { href: '#/' }, 'Overview'), h('a', { href: `#/stack/${enc(ns)}/${enc(stack)}` }, stack)),
    h('h1', {}, `Service ${svc}`),
    h('form', { class: 'controls', onsubmit: (e) => { e.preventDefault(); scale(); } },
      h('label', { for: 'replicas' }, 'Replicas'), replicas, scaleBtn, restartBtn),
    h('h2', {}, 'Instances'), instances,
    h('h2', {}, 'Resources'), charts,
    h('h2', {}, 'Logs'),
    h('div', { class: 'controls' }, h('label', { for: 'log-search' }, 'Search'), search,
      h('label', {}, follow, ' follow'), older),
    logStatus, logBox,
    h('h2', {}, 'Events'), Events.render((e) => e.stack === stack && (!e.service || e.service === svc)));
  let desired = null;
  async function scale() {
    const n = Number(replicas.value);
    if (!Number.isInteger(n) || n < 0) { toast('Replicas must be a whole number ≥ 0.', true); replicas.focus(); return; }
    const down = desired !== null && n < desired;
    if (!await confirmAction(`Scale ${svc} to ${n}?`, down ? `This stops ${desired - n} instance(s) of ${svc}.` : `${svc} goes from ${desired ?? '?'} to ${n} instances.`, 'Scale')) return;
    try {
      const r = await api('POST', `/v1/stacks/${enc(ns)}/${enc(stack)}/scale`, { replicas: { [svc]: n } });
      toast(`Scaled ${svc} to ${r.services[svc].replicas} (release v${r.release}).`);
      Events.push({ at: Date.now(), namespace: ns, stack, service: svc, kind: 'scaled', text: `${svc} scaled to ${n}` });
    } catch (e) { toast(`Scale failed: ${e.message}`, true); }
  }
  scaleBtn.addEventListener('click', (e) => { e.preventDefault(); scale(); });
  restartBtn.addEventListener('click', async () => {
    if (!await confirmAction(`Restart ${svc}?`, `Every instance of ${svc} is replaced, one by one as its update settings say.`, 'Restart')) return;
    try {
      const r = await api('POST', `/v1/stacks/${enc(ns)}/${enc(stack)}/restart`, { services: [svc] });
      toast(`Restarting ${svc} (release v${r.release}).`);
      Events.push({ at: Date.now(), namespace: ns, stack, service: svc, kind: 'restarted', text: `${svc} restart requested` });
    } catch (e) { toast(`Restart failed: ${e.message}`, true); }
  });
  let firstState = true;
  watchStack(ns, stack, (d) => {
    const spec = d.record.services[svc];
    if (!spec) { fill(instances, h('p', { class: 'bad' }, `${svc} is not in ${stack} any more.`)); return; }
    desired = spec.replicas;
    if (firstState || document.activeElement !== replicas) replicas.value = spec.replicas;
    firstState = false;
    fill(instances, instanceTable(d.instances.filter((i) => i.service === svc), false));
  });
  historyCharts(charts, ns, stack, svc);
  followLogs(logBox, search, follow, older, logStatus, ns, stack, svc);
}

// Requests/s, CPU and memory from the server's built-in history, when it has one.
async function historyCharts(box, ns, stack, svc) {
  const draw = async () => {
    let hist;
    try {
      hist = await api('GET', `/v1/stacks/${enc(ns)}/${enc(stack)}/history`);
    } catch (e) {
      fill(box, h('p', { class: 'muted' }, e.status === 404 ? 'This server keeps no metrics history, so there are no charts.' : `History unavailable: ${e.message}`));
      return e.status !== 404;
    }
    const mine = (hist.instances || []).filter((i) => i.service === svc);
    const series = (pick) => {
      const byT = new Map();
      for (const inst of mine) for (const p of inst.points) { const v = pick(p); if (v != null) byT.set(p.t, (byT.get(p.t) || 0) + v); }
      return [...byT.entries()].sort((x, y) => x[0] - y[0]);
    };
    const chart = (title, pts, fmt) => {
      const s = svg('svg', { class: 'chart', viewBox: '0 0 300 80', preserveAspectRatio: 'none', role: 'img', 'aria-label': `${title}: latest ${pts.length ? fmt(pts[pts.length - 1][1]) : 'no data'}` });
      if (pts.length > 1) {
        const t0 = pts[0][0], t1 = pts[pts.length - 1][0], max = Math.max(...pts.map((p) => p[1]), 1e-9);
        s.append(svg('polyline', { points: pts.map(([t, v]) => `${((t - t0) / Math.max(t1 - t0, 1)) * 300},${78 - (v / max) * 74}`).join(' ') }));
      }
      return h('div', { class: 'card' }, h('h3', {}, title, ' ', h('span', { class: 'muted' }, pts.length ? fmt(pts[pts.length - 1][1]) : 'no data yet')), s);
    };
    // Request rates exist only for services the HTTP router serves.
    const routed = (hist.services || []).find((s) => s.service === svc);
    fill(box,
      routed && chart('Requests/s', routed.points.map((p) => [p.t, p.requests_per_second]), (v) => `${v.toFixed(2)} req/s`),
      chart('CPU (% of a core)', series((p) => p.cpu_percent), (v) => `${v.toFixed(1)}%`),
      chart('Memory', series((p) => p.memory_bytes), fmtBytes));
    return true;
  };
  if (!await draw()) return;
  const every = setInterval(() => { draw().then((go) => { if (!go) clearInterval(every); }); }, 10000);
  page.signal.addEventListener('abort', () => clearInterval(every));
}

// Logs: the NDJSON follow stream for what happens now, and the log API's
// cursors for the past: "Load older" asks for the 200 lines before the
// oldest one shown (`before=<ts_us>`), and a search asks the server for
// past matching lines (`grep=`), so it finds lines this page never held.
// Live lines are filtered here as they arrive.
async function followLogs(box, search, follow, older, status, ns, stack, svc) {
  const PAGE = 200;
  const base = `/v1/stacks/${enc(ns)}/${enc(stack)}/logs?service=${enc(svc)}`;
  const idOf = (l) => `${l.ts_us} ${l.key.service}.${l.key.slot} ${l.stream} ${l.line}`;
  const byTime = (a, b) => a.ts_us - b.ts_us;
  let lines = []; // the unfiltered view: live tail plus pages loaded back
  let limit = 500; // lines kept and shown; grows with each older page
  let matches = []; // past lines the server matched for the current search
  let matchedFor = '';
  let pending = false;
  let jumpTop = false;
  const query = () => search.value.trim();
  const view = () => {
    const q = query().toLowerCase();
    if (!q) return lines.slice(-limit);
    const seen = new Set();
    const out = [];
    for (const l of matches.concat(lines.filter((x) => x.line.toLowerCase().includes(q)))) {
      const id = idOf(l);
      if (!seen.has(id)) { seen.add(id); out.push(l); }
    }
    return out.sort(byTime).slice(-limit);
  };
  const render = () => {
    pending = false;
    const q = query().toLowerCase();
    fill(box, ...view().map((l) => {
      const cls = l.stream === 'stderr' ? 'err' : l.stream === 'system' ? 'sys' : '';
      let text = [l.line];
      const at = q ? l.line.toLowerCase().indexOf(q) : -1;
      if (at >= 0) text = [l.line.slice(0, at), h('mark', {}, l.line.slice(at, at + q.length)), l.line.slice(at + q.length)];
      return h('div', { class: cls }, h('span', { class: 'src' }, `${l.key.service}.${l.key.slot} `), text);
    }));
    if (jumpTop) { box.scrollTop = 0; jumpTop = false; } else if (follow.checked) box.scrollTop = box.scrollHeight;
  };
  const schedule = () => { if (!pending) { pending = true; requestAnimationFrame(render); } };
  // With several servers, the one asked names each other server that did
  // not answer (its lines are missing from this answer).
  const missing = (r) => {
    const m = r.headers.get('berth-missing-server');
    return m ? ` Some servers did not answer; their lines are missing: ${m}` : '';
  };
  // One finished (not followed) request for past lines.
  const past = async (params) => {
    const r = await openStream(`${base}&${params}`, 'application/x-ndjson', page.signal);
    const got = [];
    got.note = missing(r);
    await readLines(r, (raw) => { if (raw.trim()) { try { got.push(JSON.parse(raw)); } catch { /* partial line */ } } });
    return got;
  };
  // `grep=` takes a Rust regex; the box searches for text, case-insensitively.
  const grepOf = (q) => enc('(?i)' + q.replace(/[\\^$.*+?()[\]{}|#&~-]/g, '\\$&'));
  const merge = (into, got) => {
    const have = new Set(into.map(idOf));
    const fresh = got.filter((l) => !have.has(idOf(l)));
    return [fresh.length, into.concat(fresh).sort(byTime)];
  };
  older.addEventListener('click', async () => {
    const q = query();
    const shown = view();
    const oldest = shown.length ? shown[0].ts_us : Date.now() * 1000;
    older.disabled = true;
    try {
      const got = await past(`tail=${PAGE}&before=${oldest}` + (q ? `&grep=${grepOf(q)}` : ''));
      let n;
      if (q) [n, matches] = merge(matches, got); else [n, lines] = merge(lines, got);
      limit += n;
      status.textContent = (n ? `${n} older ${q ? 'matching ' : ''}lines loaded.` : `No older ${q ? 'matching ' : ''}lines.`) + got.note;
      if (n) { follow.checked = false; jumpTop = true; }
      schedule();
    } catch (e) {
      if (e.status !== 401) status.textContent = `Could not load older lines: ${e.message}`;
    } finally { older.disabled = false; }
  });
  let searchTimer = null;
  search.addEventListener('input', () => {
    schedule();
    clearTimeout(searchTimer);
    searchTimer = setTimeout(async () => {
      const q = query();
      if (!q) { matches = []; matchedFor = ''; status.textContent = ''; schedule(); return; }
      if (q === matchedFor) return;
      try {
        const got = await past(`tail=${PAGE}&grep=${grepOf(q)}`);
        if (query() !== q) return; // the user typed on
        matches = got; matchedFor = q;
        status.textContent = `${got.length}${got.length === PAGE ? '+' : ''} past matching line${got.length === 1 ? '' : 's'} from the server; new ones appear as they come.` + got.note;
        schedule();
      } catch (e) {
        if (e.status !== 401) status.textContent = `Search failed: ${e.message}`;
      }
    }, 300);
  });
  follow.addEventListener('change', schedule);
  let delay = 500;
  let since = null;
  while (!page.signal.aborted) {
    // On a reconnect, ask from the last line's second and drop what was
    // already shown.
    const q = since ? `since=${Math.floor(since / 1e6)}` : `tail=${PAGE}`;
    const seen = since;
    try {
      const r = await openStream(`${base}&${q}&follow=true`, 'application/x-ndjson', page.signal);
      delay = 500;
      const note = missing(r);
      if (note) status.textContent = note.trim();
      await readLines(r, (raw) => {
        if (!raw.trim()) return;
        try {
          const l = JSON.parse(raw);
          if (seen && l.ts_us <= seen) return;
          lines.push(l);
          since = l.ts_us;
          if (lines.length > limit + PAGE) lines.splice(0, lines.length - limit);
          schedule();
        } catch { /* partial or foreign line */ }
      });
    } catch (e) {
      if (page.signal.aborted || e.status === 401 || e.status === 404) return;
    }
    await new Promise((res) => setTimeout(res, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// Request rates per routed service from the built-in history. Polled every
// 5 s with `since=<newest sample seen>`, so each poll returns only the
// samples taken since (usually none or one per service): the history has
// a new sample every 10 s, so a held-open stream would carry nothing more
// often, and a poll of a few hundred bytes costs the server less than one
// more long-lived connection per tab.
function requestRates(stacks, onRate) {
  const last = new Map(); // ns/stack -> newest t seen
  let stop = false;
  const poll = async () => {
    for (const s of stacks) {
      const id = `${s.namespace}/${s.name}`;
      let hist;
      try {
        hist = await api('GET', `/v1/stacks/${enc(s.namespace)}/${enc(s.name)}/history?since=${last.get(id) || 0}`);
      } catch (e) {
        if (e.message.includes('not enabled')) stop = true; // this server keeps no history
        continue;
      }
      for (const sv of hist.services || []) {
        const p = sv.points[sv.points.length - 1];
        if (!p) continue;
        last.set(id, Math.max(last.get(id) || 0, p.t));
        onRate(`${s.namespace}/${s.name}/${sv.service}`, p);
      }
    }
  };
  poll();
  const every = setInterval(() => { if (stop) clearInterval(every); else poll(); }, 5000);
  page.signal.addEventListener('abort', () => clearInterval(every));
}
function fmtRate(p) {
  if (!p) return h('span', { class: 'muted' }, 'no traffic seen');
  const r = p.requests_per_second;
  return [h('span', { class: 'rate' }, `${r < 10 ? r.toFixed(2) : r.toFixed(1)} req/s`),
    p.errors_per_second > 0 ? h('div', { class: 'bad' }, `${p.errors_per_second.toFixed(2)} 5xx/s`) : '',
    h('div', { class: 'muted' }, `at ${fmtClock(p.t)}`)];
}

async function networkPage(main) {
  const body = h('div');
  fill(main, h('h1', {}, 'Network'),
    h('p', { class: 'muted' }, 'Router rules → services → instances. Only healthy instances receive traffic and appear in DNS. Request rates are what the HTTP routers of every node served per service (all its rules; joined nodes as of their last stats report), from the built-in history (one sample every 10 s by default).'), body);
  const rates = new Map(); // ns/stack/service -> latest history point
  const draw = async () => {
    const net = await api('GET', '/v1/network');
    fill(body, h('div', { class: 'table-wrap' }, h('table', { id: 'network' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'router rules'), h('th', { scope: 'col' }, 'requests'), h('th', { scope: 'col' }, 'service'), h('th', { scope: 'col' }, 'instances'), h('th', { scope: 'col' }, 'DNS'))),
      h('tbody', {}, net.map((s) => {
        const id = `${s.namespace}/${s.stack}/${s.service}`;
        return h('tr', { 'data-service': `${s.stack}/${s.service}` },
          h('td', { class: 'mono' }, s.routes.map((r) => h('div', {}, `${r.host}${r.path === '/' ? '' : r.path}`)),
            s.published.map((p) => h('div', { class: 'muted' }, `host port ${p}`))),
          h('td', { 'data-rate': id }, fmtRate(rates.get(id))),
          h('td', {}, h('a', { href: `#/service/${enc(s.namespace)}/${enc(s.stack)}/${enc(s.service)}` }, `${s.service}`), h('div', { class: 'muted' }, `${s.namespace}/${s.stack}`)),
          h('td', { class: 'mono' }, s.instances.length ? s.instances.map((i) => h('div', {}, pill(i.healthy ? 'up' : 'out', i.healthy ? 'ok' : 'bad'), ` ${i.instance} → ${i.address}${i.port ? ':' + i.port : ''}`)) : h('span', { class: 'muted' }, 'none')),
          h('td', { class: 'mono' }, s.dns.map((n) => h('div', {}, n))));
      })))));
  };
  await draw();
  // Re-read the table whenever any stack's state changes.
  let timer = null;
  const stacks = await api('GET', '/v1/stacks');
  for (const s of stacks) {
    watchStack(s.namespace, s.name, () => {
      clearTimeout(timer);
      timer = setTimeout(() => draw().catch((e) => toast(e.message, true)), 200);
    });
  }
  requestRates(stacks, (id, p) => {
    rates.set(id, p);
    const cell = [...body.querySelectorAll('td[data-rate]')].find((td) => td.dataset.rate === id);
    if (cell) fill(cell, fmtRate(p));
  });
}

async function kvPage(main, ns) {
  ns = ns || 'default';
  const nsInput = h('input', { id: 'kv-ns', value: ns, autocomplete: 'off' });
  const list = h('div');
  const keyInput = h('input', { id: 'kv-key', autocomplete: 'off', placeholder: 'path/to/key' });
  const valueInput = h('textarea', { id: 'kv-value', rows: 3, style: 'width:100%' });
  const draw = async () => {
    let entries;
    try { entries = await api('GET', `/v1/kv/?recurse&ns=${enc(ns)}`); } catch (e) {
      if (e.status === 404) entries = []; else throw e;
    }
    entries = entries || [];
    fill(list, entries.length ? h('div', { class: 'table-wrap' }, h('table', { id: 'kv' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'key'), h('th', { scope: 'col' }, 'value'), h('th', { scope: 'col' }, ''))),
      h('tbody', {}, entries.map((e) => {
        let v = '';
        try { v = e.Value ? new TextDecoder().decode(Uint8Array.from(atob(e.Value), (c) => c.charCodeAt(0))) : ''; } catch { v = '(binary)'; }
        return h('tr', {}, h('td', { class: 'mono' }, h('button', { type: 'button', class: 'link', onclick: () => { keyInput.value = e.Key; valueInput.value = v; valueInput.focus(); } }, e.Key)),
          h('td', {}, h('pre', { class: 'kv-value' }, v)),
          h('td', {}, h('button', { type: 'button', class: 'secondary', 'aria-label': `Delete ${e.Key}`, onclick: async () => {
            if (!await confirmAction(`Delete ${e.Key}?`, `The key is removed from namespace ${ns}.`, 'Delete')) return;
            try { await api('DELETE', `/v1/kv/${e.Key.split('/').map(enc).join('/')}?ns=${enc(ns)}`); toast(`Deleted ${e.Key}.`); await draw(); } catch (err) { toast(err.message, true); }
          } }, 'Delete')));
      })))) : h('p', { class: 'muted' }, `No keys in namespace ${ns}.`));
  };
  fill(main, h('h1', {}, 'KV store'),
    h('form', { class: 'controls', onsubmit: (e) => { e.preventDefault(); location.hash = `#/kv/${enc(nsInput.value.trim() || 'default')}`; } },
      h('label', { for: 'kv-ns' }, 'Namespace'), nsInput, h('button', { type: 'submit', class: 'secondary' }, 'Show')),
    list,
    h('h2', {}, 'Put a key'),
    h('form', { onsubmit: async (e) => {
      e.preventDefault();
      const k = keyInput.value.trim().replace(/^\/+/, '');
      if (!k) { toast('A key is needed.', true); keyInput.focus(); return; }
      try { await api('PUT', `/v1/kv/${k.split('/').map(enc).join('/')}?ns=${enc(ns)}`, undefined, valueInput.value); toast(`Saved ${k}.`); await draw(); } catch (err) { toast(err.message, true); }
    } }, h('div', { class: 'controls' }, h('label', { for: 'kv-key' }, 'Key'), keyInput),
      h('label', { for: 'kv-value' }, 'Value'), valueInput, h('div', { class: 'controls' }, h('button', { type: 'submit' }, 'Save'))));
  await draw();
}

async function nodesPage(main) {
  const [nodes, instances] = await Promise.all([api('GET', '/v1/nodes'), api('GET', '/v1/instances')]);
  fill(main, h('h1', {}, 'Nodes'), h('div', { class: 'grid' }, nodes.map((n) => {
    const mine = instances.filter((i) => i.node === n.id);
    return h('article', { class: 'card', 'data-node': n.id },
      h('h3', {}, n.id, ' ', (() => {
        // `state` (up, draining, down) where the server reports it.
        const st = n.state || (n.draining ? 'draining' : 'up');
        return pill(st, st === 'up' ? 'ok' : st === 'draining' ? 'warn' : 'bad');
      })(), n.joined ? h('span', { class: 'muted' }, ' joined agent') : ''),
      h('p', { class: 'mono' }, n.address),
      h('h4', {}, 'Facts'), h('ul', {}, Object.entries(n.facts || {}).map(([k, v]) => h('li', {}, h('span', { class: 'muted' }, `${k}: `), typeof v === 'object' ? JSON.stringify(v) : String(v)))),
      h('h4', {}, 'Labels'), Object.keys(n.labels || {}).length ? h('ul', {}, Object.entries(n.labels).map(([k, v]) => h('li', { class: 'mono' }, `${k}=${v}`))) : h('p', { class: 'muted' }, 'none'),
      h('h4', {}, `Instances (${mine.length})`),
      h('p', { class: 'mono' }, mine.map((i) => `${i.stack}/${i.instance}`).join(' ')),
      h('p', { class: 'muted' }, `seen ${fmtTime(n.updated_at)}`));
  })));
}

// ---------- router ----------
async function route() {
  page.abort();
  page = new AbortController();
  const main = $('#main');
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  const section = parts[0] || 'overview';
  for (const a of document.querySelectorAll('nav a[data-nav]')) {
    const current = a.dataset.nav === section || (a.dataset.nav === 'overview' && ['stack', 'service'].includes(section));
    if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  fill(main, h('p', { class: 'muted' }, 'Loading…'));
  try {
    if (section === 'overview') await overview(main);
    else if (section === 'stack' && parts.length === 3) await stackPage(main, parts[1], parts[2]);
    else if (section === 'service' && parts.length === 4) await servicePage(main, parts[1], parts[2], parts[3]);
    else if (section === 'network') await networkPage(main);
    else if (section === 'kv') await kvPage(main, parts[1]);
    else if (section === 'nodes') await nodesPage(main);
    else fill(main, h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/' }, 'Back to the overview')));
    document.title = `${main.querySelector('h1')?.textContent || 'berth'} · berth`;
  } catch (e) {
    if (e.status === 401) return;
    fill(main, h('h1', {}, 'Something went wrong'), h('p', { class: 'error', role: 'alert' }, e.message));
  }
}

async function boot() {
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); page.abort(); if (Events.controller) Events.controller.abort(); showLogin(''); });
  window.addEventListener('hashchange', () => { route(); $('#main').focus({ preventScroll: true }); });
  try {
    await api('GET', '/v1/stacks');
  } catch (e) {
    if (e.status === 401) return; // the login form is showing
  }
  hideLogin();
  $('#logout').hidden = !sessionStorage.getItem(TOKEN_KEY);
  Events.start();
  route();
}
boot();
