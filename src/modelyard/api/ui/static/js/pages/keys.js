// API keys (admins): create (the secret shown once), list, revoke.

import { del, get, post } from "../api.js";
import { $, badge, emptyRow, h, replace, when } from "../dom.js";
import { boot, busy, confirmAction, notify } from "../shell.js";

function row(key) {
  return h("tr", { dataset: { key: key.id } },
    h("th", { scope: "row", class: "mono" }, key.id),
    h("td", {}, key.name),
    h("td", {}, key.roles.join(", ")),
    h("td", {}, key.models ? key.models.join(", ") : h("span", { class: "muted" }, "every model")),
    h("td", {}, badge(key.status)),
    h("td", {}, when(key.created_at)),
    h("td", {}, key.expires_at ? when(key.expires_at) : "never"),
    h("td", {}, key.status === "revoked" ? "" : h("button", { type: "button", class: "danger",
      "aria-label": `Revoke key ${key.name} (${key.id})`, onclick: (e) => revoke(e.currentTarget, key) }, "Revoke")));
}

async function refresh() {
  await busy(null, async () => {
    const answer = await get("/ui/api/keys");
    replace($("keys-body"), answer.keys.length ? answer.keys.map(row) : emptyRow(8, "No keys yet."));
  });
}

async function create(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const data = new FormData(form);
  const body = { name: data.get("name").trim(), roles: data.getAll("roles") };
  const models = data.get("models").split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  if (data.get("expires_in_days")) body.expires_in_days = Number(data.get("expires_in_days"));
  if (!body.roles.length) {
    notify("Pick at least one role.");
    return;
  }
  await busy(form.querySelector("button[type=submit]"), async () => {
    const issued = await post("/ui/api/keys", body);
    $("new-key-name").textContent = issued.record.name;
    $("new-key-value").textContent = issued.key;
    $("new-key").hidden = false;
    $("new-key").focus();
    form.reset();
    notify(`Key ${issued.record.id} created.`);
    await refresh();
  });
}

async function revoke(button, key) {
  const sure = await confirmAction({
    title: `Revoke key ${key.id}?`,
    text: `Requests with “${key.name}” are refused from the next one on. This cannot be undone.`,
    confirm: "Revoke",
  });
  if (!sure) return;
  await busy(button, async () => {
    await del(`/ui/api/keys/${encodeURIComponent(key.id)}`);
    notify(`Key ${key.id} revoked.`);
    await refresh();
  });
}

const session = await boot();
if (session) {
  const on = session.api_keys;
  $("keys-off").hidden = on;
  $("keys-on").hidden = !on;
  if (on) {
    $("create-key").addEventListener("submit", create);
    $("copy-key").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText($("new-key-value").textContent);
        notify("Key copied to the clipboard.");
      } catch {
        notify("The browser refused the clipboard: select the key and copy it instead.");
      }
    });
    $("hide-key").addEventListener("click", () => {
      $("new-key-value").textContent = "";
      $("new-key").hidden = true;
      $("key-name").focus();
    });
    await refresh();
  }
}
