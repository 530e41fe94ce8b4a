// The fleet page of `device-agent watch --serve`: one page of rows at a time, refreshed when the
// server-sent events say the fleet changed. DOM built with textContent only (device data is
// untrusted input: a device can publish any string as its account or error).
"use strict";

const PAGE = 100;
const STATE_ORDER = ["signing_in", "error", "signed_in", "starting", "offline", "unknown"];
let offset = 0;
let query = "";
let shownVersion = -1;
let wantedVersion = 0;
let loading = false;
let again = false;
let fetchedAt = 0;
let timer = 0;

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.max(0, Math.floor(s));
  if (s >= 86400) return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${s} s`;
}

function clockLeft(s) {
  s = Math.max(0, Math.floor(s));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")} left`;
}

function ago(iso) {
  if (!iso) return "never";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return String(iso);
  return `${duration((Date.now() - t) / 1000)} ago`;
}

function showSummary(data) {
  const box = $("summary");
  box.replaceChildren();
  box.append(el("b", "", data.total), ` device${data.total === 1 ? "" : "s"}`);
  const counts = data.counts || {};
  const names = Object.keys(counts).sort((a, b) => STATE_ORDER.indexOf(a) - STATE_ORDER.indexOf(b));
  for (const name of names) {
    if (!counts[name]) continue;
    box.append(" · ", el("span", `state ${name}`, name.replace("_", " ")), " ", el("b", "", counts[name]));
  }
  box.append(" · needs attention ", el("b", "", data.attention));
}

function codeCell(code) {
  const td = el("td");
  if (!code) return td;
  const wrap = el("div", "codebox");
  if (code.qr) {
    const img = el("img");
    img.src = code.qr;
    img.alt = `QR code for ${code.uri}`;
    wrap.append(img);
  }
  const text = el("div");
  text.append(el("div", "user-code", code.user_code));
  const a = el("a", "", code.verification_uri || code.uri);
  a.href = code.uri;
  a.rel = "noreferrer";
  text.append(a);
  const left = el("div", "left", clockLeft(code.seconds_left));
  left.dataset.left = String(code.seconds_left);
  text.append(left);
  wrap.append(text);
  td.append(wrap);
  return td;
}

function problem(row) {
  const parts = [];
  if (row.error) parts.push(row.error);
  if (row.storage && row.storage !== "ok") parts.push(`storage ${row.storage.replace("_", "-")}`);
  if (row.attention.includes("backlog")) parts.push("readings waiting too long");
  if (row.warning) parts.push(row.warning);
  if (row.clock && row.clock === "unsynced") parts.push("clock not synced");
  return parts.join("; ");
}

function showRows(data) {
  const body = $("rows");
  const frag = document.createDocumentFragment();
  for (const row of data.rows) {
    const tr = el("tr");
    tr.dataset.device = row.device_id;
    if (row.attention.length) tr.classList.add("attention");
    if (row.code) tr.classList.add("has-code");
    tr.append(el("td", "device", row.device_id));
    tr.append(el("td", `state ${row.state}`, row.state.replace("_", " ")));
    tr.append(el("td", "", row.account || "—"));
    tr.append(codeCell(row.code));
    const box = row.outbox || {};
    const outbox = el("td", "", box.pending === null || box.pending === undefined ? "—" : `${box.pending} pending`);
    if (box.dead) outbox.append(el("div", "problem", `${box.dead} dead`));
    if (box.dropped) outbox.append(el("div", "problem", `${box.dropped} dropped`));
    tr.append(outbox);
    tr.append(el("td", "", duration(row.oldest_pending_s)));
    tr.append(el("td", "", ago(row.last_upload)));
    tr.append(el("td", "problem", problem(row)));
    frag.append(tr);
  }
  body.replaceChildren(frag);
  $("empty").hidden = data.total > 0;
  const last = Math.min(data.offset + data.rows.length, data.matched);
  $("range").textContent = data.matched ? `${data.offset + 1}–${last} of ${data.matched}` : "no match";
  $("prev").disabled = data.offset === 0;
  $("next").disabled = last >= data.matched;
}

async function load() {
  if (loading) { again = true; return; }
  loading = true;
  try {
    const version = wantedVersion;
    const params = new URLSearchParams({ q: query, offset: String(offset), limit: String(PAGE) });
    const resp = await fetch(`/api/fleet?${params}`, { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    fetchedAt = performance.now();
    showSummary(data);
    showRows(data);
    shownVersion = Math.max(version, data.version);
  } catch (err) {
    $("link").textContent = `cannot load: ${err.message}`;
    $("link").classList.add("down");
  } finally {
    loading = false;
    if (again || wantedVersion > shownVersion) { again = false; setTimeout(load, 50); }
  }
}

function tick() {
  const spent = (performance.now() - fetchedAt) / 1000;
  for (const node of document.querySelectorAll(".left[data-left]")) {
    const left = Number(node.dataset.left) - spent;
    node.textContent = left > 0 ? clockLeft(left) : "expired";
  }
}

function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("fleet", (ev) => {
    const data = JSON.parse(ev.data);
    $("link").textContent = "live";
    $("link").classList.remove("down");
    showSummary(data);
    if (data.version !== shownVersion) {
      wantedVersion = data.version;
      load();
    }
  });
  source.onerror = () => {
    $("link").textContent = "reconnecting…";
    $("link").classList.add("down");
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", (ev) => {
    clearTimeout(timer);
    timer = setTimeout(() => { query = ev.target.value; offset = 0; load(); }, 150);
  });
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  $("next").addEventListener("click", () => { offset += PAGE; load(); });
  listen();
  load();
  setInterval(tick, 1000);
});
