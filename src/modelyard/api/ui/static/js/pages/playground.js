// Playground: chat (streamed), completions, embeddings similarity and classification, with
// the curl and Python (openai SDK) code for the exact request.

import { call, get, post } from "../api.js";
import { $, emptyRow, h, replace } from "../dom.js";
import { boot, clearError, showError } from "../shell.js";
import { curl, python } from "../snippets.js";

const ENDPOINTS = {
  chat: "/v1/chat/completions",
  completion: "/v1/completions",
  embeddings: "/v1/embeddings",
  classification: "/v1/classify",
};

let session = null;
let models = [];
let messages = [];
let running = null;

const task = () => $("task").value;

/** The outcome line under the form (a polite live region). */
function notify(text) {
  $("usage").textContent = text;
}

function number(id) {
  const value = $(id).value;
  return value === "" ? null : Number(value);
}

/** The request body the form describes now (what Send would post). */
function requestBody() {
  const model = $("model").value;
  const kind = task();
  if (kind === "embeddings") return { model, input: [$("text-a").value, $("text-b").value] };
  if (kind === "classification") return { model, input: $("classify-input").value };
  const body = { model };
  if (kind === "chat") {
    body.messages = [...messages, { role: "user", content: $("chat-input").value }];
  } else {
    body.prompt = $("prompt").value;
  }
  if (number("max-tokens") !== null) body.max_tokens = number("max-tokens");
  if (number("temperature") !== null) body.temperature = number("temperature");
  if ($("stream").checked) body.stream = true;
  return body;
}

/** The snippets for `body`: the request just sent, else the one the form would send now. */
function showSnippets(body = requestBody()) {
  $("snippet-curl").textContent = curl(location.origin, ENDPOINTS[task()], body, session.auth);
  $("snippet-python").textContent = python(location.origin, task(), body, session.auth);
}

function showTask() {
  const kind = task();
  for (const el of document.querySelectorAll("[data-tasks]")) {
    el.hidden = !el.dataset.tasks.split(" ").includes(kind);
  }
  $("reset").hidden = kind !== "chat";
  $("run").textContent = kind === "chat" ? "Send" : "Run";
  const fitting = models.filter((m) => !m.task || m.task === kind);
  const select = $("model");
  const previous = select.value;
  replace(select, fitting.length ? fitting.map((m) => h("option", { value: m.id }, m.id))
    : h("option", { value: "" }, "No model serves this task"));
  if (fitting.some((m) => m.id === previous)) select.value = previous;
  select.disabled = !fitting.length;
  $("run").disabled = !fitting.length;
  showSnippets();
}

function bubble(role, text) {
  return h("li", { class: role }, h("span", { class: "role" }, role), text);
}

function showTranscript() {
  replace($("transcript"), messages.map((m) => bubble(m.role, m.content)));
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

/** Stream a generation into `target`, returning the text. */
async function streamInto(endpoint, body, target, piece) {
  const controller = new AbortController();
  running = controller;
  $("stop").hidden = false;
  let text = "";
  try {
    const response = await call("POST", endpoint, { body, raw: true, signal: controller.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      text += piece(choice) || "";
      target.textContent = text;
      if (choice.finish_reason) notify(`Done (${choice.finish_reason}).`);
    }
  } catch (error) {
    if (error.name !== "AbortError") throw error;
    notify("Stopped.");
  } finally {
    running = null;
    $("stop").hidden = true;
  }
  return text;
}

async function runChat(body) {
  messages = body.messages;
  showTranscript();
  const answer = bubble("assistant", "");
  const content = document.createTextNode("");
  answer.append(content);
  $("transcript").append(answer);
  let text;
  if (body.stream) {
    $("transcript").setAttribute("aria-busy", "true");
    try {
      text = await streamInto(ENDPOINTS.chat, body, content, (c) => c.delta && c.delta.content);
    } finally {
      $("transcript").setAttribute("aria-busy", "false");
    }
  } else {
    const reply = await post(ENDPOINTS.chat, body);
    text = reply.choices[0].message.content;
    content.textContent = text;
    notify(`Done: ${reply.usage.completion_tokens} tokens.`);
  }
  messages = [...messages, { role: "assistant", content: text }];
  $("chat-input").value = "";
}

async function runCompletion(body) {
  const out = $("completion-output");
  out.textContent = "";
  if (body.stream) {
    await streamInto(ENDPOINTS.completion, body, out, (c) => c.text);
  } else {
    const reply = await post(ENDPOINTS.completion, body);
    out.textContent = reply.choices[0].text;
    notify(`Done: ${reply.usage.completion_tokens} tokens.`);
  }
}

function cosine(a, b) {
  let dot = 0; let na = 0; let nb = 0;
  for (let i = 0; i < a.length; i += 1) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / (Math.sqrt(na) * Math.sqrt(nb));
}

async function runEmbeddings(body) {
  const reply = await post(ENDPOINTS.embeddings, body);
  const [a, b] = reply.data.map((item) => item.embedding);
  const similarity = cosine(a, b);
  $("similarity").textContent = similarity.toFixed(4);
  notify(`Cosine similarity ${similarity.toFixed(4)} (${a.length} dimensions).`);
}

async function runClassification(body) {
  const reply = await post(ENDPOINTS.classification, body);
  const labels = reply.data[0].labels;
  replace($("labels"), labels.length ? labels.map((l) => h("tr", {},
    h("th", { scope: "row" }, l.label), h("td", { class: "num" }, l.score.toFixed(4))))
    : emptyRow(2, "No labels."));
  notify(labels.length ? `Best label: ${labels[0].label}.` : "No labels.");
}

async function run(event) {
  event.preventDefault();
  if (running) return;
  clearError();
  const body = requestBody();
  if (task() === "chat" && !$("chat-input").value.trim()) {
    notify("Type a message first.");
    return;
  }
  const button = $("run");
  button.disabled = true;
  notify("Working…");
  try {
    await { chat: runChat, completion: runCompletion, embeddings: runEmbeddings,
            classification: runClassification }[task()](body);
  } catch (error) {
    showError(error);
    notify("");
    if (task() === "chat") {
      messages = messages.slice(0, -1);
      showTranscript();
    }
  } finally {
    button.disabled = false;
    showSnippets(body);
  }
}

async function copy(event) {
  const target = $(event.currentTarget.dataset.copy);
  try {
    await navigator.clipboard.writeText(target.textContent);
    notify("Copied to the clipboard.");
  } catch {
    notify("The browser refused the clipboard: select the text and copy it instead.");
  }
}

session = await boot();
if (session) {
  try {
    models = (await get("/v1/models")).data;
  } catch (error) {
    showError(error);
  }
  $("task").addEventListener("change", showTask);
  $("playground").addEventListener("input", () => showSnippets());
  $("playground").addEventListener("change", () => showSnippets());
  $("playground").addEventListener("submit", run);
  $("stop").addEventListener("click", () => running && running.abort());
  $("reset").addEventListener("click", () => {
    messages = [];
    showTranscript();
    showSnippets();
    notify("New conversation.");
  });
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", copy);
  }
  showTask();
}
