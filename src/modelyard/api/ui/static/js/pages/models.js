// Models: every model with its versions, states, traffic split, health and traffic, live.

import { get } from "../api.js";
import { $, badge, bytes, emptyRow, h, ms, percent, rate, replace } from "../dom.js";
import { live, showLive } from "../events.js";
import { boot, clearError, showError } from "../shell.js";

const TRAFFIC_EVERY_MS = 3000;
const REFRESH_EVERY_MS = 30000;

let overview = null;
let traffic = new Map();
let pending = null;

function versionItem(v) {
  const item = h("li", { dataset: { version: `${v.name}/${v.version}` } },
    h("span", { class: "mono" }, v.version), " ", badge(v.state));
  if (v.state === "loading") {
    item.append(" ", h("progress", { max: 100, value: v.progress,
      "aria-label": `Loading ${v.name} version ${v.version}: ${v.phase}` }),
      h("span", { class: "muted" }, ` ${v.phase} ${Math.round(v.progress)}%`));
  }
  if (v.state === "failed" && v.error) item.append(h("div", { class: "muted" }, v.error));
  return item;
}

function shares(model) {
  const parts = Object.entries(model.traffic || {}).map(([version, share]) =>
    `${version}: ${percent(share)}`);
  const text = parts.length ? parts.join(", ") : "none";
  return model.canary ? [text, " ", h("span", { class: "badge state-loading" }, "canary")] : text;
}

function activeVersion(model) {
  return model.versions.find((v) => v.version === model.active_version) || null;
}

function row(model) {
  const active = activeVersion(model);
  const t = traffic.get(model.name) || {};
  const memory = model.versions.reduce((sum, v) => sum + (v.memory_bytes || 0), 0);
  return h("tr", { dataset: { model: model.name } },
    h("th", { scope: "row" }, h("a", { href: `/ui/models/${encodeURIComponent(model.name)}` }, model.name)),
    h("td", {}, h("ul", {}, model.versions.map(versionItem))),
    h("td", {}, shares(model)),
    h("td", {}, active ? active.backend : model.versions[0]?.backend || "—"),
    h("td", {}, (active || model.versions[0])?.task || "—"),
    h("td", { class: "num" }, bytes(memory)),
    h("td", {}, active ? badge(active.breaker.state) : "—"),
    h("td", { class: "num" }, rate(t.requests_per_s)),
    h("td", { class: "num" }, ms(t.p50_ms)),
    h("td", { class: "num" }, ms(t.p99_ms)),
    h("td", { class: "num" }, rate(t.errors_per_s)));
}

function render() {
  if (!overview) return;
  const body = $("models-body");
  replace(body, overview.models.length ? overview.models.map(row)
    : emptyRow(11, "No models are configured, or none within this key's scopes."));
  $("fact-ready").textContent = overview.ready ? "yes" : "not yet";
  const memory = overview.memory;
  $("fact-memory").textContent = memory.budget_bytes
    ? `${bytes(memory.used_bytes)} of ${bytes(memory.budget_bytes)}` : bytes(memory.used_bytes);
  $("fact-loaded").textContent = memory.max_loaded
    ? `${memory.loaded} of ${memory.max_loaded}` : String(memory.loaded);
  $("aliases").hidden = !overview.aliases.length;
  replace($("aliases-body"), overview.aliases.map((a) => h("tr", {},
    h("th", { scope: "row" }, a.name),
    h("td", {}, a.targets.map((target, i) => [i ? " → " : "", target, " ",
      badge(a.target_states[target] || "unknown")])),
    h("td", { class: "num" }, a.failovers), h("td", { class: "num" }, a.exhausted))));
}

async function refresh() {
  try {
    overview = await get("/admin/models");
    clearError();
    render();
  } catch (error) {
    showError(error);
  }
}

async function refreshTraffic() {
  try {
    const answer = await get("/ui/api/traffic");
    traffic = new Map(answer.models.map((m) => [m.model, m]));
    render();
  } catch (error) {
    showError(error);
  }
}

function soon() {
  clearTimeout(pending);
  pending = setTimeout(refresh, 200);
}

function onEvent(event) {
  if (event.kind === "load.progress") {
    const item = document.querySelector(`[data-version="${CSS.escape(`${event.model}/${event.version}`)}"] progress`);
    if (item) {
      item.value = event.percent;
      return;
    }
  }
  soon();
}

const session = await boot();
if (session) {
  await Promise.all([refresh(), refreshTraffic()]);
  live({
    kinds: ["version.state", "load.progress", "model.swap", "model.rollback", "canary", "breaker.state"],
    onEvent,
    onState: (state, detail) => {
      showLive($("live"), state, detail);
      if (state === "live") soon();
    },
  });
  setInterval(refreshTraffic, TRAFFIC_EVERY_MS);
  setInterval(refresh, REFRESH_EVERY_MS);
}
