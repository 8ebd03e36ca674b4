// The triage page: upload scans to /v1/predict, keep a queue sorted by P(tumor), show the evidence map on click.
"use strict";

const queue = [];       // {file, filename, probability, label, version}
const failures = [];    // {filename, error}
let batchSize = 16;
let threshold = null;   // the model's, drawn as a line between suspected and cleared scans

const $ = (selector) => document.querySelector(selector);

function percent(p) { return (100 * p).toFixed(1) + " %"; }

async function describeModel() {
  const answer = await fetch("/v1/model");
  if (!answer.ok) { $("#model").textContent = "The model could not be described."; return; }
  const info = await answer.json();
  const m = info.model, t = info.test_metrics || {};
  threshold = m.threshold;
  batchSize = Math.max(1, Math.min(16, info.limits.max_files));
  const name = m.name ? `${m.name} version ${m.version}${m.alias ? ` (@${m.alias})` : ""}` : "local model";
  const figures = ["recall", "specificity"].filter((k) => t[k] != null)
    .map((k) => `test ${k} ${percent(t[k])}`).join(", ");
  $("#model").textContent = `Model: ${name}; threshold ${m.threshold.toFixed(3)}` + (figures ? `; ${figures}.` : ".");
  $("#limits").textContent = `JPEG, PNG, BMP, GIF, TIFF or WebP; up to ${Math.round(info.limits.max_file_bytes / 1048576)} MB a file.`;
}

function render() {
  const body = $("#queue tbody");
  body.replaceChildren();
  queue.sort((a, b) => b.probability - a.probability);
  queue.forEach((item, index) => {
    if (threshold !== null && !item.label && (index === 0 || queue[index - 1].label)) {
      const line = document.createElement("tr");
      line.className = "threshold";
      line.innerHTML = `<td colspan="4">threshold ${percent(threshold)}: above it, a tumor is suspected</td>`;
      body.appendChild(line);
    }
    const row = document.createElement("tr");
    row.className = item.label ? "suspected" : "cleared";
    row.dataset.filename = item.filename;
    row.dataset.probability = item.probability;
    const bar = `<span class="bar" style="width:${Math.round(60 * item.probability)}px"></span>`;
    row.innerHTML = `<td>${index + 1}</td><td class="name"></td><td>${percent(item.probability)}${bar}</td>` +
      `<td>${item.label ? "Tumor suspected" : "No tumor found"}</td>`;
    row.querySelector(".name").textContent = item.filename;
    row.addEventListener("click", () => select(item, row));
    body.appendChild(row);
  });
  const list = $("#errors ul");
  list.replaceChildren(...failures.map((f) => {
    const li = document.createElement("li");
    li.textContent = `${f.filename}: ${f.error}`;
    return li;
  }));
  $("#errors").hidden = failures.length === 0;
}

async function select(item, row) {
  document.querySelectorAll("#queue tbody tr.selected").forEach((r) => r.classList.remove("selected"));
  row.classList.add("selected");
  $("#detail").hidden = false;
  $("#detail-title").textContent = item.filename;
  $("#detail-reading").textContent = `P(tumor) ${percent(item.probability)}: ` +
    (item.label ? "tumor suspected" : "no tumor found") + ` (model version ${item.version ?? "local"})`;
  const image = $("#overlay");
  image.removeAttribute("src");
  const form = new FormData();
  form.append("file", item.file, item.filename);
  const answer = await fetch("/v1/explain", { method: "POST", body: form });
  if (answer.ok) {
    image.src = URL.createObjectURL(await answer.blob());
  } else {
    $("#detail-reading").textContent += ` — no overlay: ${(await answer.json()).detail}`;
  }
}

async function upload(files) {
  files = Array.from(files);
  for (let start = 0; start < files.length; start += batchSize) {
    const part = files.slice(start, start + batchSize);
    $("#status").textContent = `Reading ${start + part.length} of ${files.length} scans…`;
    const form = new FormData();
    part.forEach((file) => form.append("files", file, file.name));
    const answer = await fetch("/v1/predict", { method: "POST", body: form });
    if (!answer.ok) {
      const detail = (await answer.json().catch(() => ({}))).detail || answer.statusText;
      part.forEach((file) => failures.push({ filename: file.name, error: detail }));
      render();
      continue;
    }
    const data = await answer.json();
    data.results.forEach((result, k) => {
      if ("error" in result) failures.push({ filename: result.filename, error: result.error });
      else queue.push({ file: part[k], filename: result.filename, probability: result.probability,
                        label: result.label, version: data.model.version });
    });
    render();
  }
  const suspected = queue.filter((item) => item.label).length;
  $("#status").textContent = `${queue.length} scans read, ${suspected} with a suspected tumor` +
    (failures.length ? `, ${failures.length} not read (listed below).` : ".");
}

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  upload(event.dataTransfer.files);
});
$("#files").addEventListener("change", (event) => { upload(event.target.files); event.target.value = ""; });
describeModel();
