// The mcllava web page: list the concepts, pick or drop a photo, ask, show the answer and the marked photo.
// Plain JavaScript talking to the server's own API; text is always set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { photo: null, bank: null }; // the chosen photo as a data URL; the chosen bank (a model id)

function headers(extra = {}) {
  const key = sessionStorage.getItem("mcllava-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  const body = await response.json().catch(() => null);
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `the server answered ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// The banks this key may use, from /v1/models; the picker shows only when there are several.
async function loadBanks() {
  try {
    const { data } = await api("/v1/models");
    const select = $("bank");
    select.replaceChildren();
    for (const model of data) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.id;
      select.append(option);
    }
    const saved = sessionStorage.getItem("mcllava-bank");
    state.bank = data.some((m) => m.id === saved) ? saved : data.length ? data[0].id : null;
    select.value = state.bank ?? "";
    $("bank-row").hidden = data.length < 2;
  } catch (error) {
    $("concepts-status").textContent = `Could not load the banks: ${error.message}`;
    return;
  }
  await loadConcepts();
}

function chooseBank(event) {
  state.bank = event.target.value;
  sessionStorage.setItem("mcllava-bank", state.bank);
  $("result").hidden = true;
  loadConcepts();
}

async function loadConcepts() {
  try {
    const query = state.bank ? `?model=${encodeURIComponent(state.bank)}` : "";
    const { data } = await api(`/v1/concepts${query}`);
    const list = $("concepts");
    list.replaceChildren();
    for (const concept of data) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "concept";
      button.title = `Insert ${concept.token} into the question`;
      const picture = document.createElement(concept.thumbnail ? "img" : "span");
      picture.className = "thumb";
      if (concept.thumbnail) {
        picture.src = concept.thumbnail;
        picture.alt = "";
      } else {
        picture.textContent = concept.name.slice(0, 1).toUpperCase();
        picture.setAttribute("aria-hidden", "true");
      }
      const text = document.createElement("span");
      text.className = "concept-text";
      const name = document.createElement("strong");
      name.textContent = concept.name;
      const token = document.createElement("code");
      token.textContent = concept.token;
      text.append(name, token);
      if (concept.category) {
        const category = document.createElement("span");
        category.className = "muted small";
        category.textContent = concept.category;
        text.append(category);
      }
      button.append(picture, text);
      button.addEventListener("click", () => insertToken(concept.token));
      item.append(button);
      list.append(item);
    }
    $("concepts-status").textContent = data.length ? "" : "This bank has no concepts.";
  } catch (error) {
    $("concepts-status").textContent = `Could not load the concepts: ${error.message}`;
  }
}

function insertToken(token) {
  const box = $("question");
  const at = box.selectionStart ?? box.value.length;
  const before = box.value.slice(0, at);
  const spaced = (before && !before.endsWith(" ") ? " " : "") + token + " ";
  box.value = before + spaced + box.value.slice(box.selectionEnd ?? at);
  box.focus();
  box.selectionStart = box.selectionEnd = at + spaced.length;
}

function choosePhoto(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError("Please choose an image (JPEG, PNG, WebP or BMP).");
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.photo = reader.result;
    $("preview").src = state.photo;
    $("preview").hidden = false;
    $("drop-text").textContent = `${file.name} · drop or click to change`;
    $("clear-photo").hidden = false;
    $("no-photo-hint").hidden = true;
    showError("");
  };
  reader.onerror = () => showError("The photo could not be read.");
  reader.readAsDataURL(file);
}

function clearPhoto() {
  state.photo = null;
  $("photo").value = "";
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("drop-text").textContent = "Drop a photo here, or choose one";
  $("clear-photo").hidden = true;
  $("no-photo-hint").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    showError("Write a question first.");
    $("question").focus();
    return;
  }
  const content = [{ type: "text", text: question }];
  if (state.photo) content.push({ type: "image_url", image_url: { url: state.photo } });
  const button = $("ask-button");
  button.disabled = true;
  button.textContent = "Thinking…";
  showError("");
  try {
    const reply = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        ...(state.bank ? { model: state.bank } : {}),
        messages: [{ role: "user", content }],
        mcllava: { visual_prompt: $("visual-prompt").checked, return_image: true },
      }),
    });
    showAnswer(reply);
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
    button.textContent = "Ask";
  }
}

function showAnswer(reply) {
  const extras = reply.mcllava || { marks: {}, marked_image: null };
  $("answer").textContent = reply.choices[0].message.content || "(empty answer)";
  const names = Object.fromEntries((extras.locations || []).map((l) => [l.concept, l.name]));
  const marks = Object.entries(extras.marks).map(([n, id]) => `${n} = ${names[id] || id}`);
  $("marked-figure").hidden = !extras.marked_image;
  if (extras.marked_image) {
    $("marked").src = extras.marked_image;
    $("marks-caption").textContent = `Marks: ${marks.join(", ")}`;
  }
  $("no-marks").hidden = Boolean(extras.marked_image) || !state.photo || !$("visual-prompt").checked;
  $("result").hidden = false;
}

function setUpDrop() {
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choosePhoto(event.dataTransfer.files[0]);
  });
  $("photo").addEventListener("change", (event) => choosePhoto(event.target.files[0]));
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDrop();
  $("clear-photo").addEventListener("click", clearPhoto);
  $("ask-form").addEventListener("submit", ask);
  $("api-key").addEventListener("change", (event) => {
    sessionStorage.setItem("mcllava-key", event.target.value);
    loadBanks();
  });
  $("bank").addEventListener("change", chooseBank);
  loadBanks();
});
