// Small DOM helpers: elements are built with text nodes, never from HTML strings.

/** `h("a", {href: "/x", class: "y"}, "text", child)`; attributes false/null are left out. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Live updates re-render whole tables: the control that had keyboard focus gets it back
// (the same tag, text and label), or a keyboard user would be thrown out of the page.
export function replace(el, ...children) {
  const focused = document.activeElement;
  const kept = focused && focused !== el && el.contains(focused)
    ? [focused.tagName, focused.textContent, focused.getAttribute("aria-label")] : null;
  el.replaceChildren();
  append(el, children);
  if (!kept) return;
  for (const candidate of el.querySelectorAll(kept[0])) {
    if (candidate.textContent === kept[1] && candidate.getAttribute("aria-label") === kept[2]) {
      candidate.focus();
      return;
    }
  }
}

export function $(id) {
  return document.getElementById(id);
}

export function badge(state) {
  const text = state || "unknown";
  return h("span", { class: `badge state-${String(text).replace(/[^a-z_]/g, "")}` }, text.replace("_", " "));
}

export function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(value < 10 ? 1 : 0)} ms`;
}

export function rate(value) {
  if (value === null || value === undefined) return "—";
  return value.toFixed(value < 10 ? 2 : 1);
}

export function when(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString();
}

export function percent(value) {
  return `${Number(value).toFixed(value % 1 ? 1 : 0)}%`;
}

/** A table row saying there is nothing to show. */
export function emptyRow(columns, text) {
  return h("tr", {}, h("td", { colspan: columns, class: "empty" }, text));
}
