// The EZTinker dashboard: runs, a run's curves, checkpoints and live jobs, and a playground.
// Plain browser JavaScript, no build step. It calls the server's public REST and OpenAI-compatible
// routes with the key the user entered; the key stays in this tab's sessionStorage.
"use strict";

const KEY_STORAGE = "eztinker-api-key";
const REFRESH_MS = 2000;
const main = document.getElementById("main");

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  refresh: null,      // the current view's refresher, called every REFRESH_MS
  refreshing: false,
  charts: {},         // the run page's uPlot instances, by metric
};
// For automation (the dashboard's browser test reads the plotted data from here).
window.eztinker = { charts: state.charts };

class AuthRequired extends Error {}

// ------------------------------------------------------------------------------------ API
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    showLogin(state.key ? "That key was refused." : "");
    throw new AuthRequired();
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function getJSON(path) {
  return (await api(path)).json();
}

// The message of an error body in any of the server's shapes: REST's {"detail"}, OpenAI's {"error"}.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) return body.error.message;
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("\n");
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}: ${text.slice(0, 200)}`;
}

// ------------------------------------------------------------------------------ helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function number(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  return Math.abs(value) >= 1000 ? value.toFixed(0) : Number(value.toPrecision(digits)).toString();
}

function statusBadge(status) {
  return el("span", { class: `status ${status}` }, status);
}

function table(headers, rows, emptyText) {
  if (!rows.length) return el("p", { class: "empty" }, emptyText);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)))),
    el("tbody", {}, rows));
}

function errorBox(error) {
  return el("p", { class: "error", role: "alert" }, error.message || String(error));
}

// A download that carries the key: fetch, then hand the browser the bytes under the server's file name.
async function download(path) {
  const response = await api(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: match ? match[1] : "download" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ------------------------------------------------------------------------------ sign-in
function showLogin(message) {
  state.refresh = null;
  main.replaceChildren(document.getElementById("login-view").content.cloneNode(true));
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = document.getElementById("login-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    route();
  });
  document.getElementById("login-key").focus();
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = "";
  document.getElementById("sign-out").hidden = true;
  showLogin("");
});

async function showServer() {
  try {
    const health = await getJSON("/health");
    const models = (health.models || []).join(", ");
    document.getElementById("server-info").textContent = `v${health.version || "?"} · ${models}`;
    document.getElementById("sign-out").hidden = !state.key;
  } catch (_) { /* the view shows the error */ }
}

// ---------------------------------------------------------------------------- run list
async function runsView() {
  const body = el("div", { id: "runs" });
  main.replaceChildren(el("section", { class: "card" }, el("h1", {}, "Runs"), body));
  state.refresh = async () => {
    const runs = await getJSON("/v1/runs");
    runs.sort((a, b) => (b.updated_at || b.created_at).localeCompare(a.updated_at || a.created_at));
    body.replaceChildren(table(
      ["Run", "Base model", { label: "LoRA rank", num: true }, { label: "Step", num: true }, "Status",
        { label: "Last loss", num: true }, "Created", "Updated"],
      runs.map((run) => el("tr", { "data-run": run.id },
        el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "mono" }, run.id)),
        el("td", { class: "mono" }, run.base_model),
        el("td", { class: "num" }, run.lora.rank),
        el("td", { class: "num" }, run.step),
        el("td", {}, statusBadge(run.status)),
        el("td", { class: "num" }, number(run.last_loss)),
        el("td", {}, when(run.created_at)),
        el("td", {}, when(run.updated_at)))),
      "No runs yet. Start one from the SDK, the Tinker SDK, or `eztinker demo`."));
  };
}

// ------------------------------------------------------------------------------ a run
const CURVES = [
  // The step's loss over the sum of its weights: cross_entropy's mean NLL per token, whether the
  // weights are ones or normalised to sum to 1 (not over the token count, which is off by that sum).
  { key: "loss_per_token", title: "Loss per token", color: "#2f6fde" },
  { key: "grad_norm", title: "Gradient norm", color: "#c4320a" },
];

const STEP_TICKS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1000, 10000, 100000].map((p) => m * p)).sort((a, b) => a - b);

function makeChart(container, curve) {
  const width = Math.max(container.clientWidth - 8, 300);
  return new uPlot({
    width, height: 240,
    scales: { x: { time: false } },
    // Steps are whole numbers: ticks at 1, 2, 5, 10, ... never between two steps.
    axes: [{ label: "step", incrs: STEP_TICKS }, { label: curve.title, size: 60 }],
    series: [{ label: "step" }, { label: curve.title, stroke: curve.color, width: 2, points: { show: true, size: 5 },
      spanGaps: true }],
  }, [[], []], container);
}

async function runView(runId) {
  const facts = el("div");
  const charts = el("div", { class: "grid" });
  const dataTable = el("div");
  const checkpoints = el("div");
  const evaluations = el("div");
  const jobs = el("div");
  main.replaceChildren(
    el("section", { class: "card" }, el("h1", { class: "mono" }, runId), facts),
    charts,
    el("section", { class: "card" }, el("details", {}, el("summary", {}, "Per-step data"), dataTable)),
    el("section", { class: "card" }, el("h2", {}, "Checkpoints"), checkpoints),
    el("section", { class: "card" }, el("h2", {}, "Evaluations"), evaluations),
    el("section", { class: "card" }, el("h2", {}, "Jobs"), el("p", { class: "muted" },
      "Queued and running jobs first, then the newest finished ones; refreshed every 2 s."), jobs));

  for (const name of Object.keys(state.charts)) delete state.charts[name];
  for (const curve of CURVES) {
    const box = el("div", { class: "card", "data-chart": curve.key }, el("h2", {}, curve.title));
    charts.append(box);
    state.charts[curve.key] = makeChart(box, curve);
  }

  const base = `/v1/runs/${encodeURIComponent(runId)}`;
  state.refresh = async () => {
    const [run, metrics, jobList, evaluationList] = await Promise.all([
      getJSON(base), getJSON(`${base}/metrics`), getJSON(`${base}/jobs`), getJSON(`${base}/evaluations`)]);
    renderFacts(facts, run);
    const steps = metrics.points.map((p) => p.step);
    for (const curve of CURVES) {
      state.charts[curve.key].setData([steps, metrics.points.map((p) => p[curve.key] ?? null)]);
    }
    dataTable.replaceChildren(table(
      [{ label: "Step", num: true }, { label: "Loss / token", num: true }, { label: "Tokens", num: true },
        { label: "Weight sum", num: true }, { label: "Grad norm", num: true }, { label: "Learning rate", num: true },
        "Recorded"],
      metrics.points.map((p) => el("tr", { "data-step": p.step },
        el("td", { class: "num" }, p.step), el("td", { class: "num" }, number(p.loss_per_token)),
        el("td", { class: "num" }, p.num_tokens ?? "—"), el("td", { class: "num" }, number(p.weight_sum)),
        el("td", { class: "num" }, number(p.grad_norm)),
        el("td", { class: "num" }, number(p.learning_rate, 3)), el("td", {}, when(p.recorded_at)))),
      "No training steps recorded yet."));
    renderCheckpoints(checkpoints, run);
    renderEvaluations(evaluations, evaluationList);
    renderJobs(jobs, jobList);
  };
}

function renderFacts(container, run) {
  const fact = (label, value) => el("div", {}, el("dt", {}, label), el("dd", {}, value));
  container.replaceChildren(el("dl", { class: "facts" },
    fact("Base model", el("span", { class: "mono" }, run.base_model)),
    fact("LoRA rank", run.lora.rank),
    fact("Step", run.step),
    fact("Status", statusBadge(run.status)),
    fact("Last loss", number(run.last_loss)),
    fact("Created", when(run.created_at)),
    fact("Updated", when(run.updated_at)),
    run.restored_from ? fact("Restored from", el("span", { class: "mono" }, run.restored_from)) : null));
}

function renderCheckpoints(container, run) {
  container.replaceChildren(table(
    ["Name", { label: "Step", num: true }, "Saved", "Adapter", "Use", "Export (merged, on the server's machine)"],
    run.checkpoints.map((c) => {
      const ref = `${c.run_id}/${c.name}`;
      const path = `/v1/runs/${encodeURIComponent(c.run_id)}/checkpoints/${encodeURIComponent(c.name)}/adapter`;
      const status = el("span", { class: "error" });
      return el("tr", { "data-checkpoint": c.name },
        el("td", { class: "mono" }, c.name),
        el("td", { class: "num" }, c.step),
        el("td", {}, when(c.created_at)),
        el("td", {}, el("button", { type: "button", class: "link", "data-download": ref,
          onclick: () => download(path).catch((e) => { if (!(e instanceof AuthRequired)) status.textContent = e.message; }) },
          "Download adapter (.tar)"), status),
        el("td", {}, el("a", { href: `#/playground?model=${encodeURIComponent(ref)}` }, "Playground")),
        el("td", {}, el("code", {}, `eztinker export ${ref} OUT --merge`)));
    }),
    "No checkpoints yet: save one with save_state (or the Tinker SDK's save_state / save_weights_for_sampler)."));
}

// What `eztinker eval` (or a recipe's --eval-tasks) recorded: one row per evaluated task, newest first.
function renderEvaluations(container, evaluations) {
  const metrics = (scores) => Object.entries(scores)
    .filter(([name, value]) => value !== null && !name.includes("stderr"))
    .map(([name, value]) => `${name.replace(/,none$/, "")} ${number(value)}`).join(" · ");
  const rows = evaluations.slice().reverse().flatMap((e) => e.tasks.map((task) =>
    el("tr", { "data-evaluation": e.id, "data-task": task },
      el("td", { class: "mono" }, e.checkpoint ?? "live adapter"),
      el("td", { class: "num" }, e.step),
      el("td", {}, task),
      el("td", { class: "mono" }, metrics(e.scores[task] ?? {})),
      el("td", { class: "num" }, e.config.limit ?? "all"),
      el("td", {}, e.harness),
      el("td", {}, when(e.created_at)))));
  container.replaceChildren(table(
    ["Adapter", { label: "Step", num: true }, "Task", "Scores", { label: "Limit", num: true }, "Harness", "Recorded"],
    rows, "No evaluations yet: `eztinker eval <run>/<checkpoint> --tasks ...` records one here."));
}

function renderJobs(container, jobs) {
  const seconds = (a, b) => (a && b ? ((new Date(b) - new Date(a)) / 1000).toFixed(2) + " s" : "—");
  container.replaceChildren(table(
    ["Job", "Kind", "Status", "Created", { label: "Waited", num: true }, { label: "Ran", num: true }, "Error"],
    jobs.map((job) => el("tr", { "data-job": job.id, "data-status": job.status },
      el("td", { class: "mono" }, job.id),
      el("td", {}, job.kind),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, when(job.created_at)),
      el("td", { class: "num" }, seconds(job.created_at, job.started_at)),
      el("td", { class: "num" }, seconds(job.started_at, job.finished_at)),
      el("td", { class: "error" }, job.error || ""))),
    "No jobs on record (finished jobs expire after a while)."));
}

// --------------------------------------------------------------------------- playground
async function playgroundView(params) {
  const select = el("select", { id: "playground-model" });
  const system = el("textarea", { id: "playground-system", rows: 2, placeholder: "optional" });
  const message = el("textarea", { id: "playground-message", rows: 3, required: true });
  const maxTokens = el("input", { id: "playground-max-tokens", type: "number", min: 1, value: 64 });
  const temperature = el("input", { id: "playground-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const output = el("div", { id: "playground-output" });
  const usage = el("p", { class: "muted", id: "playground-usage" });
  const send = el("button", { type: "submit", id: "playground-send" }, "Send");
  const clear = el("button", { type: "button", class: "link" }, "Clear the conversation");
  const history = [];

  const form = el("form", {},
    el("label", {}, "Model (a base model, a run's live adapter, or a checkpoint)", select),
    el("label", {}, "System prompt", system),
    el("label", {}, "Message", message),
    el("div", { class: "row" }, el("label", {}, "Max tokens", maxTokens), el("label", {}, "Temperature", temperature)),
    send, " ", clear);
  main.replaceChildren(el("div", { class: "grid" },
    el("section", { class: "card" }, el("h1", {}, "Playground"), form),
    el("section", { class: "card" }, el("h2", {}, "Conversation"), output, usage)));

  const models = (await getJSON("/v1/models")).data;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id },
    m.parent ? `${m.id}  (on ${m.parent})` : `${m.id}  (base model)`)));
  if (params.get("model")) select.value = params.get("model");

  const show = () => output.replaceChildren(...history.map((m) =>
    el("p", { class: `turn ${m.role}` }, el("strong", {}, m.role === "user" ? "You: " : "Model: "), m.content)));
  clear.addEventListener("click", () => { history.length = 0; show(); usage.textContent = ""; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!message.value.trim()) return;
    history.push({ role: "user", content: message.value });
    const reply = { role: "assistant", content: "" };
    history.push(reply);
    message.value = "";
    show();
    send.disabled = true;
    usage.textContent = "sampling…";
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value }] : []),
      ...history.slice(0, -1)];
    try {
      await streamChat({
        model: select.value, messages, stream: true, stream_options: { include_usage: true },
        max_tokens: Number(maxTokens.value), temperature: Number(temperature.value),
      }, (delta) => { reply.content += delta; show(); }, (u) => {
        usage.textContent = `${u.prompt_tokens} prompt tokens, ${u.completion_tokens} completion tokens`;
      });
      if (usage.textContent === "sampling…") usage.textContent = "";
      output.dataset.done = "true";
    } catch (error) {
      if (error instanceof AuthRequired) return;
      history.pop();
      show();
      usage.textContent = "";
      output.append(errorBox(error));
    } finally {
      send.disabled = false;
    }
  });
}

// POST a streaming chat completion and hand each content delta to onDelta as it arrives
// (server-sent events: "data: {chunk}" lines, then "data: [DONE]").
async function streamChat(request, onDelta, onUsage) {
  const response = await api("/v1/chat/completions", { method: "POST", json: request });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        }
        if (chunk.usage) onUsage(chunk.usage);
      }
    }
  }
}

// ------------------------------------------------------------------------------ routing
async function route() {
  state.refresh = null;
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const runMatch = /^\/runs\/(.+)$/.exec(path);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === (path.startsWith("/playground") ? "playground" : "runs"));
  }
  try {
    if (path.startsWith("/playground")) await playgroundView(params);
    else if (runMatch) await runView(decodeURIComponent(runMatch[1]));
    else await runsView();
    await refreshNow();
    showServer();
  } catch (error) {
    if (!(error instanceof AuthRequired)) main.replaceChildren(el("section", { class: "card" }, errorBox(error)));
  }
}

async function refreshNow() {
  if (!state.refresh || state.refreshing) return;
  state.refreshing = true;
  const refresh = state.refresh;
  try {
    await refresh();
  } finally {
    state.refreshing = false;
  }
}

setInterval(() => refreshNow().catch((error) => {
  if (!(error instanceof AuthRequired)) console.warn("refresh failed:", error);
}), REFRESH_MS);
window.addEventListener("hashchange", route);
window.addEventListener("resize", () => {
  for (const chart of Object.values(state.charts)) {
    const box = chart.root.parentElement;
    chart.setSize({ width: Math.max(box.clientWidth - 8, 300), height: 240 });
  }
});
route();
