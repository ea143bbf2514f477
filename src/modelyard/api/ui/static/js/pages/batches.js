// Batch jobs: list with progress, cancel, download output and errors, start one from a file.

import { call, get, post } from "../api.js";
import { $, badge, emptyRow, h, replace, when } from "../dom.js";
import { live, showLive } from "../events.js";
import { boot, busy, notify, showError } from "../shell.js";

const PAGE = 20;
const POLL_MS = 3000; // while a batch runs, in case an event was missed (a dropped socket)
const RUNNING = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
let batches = [];
let hasMore = false;
let pending = null;

function progress(batch) {
  const c = batch.request_counts;
  const done = c.completed + c.failed;
  return [
    h("progress", { max: Math.max(1, c.total), value: done, "aria-label": `Lines done in ${batch.id}` }),
    ` ${done} of ${c.total}`, c.failed ? h("span", { class: "state-failed" }, ` (${c.failed} failed)`) : null,
  ];
}

async function download(button, fileId, name) {
  await busy(button, async () => {
    const response = await call("GET", `/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    notify(`Downloaded ${name}.`);
  });
}

async function cancel(button, batch) {
  await busy(button, async () => {
    await post(`/v1/batches/${encodeURIComponent(batch.id)}/cancel`);
    notify(`Batch ${batch.id} cancelled.`);
    await refresh();
  });
}

function actions(batch) {
  const box = h("div", { class: "actions" });
  if (RUNNING.has(batch.status) && batch.status !== "cancelling") {
    box.append(h("button", { type: "button", class: "danger",
      onclick: (e) => cancel(e.currentTarget, batch) }, "Cancel"));
  }
  if (batch.output_file_id) {
    box.append(h("button", { type: "button", class: "secondary",
      onclick: (e) => download(e.currentTarget, batch.output_file_id, `${batch.id}-output.jsonl`) },
      "Download output"));
  }
  if (batch.error_file_id) {
    box.append(h("button", { type: "button", class: "secondary",
      onclick: (e) => download(e.currentTarget, batch.error_file_id, `${batch.id}-errors.jsonl`) },
      "Download errors"));
  }
  return box;
}

function row(batch) {
  const errors = batch.errors && batch.errors.data.length
    ? h("div", { class: "muted" }, batch.errors.data.map((e) => e.message).join("; ")) : null;
  return h("tr", { dataset: { batch: batch.id } },
    h("th", { scope: "row", class: "mono" }, batch.id),
    h("td", {}, badge(batch.status), errors),
    h("td", { class: "mono" }, batch.endpoint),
    h("td", {}, progress(batch)),
    h("td", {}, when(batch.created_at)),
    h("td", {}, actions(batch)));
}

function render() {
  replace($("batches-body"), batches.length ? batches.map(row) : emptyRow(6, "No batch jobs yet."));
  $("more").hidden = !hasMore;
}

async function refresh() {
  try {
    const page = await get(`/v1/batches?limit=${Math.max(PAGE, batches.length)}`);
    batches = page.data;
    hasMore = page.has_more;
    render();
  } catch (error) {
    showError(error);
  }
}

async function more() {
  await busy($("more"), async () => {
    const last = batches[batches.length - 1];
    const page = await get(`/v1/batches?limit=${PAGE}&after=${encodeURIComponent(last.id)}`);
    batches = [...batches, ...page.data];
    hasMore = page.has_more;
    render();
  });
}

async function start(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const file = $("batch-file").files[0];
  if (!file) return;
  await busy(form.querySelector("button"), async () => {
    const upload = new FormData();
    upload.append("purpose", "batch");
    upload.append("file", file, file.name);
    const created = await call("POST", "/v1/files", { body: upload });
    const batch = await post("/v1/batches", { input_file_id: created.id, endpoint: $("batch-endpoint").value });
    notify(`Batch ${batch.id} started over ${file.name}.`);
    form.reset();
    await refresh();
  });
}

function onEvent(event) {
  const known = batches.find((b) => b.id === event.batch_id);
  if (known && event.kind === "batch.progress") {
    known.status = event.status;
    Object.assign(known.request_counts, { completed: event.completed, failed: event.failed, total: event.total });
    render();
  }
  clearTimeout(pending);
  pending = setTimeout(refresh, event.kind === "batch.completed" ? 0 : 1000);
}

const session = await boot();
if (session) {
  $("new-batch").addEventListener("submit", start);
  $("more").addEventListener("click", more);
  await refresh();
  live({
    kinds: ["batch.progress", "batch.completed"],
    onEvent,
    onState: (state, detail) => {
      showLive($("live"), state, detail);
      if (state === "live") refresh();
    },
  });
  setInterval(() => {
    if (batches.some((b) => RUNNING.has(b.status))) refresh();
  }, POLL_MS);
}
