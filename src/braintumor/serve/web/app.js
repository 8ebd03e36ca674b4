// The triage page: upload scans to /v1/predict, keep a queue (uncertain scans first, then by P(tumor)), list
// what was not read apart, and show the evidence map on click. A DICOM series, a NIfTI volume or a zipped study
// is one row, which opens to its slices.
"use strict";

const queue = [];       // {file, filename, status, probability, label, reason, version[, series, slices]}
const failures = [];    // {filename, error}: unreadable, refused, or not a brain MR slice
let batchSize = 16;
let threshold = null;   // the model's, drawn as a line between suspected and cleared scans
let maxFiles = 64;      // files per request: loose DICOM files of one upload travel together, up to this
let reading = "";       // the selected scan's reading, which the overlay's note follows
let feedback = false;   // whether the server keeps readers' verdicts (POST /v1/feedback)
let selected = null;    // the queue item shown in the detail panel
const VERDICTS = { t: "tumor", n: "no_tumor", x: "not_brain_mr", c: "cant_tell" };
const VERDICT_TEXT = { tumor: "Tumor", no_tumor: "No tumor", not_brain_mr: "Not a brain MR", cant_tell: "Can't tell" };

const $ = (selector) => document.querySelector(selector);

function percent(p) { return (100 * p).toFixed(1) + " %"; }

function headers() {
  const key = sessionStorage.getItem("apiKey");
  return key ? { "X-API-Key": key } : {};
}

async function describeModel() {
  const answer = await fetch("/v1/model", { headers: headers() });
  if (answer.status === 401 || answer.status === 403) {
    $("#key").hidden = false;
    $("#model").textContent = `This server asks for an API key: ${(await answer.json()).detail}`;
    return;
  }
  if (!answer.ok) { $("#model").textContent = "The model could not be described."; return; }
  const info = await answer.json();
  const m = info.model, t = info.test_metrics || {};
  threshold = m.threshold;
  batchSize = Math.max(1, Math.min(16, info.limits.max_files));
  const name = m.name ? `${m.name} version ${m.version}${m.alias ? ` (@${m.alias})` : ""}` : "local model";
  const figures = ["recall", "specificity"].filter((k) => t[k] != null)
    .map((k) => `test ${k} ${percent(t[k])}`).join(", ");
  const calibration = m.calibration ? "calibrated P(tumor)" : "uncalibrated score";
  $("#model").textContent = `Model: ${name}${m.run_id ? `, run ${m.run_id.slice(0, 8)}` : ""}; ` +
    `threshold ${percent(m.threshold)} (${calibration})` + (figures ? `; ${figures}.` : ".") +
    (m.gate ? " Scans that do not look like brain MR slices are not read." : "");
  maxFiles = info.limits.max_files;
  feedback = Boolean(info.feedback);
  $("#verdict-keeps").textContent = !feedback ? "" : info.keeps_scans
    ? "This server keeps the pixels (nothing else) of each scan you read as tumor or no tumor, to retrain on."
    : "This server keeps your readings, not the scans.";
  siteHealth();
  $("#limits").textContent = `JPEG, PNG, BMP, GIF, TIFF or WebP images, DICOM files, NIfTI volumes or a zipped ` +
    `study; up to ${Math.round(info.limits.max_file_bytes / 1048576)} MB a file.`;
}

// This week at the reader's site (their key), for keys with the `health` scope: is the model on its ground?
async function siteHealth() {
  const answer = await fetch("/v1/site-health", { headers: headers() });
  if (!answer.ok) { $("#health").hidden = true; return; }
  const h = await answer.json();
  const rates = h.scans ? `, ${percent(h.refusal_rate)} not read, ${percent(h.uncertain_rate)} uncertain` : "";
  $("#health").textContent = `This week (${h.week}) at site ${h.site}: ${h.scans} scans${rates}.` +
    (h.alerts.length ? ` Alert: ${h.alerts.join("; ")}.` : "");
  $("#health").classList.toggle("alert", h.alerts.length > 0);
  $("#health").hidden = false;
}

const rank = (item) => (item.status === "uncertain" ? 0 : 1);

function render() {
  const body = $("#queue tbody");
  body.replaceChildren();
  queue.sort((a, b) => rank(a) - rank(b) || b.probability - a.probability);
  queue.forEach((item, index) => {
    if (item.status === "uncertain") {
      const row = document.createElement("tr");
      row.className = "uncertain";
      row.dataset.filename = item.filename;
      row.dataset.probability = item.probability;
      if (item.series) row.dataset.series = item.series;
      row.innerHTML = `<td>${index + 1}</td><td class="name"></td><td>${percent(item.probability)}</td>` +
        `<td>Uncertain: read first<div class="reason"></div></td>`;
      row.querySelector(".name").textContent = item.filename;
      row.querySelector(".reason").textContent = item.reason;
      markVerdict(row, item);
      row.addEventListener("click", () => select(item, row));
      body.appendChild(row);
      return;
    }
    const previous = queue[index - 1];
    if (threshold !== null && !item.label && (index === 0 || previous.label || previous.status === "uncertain")) {
      const line = document.createElement("tr");
      line.className = "threshold";
      line.innerHTML = `<td colspan="4">threshold ${percent(threshold)}: above it, a tumor is suspected</td>`;
      body.appendChild(line);
    }
    const row = document.createElement("tr");
    row.className = item.label ? "suspected" : "cleared";
    row.dataset.filename = item.filename;
    row.dataset.probability = item.probability;
    if (item.series) row.dataset.series = item.series;
    const bar = `<span class="bar" style="width:${Math.round(60 * item.probability)}px"></span>`;
    row.innerHTML = `<td>${index + 1}</td><td class="name"></td><td>${percent(item.probability)}${bar}</td>` +
      `<td>${item.label ? "Tumor suspected" : "No tumor found"}</td>`;
    row.querySelector(".name").textContent = item.filename;
    markVerdict(row, item);
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

function markVerdict(row, item) {
  if (item === selected) row.classList.add("selected");
  if (!item.verdict) return;
  row.dataset.verdict = item.verdict;
  row.dataset.verdictText = `your reading: ${VERDICT_TEXT[item.verdict]}`;
}

// A reader's verdict on the selected scan, tied to the answer it is about (its request id and scan digest).
async function giveVerdict(verdict) {
  if (!feedback || !selected) return;
  const item = selected;
  const answer = await fetch("/v1/feedback", {
    method: "POST",
    headers: { ...headers(), "Content-Type": "application/json" },
    body: JSON.stringify({ request_id: item.requestId, scan_sha256: item.scan, verdict }),
  });
  if (answer.ok) {
    item.verdict = verdict;
    $("#verdict-note").textContent = `Recorded: ${VERDICT_TEXT[verdict]}.`;
    render();
  } else {
    $("#verdict-note").textContent = `Not recorded: ${(await answer.json().catch(() => ({}))).detail}`;
  }
  showVerdict(item);
}

function showVerdict(item) {
  document.querySelectorAll("#verdict button").forEach((button) =>
    button.classList.toggle("chosen", button.dataset.verdict === item.verdict));
}

function step(offset) {
  const rows = Array.from(document.querySelectorAll("#queue tbody tr[data-filename]"));
  const at = rows.findIndex((row) => row.classList.contains("selected"));
  const next = rows[Math.min(rows.length - 1, Math.max(0, at + offset))];
  if (next) next.click();
}

async function select(item, row) {
  document.querySelectorAll("#queue tbody tr.selected").forEach((r) => r.classList.remove("selected"));
  row.classList.add("selected");
  selected = item;
  $("#verdict").hidden = !feedback;
  $("#verdict-note").textContent = item.verdict ? `Recorded: ${VERDICT_TEXT[item.verdict]}.` : "";
  showVerdict(item);
  $("#detail").hidden = false;
  $("#detail-title").textContent = item.filename;
  const verdict = item.status === "uncertain" ? `uncertain, read first (${item.reason})`
    : item.label ? "tumor suspected" : "no tumor found";
  reading = `P(tumor) ${percent(item.probability)}: ${verdict} ` +
    `(model version ${item.version ?? "local"}; not for diagnosis)`;
  $("#detail-reading").textContent = reading;
  $("#overlay").removeAttribute("src");
  const slices = $("#slices");
  slices.replaceChildren();
  slices.hidden = !item.series;
  if (!item.series) {
    const form = new FormData();
    form.append("file", item.file, item.file.name);
    await overlay(form, "");
    return;
  }
  const items = item.slices.map((s) => {
    const li = document.createElement("li");
    const text = s.status === "out_of_distribution" ? "not read"
      : s.status === "uncertain" ? `${percent(s.probability)}, uncertain`
      : `${percent(s.probability)}, ${s.label ? "tumor suspected" : "no tumor found"}`;
    li.textContent = `slice ${s.slice + 1}: ${text}`;
    li.dataset.slice = s.slice;
    li.classList.toggle("driving", item.driving.includes(s.slice));
    if (s.status !== "out_of_distribution") {
      li.classList.add("readable");
      li.addEventListener("click", () => showSlice(item, li));
    }
    slices.appendChild(li);
    return li;
  });
  // the slice that drove the reading first, else the first one read
  const first = items.find((li) => li.classList.contains("driving")) || items.find((li) => li.classList.contains("readable"));
  if (first) await showSlice(item, first);
}

async function showSlice(item, li) {
  document.querySelectorAll("#slices li.shown").forEach((other) => other.classList.remove("shown"));
  li.classList.add("shown");
  const form = new FormData();
  item.files.forEach((file) => form.append("files", file, file.name));
  form.append("series", item.series);
  form.append("slice", li.dataset.slice);
  await overlay(form, ` Slice ${Number(li.dataset.slice) + 1} shown.`);
}

// The scan (or slice) as it was scored beside its evidence map, from /v1/explain.
async function overlay(form, note) {
  const image = $("#overlay");
  image.removeAttribute("src");
  const answer = await fetch("/v1/explain", { method: "POST", body: form, headers: headers() });
  if (answer.ok) {
    image.src = URL.createObjectURL(await answer.blob());
    $("#detail-reading").textContent = reading + note;
  } else {
    $("#detail-reading").textContent = reading + ` — no overlay: ${(await answer.json()).detail}`;
  }
}

// Loose DICOM files of one drop travel in one request, so that a series is answered whole; images in batches.
const isImage = (file) => file.type.startsWith("image/") && !/\.(dcm|dicom)$/i.test(file.name);
const isLooseDicom = (file) => !isImage(file) && !/\.(zip|nii|nii\.gz)$/i.test(file.name);

function requests(files) {
  const images = files.filter(isImage), dicom = files.filter(isLooseDicom);
  const parts = [];
  for (let start = 0; start < images.length; start += batchSize) parts.push(images.slice(start, start + batchSize));
  if (dicom.length > maxFiles) {
    dicom.forEach((file) => failures.push({ filename: file.name,
      error: `more than ${maxFiles} loose DICOM files: zip the series and drop the .zip` }));
  } else if (dicom.length) parts.push(dicom);
  files.filter((file) => !isImage(file) && !isLooseDicom(file)).forEach((file) => parts.push([file]));
  return parts;
}

function seriesName(result) {
  const kind = result.kind === "nifti" ? "NIfTI volume" : "DICOM series";
  return `${kind}, ${result.slices} slices (${result.series.slice(7, 15)})`;
}

async function upload(files) {
  files = Array.from(files);
  let sent = 0;
  for (const part of requests(files)) {
    sent += part.length;
    $("#status").textContent = `Reading ${sent} of ${files.length} files…`;
    const form = new FormData();
    part.forEach((file) => form.append("files", file, file.name));
    const answer = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
    if (!answer.ok) {
      const detail = (await answer.json().catch(() => ({}))).detail || answer.statusText;
      part.forEach((file) => failures.push({ filename: file.name, error: detail }));
      render();
      continue;
    }
    const data = await answer.json();
    data.results.forEach((result) => {
      const name = result.series ? seriesName(result) : result.filename;
      if ("error" in result) failures.push({ filename: name, error: result.error });
      else if (result.status === "out_of_distribution") {
        failures.push({ filename: name, error: `not read: ${result.reason}` });
      } else queue.push({ file: part.find((file) => file.name === result.filename), files: part, filename: name,
                          status: result.status, probability: result.probability, label: result.label,
                          reason: result.reason, version: data.model.version, series: result.series,
                          requestId: data.request_id, scan: result.scan_sha256,
                          slices: result.slice_results, driving: result.driving_slices });
    });
    render();
  }
  siteHealth();
  const suspected = queue.filter((item) => item.label).length;
  const uncertain = queue.filter((item) => item.status === "uncertain").length;
  $("#status").textContent = `${queue.length} scans read, ${suspected} with a suspected tumor, ` +
    `${uncertain} uncertain (at the top)` + (failures.length ? `, ${failures.length} not read (listed below).` : ".");
}

$("#key").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("apiKey", $("#key-input").value.trim());
  $("#key-input").value = "";
  $("#key").hidden = true;
  describeModel();
});

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  upload(event.dataTransfer.files);
});
$("#files").addEventListener("change", (event) => { upload(event.target.files); event.target.value = ""; });
document.querySelectorAll("#verdict button").forEach((button) =>
  button.addEventListener("click", () => giveVerdict(button.dataset.verdict)));
// Keyboard first: a reader has seconds per scan.
document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (VERDICTS[event.key]) giveVerdict(VERDICTS[event.key]);
  else if (event.key === "j" || event.key === "ArrowDown") step(1);
  else if (event.key === "k" || event.key === "ArrowUp") step(-1);
  else return;
  event.preventDefault();
});
describeModel();
