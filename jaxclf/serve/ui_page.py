"""The /ui page: type a text, see the label and one bar per class probability.

Self-contained (inline CSS and JS, no external assets, no build step). It talks to the
service's own /predict and /model/info with relative URLs, so it works behind a path prefix.
"""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jaxclf</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem;
         color: #1d2330; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  #model { color: #667; font-size: 0.85rem; margin-bottom: 1rem; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 0.5rem; min-height: 6rem; }
  button { font: inherit; padding: 0.4rem 1.2rem; margin-top: 0.5rem; cursor: pointer; }
  #result { margin-top: 1.5rem; }
  #label { font-size: 1.3rem; font-weight: 600; }
  .row { display: grid; grid-template-columns: 8rem 1fr 4rem; gap: 0.5rem; align-items: center;
         margin: 0.3rem 0; }
  .track { background: #e8ebf2; border-radius: 3px; height: 1.1rem; }
  .bar { background: #4a6fd8; border-radius: 3px; height: 100%; }
  .bar.top { background: #2f9e62; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  #error { color: #b3261e; margin-top: 1rem; }
</style>
</head>
<body>
<h1>jaxclf text classifier</h1>
<div id="model">loading model info&hellip;</div>
<form id="form">
  <label for="text">Text</label>
  <textarea id="text" name="text" placeholder="Type a sentence to classify"></textarea>
  <button id="submit" type="submit">Classify</button>
</form>
<div id="error" role="alert"></div>
<div id="result" hidden>
  <div>Label: <span id="label"></span> (<span id="confidence"></span>)</div>
  <div id="bars"></div>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

fetch("model/info").then((r) => r.json()).then((info) => {
  $("model").textContent = info.error ? info.error.message
    : `model version ${info.model_version} \u00b7 labels: ${info.labels.join(", ")}`;
}).catch(() => { $("model").textContent = "model info unavailable"; });

function showBars(probabilities, label) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.label = name;
    const nameEl = document.createElement("span");
    nameEl.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = name === label ? "bar top" : "bar";
    bar.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(bar);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = (100 * p).toFixed(1) + "%";
    row.append(nameEl, track, pct);
    bars.appendChild(row);
  }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  $("submit").disabled = true;
  try {
    const response = await fetch("predict", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: $("text").value}),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    $("label").textContent = body.label;
    $("confidence").textContent = (100 * body.confidence).toFixed(1) + "%";
    showBars(body.probabilities, body.label);
    $("result").hidden = false;
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("result").hidden = true;
  } finally {
    $("submit").disabled = false;
  }
});
</script>
</body>
</html>
"""
