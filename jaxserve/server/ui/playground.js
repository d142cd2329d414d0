"use strict";
// The jaxserve playground: a chat over the server's own OpenAI API. Every URL is relative to the
// page (a --root-path or reverse-proxy prefix just works), model output only ever goes through
// textContent, and nothing here is inline code, so the page passes the server's strict CSP.

const $ = (id) => document.getElementById(id);
const STORE = "jaxserve.playground.";  // localStorage prefix: the API key, the model, the settings
const ui = {
  model: $("model"), info: $("model-info"), key: $("api-key"), settings: $("settings"), system: $("system"),
  messages: $("messages"), empty: $("empty"), message: $("message"),
  send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
};
const params = [...document.querySelectorAll("[data-param]")];
let history = [];  // the conversation: {role, content, el}; an assistant turn with no content is not sent
let controller = null;  // aborts the answer streaming now (null: idle)

const api = (path) => new URL(path, document.baseURI);

function headers() {
  const key = ui.key.value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollDown(always = false) {  // follows the newest text unless the reader has scrolled up
  const box = ui.messages;
  if (always || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
}

// ---- errors ------------------------------------------------------------------------------------

function describe(status, error, statusText) {
  const kind = error && error.type ? ` ${error.type}` : "";
  const message = (error && error.message) || statusText || "the server sent no details";
  let text = `Error${status ? ` ${status}` : ""}${kind}: ${message}`;
  if (status === 401) text += " Enter your API key at the top of the page.";
  return text;
}

async function responseError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  let text = describe(response.status, body && body.error, response.statusText);
  const retry = response.headers.get("Retry-After");
  if (response.status === 429 && retry) text += ` Retry in ${retry} s.`;
  if (response.status === 401) askForKey();
  return text;
}

function askForKey() {
  ui.key.classList.add("attention");
  ui.key.focus();
}

function errorBox(text, className) {
  const node = element("div", className, text);
  node.dataset.testid = "error";
  node.setAttribute("role", "alert");
  return node;
}

function notice(text) {  // an error outside any answer (the model list)
  ui.empty.hidden = true;
  ui.messages.append(errorBox(text, "error notice"));
  scrollDown();
}

// ---- models ------------------------------------------------------------------------------------

async function loadModels() {
  let response;
  try {
    response = await fetch(api("v1/models"), { headers: headers() });
  } catch (e) {
    return notice(`Cannot reach the server: ${e.message}`);
  }
  if (!response.ok) return notice(await responseError(response));
  const cards = (await response.json()).data || [];
  for (const node of ui.messages.querySelectorAll(".notice")) node.remove();
  const keep = ui.model.value || localStorage.getItem(STORE + "model");
  ui.model.replaceChildren(...cards.map((card) => {
    const label = card.parent ? `${card.id} (adapter of ${card.parent})` : card.id;
    const option = new Option(card.state && card.state !== "ready" ? `${label} · ${card.state}` : label, card.id);
    option.card = card;
    return option;
  }));
  if (cards.some((card) => card.id === keep)) ui.model.value = keep;
  showModel();
}

function showModel() {
  const option = ui.model.selectedOptions[0];
  const card = option ? option.card : null;
  ui.info.textContent = !card ? "no models" : [
    card.version && card.version !== "default" ? `version ${card.version}` : null,
    card.state, card.max_model_len ? `${card.max_model_len}-token context` : null,
  ].filter(Boolean).join(" · ");
}

// ---- settings ----------------------------------------------------------------------------------

function sampling() {
  const out = {};
  for (const input of params) {
    if (input.value.trim() === "") continue;
    const value = Number(input.value);
    out[input.dataset.param] = ["max_tokens", "seed"].includes(input.dataset.param) ? Math.trunc(value) : value;
  }
  return out;
}

function saveSettings() {
  const values = Object.fromEntries(params.map((input) => [input.id, input.value]));
  localStorage.setItem(STORE + "settings", JSON.stringify({ ...values, system: ui.system.value }));
}

function restoreSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORE + "settings") || "{}");
  } catch {
    // a damaged entry: the defaults
  }
  for (const input of [...params, ui.system]) {
    if (typeof saved[input.id] === "string") input.value = saved[input.id];
  }
}

// ---- chat --------------------------------------------------------------------------------------

function busy(on) {
  ui.send.disabled = on;
  ui.stop.disabled = !on;
  ui.regenerate.disabled = on || !history.some((turn) => turn.role === "user");
}

function addUser(text) {
  const node = element("article", "msg user");
  node.dataset.testid = "question";
  node.append(element("div", "text", text));
  ui.empty.hidden = true;
  ui.messages.append(node);
  history.push({ role: "user", content: text, el: node });
}

function answerView(model) {
  const root = element("article", "msg assistant");
  root.dataset.testid = "answer";
  const view = {
    root,
    model: element("div", "meta", model),
    reasoning: element("details", "reasoning"),
    thoughts: element("div", "text"),
    text: element("div", "text"),
    stats: element("div", "stats"),
  };
  view.model.dataset.testid = "answer-model";
  view.reasoning.hidden = true;
  view.reasoning.append(element("summary", "", "Reasoning"), view.thoughts);
  view.thoughts.dataset.testid = "reasoning";
  view.text.dataset.testid = "answer-text";
  view.stats.dataset.testid = "stats";
  root.append(view.model, view.reasoning, view.text, view.stats);
  ui.messages.append(root);
  return view;
}

function fail(view, text) {
  view.root.insertBefore(errorBox(text, "error"), view.stats);
  view.root.classList.add("failed");
}

// Server-sent events of a streamed answer, parsed ({"error": ...} frames included); ends at [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value, { stream: !done });
      const frames = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : frames.pop();
      for (const frame of frames) {
        const data = frame.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
        if (data === "[DONE]") return;
        if (!data) continue;
        try {
          yield JSON.parse(data);
        } catch {
          yield { error: { message: `unreadable event from the server: ${data.slice(0, 200)}` } };
        }
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function stats(run) {
  const parts = [];
  const tokens = run.usage ? run.usage.completion_tokens : run.chunks;
  if (tokens) parts.push(`${run.usage ? "" : "~"}${tokens} tokens`);
  if (run.first !== null) {
    const decode = (run.end - run.first) / 1000;
    if (tokens > 1 && decode > 0) parts.push(`${((tokens - 1) / decode).toFixed(1)} tok/s`);
    parts.push(`TTFT ${Math.round(run.first - run.start)} ms`);
  }
  if (run.finish) parts.push(run.finish);
  return parts.join(" · ");
}

async function answer() {
  const model = ui.model.value;
  const view = answerView(model);
  const turn = { role: "assistant", content: "", el: view.root };
  const messages = history.filter((t) => t.content).map(({ role, content }) => ({ role, content }));
  const system = ui.system.value.trim();
  const body = {
    model, messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true, stream_options: { include_usage: true }, ...sampling(),
  };
  history.push(turn);
  controller = new AbortController();
  busy(true);
  scrollDown(true);
  const run = { start: performance.now(), first: null, end: null, usage: null, chunks: 0, finish: null };
  const failed = (text) => {  // shown, and left out of the conversation sent next
    fail(view, text);
    turn.content = "";
  };
  const arrived = () => {
    if (run.first === null) run.first = performance.now();
    run.chunks += 1;
  };
  try {
    const response = await fetch(api("v1/chat/completions"), {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      failed(await responseError(response));
      return;
    }
    const version = response.headers.get("X-Model-Version");
    for await (const event of events(response)) {
      if (event.error) {
        failed(describe(null, event.error));
        break;
      }
      const named = version && version !== "default" && !String(event.model).includes("@");  // NAME@VERSION names its own
      if (event.model) view.model.textContent = named ? `${event.model} · ${version}` : event.model;
      if (event.usage) run.usage = event.usage;
      const choice = (event.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        arrived();
        view.reasoning.hidden = false;
        view.thoughts.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        arrived();
        view.text.textContent += delta.content;
        turn.content += delta.content;
      }
      if (choice.finish_reason) run.finish = choice.finish_reason;
      scrollDown();
    }
  } catch (e) {
    if (e.name === "AbortError") run.finish = "stopped";
    else failed(`The connection failed: ${e.message}`);
  } finally {
    run.end = performance.now();
    view.stats.textContent = stats(run);
    controller = null;
    busy(false);
    scrollDown();
  }
}

function send() {
  const text = ui.message.value.trim();
  if (!text || controller) return;
  ui.message.value = "";
  addUser(text);
  answer();
}

function regenerate() {
  if (controller) return;
  while (history.length && history[history.length - 1].role === "assistant") history.pop().el.remove();
  if (history.length) answer();
}

function clear() {
  if (controller) controller.abort();
  history = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  busy(false);
}

// ---- wiring ------------------------------------------------------------------------------------

ui.key.value = localStorage.getItem(STORE + "key") || "";
restoreSettings();
if (window.matchMedia("(max-width: 720px)").matches) ui.settings.open = false;
ui.key.addEventListener("input", () => ui.key.classList.remove("attention"));
ui.key.addEventListener("change", () => {
  const key = ui.key.value.trim();
  if (key) localStorage.setItem(STORE + "key", key);
  else localStorage.removeItem(STORE + "key");
  loadModels();
});
ui.model.addEventListener("change", () => {
  localStorage.setItem(STORE + "model", ui.model.value);
  showModel();
});
for (const input of [...params, ui.system]) input.addEventListener("change", saveSettings);
ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.send.addEventListener("click", send);
ui.stop.addEventListener("click", () => controller && controller.abort());
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clear);
busy(false);
loadModels();
