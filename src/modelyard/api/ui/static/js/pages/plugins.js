// Plugins: loaded, skipped or failed, with what each provides and its error.

import { get } from "../api.js";
import { $, badge, emptyRow, h, replace } from "../dom.js";
import { boot, busy } from "../shell.js";

const KINDS = [
  ["backends", "backends"], ["auth_providers", "auth providers"], ["cache_tiers", "cache tiers"],
  ["source_schemes", "source schemes"], ["api_extensions", "API routes"],
];

function provides(plugin) {
  const parts = KINDS.filter(([field]) => plugin[field] && plugin[field].length)
    .map(([field, label]) => `${label}: ${plugin[field].join(", ")}`);
  return parts.length ? h("ul", {}, parts.map((p) => h("li", {}, p))) : h("span", { class: "muted" }, "nothing");
}

function row(plugin) {
  return h("tr", { dataset: { plugin: plugin.name } },
    h("th", { scope: "row" }, plugin.name, plugin.version ? h("span", { class: "muted" }, ` ${plugin.version}`) : null),
    h("td", {}, badge(plugin.status)),
    h("td", { class: "mono" }, plugin.source),
    h("td", {}, provides(plugin)),
    h("td", {}, plugin.error ? h("span", { class: "state-failed" }, plugin.error) : ""));
}

const session = await boot();
if (session) {
  await busy(null, async () => {
    const answer = await get("/v1/plugins");
    const order = { failed: 0, missing: 1, skipped: 2, loaded: 3 };
    const plugins = answer.plugins.sort((a, b) =>
      (order[a.status] ?? 9) - (order[b.status] ?? 9) || a.name.localeCompare(b.name));
    replace($("plugins-body"), plugins.length ? plugins.map(row) : emptyRow(5, "No plugins."));
  });
}
