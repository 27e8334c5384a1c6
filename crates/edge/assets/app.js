"use strict";

// The page of `lsplit edge`: chat over the OpenAI-compatible API with lsplit's per-token trace
// (`lsplit_trace`), an image tab speaking OpenAI's image API, and views of what crossed the wire.

const $ = (id) => document.getElementById(id);
const HEAT_ROWS = 48;      // rows kept in each heat map
const HEAT_ROW_PX = 4;     // canvas pixels per row

const state = {
  info: null,
  history: [],             // {role, content} of the conversation so far
  controller: null,        // AbortController of the running request
  tokens: [],              // per-token traces of the current reply
  heat: { up: [], down: [] },
};

// ---- HTTP ----------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("s-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// Server-Sent Events of a fetch response: yields {event, data} as they arrive.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// ---- Model, split, settings ----------------------------------------------------------------

function chip(label, value) {
  const c = document.createElement("span");
  c.className = "chip";
  c.append(label + " ");
  const b = document.createElement("b");
  b.textContent = value;
  c.append(b);
  return c;
}

function renderSplit(info) {
  const bar = $("split-bar");
  const legend = $("split-legend");
  bar.replaceChildren();
  legend.replaceChildren();
  const layers = info.layers || 0;
  const k1 = info.split ? info.split.k1 : layers;
  const k2 = info.split ? info.split.k2 : layers;
  for (let i = 0; i < layers; i++) {
    const cell = document.createElement("div");
    cell.className = "layer " + (i < k1 ? "head" : i < k2 ? "trunk" : "tail");
    cell.title = `layer ${i}`;
    bar.append(cell);
  }
  const part = (cls, text) => {
    const s = document.createElement("span");
    s.innerHTML = `<i class="sw ${cls}"></i>`;
    s.append(text);
    legend.append(s);
  };
  if (info.split) {
    part("head", `head: embeddings + layers ${0}–${k1 - 1 < 0 ? "none" : k1 - 1} (this device)`);
    part("trunk", `trunk: layers ${k1}–${k2 - 1} (${info.trunk})`);
    part("tail", `tail: layers ${k2}–${layers - 1}, norm, LM head (this device)`);
  } else {
    part("head", `unsplit: all ${layers} layers on this device`);
  }
}

function fillSettings(defaults) {
  const set = (name, value) => {
    const input = $("s-" + name);
    if (input && value !== null && value !== undefined && input.value === "") input.value = value;
  };
  for (const name of ["temperature", "top_p", "top_k", "max_tokens", "seed", "repeat_penalty"]) set(name, defaults[name]);
}

async function loadInfo() {
  $("s-key").value = localStorage.getItem("lsplit-key") || "";
  const response = await fetch("/lsplit/info", { headers: headers() });
  if (!response.ok) {
    $("chips").replaceChildren(chip("server", await errorMessage(response)));
    if (response.status === 401) $("s-key").focus();
    return;
  }
  const info = await response.json();
  state.info = info;
  $("chips").replaceChildren(
    chip("model", info.model),
    chip("split", info.split ? `${info.split.k1}:${info.split.k2} of ${info.layers}` : "none"),
    chip("codec", info.codec),
    chip("trunk", info.trunk),
  );
  renderSplit(info);
  fillSettings(info.defaults);
  for (const id of ["heat-up", "heat-down"]) $(id).width = info.hidden_size || 576;
  const notice = $("image-notice");
  if (!info.images) {
    notice.hidden = false;
    notice.textContent = "No diffusion model is loaded on this server, so image requests are answered with an " +
      "error. When one is, this tab shows progress, intermediate previews and the step tensor that crossed the wire.";
  }
}

function requestSettings() {
  const number = (name) => {
    const v = $("s-" + name).value.trim();
    return v === "" ? undefined : Number(v);
  };
  const body = {};
  for (const name of ["temperature", "top_p", "top_k", "max_tokens", "seed", "repeat_penalty"]) {
    const v = number(name);
    if (v !== undefined && !Number.isNaN(v)) body[name] = v;
  }
  const stop = $("s-stop").value.split(",").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
  if (stop.length) body.stop = stop;
  return body;
}

// ---- Chat ------------------------------------------------------------------------------------

function addMessage(role, text) {
  $("chat-hint").hidden = true;
  const m = document.createElement("div");
  m.className = "msg " + role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  m.append(content);
  $("messages").append(m);
  $("messages").scrollTop = $("messages").scrollHeight;
  return m;
}

function setStatus(id, text, kind) {
  $(id).textContent = text;
  $(id).dataset.state = kind;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function sendChat(text) {
  const system = $("s-system").value.trim();
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const content = reply.querySelector(".content");
  resetTrace();
  busy(true);
  setStatus("status", "prefilling the prompt…", "running");
  state.controller = new AbortController();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const body = Object.assign({
    model: state.info ? state.info.model : undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    lsplit_trace: true,
  }, requestSettings());
  let answer = "";
  let finish = null;
  let usage = null;
  let summary = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const { data } of sse(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        content.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.lsplit && chunk.lsplit.index !== undefined) addToken(chunk.lsplit);
      if (chunk.lsplit && chunk.lsplit.summary) summary = chunk.lsplit.summary;
    }
    state.history.push({ role: "assistant", content: answer });
    const meta = document.createElement("span");
    meta.className = "meta";
    const speed = summary ? `${summary.decode_tokens_per_second.toFixed(1)} tokens/s · ` : "";
    meta.textContent = `${usage ? usage.completion_tokens : state.tokens.length} tokens · ${speed}` +
      `${summary ? `↑ ${bytes(summary.bytes_up)} ↓ ${bytes(summary.bytes_down)} · ` : ""}finish: ${finish}`;
    reply.append(meta);
    if (summary) showSummary(summary);
    setStatus("status", `done (${finish})`, "done");
  } catch (e) {
    state.history.pop();
    if (e.name === "AbortError") {
      setStatus("status", "stopped: the server freed this reply's session", "stopped");
    } else {
      reply.remove();
      addMessage("error", e.message);
      setStatus("status", e.message, "error");
    }
  } finally {
    reply.classList.remove("streaming");
    busy(false);
    state.controller = null;
  }
}

// ---- Per-token breakdown ---------------------------------------------------------------------

function ms(v) {
  return v >= 100 ? `${v.toFixed(0)} ms` : `${v.toFixed(1)} ms`;
}

function bytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

function resetTrace() {
  state.tokens = [];
  state.heat = { up: [], down: [] };
  for (const id of ["t-head", "t-trunk", "t-tail", "bytes-up", "bytes-down", "speed"]) $(id).textContent = "–";
  $("last-token").textContent = "";
  $("token-count").textContent = "waiting for the first token";
  $("token-count").dataset.tokens = "0";
  drawBreakdown();
  drawHeat("up");
  drawHeat("down");
}

function addToken(trace) {
  state.tokens.push(trace);
  const sum = (key) => state.tokens.reduce((a, t) => a + t[key], 0);
  $("t-head").textContent = ms(sum("head_ms"));
  $("t-trunk").textContent = ms(sum("trunk_ms"));
  $("t-tail").textContent = ms(sum("tail_ms"));
  $("bytes-up").textContent = bytes(sum("bytes_up"));
  $("bytes-down").textContent = bytes(sum("bytes_down"));
  const n = state.tokens.length;
  $("token-count").textContent = `${n} token${n === 1 ? "" : "s"} (the first one includes the prompt pass)`;
  $("token-count").dataset.tokens = String(n);
  const what = trace.index === 0 ? `prompt pass (${trace.positions} positions)` : `token ${trace.index}`;
  $("last-token").textContent = `${what}: head ${ms(trace.head_ms)}, network + trunk ${ms(trace.trunk_ms)}, ` +
    `tail ${ms(trace.tail_ms)}, ↑ ${bytes(trace.bytes_up)} ↓ ${bytes(trace.bytes_down)}`;
  if (trace.up) pushRows("up", trace.up);
  if (trace.down) pushRows("down", trace.down);
  drawBreakdown();
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawBreakdown() {
  const canvas = $("breakdown");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 150;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const tokens = state.tokens;
  if (!tokens.length) return;
  const total = (t) => t.head_ms + t.trunk_ms + t.tail_ms;
  // The prompt pass dwarfs the rest: scale to the one-token steps and clip it.
  const steps = tokens.length > 1 ? tokens.slice(1) : tokens;
  const top = Math.max(...steps.map(total), 1e-3) * 1.15;
  const pad = 18;
  const slot = (width - 8) / Math.max(tokens.length, 24);
  const bar = Math.max(1, slot * 0.75);
  const colors = [cssVar("--head"), cssVar("--trunk"), cssVar("--tail")];
  tokens.forEach((t, i) => {
    let y = height - pad;
    const x = 4 + i * slot;
    [t.head_ms, t.trunk_ms, t.tail_ms].forEach((v, k) => {
      const h = Math.min(v / top, 1) * (height - pad - 6);
      g.fillStyle = colors[k];
      g.fillRect(x, y - h, bar, h);
      y -= h;
    });
    if (total(t) > top) {
      g.fillStyle = cssVar("--text");
      g.fillRect(x, 2, bar, 2);
    }
  });
  g.fillStyle = cssVar("--muted");
  g.font = "11px system-ui, sans-serif";
  g.fillText(`${ms(top / 1.15)} max per token (prompt pass clipped)`, 6, height - 4);
}

// The whole reply's totals, including the step that produced the end-of-sequence token.
function showSummary(summary) {
  $("t-head").textContent = ms(summary.head_ms);
  $("t-trunk").textContent = ms(summary.trunk_ms);
  $("t-tail").textContent = ms(summary.tail_ms);
  $("bytes-up").textContent = bytes(summary.bytes_up);
  $("bytes-down").textContent = bytes(summary.bytes_down);
  $("speed").textContent = `${summary.decode_tokens_per_second.toFixed(1)} tokens/s`;
}

// ---- Heat maps of the rows that crossed ------------------------------------------------------

function decodeRows(view) {
  const raw = atob(view.f32_base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const values = new Float32Array(bytes.buffer);
  const rows = [];
  for (let r = 0; r < view.shown_rows; r++) {
    rows.push({ position: view.shown_start + r, values: values.subarray(r * view.width, (r + 1) * view.width) });
  }
  return rows;
}

function pushRows(which, view) {
  const rows = state.heat[which].concat(decodeRows(view));
  state.heat[which] = rows.slice(-HEAT_ROWS);
  const label = $(`heat-${which}-label`);
  label.textContent = `· ${view.codec}, ${bytes(view.wire_bytes)} for ${view.rows} row${view.rows === 1 ? "" : "s"} ` +
    `of ${view.width} at position ${view.start}`;
  drawHeat(which);
}

// Blue for negative, orange for positive; each row scaled to its 98th percentile magnitude so
// that the few huge activations do not wash out the rest.
function color(v) {
  const t = Math.max(-1, Math.min(1, v));
  const base = [13, 17, 23];
  const target = t < 0 ? [79, 140, 255] : [255, 159, 67];
  const a = Math.abs(t);
  return base.map((b, i) => Math.round(b + (target[i] - b) * a));
}

function drawHeat(which) {
  const canvas = $(`heat-${which}`);
  const rows = state.heat[which];
  canvas.dataset.rows = String(rows.length);
  const width = rows.length ? rows[0].values.length : canvas.width;
  canvas.width = width;
  canvas.height = Math.max(rows.length, 2) * HEAT_ROW_PX;
  const g = canvas.getContext("2d");
  g.fillStyle = cssVar("--bg");
  g.fillRect(0, 0, canvas.width, canvas.height);
  if (!rows.length) return;
  const image = g.createImageData(width, rows.length * HEAT_ROW_PX);
  rows.forEach((row, r) => {
    const magnitudes = Array.from(row.values, Math.abs).sort((a, b) => a - b);
    const scale = magnitudes[Math.floor(magnitudes.length * 0.98)] || 1;
    for (let c = 0; c < width; c++) {
      const [red, green, blue] = color(row.values[c] / scale);
      for (let k = 0; k < HEAT_ROW_PX; k++) {
        const i = ((r * HEAT_ROW_PX + k) * width + c) * 4;
        image.data[i] = red; image.data[i + 1] = green; image.data[i + 2] = blue; image.data[i + 3] = 255;
      }
    }
  });
  g.putImageData(image, 0, 0);
}

// ---- Images (OpenAI's image API, streamed previews) -------------------------------------------

function showImage(b64, partial) {
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = partial ? "intermediate preview" : "generated image";
  if (partial) img.className = "partial";
  $("image-grid").append(img);
}

async function generateImage(prompt) {
  const partials = Number($("image-partials").value) || 0;
  $("image-grid").replaceChildren();
  $("image-progress").hidden = false;
  $("image-progress-fill").style.width = "0%";
  $("image-go").disabled = true;
  setStatus("image-status", "generating…", "running");
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(),
      body: JSON.stringify({
        model: undefined, prompt, n: 1, size: $("image-size").value, response_format: "b64_json",
        stream: partials > 0, partial_images: partials > 0 ? partials : undefined,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    if ((response.headers.get("content-type") || "").includes("text/event-stream")) {
      for await (const { data } of sse(response)) {
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.lsplit && event.lsplit.step_tensor) drawImageTensor(event.lsplit.step_tensor);
        if (event.type === "image_generation.partial_image") {
          showImage(event.b64_json, true);
          $("image-progress-fill").style.width = `${(100 * (event.partial_image_index + 1)) / (partials + 1)}%`;
        } else if (event.type === "image_generation.completed") {
          showImage(event.b64_json, false);
        }
      }
    } else {
      const body = await response.json();
      for (const item of body.data || []) showImage(item.b64_json, false);
    }
    $("image-progress-fill").style.width = "100%";
    setStatus("image-status", "done", "done");
  } catch (e) {
    $("image-progress").hidden = true;
    setStatus("image-status", e.message, "error");
  } finally {
    $("image-go").disabled = false;
  }
}

function drawImageTensor(view) {
  $("image-wire").hidden = false;
  const rows = decodeRows(view);
  const canvas = $("heat-image");
  canvas.width = view.width;
  canvas.height = rows.length;
  const g = canvas.getContext("2d");
  const image = g.createImageData(view.width, rows.length);
  const magnitudes = rows.flatMap((r) => Array.from(r.values, Math.abs)).sort((a, b) => a - b);
  const scale = magnitudes[Math.floor(magnitudes.length * 0.98)] || 1;
  rows.forEach((row, r) => row.values.forEach((v, c) => {
    const i = (r * view.width + c) * 4;
    [image.data[i], image.data[i + 1], image.data[i + 2]] = color(v / scale);
    image.data[i + 3] = 255;
  }));
  g.putImageData(image, 0, 0);
}

// ---- Wiring ----------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("pane-chat").hidden = name !== "chat";
  $("pane-image").hidden = name !== "image";
}

function init() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    sendChat(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren($("chat-hint"));
    $("chat-hint").hidden = false;
    resetTrace();
    setStatus("status", "", "idle");
  });
  $("image-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("image-prompt").value.trim();
    if (prompt) generateImage(prompt);
  });
  $("s-key").addEventListener("change", () => {
    localStorage.setItem("lsplit-key", $("s-key").value.trim());
    loadInfo();
  });
  window.addEventListener("resize", drawBreakdown);
  resetTrace();
  loadInfo().catch((e) => setStatus("status", e.message, "error"));
}

init();
