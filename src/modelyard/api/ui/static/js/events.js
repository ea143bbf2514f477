// Live server events over the /v1/events WebSocket (docs/events.md), reconnecting on loss.

import { storedKey } from "./api.js";

const POLICY = 1008;

/**
 * `live({kinds, models, onEvent, onState})`: calls `onEvent(event)` per event and
 * `onState("live" | "reconnecting" | "refused")`; after a reconnect `onState("live")` again,
 * so the caller re-reads the current state (events may have been missed meanwhile).
 */
export function live({ kinds, models = null, onEvent, onState }) {
  let socket = null;
  let stopped = false;
  let delay = 1000;

  function connect() {
    const url = new URL("/v1/events", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.addEventListener("open", () => {
      // A browser cannot set headers on a WebSocket: the key goes in the first message.
      const key = storedKey();
      socket.send(JSON.stringify({ type: "subscribe", token: key || null, kinds, models }));
    });
    socket.addEventListener("message", (message) => {
      const data = JSON.parse(message.data);
      if (data.type === "subscribed") {
        delay = 1000;
        onState("live");
      } else if (data.type === "error") {
        onState("error", data.error.message);
      } else if (data.kind) {
        onEvent(data);
      }
    });
    socket.addEventListener("close", (event) => {
      if (stopped) return;
      if (event.code === POLICY) {
        onState("refused", event.reason);
        return;
      }
      onState("reconnecting");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    });
  }

  connect();
  window.addEventListener("pagehide", () => { stopped = true; socket.close(); });
  return { stop() { stopped = true; socket.close(); } };
}

/** Show the connection state in a `.live` element. */
export function showLive(el, state, detail) {
  el.dataset.state = state;
  el.textContent = {
    live: "Live: updates as they happen",
    reconnecting: "Connection lost; reconnecting…",
    refused: `Live updates refused${detail ? `: ${detail}` : ""}`,
    error: `Live updates: ${detail || "error"}`,
  }[state] || state;
}
