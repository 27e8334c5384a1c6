"use strict";

// The page of `lsplit edge`: chat over the OpenAI-compatible API with lsplit's per-token trace
// (`lsplit_trace`), an image tab over lsplit's image stream (progress, previews, the step
// tensor that crossed), and views of what crossed the wire.

const $ = (id) => document.getElementById(id);
const HEAT_ROWS = 48;      // rows kept in each heat map
const HEAT_ROW_PX = 4;     // canvas pixels per row

const state = {
  info: null,
  history: [],             // {role, content} of the conversation so far
  controller: null,        // AbortController of the running chat request
  imageController: null,   // AbortController of the running image
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
  showImageModel(info.images);
}

function showImageModel(images) {
  const notice = $("image-notice");
  notice.hidden = Boolean(images);
  if (!images) {
    notice.textContent = "No diffusion model is loaded on this server: start lsplit edge with --image-model DIR " +
      "(a diffusers Stable Diffusion directory). Then this tab shows progress, intermediate previews and the step " +
      "tensor that crossed the wire.";
    return;
  }
  $("image-chips").replaceChildren(
    chip("image model", images.model),
    chip("UNet split", images.unet_split),
    chip("step codec", images.step_codec),
    chip("trunk", images.trunk),
  );
  const d = images.default_size;
  const sizes = [d, d / 2, (d * 3) / 4].filter((v) => Number.isInteger(v) && v > 0);
  $("image-sizes").replaceChildren(...sizes.map((v) => {
    const o = document.createElement("option");
    o.value = `${v}x${v}`;
    return o;
  }));
  if (!$("image-size").value) $("image-size").value = `${d}x${d}`;
  if (!$("image-steps").value) $("image-steps").value = images.defaults.steps;
  if (!$("image-guidance").value) $("image-guidance").value = images.defaults.guidance;
  $("image-steps").max = images.max_steps;
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

// ---- Images (lsplit's image stream: progress, previews, the step tensor) ----------------------

function showPicture(b64, caption) {
  $("image-current").hidden = false;
  $("image-shown").src = "data:image/png;base64," + b64;
  $("image-caption").textContent = caption;
}

function addPreview(b64, step, total) {
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = `preview after step ${step}`;
  img.title = `step ${step} of ${total}`;
  $("image-previews").append(img);
  showPicture(b64, `preview after step ${step} of ${total}`);
}

function showImageBytes(b) {
  $("image-bytes-setup").textContent = bytes(b.setup);
  $("image-bytes-up").textContent = bytes(b.up);
  $("image-bytes-down").textContent = bytes(b.down);
}

function imageRequest() {
  const number = (id) => {
    const v = $(id).value.trim();
    return v === "" || Number.isNaN(Number(v)) ? undefined : Number(v);
  };
  const body = {
    model: state.info && state.info.images ? state.info.images.model : undefined,
    prompt: $("image-prompt").value.trim(),
    size: $("image-size").value.trim() || "auto",
    steps: number("image-steps"),
    guidance: number("image-guidance"),
    seed: number("image-seed"),
    preview_every: number("image-preview-every"),
  };
  const negative = $("image-negative").value.trim();
  if (negative) body.negative_prompt = negative;
  return body;
}

function imageBusy(on) {
  $("image-go").disabled = on;
  $("image-stop").hidden = !on;
}

async function generateImage() {
  const body = imageRequest();
  $("image-previews").replaceChildren();
  $("tensor-maps").replaceChildren();
  $("image-wire").hidden = true;
  $("image-current").hidden = true;
  delete $("image-shown").dataset.final;
  $("image-totals").hidden = false;
  $("image-step").textContent = "–";
  $("image-step").dataset.step = "0";
  for (const id of ["image-time", "image-bytes-setup", "image-bytes-up", "image-bytes-down", "image-seed-used"]) {
    $(id).textContent = "–";
  }
  $("image-progress").hidden = false;
  $("image-progress-fill").style.width = "0%";
  imageBusy(true);
  setStatus("image-status", "waiting for the image thread…", "running");
  state.imageController = new AbortController();
  try {
    const response = await fetch("/lsplit/images/stream", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.imageController.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    let finished = false;
    for await (const { event, data } of sse(response)) {
      const value = JSON.parse(data);
      if (event === "error") throw new Error(value.error ? value.error.message : data);
      if (event === "start") {
        $("image-seed-used").textContent = String(value.seed);
        setStatus("image-status", `drawing ${value.width}x${value.height} in ${value.steps} steps ` +
          `(UNet split ${value.unet_split}, step codec ${value.step_codec}, trunk ${value.trunk})…`, "running");
      } else if (event === "step") {
        $("image-step").textContent = `${value.step} / ${value.total}`;
        $("image-step").dataset.step = String(value.step);
        $("image-time").textContent = ms(value.elapsed_ms);
        $("image-progress-fill").style.width = `${(100 * value.step) / value.total}%`;
        showImageBytes(value.bytes);
        if (value.preview_png) addPreview(value.preview_png, value.step, value.total);
        if (value.uplink) drawStepTensor(value.uplink, value.bytes, value.step);
      } else if (event === "done") {
        const s = value.lsplit;
        $("image-time").textContent = ms(s.elapsed_ms);
        showImageBytes(s.bytes);
        showPicture(value.b64_json, `${s.width}x${s.height}, ${s.steps} steps, seed ${s.seed}`);
        $("image-shown").dataset.final = "1";
        finished = true;
      }
    }
    if (!finished) throw new Error("the image stream ended early");
    $("image-progress-fill").style.width = "100%";
    setStatus("image-status", "done", "done");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("image-status", "stopped: the server stopped drawing at the next step", "stopped");
    } else {
      $("image-progress").hidden = true;
      setStatus("image-status", e.message, "error");
    }
  } finally {
    imageBusy(false);
    state.imageController = null;
  }
}

// The step tensor that crossed: its channel mean and first channels, each scaled to its own
// 98th percentile magnitude.
function drawStepTensor(view, totals, step) {
  $("image-wire").hidden = false;
  const raw = atob(view.f32_base64);
  const buffer = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) buffer[i] = raw.charCodeAt(i);
  const values = new Float32Array(buffer.buffer);
  const size = view.width * view.height;
  const holder = $("tensor-maps");
  while (holder.children.length < view.maps) {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.className = "heat tensor";
    const caption = document.createElement("figcaption");
    caption.className = "muted small";
    const k = holder.children.length;
    caption.textContent = k === 0 ? "channel mean" : `channel ${k - 1}`;
    figure.append(canvas, caption);
    holder.append(figure);
  }
  for (let k = 0; k < view.maps; k++) {
    const map = values.subarray(k * size, (k + 1) * size);
    const canvas = holder.children[k].querySelector("canvas");
    canvas.width = view.width;
    canvas.height = view.height;
    const g = canvas.getContext("2d");
    const image = g.createImageData(view.width, view.height);
    const magnitudes = Array.from(map, Math.abs).sort((a, b) => a - b);
    const scale = magnitudes[Math.floor(magnitudes.length * 0.98)] || 1;
    map.forEach((v, i) => {
      [image.data[4 * i], image.data[4 * i + 1], image.data[4 * i + 2]] = color(v / scale);
      image.data[4 * i + 3] = 255;
    });
    g.putImageData(image, 0, 0);
    canvas.dataset.step = String(step);
  }
  const perStep = Math.round(totals.up / Math.max(step, 1));
  $("image-wire-label").textContent = `· [${view.shape.join(", ")}], row ${view.row} shown, ` +
    `${bytes(perStep)} up per step`;
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
    if ($("image-prompt").value.trim() && !state.imageController) generateImage();
  });
  $("image-stop").addEventListener("click", () => state.imageController && state.imageController.abort());
  $("s-key").addEventListener("change", () => {
    localStorage.setItem("lsplit-key", $("s-key").value.trim());
    loadInfo();
  });
  window.addEventListener("resize", drawBreakdown);
  resetTrace();
  loadInfo().catch((e) => setStatus("status", e.message, "error"));
}

init();
