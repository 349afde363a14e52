// The web chat: plain JS, no build step. Talks to /api (conversations, turns, SSE events).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { auth: false, conversation: null, model: null, turn: null, busy: false, abort: null };

function headers(extra = {}) {
  const h = { ...extra };
  const key = $("apikey").value.trim();
  if (state.auth && key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  if (res.status === 204) return null;
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}

function status(text) { $("status").textContent = text; }

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = { user: "You", assistant: "Assistant", system: "System", error: "Error" }[role] || role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function newConversation() {
  if (state.abort) state.abort.abort(); // stop following the turn in flight (it goes on server-side)
  state.conversation = null;
  state.turn = null;
  $("log").replaceChildren();
  status("New conversation with " + $("model").value + ".");
}

async function loadModels() {
  try {
    const { models } = await api("GET", "/api/models");
    const select = $("model");
    select.replaceChildren();
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.served ? "" : " (no worker yet)");
      select.append(opt);
    }
    const served = models.find((m) => m.served);
    if (served) select.value = served.id;
    state.model = select.value;
    status("Ready.");
  } catch (e) {
    status("Could not list models: " + e.message + (state.auth ? " (check the API key)" : ""));
  }
}

function samplingFields() {
  const out = {};
  const t = $("temperature").value, n = $("max-tokens").value;
  if (t !== "") out.temperature = Number(t);
  if (n !== "") out.max_tokens = Number(n);
  return out;
}

// Read an SSE response body: yields {event, data, id} for each event.
async function* readEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { event: "message", data: "", id: null };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") data.push(val);
        else if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
      }
      if (data.length) { ev.data = data.join("\n"); yield ev; }
    }
  }
}

async function follow(turn, box) {
  const text = box.querySelector(".text");
  const abort = (state.abort = new AbortController());
  let last = null;
  for (let tries = 0; tries < 30; tries++) {
    const h = headers({ Accept: "text/event-stream" });
    if (last) h["Last-Event-ID"] = last;
    try {
      const res = await fetch(turn.events_url, { headers: h, signal: abort.signal });
      if (!res.ok) {
        const data = await res.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || String(res.status));
      }
      for await (const ev of readEvents(res)) {
        if (ev.id) last = ev.id;
        const d = JSON.parse(ev.data);
        if (ev.event === "queued") {
          status(d.position > 0 ? "Waiting in the queue: position " + d.position : "A worker picked it up…");
        } else if (ev.event === "start") {
          // A turn's first start, or a restart whose new reply differs from what was shown: show its text.
          text.textContent = d.text || "";
          status("Generating…");
        } else if (ev.event === "token") {
          text.textContent += d.text;
          box.scrollIntoView({ block: "end" });
        } else if (ev.event === "done") {
          text.textContent = d.reply;
          box.dataset.state = "done";
          status("Done: " + d.finish_reason + ", " + d.usage.completion_tokens + " tokens in "
                 + d.timings.total_s.toFixed(2) + " s.");
          return;
        } else if (ev.event === "error") {
          box.dataset.state = "error";
          bubble("error", d.error.message);
          status("The turn failed.");
          return;
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
      if (tries >= 29) { bubble("error", e.message); return; }
    }
    await new Promise((r) => setTimeout(r, 1000)); // the stream dropped: resume after the last event
  }
}

async function send(ev) {
  ev.preventDefault();
  const content = $("input").value;
  if (!content.trim() || state.busy) return;
  setBusy(true);
  try {
    if (!state.conversation || state.model !== $("model").value) {
      state.model = $("model").value;
      const system = $("system").value.trim();
      const conv = await api("POST", "/api/conversations", { model: state.model, ...(system ? { system } : {}) });
      state.conversation = conv.id;
      if (system) bubble("system", system);
    }
    const turn = await api("POST", "/api/conversations/" + state.conversation + "/messages",
                           { content, ...samplingFields() });
    state.turn = turn;
    $("input").value = "";
    bubble("user", content);
    const box = bubble("assistant", "");
    box.dataset.state = "streaming";
    status(turn.queue_position > 0 ? "Waiting in the queue: position " + turn.queue_position : "Sent.");
    await follow(turn, box);
  } catch (e) {
    bubble("error", e.message);
    status("");
  } finally {
    state.turn = null;
    state.abort = null;
    setBusy(false);
    $("input").focus();
  }
}

async function stop() {
  if (!state.turn) return;
  try { await api("POST", state.turn.turn_url + "/cancel"); status("Stopping…"); }
  catch (e) { bubble("error", e.message); }
}

async function init() {
  try {
    const info = await (await fetch("/api/info")).json();
    state.auth = info.auth;
  } catch (e) { status("The API is unreachable."); }
  $("keybox").hidden = !state.auth;
  $("apikey").value = localStorage.getItem("chat.apikey") || "";
  $("apikey").addEventListener("change", () => { localStorage.setItem("chat.apikey", $("apikey").value); loadModels(); });
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("new").addEventListener("click", newConversation);
  $("stop").addEventListener("click", stop);
  $("model").addEventListener("change", newConversation);
  if (state.auth && !$("apikey").value) { status("Enter your API key to start."); return; }
  await loadModels();
}

init();
