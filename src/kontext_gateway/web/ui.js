// Small DOM helpers and widgets shared by the pages: an element builder, number formats, the error
// box, tabbed code blocks with a copy button, and the image picker (file, drag and drop, paste).

import { ApiError, askForKey, fileToDataURI } from "./api.js";

/**
 * h("button", {class: "button", onclick: fn, testid: "run"}, "Run") -> <button>.
 * Attributes: `class`, `testid` (data-testid), `on<event>` handlers, `value` (set as a property
 * after the children, so a <select>'s value can name one of its options); true -> empty attribute,
 * false / null -> left out. Never `style`: the pages' Content-Security-Policy (style-src 'self')
 * refuses style attributes; give the element a class from app.css. Children: strings, nodes, arrays, null.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false || k === "value") continue;
    if (k === "class") el.className = v;
    else if (k === "testid") el.dataset.testid = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  if (attrs && attrs.value != null) el.value = attrs.value;
  return el;
}

let uid = 0;
export const nextId = (prefix = "k") => `${prefix}-${++uid}`;

// ---- formats -----------------------------------------------------------------------------------------

export function money(amount, currency = "USD") {
  if (amount == null || Number.isNaN(Number(amount))) return "—";
  return new Intl.NumberFormat("en-US", {
    style: "currency", currency: currency || "USD", minimumFractionDigits: 2, maximumFractionDigits: 4,
  }).format(amount);
}

export function duration(ms) {
  if (ms == null) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(ms < 60000 ? 1 : 0)} s`;
}

export function percent(x) {
  return x == null ? "—" : `${(x * 100).toFixed(x >= 0.999 || x === 0 ? 0 : 1)}%`;
}

export function timeAgo(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

// ---- parameter names as people read them -------------------------------------------------------------

const LABELS = {
  prompt: "Prompt", size: "Size", aspect_ratio: "Aspect ratio", resolution: "Resolution", seed: "Seed",
  n: "Number of images", output_format: "Output format", output_compression: "Compression",
  cfg_scale: "Guidance", num_inference_steps: "Inference steps", image: "Input image",
  input_image: "Input image", input_images: "Input images", model: "Model", "x-provider": "Provider",
  safety_tolerance: "Safety tolerance", prompt_upsampling: "Prompt upsampling", enhance_prompt: "Enhance prompt",
  sync_mode: "Sync mode",
};

export function label(name) {
  if (!name) return "";
  const base = String(name).replace(/^input\./, "").replace(/\[\d+\]$/, "");
  return LABELS[base] || base.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

/** Which form control a server error's `param` points at ("input.input_image" -> "image"). */
export function paramKey(param) {
  if (!param) return null;
  const base = String(param).replace(/^input\./, "").replace(/\[\d+\]$/, "");
  if (["input_image", "input_images", "image", "images", "image_url"].includes(base)) return "image";
  if (base === "guidance" || base === "guidance_scale") return "cfg_scale";
  return base;
}

const TITLES = {
  401: "An API key is needed",
  402: "Not enough budget left",
  403: "Not allowed",
  404: "Not found",
  409: "Not possible right now",
  413: "Too large",
  422: "Not accepted",
  429: "Too many requests",
  503: "No provider can run this right now",
};

/** A problem found before or after a call (an empty prompt, a failed run): its own heading and words. */
export class Problem extends Error {
  constructor(title, message, param = null) {
    super(message);
    this.name = "Problem";
    this.title = title;
    this.param = param;
  }
}

/** A heading and a sentence for an error, in words a person reads. `values`: what was sent, by param. */
export function describeError(err, values = {}) {
  if (err instanceof Problem) return { title: err.title, detail: err.message, param: err.param };
  if (err instanceof ApiError) {
    const key = paramKey(err.param);
    let title = TITLES[err.status] || (err.status >= 500 ? "The gateway had a problem" : "Something is not right");
    if (err.status === 400 || err.status === 422) {
      if (key) {
        const v = values[key];
        const shown = v == null || typeof v === "object" || String(v).length > 40 ? "" : ` ${v}`;
        title = `${label(key)}${shown} is not valid`;
      } else {
        title = "The request is not valid";
      }
    }
    return { title, detail: err.message, param: key };
  }
  if (err instanceof TypeError) {
    return { title: "Could not reach the gateway", detail: "Check that the server is running and try again.", param: null };
  }
  return { title: "Something went wrong", detail: String(err?.message || err), param: null };
}

/** The error box. A 401 offers to type a key (then `retry()`). */
export function errorBox(err, { values, retry, testid = "error" } = {}) {
  const { title, detail } = describeError(err, values);
  const box = h("div", { class: "alert error", role: "alert", testid },
    h("h3", {}, title),
    h("p", { testid: `${testid}-message` }, detail));
  if (err instanceof ApiError && err.status === 401 && retry) {
    box.append(h("div", { class: "actions" },
      h("button", { type: "button", class: "button small", onclick: () => askForKey("This gateway asks for an API key.").then(retry, () => {}) }, "Enter an API key")));
  }
  return box;
}

export function isAbort(err) {
  return err?.name === "AbortError";
}

// ---- copy and code tabs ------------------------------------------------------------------------------

async function copyText(text) {
  // navigator.clipboard needs a secure context (https or localhost); otherwise a hidden textarea.
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); return true; } catch { /* fall through */ }
  }
  const ta = h("textarea", { class: "visually-hidden", "aria-hidden": "true", tabindex: "-1" });
  ta.value = text;
  document.body.append(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch { ok = false; }
  ta.remove();
  return ok;
}

export function copyButton(getText, { text = "Copy", testid } = {}) {
  const btn = h("button", { type: "button", class: "button small copy", testid }, text);
  btn.addEventListener("click", async () => {
    const ok = await copyText(getText());
    btn.textContent = ok ? "Copied" : "Select and copy";
    setTimeout(() => { btn.textContent = text; }, 1500);
  });
  return btn;
}

/**
 * Tabs of code blocks: items [{id, label, code}]. Every panel is in the page (inactive ones hidden),
 * each <code> with data-testid `${testid}-${id}`; arrow keys move between tabs.
 */
export function codeTabs(items, { testid = "code", title = "Code" } = {}) {
  const base = nextId("code");
  const tabs = [];
  const panels = [];
  let current = 0;
  const select = (i, focus = false) => {
    current = i;
    tabs.forEach((t, j) => {
      t.setAttribute("aria-selected", String(i === j));
      t.tabIndex = i === j ? 0 : -1;
      panels[j].hidden = i !== j;
    });
    if (focus) tabs[i].focus();
  };
  items.forEach((item, i) => {
    const tabId = `${base}-tab-${item.id}`;
    const panelId = `${base}-panel-${item.id}`;
    tabs.push(h("button", {
      type: "button", role: "tab", id: tabId, "aria-controls": panelId, testid: `${testid}-tab-${item.id}`,
      onclick: () => select(i),
      onkeydown: (e) => {
        if (e.key === "ArrowRight") select((i + 1) % items.length, true);
        else if (e.key === "ArrowLeft") select((i - 1 + items.length) % items.length, true);
        else return;
        e.preventDefault();
      },
    }, item.label));
    panels.push(h("div", { role: "tabpanel", id: panelId, "aria-labelledby": tabId },
      h("pre", { class: "code", tabindex: "0" }, h("code", { testid: `${testid}-${item.id}` }, item.code))));
  });
  const wrap = h("div", { class: "code-tabs", testid },
    h("div", { role: "tablist", "aria-label": title }, tabs,
      copyButton(() => items[current].code, { text: "Copy", testid: `${testid}-copy` })),
    panels);
  select(0);
  return wrap;
}

// ---- images in: file picker, drag and drop, paste ----------------------------------------------------

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];

/** Files (from a picker, a drop or a paste) as [{name, dataUri}], images only. */
export async function readImages(fileList) {
  const files = [...(fileList || [])].filter((f) => IMAGE_TYPES.includes(f.type) || f.type.startsWith("image/"));
  return Promise.all(files.map(async (f) => ({ name: f.name || "pasted.png", dataUri: await fileToDataURI(f) })));
}

/**
 * The input-images widget: a drop zone with a real file input (behind a label styled as a button) and
 * thumbnails with remove buttons. `images` is the list it shows; `onAdd(list)` / `onRemove(i)` change it.
 */
export function imagePicker({ images, max, onAdd, onRemove, testid = "images", labelText = "Input images", hint }) {
  const inputId = nextId("file");
  const input = h("input", {
    type: "file", id: inputId, accept: IMAGE_TYPES.join(","), class: "visually-hidden", testid: `${testid}-file`,
    ...(max > 1 ? { multiple: true } : {}),
  });
  input.addEventListener("change", async () => {
    const list = await readImages(input.files);
    input.value = ""; // choosing the same file again still fires change
    if (list.length) onAdd(list);
  });
  const thumbs = h("ul", { class: "thumbs", testid: `${testid}-thumbs`, "aria-label": "Chosen images" },
    images.map((img, i) => h("li", { class: "thumb" },
      h("img", { src: img.dataUri, alt: `Input image ${i + 1}${img.name ? ` (${img.name})` : ""}`, testid: `${testid}-thumb` }),
      h("button", {
        type: "button", "aria-label": `Remove input image ${i + 1}`, title: "Remove", testid: `${testid}-remove`,
        onclick: () => onRemove(i),
      }, "×"))));
  const countText = max > 1 ? `${images.length} of ${max} images` : (images.length ? "1 image" : "No image yet");
  const zone = h("div", { class: "dropzone", testid: `${testid}-dropzone` },
    h("div", { class: "row" },
      input,
      h("label", { for: inputId, class: "button small pick", testid: `${testid}-pick` }, images.length && max === 1 ? "Replace image" : "Choose image" + (max > 1 ? "s" : "")),
      h("span", { class: "muted small" }, "or drop, or paste (Ctrl+V)"),
      h("span", { class: "badge tally" }, countText)),
    images.length ? thumbs : null,
    hint ? h("p", { class: "hint" }, hint) : null);
  // Drag and drop: highlight while something is over the zone; read the dropped images.
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    const list = await readImages(e.dataTransfer?.files);
    if (list.length) onAdd(list);
  });
  return h("div", { class: "field wide" }, h("span", { class: "label", id: `${inputId}-label` }, labelText), zone);
}

/** Images from a paste event (a screenshot, a copied image), or [] when the paste is text. */
export async function pastedImages(event) {
  const files = [...(event.clipboardData?.files || [])];
  return files.length ? readImages(files) : [];
}
