// One model: versions with load progress; load, unload, swap (safety report first),
// rollback, canary start/stop/promote; recent errors; a chart of the last minutes.

import { del, get, post } from "../api.js";
import { trafficChart } from "../chart.js";
import { $, badge, bytes, emptyRow, h, ms, percent, rate, replace, when } from "../dom.js";
import { live, showLive } from "../events.js";
import { boot, busy, can, clearError, confirmAction, notify, showError } from "../shell.js";

const name = document.body.dataset.model;
const base = `/admin/models/${encodeURIComponent(name)}`;
const ACTIVITY_EVERY_MS = 3000;

let session = null;
let model = null;
let activity = null;
let chart = null;
let pending = null;
let swapTarget = null;
let canaryTarget = null;

const SERVING = new Set(["active", "ready", "deprecated"]);

function versionActions(v) {
  const actions = h("div", { class: "actions" });
  const isActive = v.version === model.active_version;
  if (SERVING.has(v.state) && !isActive) {
    actions.append(
      h("button", { type: "button", onclick: () => openSwap(v.version) }, `Swap to ${v.version}`),
      model.canary ? null : h("button", { type: "button", class: "secondary",
        onclick: () => openCanary(v.version) }, "Start canary"));
  }
  if (!isActive) {
    actions.append(h("button", { type: "button", class: "secondary",
      onclick: (e) => remove(e.currentTarget, v.version) }, `Remove ${v.version}`));
  }
  return actions;
}

function versionRow(v) {
  const t = activity?.now?.versions?.[v.version];
  const progress = v.state === "loading"
    ? [h("progress", { max: 100, value: v.progress, "aria-label": `Load progress of version ${v.version}` }),
      ` ${Math.round(v.progress)}% · ${v.phase}`]
    : v.state === "failed" ? h("span", { class: "state-failed" }, v.error || "failed")
      : `${Math.round(v.progress)}%`;
  return h("tr", { dataset: { version: v.version } },
    h("th", { scope: "row", class: "mono" }, v.version,
      v.version === model.active_version ? [" ", h("span", { class: "muted" }, "(active)")] : null,
      model.canary && model.canary.target === v.version ? [" ", h("span", { class: "muted" }, "(canary)")] : null),
    h("td", {}, badge(v.state)),
    h("td", { class: "progress-cell" }, progress),
    h("td", {}, v.backend),
    h("td", {}, v.task || "—"),
    h("td", { class: "mono" }, v.source),
    h("td", { class: "num" }, bytes(v.memory_bytes)),
    h("td", { class: "num" }, v.in_flight),
    h("td", {}, badge(v.breaker.state)),
    h("td", { class: "num" }, rate(t)),
    can(session, "operate") ? h("td", {}, versionActions(v)) : null);
}

function render() {
  if (!model) return;
  $("fact-active").textContent = model.active_version || "none";
  $("fact-traffic").textContent = Object.entries(model.traffic || {})
    .map(([v, share]) => `${v}: ${percent(share)}`).join(", ") || "none";
  replace($("versions-body"), model.versions.length ? model.versions.map(versionRow)
    : emptyRow(11, "No versions."));
  const canary = Boolean(model.canary);
  $("canary-promote").hidden = !canary;
  $("canary-stop").hidden = !canary;
  $("load-model").disabled = !model.versions.some((v) => !SERVING.has(v.state) && v.state !== "loading");
  $("unload-model").disabled = !model.versions.some((v) => SERVING.has(v.state));
}

function renderActivity() {
  if (!activity) return;
  const now = activity.now;
  $("fact-rps").textContent = rate(now.requests_per_s);
  $("fact-latency").textContent = `${ms(now.p50_ms)} / ${ms(now.p99_ms)}`;
  $("fact-errors").textContent = rate(now.errors_per_s);
  if (chart) chart.update(activity.series);
  const incidents = activity.incidents;
  replace($("incidents"), incidents.length ? incidents.map((i) => h("li", {},
    h("strong", {}, i.kind), ` · version ${i.version} · ${when(i.at)}: `, i.detail))
    : h("li", { class: "empty" }, "None since the server started."));
  const failed = Object.entries(now.statuses).filter(([status]) => Number(status) >= 400);
  $("statuses").textContent = failed.length
    ? `Error answers in the last ${activity.window_s} s: ${failed.map(([s, n]) => `${n} × ${s}`).join(", ")}`
    : `No error answers in the last ${activity.window_s} s.`;
}

async function refresh() {
  try {
    const overview = await get("/admin/models");
    model = overview.models.find((m) => m.name === name) || null;
    if (!model) {
      showError(`There is no model named “${name}”, or it is outside this key's scopes.`);
      return;
    }
    render();
  } catch (error) {
    showError(error);
  }
}

async function refreshActivity() {
  try {
    activity = await get(`/ui/api/models/${encodeURIComponent(name)}/activity`);
    render();
    renderActivity();
  } catch (error) {
    if (error.status !== 404) showError(error);
  }
}

function soon() {
  clearTimeout(pending);
  pending = setTimeout(refresh, 150);
}

// -- actions -------------------------------------------------------------------------------

async function openSwap(version) {
  swapTarget = version;
  clearError();
  let report;
  try {
    report = await get(`${base}/swap/safety?to=${encodeURIComponent(version)}`);
  } catch (error) {
    showError(error);
    return;
  }
  $("swap-to").textContent = version;
  $("swap-summary").textContent = report.safe
    ? `Every check passed: version ${version} can take over from ${report.from || "nothing"}.`
    : `Version ${version} cannot take over now: the failed checks say why.`;
  replace($("swap-checks"), report.checks.map((check) => h("tr", {},
    h("th", { scope: "row" }, check.name.replaceAll("_", " ")),
    h("td", {}, badge(check.ok ? "ok" : "bad"), " ", check.ok ? "passed" : "failed"),
    h("td", {}, check.detail || ""))));
  $("swap-confirm").disabled = !report.safe;
  $("swap-dialog").showModal();
}

async function confirmSwap() {
  const dialog = $("swap-dialog");
  await busy($("swap-confirm"), async () => {
    const answer = await post(`${base}/swap`, { to: swapTarget });
    dialog.close();
    notify(`Swapped ${name} to version ${answer.active_version}` +
      (answer.previous ? ` (was ${answer.previous}).` : "."));
    await refresh();
  });
  if (dialog.open) dialog.close();
}

function openCanary(version) {
  canaryTarget = version;
  $("canary-to").textContent = version;
  $("canary-dialog").showModal();
}

async function startCanary(event) {
  if (event.submitter && event.submitter.value === "cancel") return;
  const percentValue = Number($("canary-percent").value);
  await busy(null, async () => {
    await post(`${base}/canary`, { to: canaryTarget, percent: percentValue });
    notify(`Canary started: ${percentValue}% of ${name}'s traffic goes to version ${canaryTarget}.`);
    await refresh();
  });
}

async function remove(button, version) {
  const sure = await confirmAction({
    title: `Remove version ${version}?`,
    text: `Version ${version} of ${name} is unloaded and forgotten; add it again to serve it.`,
    confirm: `Remove ${version}`,
  });
  if (!sure) return;
  await busy(button, async () => {
    await del(`${base}/versions/${encodeURIComponent(version)}`);
    notify(`Version ${version} removed.`);
    await refresh();
  });
}

async function unloadModel(event) {
  const sure = await confirmAction({
    title: `Unload ${name}?`,
    text: `Every version of ${name} is unloaded: requests for it fail (503) until it is loaded again.`,
    confirm: "Unload model",
  });
  if (!sure) return;
  await busy(event.currentTarget, async () => {
    await post(`/v2/repository/models/${encodeURIComponent(name)}/unload`);
    notify(`${name} unloaded.`);
    await refresh();
  });
}

async function loadModel(event) {
  notify(`Loading ${name}…`);
  await busy(event.currentTarget, async () => {
    await post(`/v2/repository/models/${encodeURIComponent(name)}/load`);
    notify(`${name} loaded.`);
    await refresh();
  });
}

async function rollback(event) {
  await busy(event.currentTarget, async () => {
    const answer = await post(`${base}/rollback`);
    notify(`Rolled back: ${name} serves version ${answer.active_version} again.`);
    await refresh();
  });
}

async function promote(event) {
  await busy(event.currentTarget, async () => {
    const answer = await post(`${base}/canary/promote`);
    notify(`Canary promoted: version ${answer.active_version} is active.`);
    await refresh();
  });
}

async function stopCanary(event) {
  await busy(event.currentTarget, async () => {
    await del(`${base}/canary`);
    notify("Canary stopped: all traffic goes to the active version.");
    await refresh();
  });
}

async function addVersion(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const data = new FormData(form);
  const body = { version: data.get("version").trim(), source: data.get("source").trim() };
  const backend = data.get("backend").trim();
  if (backend) body.backend = backend;
  await busy(form.querySelector("button"), async () => {
    await post(`${base}/versions`, body);
    notify(`Version ${body.version} added; it is loading.`);
    form.reset();
    await refresh();
  });
}

// -- start ---------------------------------------------------------------------------------

session = await boot();
if (session) {
  $("swap-confirm").addEventListener("click", confirmSwap);
  $("canary-form").addEventListener("submit", startCanary);
  $("load-model").addEventListener("click", loadModel);
  $("unload-model").addEventListener("click", unloadModel);
  $("rollback").addEventListener("click", rollback);
  $("canary-promote").addEventListener("click", promote);
  $("canary-stop").addEventListener("click", stopCanary);
  $("add-version").addEventListener("submit", addVersion);
  chart = trafficChart($("chart"));
  await refresh();
  await refreshActivity();
  live({
    kinds: ["version.state", "load.progress", "model.swap", "model.rollback", "canary", "breaker.state"],
    models: [name],
    onEvent: (event) => {
      if (event.kind === "load.progress" && model) {
        const version = model.versions.find((v) => v.version === event.version);
        if (version) {
          version.state = "loading";
          version.progress = event.percent;
          version.phase = event.phase;
          render();
        }
      }
      soon();
      if (["version.state", "breaker.state", "canary"].includes(event.kind)) refreshActivity();
    },
    onState: (state, detail) => {
      showLive($("live"), state, detail);
      if (state === "live") soon();
    },
  });
  setInterval(refreshActivity, ACTIVITY_EVERY_MS);
}
