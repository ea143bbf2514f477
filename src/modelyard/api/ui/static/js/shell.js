// Every page's start: who is calling (asking for a key when the server wants one), what the
// key's role may do, and the page chrome (navigation, messages).

import { describe, forgetKey, get, storedKey, storeKey } from "./api.js";
import { $, h, replace } from "./dom.js";

const PAGE_NAMES = { inspect: "view models and plugins", infer: "run models",
                     operate: "operate models", admin: "administer the server" };

export function can(session, permission) {
  return session.permissions.includes(permission);
}

/** Show an error (an ApiError's problem detail) in the page's alert region. */
export function showError(error) {
  $("alert-text").textContent = typeof error === "string" ? error : describe(error);
  $("alert").hidden = false;
}

export function clearError() {
  $("alert").hidden = true;
}

/** A short status line, read out politely by screen readers. */
export function notify(text) {
  $("notice").textContent = text;
}

function askForKey(reason) {
  $("sign-in").hidden = false;
  $("content").hidden = true;
  if (reason) showError(reason);
  const input = $("api-key");
  input.focus();
  return new Promise((resolve) => {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      storeKey(input.value.trim());
      input.value = "";
      $("sign-in").hidden = true;
      clearError();
      resolve();
    }, { once: true });
  });
}

function applySession(session) {
  for (const item of document.querySelectorAll("nav [data-needs]")) {
    item.hidden = !can(session, item.dataset.needs);
  }
  const who = session.auth ? session.principal : "anonymous (auth is off)";
  replace($("who-name"), `${who} · ${session.roles.join(", ") || "no role"}`);
  $("who").hidden = false;
  $("sign-out").hidden = !session.auth;
}

function deny(session, needs) {
  const allowed = [...document.querySelectorAll("nav li[data-needs]")]
    .filter((li) => can(session, li.dataset.needs))
    .map((li) => li.querySelector("a"));
  const roles = session.roles.join(", ") || "no role";
  replace($("denied-text"),
    `This page needs a role that may ${PAGE_NAMES[needs] || needs}; this key has ${roles}. `,
    allowed.length ? "You may use: " : "",
    ...allowed.flatMap((a, i) => [i ? ", " : "", h("a", { href: a.href }, a.textContent)]));
  $("denied").hidden = false;
}

/**
 * Resolve the session (asking for a key while the server refuses the tab's one), then show
 * the page's content when its permission is granted. Returns the session, or null when the
 * page is not available to this key.
 */
export async function boot() {
  $("alert-close").addEventListener("click", clearError);
  $("sign-out").addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  let session;
  for (;;) {
    try {
      session = await get("/ui/api/session");
      break;
    } catch (error) {
      if (error.status !== 401) {
        showError(error);
        return null;
      }
      const reason = storedKey() ? `That key was refused: ${error.detail}` : "";
      forgetKey();
      await askForKey(reason);
    }
  }
  applySession(session);
  const needs = document.body.dataset.needs;
  if (needs && !can(session, needs)) {
    deny(session, needs);
    return null;
  }
  for (const el of document.querySelectorAll("#content [data-needs]")) {
    el.hidden = !can(session, el.dataset.needs);
  }
  $("content").hidden = false;
  return session;
}

/** Ask before a change that is hard to undo; resolves true when confirmed. */
export function confirmAction({ title, text, confirm }) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = confirm;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

/** Run `action` with `button` disabled meanwhile; errors go to the alert region. */
export async function busy(button, action) {
  if (button) button.disabled = true;
  clearError();
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}
