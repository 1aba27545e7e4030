"""The generation page: one static HTML document whose script calls `POST /generate`.

Kept as a Python string so it ships in the wheel with the code (no package-data entry).
User text is only ever set through textContent, never parsed as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>at1-jax · generate</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #e3e6eb; --accent: #2f62d8;
          --bg: #f5f6f8; --card: #fff; --err: #b42318; --errbg: #fef3f2; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px;
           background: var(--card); border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; white-space: nowrap; }
  header #model { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
  main { display: grid; grid-template-columns: 340px 1fr; gap: 24px; padding: 24px;
         align-items: start; }
  @media (max-width: 760px) { main { grid-template-columns: 1fr; } }
  form, .run, .empty { background: var(--card); border: 1px solid var(--line);
                       border-radius: 10px; padding: 18px; }
  form { position: sticky; top: 16px; display: flex; flex-direction: column; gap: 12px; }
  label { display: flex; flex-direction: column; gap: 4px; font-size: 13px; font-weight: 600; }
  .hint { color: var(--muted); font-weight: 400; font-size: 12px; }
  textarea, input, select { font: inherit; font-weight: 400; padding: 7px 9px; width: 100%;
                            border: 1px solid #cfd4dc; border-radius: 6px; background: #fff; }
  textarea { resize: vertical; min-height: 110px; }
  textarea:focus, input:focus, select:focus { outline: 2px solid #c7d7fe;
                                              border-color: var(--accent); }
  .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; align-items: end; }
  button { font: inherit; font-weight: 600; padding: 9px 14px; border: 0; border-radius: 6px;
           color: #fff; background: var(--accent); cursor: pointer; }
  button:disabled { background: #98a2b3; cursor: progress; }
  #status { color: var(--muted); font-size: 13px; }
  #status:empty { display: none; }
  #error { color: var(--err); background: var(--errbg); border: 1px solid #fecdca;
           border-radius: 6px; padding: 8px 10px; font-size: 13px; white-space: pre-wrap; }
  #results { display: flex; flex-direction: column; gap: 18px; min-width: 0; }
  .empty { color: var(--muted); text-align: center; padding: 48px 18px; }
  .run h2 { font-size: 14px; margin: 0 0 2px; }
  .run .meta { color: var(--muted); font-size: 12px; margin-bottom: 12px; }
  .prompt { margin: 12px 0 4px; font-weight: 600; overflow-wrap: anywhere; }
  .images { display: flex; flex-wrap: wrap; gap: 12px; }
  figure { margin: 0; }
  figure img { display: block; width: 160px; max-width: 100%; image-rendering: pixelated;
               border-radius: 6px; border: 1px solid var(--line); background: #eef0f3; }
  figcaption { color: var(--muted); font-size: 12px; margin-top: 3px; }
  details { margin-top: 14px; font-size: 12px; color: var(--muted); }
  summary { cursor: pointer; }
  code { display: block; margin-top: 6px; padding: 8px 10px; background: #f2f4f7;
         border-radius: 6px; color: var(--fg); white-space: pre-wrap; overflow-wrap: anywhere;
         font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
</style>
</head>
<body>
<header><h1>at1-jax · generate</h1><span id="model">loading model info…</span></header>
<main>
  <form id="form">
    <label for="prompts">Prompts <span class="hint">one per line; each gets its own row</span>
      <textarea id="prompts" rows="5" placeholder="a red square on the left"></textarea>
    </label>
    <div class="pair">
      <label for="num_images">Images per prompt
        <input id="num_images" type="number" min="1"></label>
      <label for="seed">Seed <input id="seed" type="number" min="0"></label>
    </div>
    <div class="pair">
      <label for="steps">Steps <input id="steps" type="number" min="1"></label>
      <label for="guidance">Guidance <input id="guidance" type="number" min="0" step="0.5"></label>
    </div>
    <label for="sampler">Sampler <select id="sampler"></select></label>
    <button id="generate" type="submit">Generate</button>
    <div id="error" role="alert" hidden></div>
    <div id="status" role="status"></div>
    <div class="hint">Image k of each prompt starts from seed + k. Ctrl+Enter generates.</div>
  </form>
  <section id="results"><div class="empty" id="empty">Images appear here.</div></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const MAX_RUNS = 20;  // older runs are dropped from the page so it does not grow forever
let runs = 0;

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function loadInfo() {
  try {
    const info = await (await fetch("info")).json();
    for (const name of info.samplers) {
      $("sampler").append(el("option", {value: name, textContent: name}));
    }
    for (const [key, value] of Object.entries(info.defaults)) $(key).value = value;
    $("steps").max = info.limits.max_steps;
    $("num_images").max = info.limits.max_images;
    const m = info.model;
    $("model").textContent = `${m.checkpoint} · text: ${m.text_encoder} · ` +
      `decoder: ${m.decode.vae} · ${m.backend} · batch sizes ${info.batch_sizes.join(", ")}`;
  } catch (e) {
    $("model").textContent = `model info unavailable: ${e.message}`;
  }
}

function request() {
  const prompts = $("prompts").value.split("\\n").map((s) => s.trim()).filter((s) => s);
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  return {prompts, num_images: number("num_images"), seed: number("seed"),
          steps: number("steps"), guidance: number("guidance"), sampler: $("sampler").value};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function render(data) {
  const s = data.settings, b = data.batch;
  const shared = b.requests > 1 ? `, batched with ${b.requests - 1} other request(s)` : "";
  const compiled = b.xla_compiles ? `, compiled ${b.xla_compiles} XLA program(s)` : "";
  const run = el("article", {className: "run"}, [
    el("h2", {textContent: `${data.images.length} image(s) · steps ${s.steps} · ` +
      `guidance ${s.guidance} · ${s.sampler} · seed ${s.seed}`}),
    el("div", {className: "meta", textContent: `${data.seconds} s · batch ${b.id} ` +
      `(${b.images} images at batch size ${b.batch_sizes.join(" + ")}${shared}${compiled})`}),
  ]);
  s.prompts.forEach((prompt, i) => {
    const row = el("div", {className: "images"});
    for (const im of data.images.slice(i * s.num_images, (i + 1) * s.num_images)) {
      const src = `data:image/png;base64,${im.png_base64}`;
      const img = el("img", {className: "result-image", src, alt: `${prompt}, seed ${im.seed}`,
                             title: im.sample_command});
      Object.assign(img.dataset, {prompt, seed: im.seed, batchSize: im.batch_size});
      img.addEventListener("load", () => {
        img.style.width = `${Math.max(160, img.naturalWidth)}px`;
      });
      const link = el("a", {href: src, download: `seed${im.seed}.png`}, [img]);
      row.append(el("figure", {}, [link, el("figcaption", {textContent: `seed ${im.seed}`})]));
    }
    run.append(el("div", {className: "prompt", textContent: prompt}), row);
  });
  const command = data.sample_command ||
    data.images.map((im) => im.sample_command).join("\\n");
  run.append(el("details", {}, [
    el("summary", {textContent: "The same images from the command line"}),
    el("code", {textContent: command}),
  ]));
  $("empty")?.remove();
  $("results").prepend(run);
  if (++runs > MAX_RUNS) $("results").lastElementChild.remove();
}

async function generate(event) {
  event.preventDefault();
  const body = request();
  const n = body.prompts.length * (body.num_images || 0);
  showError("");
  $("generate").disabled = true;
  const t0 = performance.now();
  const tick = () => {
    $("status").textContent =
      `Generating ${n} image(s)… ${((performance.now() - t0) / 1000).toFixed(0)} s`;
  };
  tick();
  const timer = setInterval(tick, 1000);
  try {
    const response = await fetch("generate", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      showError(data.error || `the server answered HTTP ${response.status}`);
      $("status").textContent = "";
      return;
    }
    render(data);
    $("status").textContent = `Done: ${data.images.length} image(s) in ${data.seconds} s.`;
  } catch (e) {
    showError(`no answer from the server: ${e.message}`);
    $("status").textContent = "";
  } finally {
    clearInterval(timer);
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("prompts").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
loadInfo();
</script>
</body>
</html>
"""
