// The page at /: talk to the model (/predict, streamed) and watch it learn (/health and /v1/training).
// Every piece of text from the service goes into the page as text (textContent, append), never as markup.
"use strict";

(() => {
  const HEALTH_EVERY_MS = 3000;
  const TRAINING_EVERY_MS = 5000;
  const CATCH_UP_MS = 200; // a long run's metrics.jsonl arrives over several answers
  const KEY_ITEM = "gpt-service-api-key";
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let served = null; // the newest model the workers serve: {step, val_loss, loaded_at, checkpoint}
  let curves = null; // the last /v1/training answer
  let generation = null; // the AbortController of the running generation

  // The API key, for this tab only.

  async function api(path, options = {}) {
    const key = sessionStorage.getItem(KEY_ITEM);
    const headers = new Headers(options.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      askForKey(
        key
          ? "The service refused this key: check SERVICE_API_KEY and enter it again."
          : "This service needs its API key (SERVICE_API_KEY)."
      );
    }
    return response;
  }

  function askForKey(message) {
    $("key-message").textContent = message;
    if (!$("key-form").hidden) return;
    $("key-form").hidden = false;
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_ITEM, key);
    $("key").value = "";
    $("key-form").hidden = true;
    $("error").textContent = "";
    training.now();
  });

  // Errors, as the service words them.

  async function describe(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
    } catch {
      // Not JSON (a proxy's page): the status line says enough.
    }
    const retry = response.headers.get("Retry-After");
    return retry ? `${message} (retry in ${retry} s)` : message;
  }

  // Talk to it.

  function number(id) {
    const input = $(id);
    return input.value.trim() === "" ? undefined : input.valueAsNumber;
  }

  function stopStrings() {
    const unescape = (s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
    return $("stop").value.split("\n").filter((line) => line !== "").map(unescape);
  }

  function request() {
    const body = { prompt: $("prompt").value, stream: true };
    for (const field of ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]) {
      const value = number(field);
      if (value !== undefined) body[field] = value;
    }
    const stop = stopStrings();
    if (stop.length) body.stop = stop;
    return body;
  }

  // Server-sent events of a streamed /predict, up to [DONE].
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer
          .slice(0, end)
          .split("\n")
          .filter((line) => line.startsWith("data: "))
          .map((line) => line.slice(6))
          .join("\n");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") return;
        if (data) yield JSON.parse(data);
      }
    }
  }

  function running(on) {
    $("generate").disabled = on;
    $("stop-button").disabled = !on;
    $("output").setAttribute("aria-busy", String(on));
  }

  async function generate(event) {
    event.preventDefault();
    if (generation) return;
    const body = request();
    const started = performance.now();
    generation = new AbortController();
    running(true);
    $("shown-prompt").textContent = body.prompt;
    $("completion").textContent = "";
    $("result").textContent = "";
    $("error").textContent = "";
    try {
      const response = await api("/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: generation.signal,
      });
      if (!response.ok) {
        $("error").textContent = await describe(response);
        return;
      }
      for await (const chunk of events(response)) {
        if (chunk.error) {
          $("error").textContent = `stopped by the service: ${chunk.error.message}`;
          continue;
        }
        $("completion").append(chunk.text);
        $("output").scrollTop = $("output").scrollHeight;
        if (chunk.finish_reason) finished(chunk, (performance.now() - started) / 1000);
      }
    } catch (error) {
      if (error.name === "AbortError") $("result").textContent = "stopped";
      else $("error").textContent = `the request failed: ${error.message}`;
    } finally {
      generation = null;
      running(false);
    }
  }

  function finished(last, seconds) {
    const { usage, model } = last;
    const parts = [
      `finish_reason: ${last.finish_reason}`,
      `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`,
      `${seconds.toFixed(1)} s`,
    ];
    if (model) parts.push(`${model.checkpoint}${model.step === null ? "" : ` at step ${model.step}`}`);
    $("result").textContent = parts.join(" · ");
  }

  $("generate-form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", () => generation && generation.abort());

  // Watch it learn: the served checkpoint (/health) and the loss curves (/v1/training), polled while the
  // tab is visible, not at all while it is hidden.

  class Poller {
    constructor(fetcher, every) {
      this.fetcher = fetcher;
      this.every = every;
      this.timer = null;
      this.busy = false;
      document.addEventListener("visibilitychange", () => {
        if (!document.hidden) this.now();
      });
    }

    // The fetcher answers the delay before the next poll: undefined for the usual one, false for none
    // until something calls now() again.
    async now() {
      clearTimeout(this.timer);
      this.timer = null;
      if (this.busy || document.hidden) return;
      this.busy = true;
      let next = this.every;
      try {
        next = (await this.fetcher()) ?? this.every;
      } catch {
        // The service is restarting or unreachable: the status line says so, the next poll retries.
        $("status").textContent = "The service does not answer; retrying…";
        $("status").className = "";
      } finally {
        this.busy = false;
        if (next !== false && !document.hidden) this.timer = setTimeout(() => this.now(), next);
      }
    }
  }

  async function pollHealth() {
    const response = await fetch("/health", { cache: "no-store" });
    const body = await response.json();
    const workers = (body.workers || []).filter((w) => w.loaded_at);
    workers.sort((a, b) => b.loaded_at - a.loaded_at);
    served = workers[0] || null;
    const status = $("status");
    status.className = body.status === "ready" ? "ready" : "";
    if (body.status !== "ready") status.textContent = body.message || body.status;
    else if (!served) status.textContent = "Ready";
    else status.textContent = `Ready: serving ${served.checkpoint}${served.step === null ? "" : ` at step ${served.step}`}`;
    showServed();
    drawChart();
  }

  function showServed() {
    $("served-step").textContent = served && served.step !== null ? String(served.step) : "–";
    $("served-loss").textContent = served && served.val_loss !== null ? served.val_loss.toFixed(4) : "–";
    $("served-checkpoint").textContent = served ? served.checkpoint || "–" : "–";
    const at = $("served-at");
    if (!served) {
      at.textContent = "–";
      return;
    }
    const when = new Date(served.loaded_at * 1000);
    const ago = Math.max(0, Math.round(Date.now() / 1000 - served.loaded_at));
    at.textContent = `${ago < 90 ? `${ago} s` : `${Math.round(ago / 60)} min`} ago`;
    at.title = when.toLocaleString();
  }

  async function pollTraining() {
    const response = await api("/v1/training");
    if (response.status === 401) return false; // until a key is entered
    if (!response.ok) {
      $("training").textContent = await describe(response);
      return undefined;
    }
    curves = await response.json();
    const latest = curves.latest;
    $("training").textContent = latest
      ? `metrics.jsonl: ${curves.records} records` +
        (curves.skipped ? ` (${curves.skipped} lines skipped: no records)` : "") +
        `; the trainer's latest is step ${latest.step}` +
        (latest.loss === undefined ? "" : `, loss ${latest.loss.toFixed(4)}`) +
        (latest.tokens_per_sec === undefined ? "" : `, ${Math.round(latest.tokens_per_sec).toLocaleString()} tokens/s`)
      : "No training records yet: the trainer writes metrics.jsonl into the checkpoint folder.";
    drawChart();
    return curves.complete ? undefined : CATCH_UP_MS;
  }

  // The chart: an SVG drawn from numbers only.

  function svg(name, attributes, parent) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    parent.append(element);
    return element;
  }

  function ticks(low, high, count) {
    const span = high - low || 1;
    const raw = span / count;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const values = [];
    for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(v);
    return { values, digits: Math.max(0, -Math.floor(Math.log10(step))) };
  }

  function drawChart() {
    const chart = $("chart");
    for (const child of [...chart.children]) if (child.tagName !== "title") child.remove();
    const train = curves ? curves.train : [];
    const val = curves ? curves.val : [];
    const marker = served && served.step !== null ? served : null;
    if (!train.length && !val.length) {
      const text = svg("text", { x: 320, y: 170, "text-anchor": "middle", class: "empty" }, chart);
      text.textContent = curves ? "no training records yet" : "loading the training curve…";
      return;
    }
    const points = [...train, ...val];
    if (marker && marker.val_loss !== null) points.push([marker.step, marker.val_loss]);
    const steps = points.map((p) => p[0]).concat(marker ? [marker.step] : []);
    const losses = points.map((p) => p[1]);
    const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
    let [y0, y1] = [Math.min(...losses), Math.max(...losses)];
    const pad = (y1 - y0) * 0.05 || 0.5;
    [y0, y1] = [y0 - pad, y1 + pad];
    const box = { left: 52, right: 624, top: 14, bottom: 290 };
    const x = (step) => box.left + ((step - x0) / (x1 - x0 || 1)) * (box.right - box.left);
    const y = (loss) => box.bottom - ((loss - y0) / (y1 - y0)) * (box.bottom - box.top);

    svg("line", { x1: box.left, y1: box.bottom, x2: box.right, y2: box.bottom, class: "axis" }, chart);
    svg("line", { x1: box.left, y1: box.top, x2: box.left, y2: box.bottom, class: "axis" }, chart);
    const yTicks = ticks(y0, y1, 5);
    for (const v of yTicks.values) {
      svg("line", { x1: box.left - 4, y1: y(v), x2: box.left, y2: y(v), class: "axis" }, chart);
      const label = svg("text", { x: box.left - 7, y: y(v) + 4, "text-anchor": "end", class: "tick" }, chart);
      label.textContent = v.toFixed(yTicks.digits);
    }
    const xTicks = ticks(x0, x1, 6);
    for (const v of xTicks.values.filter((s) => Number.isInteger(s))) {
      svg("line", { x1: x(v), y1: box.bottom, x2: x(v), y2: box.bottom + 4, class: "axis" }, chart);
      const label = svg("text", { x: x(v), y: box.bottom + 18, "text-anchor": "middle", class: "tick" }, chart);
      label.textContent = v.toLocaleString();
    }
    const axisTitle = { x: (box.left + box.right) / 2, y: box.bottom + 36, "text-anchor": "middle", class: "tick" };
    svg("text", axisTitle, chart).textContent = "step";
    svg("text", { x: box.left + 6, y: box.top + 4, class: "tick" }, chart).textContent = "loss";
    const line = (curve) => curve.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" ");
    svg("polyline", { points: line(train), class: "train" }, chart);
    svg("polyline", { points: line(val), class: "val" }, chart);
    for (const [s, l] of val) svg("circle", { cx: x(s), cy: y(l), r: 2.5, class: "val-point" }, chart);
    if (marker) {
      svg("line", { x1: x(marker.step), y1: box.top, x2: x(marker.step), y2: box.bottom, class: "served-line" }, chart);
      if (marker.val_loss !== null) {
        svg("circle", { cx: x(marker.step), cy: y(marker.val_loss), r: 5, class: "served-point" }, chart);
      }
      const right = x(marker.step) > (box.left + box.right) / 2;
      const label = svg("text", {
        x: x(marker.step) + (right ? -6 : 6),
        y: box.top + 12,
        "text-anchor": right ? "end" : "start",
        class: "served-label",
        id: "served-marker",
        "data-step": marker.step,
      }, chart);
      label.textContent = `served: step ${marker.step}`;
    }
  }

  const health = new Poller(pollHealth, HEALTH_EVERY_MS);
  const training = new Poller(pollTraining, TRAINING_EVERY_MS);
  health.now();
  training.now();
})();
