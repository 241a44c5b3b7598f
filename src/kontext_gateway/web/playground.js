// The playground: choose a model and a mode, write a prompt, add input images, set the parameters the
// model's compiled schema offers, run it as a prediction with live status, then download the result,
// edit it again ("Edit this result") or copy the exact request as code.

import { availableProviders, getModel, listModels, pricePerImage, urlToDataURI } from "./api.js";
import { snippets } from "./code.js";
import { Run, outputs, statusText } from "./run.js";
import {
  Problem, codeTabs, describeError, duration, errorBox, h, imagePicker, isAbort, label, money, nextId,
  pastedImages,
} from "./ui.js";

// prompt and images have their own inputs; the playground always asks for URLs (response_format)
// Set elsewhere on the page (prompt, the image picker, "Edit this result") or meaningless here
// (the playground polls a prediction instead of streaming, and masks need a drawing tool).
const SKIP = new Set(["prompt", "image", "response_format", "mask", "partial_images", "previous_response_id"]);
const MODES = { "text-to-image": "Generate", edit: "Edit" };
const GROUPS = {
  "Core Parameters": "Basics", "Size & Layout": "Size & layout", "Output & Format": "Output",
  "Additional Parameters": "Advanced",
};
const NARROW = window.matchMedia("(max-width: 899px)");
const COLLAPSED = new Set(["Output & Format", "Additional Parameters"]);
const SIZE_SUGGESTIONS = ["auto", "1024x1024", "768x768", "512x512", "256x256", "1:1", "16:9", "9:16", "4:3", "3:4", "21:9"];

// Kept while the tab lives: the prompt, images and settings survive a trip to the gallery and back.
const state = {
  modelId: null,
  mode: "text-to-image",
  provider: "", // a provider config key, or "" for the gateway's choice
  prompt: "",
  values: {}, // parameter name -> the text of its control
  images: [], // [{name, dataUri}]
  last: null, // the last finished run: {prediction, request, req}
};

export async function render(root, { signal, query, handoff }) {
  root.append(h("div", { class: "page-head" },
    h("h1", {}, "Playground"),
    h("p", {}, "Generate an image from a prompt, or edit your own, on any model of this gateway.")));
  const models = await listModels();
  const find = (name) => models.find((m) => m.id === name || (m.aliases || []).includes(name));
  const wanted = handoff?.model || query.get("model");
  let notice = null;
  if (wanted && find(wanted)) state.modelId = find(wanted).id;
  else if (wanted) notice = `There is no model “${wanted}” on this gateway; showing another one.`;
  if (!state.modelId || !find(state.modelId)) {
    state.modelId = (models.find((m) => availableProviders(m).length) || models[0])?.id;
  }
  if (handoff) applyHandoff(handoff);
  const view = new Playground(root, models, signal, notice);
  await view.start();
}

/** Data from another page: a gallery item's prompt and settings, or an image to edit. */
function applyHandoff(d) {
  if (d.prompt != null) state.prompt = d.prompt;
  if (d.mode) state.mode = d.mode;
  if (d.images) state.images = d.images;
  if (d.settings) {
    const { extra = {}, ...rest } = d.settings;
    state.values = {};
    for (const [k, v] of Object.entries({ ...rest, ...extra })) {
      if (v != null && typeof v !== "object") state.values[k] = String(v);
    }
  }
  state.provider = d.provider || "";
  state.last = null;
}

/** "Image dimensions as WxH pixels (e.g. "1024x1024"), ... or "auto". WxH determines ..." -> up to "auto". */
/** A parameter's type; for one that takes several (an integer or its string form), the first. */
function kindOf(prop) {
  return Array.isArray(prop.type) ? prop.type[0] : prop.type;
}

function firstSentence(text = "") {
  const m = /^.*?[.!?](?=\s+[A-Z]|$)/s.exec(text);
  return m ? m[0] : text;
}

class Playground {
  constructor(root, models, signal, notice) {
    Object.assign(this, { root, models, signal, notice });
    this.run = null;
    this.visible = []; // [name, property] of the parameter controls shown
  }

  async start() {
    this.form = h("form", { class: "card playground-form stack", testid: "playground-form", novalidate: true, "aria-label": "Request" });
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    this.status = h("div", { class: "card", testid: "status", hidden: true, "aria-live": "polite" });
    this.errors = h("div");
    this.result = h("div", { testid: "result-area" });
    this.announce = h("p", { class: "visually-hidden", "aria-live": "polite" });
    const output = h("section", { class: "output stack", "aria-label": "Result" }, this.status, this.errors, this.result, this.announce);
    if (this.notice) this.root.append(h("p", { class: "alert info", role: "status", testid: "notice" }, this.notice));
    this.root.append(h("div", { class: "playground" }, this.form, output));
    // Paste an image anywhere on the page: it becomes an input image (and the mode "edit").
    document.addEventListener("paste", (e) => this.onPaste(e), { signal: this.signal });
    await this.loadModel();
    this.renderResult();
  }

  async loadModel() {
    this.model = await getModel(state.modelId);
    if (this.signal.aborted) return;
    if (!this.model.modes.includes(state.mode)) state.mode = this.model.modes[0];
    this.fixProvider();
    this.renderForm();
  }

  fixProvider() {
    if (state.provider && !availableProviders(this.model, state.mode).some((p) => p.config_key === state.provider)) {
      state.provider = "";
    }
  }

  get maxImages() {
    const chosen = this.model.providers.find((p) => p.config_key === state.provider);
    const schemaMax = this.model.schema?.modes?.edit?.properties?.image?.maxItems;
    return chosen?.max_input_images || schemaMax || this.model.max_input_images || 1;
  }

  // ---- the form --------------------------------------------------------------------------------------

  renderForm(focusTestid) {
    const m = this.model;
    const modelId = nextId("model");
    const promptId = nextId("prompt");
    const parts = [];

    parts.push(h("div", { class: "field" },
      h("label", { for: modelId }, "Model"),
      h("select", { id: modelId, testid: "model-select", value: state.modelId, onchange: (e) => this.changeModel(e.target.value) },
        this.models.map((x) => h("option", { value: x.id },
          x.name + (availableProviders(x).length ? "" : " (not configured)")))),
      h("p", { class: "hint" }, h("a", { href: `/models/${m.id}`, testid: "model-page-link" }, `About ${m.name}`))));

    parts.push(h("fieldset", {},
      h("legend", {}, "Mode"),
      h("div", { class: "segmented", role: "radiogroup", "aria-label": "Mode" },
        Object.entries(MODES).map(([mode, text]) => h("label", {},
          h("input", {
            type: "radio", name: "mode", value: mode, testid: `mode-${mode === "edit" ? "edit" : "generate"}`,
            checked: state.mode === mode, disabled: !m.modes.includes(mode),
            onchange: () => this.changeMode(mode),
          }),
          h("span", {}, text))))));

    const prompt = h("textarea", {
      id: promptId, name: "prompt", testid: "prompt", "data-param": "prompt", rows: 4, required: true,
      placeholder: state.mode === "edit" ? "Describe the change, e.g. “Add a starry night sky”" : "Describe the image",
      "aria-describedby": `${promptId}-hint`,
      oninput: (e) => { state.prompt = e.target.value; },
      onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); this.submit(); } },
    });
    prompt.value = state.prompt;
    parts.push(h("div", { class: "field" },
      h("label", { for: promptId }, state.mode === "edit" ? "Edit instruction" : "Prompt"),
      prompt,
      h("p", { class: "hint", id: `${promptId}-hint` }, "Ctrl+Enter runs it.")));

    if (state.mode === "edit") {
      this.imagesBox = h("div", { "data-param": "image" });
      this.renderImages();
      parts.push(this.imagesBox);
    }

    const providers = availableProviders(m, state.mode);
    if (!availableProviders(m).length) {
      parts.push(h("p", { class: "alert error", testid: "no-provider" },
        `No provider of ${m.name} is configured on this gateway, so a run will be refused. It can run on: `,
        [...new Set(m.providers.map((p) => p.provider))].join(", "), "."));
    } else {
      const provId = nextId("provider");
      parts.push(h("div", { class: "field" },
        h("label", { for: provId }, "Provider"),
        h("select", {
          id: provId, testid: "provider-select", "data-param": "x-provider", value: state.provider,
          onchange: (e) => { state.provider = e.target.value; this.renderForm("provider-select"); },
        },
        h("option", { value: "" }, "Automatic (with failover)"),
        providers.map((p) => h("option", { value: p.config_key },
          `${p.provider} — ${p.config_key}${pricePerImage(p) != null ? ` · ${money(pricePerImage(p), p.pricing.currency)}/image` : ""}`)))));
    }

    parts.push(...this.paramGroups());

    this.runButton = h("button", { type: "submit", class: "button primary", testid: "run" }, state.mode === "edit" ? "Edit image" : "Generate");
    this.cancelButton = h("button", { type: "button", class: "button danger", testid: "cancel", hidden: true, onclick: () => this.cancel() }, "Cancel");
    parts.push(h("div", { class: "run-row" }, this.runButton, this.cancelButton,
      h("span", { class: "muted small", testid: "estimate" }, this.estimate())));

    this.form.replaceChildren(...parts);
    this.setRunning(Boolean(this.run));
    if (focusTestid) this.form.querySelector(`[data-testid="${focusTestid}"]`)?.focus();
  }

  /** "≈ $0.04" for n images on the chosen (or cheapest available) provider. */
  estimate() {
    const list = state.provider
      ? this.model.providers.filter((p) => p.config_key === state.provider)
      : availableProviders(this.model, state.mode);
    const prices = list.map(pricePerImage).filter((x) => x != null);
    if (!prices.length) return "";
    const n = Math.max(1, parseInt(state.values.n, 10) || 1);
    return `≈ ${money(Math.min(...prices) * n, list[0].pricing?.currency)}`;
  }

  renderImages() {
    const max = this.maxImages;
    this.imagesBox.replaceChildren(imagePicker({
      images: state.images, max, testid: "input",
      labelText: max > 1 ? `Input images (up to ${max})` : "Input image",
      onAdd: (list) => this.addImages(list),
      onRemove: (i) => { state.images.splice(i, 1); this.renderImages(); },
    }));
  }

  addImages(list) {
    const max = this.maxImages;
    // One slot: a new image replaces the old. Several: add until full, then say so.
    if (max === 1) state.images = list.slice(0, 1);
    else {
      const room = max - state.images.length;
      state.images.push(...list.slice(0, Math.max(0, room)));
      if (list.length > room) this.say(`${this.model.name} takes at most ${max} images; ${list.length - Math.max(0, room)} left out.`);
    }
    if (state.mode !== "edit") this.changeMode("edit");
    else this.renderImages();
  }

  async onPaste(e) {
    const list = await pastedImages(e);
    if (!list.length || !this.model.modes.includes("edit")) return;
    e.preventDefault();
    this.addImages(list);
    this.say("Pasted image added as an input image.");
  }

  /** The parameter controls, from the schema of the mode, for the providers that may run it. */
  paramGroups() {
    const schema = this.model.schema?.modes?.[state.mode] || { properties: {} };
    const keys = this.candidateKeys();
    const groups = new Map();
    this.visible = [];
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      if (SKIP.has(name)) continue;
      const xp = prop["x-providers"];
      if (xp && !keys.some((k) => k in xp)) continue; // no provider that may run it honours it
      this.visible.push([name, prop]);
      const g = prop["x-group"] || "Additional Parameters";
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(this.control(name, prop));
    }
    return [...groups].map(([g, controls]) => {
      const title = GROUPS[g] || g;
      const slug = title.toLowerCase().replace(/[^a-z]+/g, "-");
      const fieldset = h("fieldset", {}, h("legend", { class: "visually-hidden" }, title), h("div", { class: "fields" }, controls));
      if (!COLLAPSED.has(g)) {
        return h("section", { class: "group", testid: `group-${slug}`, "aria-label": title }, h("h3", { class: "group-title", "aria-hidden": "true" }, title), fieldset);
      }
      // Less used options fold away, but stay open once one of them is set.
      const names = controls.map((c) => c.querySelector("[data-param]")?.dataset.param);
      const open = names.some((n) => (state.values[n] ?? "") !== "");
      return h("details", { class: "group", testid: `group-${slug}`, open },
        h("summary", {}, title, h("span", { class: "muted small" }, ` (${names.length})`)), fieldset);
    });
  }

  candidateKeys() {
    if (state.provider) return [state.provider];
    const avail = availableProviders(this.model, state.mode).map((p) => p.config_key);
    if (avail.length) return avail;
    return this.model.providers.filter((p) => (p.modes || this.model.modes).includes(state.mode)).map((p) => p.config_key);
  }

  control(name, prop) {
    const id = nextId(`p-${name}`);
    const hintId = `${id}-hint`;
    const value = state.values[name] ?? "";
    const common = {
      id, name, testid: `param-${name}`, "data-param": name, "aria-describedby": hintId,
      oninput: (e) => { state.values[name] = e.target.value; if (name === "n") this.form.querySelector('[data-testid="estimate"]').textContent = this.estimate(); },
      onchange: (e) => { state.values[name] = e.target.value; },
    };
    const dflt = prop.default != null ? `Default (${prop.default})` : "Default";
    const kind = kindOf(prop);
    let input;
    let extra = null;
    if (name === "size") {
      const listId = `${id}-list`;
      input = h("input", { ...common, type: "text", value, placeholder: "auto — or WxH, e.g. 512x512", autocomplete: "off", spellcheck: "false", list: listId });
      extra = h("datalist", { id: listId }, SIZE_SUGGESTIONS.map((s) => h("option", { value: s })));
    } else if (prop.enum) {
      input = h("select", { ...common, value }, h("option", { value: "" }, dflt), prop.enum.map((v) => h("option", { value: String(v) }, String(v))));
    } else if (kind === "string" && prop.examples) {
      input = h("select", { ...common, value }, h("option", { value: "" }, dflt), prop.examples.map((v) => h("option", { value: String(v) }, String(v))));
    } else if (kind === "boolean") {
      input = h("select", { ...common, value }, h("option", { value: "" }, dflt), h("option", { value: "true" }, "On"), h("option", { value: "false" }, "Off"));
    } else if (kind === "integer" || kind === "number") {
      input = h("input", {
        ...common, type: "number", value, inputmode: kind === "integer" ? "numeric" : "decimal",
        min: prop.minimum, max: prop.maximum, step: kind === "integer" ? 1 : "any",
        placeholder: prop.default != null ? `${prop.default}` : name === "seed" ? "random" : "",
      });
    } else if (prop.type === "array") {
      // e.g. loras: typed as JSON, sent parsed (the gateway explains what is wrong with it).
      input = h("input", { ...common, type: "text", value, spellcheck: "false", autocomplete: "off",
        placeholder: name === "loras" ? '[{"path": "style.safetensors", "scale": 0.8}]' : "[...]" });
    } else {
      input = h("input", { ...common, type: "text", value, placeholder: prop.default != null ? String(prop.default) : "" });
    }
    const only = prop["x-provider-only"];
    const first = firstSentence(prop.description);
    const range = prop.minimum != null && prop.maximum != null ? ` ${prop.minimum}–${prop.maximum}.` : "";
    return h("div", { class: `field${name === "size" ? " wide" : ""}` },
      h("label", { for: id }, label(name), only ? h("span", { class: "only" }, `only ${only.join(", ")}`) : null),
      input, extra,
      h("p", { class: "hint", id: hintId }, h("code", {}, name), " ", first, range));
  }

  changeModel(id) {
    state.modelId = id;
    history.replaceState(null, "", `${location.pathname}?model=${encodeURIComponent(id)}`);
    this.loadModel().then(() => this.form.querySelector('[data-testid="model-select"]')?.focus(),
      (err) => this.showError(err));
  }

  changeMode(mode) {
    state.mode = mode;
    this.fixProvider();
    this.renderForm(`mode-${mode === "edit" ? "edit" : "generate"}`);
  }

  // ---- running ---------------------------------------------------------------------------------------

  /** The prediction input from the form: only the parameters a person set, typed per the schema. */
  buildInput() {
    const input = { prompt: state.prompt.trim() };
    const params = {};
    for (const [name, prop] of this.visible) {
      const raw = (state.values[name] ?? "").trim();
      if (raw === "") continue;
      let v = raw;
      const kind = kindOf(prop);
      if (kind === "integer" || kind === "number") {
        const num = Number(raw);
        v = Number.isFinite(num) ? num : raw; // the gateway says what is wrong with it
      } else if (kind === "boolean") v = raw === "true";
      else if (kind === "array") {
        try { v = JSON.parse(raw); } catch { v = raw; } // not JSON: the gateway's 400 says so
      }
      params[name] = v;
    }
    Object.assign(input, params);
    if (state.mode === "edit") {
      if (state.images.length === 1) input.input_image = state.images[0].dataUri;
      else input.input_images = state.images.map((i) => i.dataUri);
    }
    return { input, params };
  }

  async submit() {
    if (this.run) return;
    this.clearErrors();
    const { input, params } = this.buildInput();
    if (!input.prompt) {
      return this.showError(new Problem("A prompt is needed",
        state.mode === "edit" ? "Describe the change to make to the image." : "Describe the image to make.", "prompt"));
    }
    if (state.mode === "edit" && !state.images.length) {
      return this.showError(new Problem("An input image is needed",
        "Choose an image, drop one on the box, or paste one, then describe the edit.", "image"));
    }
    const req = {
      model: this.model.id, mode: state.mode, prompt: input.prompt, params,
      images: state.images.map((i) => i.name), provider: state.provider,
    };
    const run = new Run({
      model: this.model.id, provider: state.provider, input, signal: this.signal,
      onUpdate: () => this.renderStatus(run),
    });
    this.run = run;
    this.setRunning(true);
    this.renderStatus(run);
    const ticker = setInterval(() => this.renderStatus(run), 100);
    try {
      const res = await run.start();
      if (!res) return; // the page was left
      this.renderStatus(run);
      if (res.prediction.status === "succeeded") {
        state.last = { ...res, req };
        this.renderResult();
        this.say("The image is ready.");
        if (NARROW.matches) this.status.scrollIntoView({ behavior: "smooth", block: "start" }); // below the form on phones
      } else if (res.prediction.status === "failed") {
        this.showError(new Problem("The run failed", res.prediction.error || "The provider gave no reason."));
      }
    } catch (err) {
      if (isAbort(err) || this.signal.aborted) return;
      this.status.hidden = true;
      this.showError(err, params);
    } finally {
      clearInterval(ticker);
      this.run = null;
      if (!this.signal.aborted) this.setRunning(false);
    }
  }

  async cancel() {
    try {
      await this.run?.cancel();
    } catch (err) {
      this.showError(err);
    }
  }

  setRunning(running) {
    if (!this.runButton) return;
    this.runButton.disabled = running;
    this.runButton.textContent = running ? "Running…" : state.mode === "edit" ? "Edit image" : "Generate";
    this.cancelButton.hidden = !running;
  }

  renderStatus(run) {
    const p = run.prediction;
    const s = p?.status || "sending";
    const ended = ["succeeded", "failed", "canceled"].includes(s);
    const progress = p?.progress;
    this.status.hidden = false;
    this.status.dataset.state = s;
    const text = s === "succeeded" ? `Done in ${duration(run.elapsedMs)}`
      : s === "canceled" ? `Canceled after ${duration(run.elapsedMs)}`
        : s === "failed" ? `Failed after ${duration(run.elapsedMs)}`
          : statusText(p, state.mode === "edit" ? "Editing" : "Generating");
    this.status.replaceChildren(h("div", { class: "status" },
      ended ? null : h("span", { class: "spinner", "aria-hidden": "true" }),
      h("strong", { testid: "status-text" }, text),
      ended ? null : h("span", { class: "muted", testid: "elapsed" }, duration(run.elapsedMs)),
      progress ? h("span", { testid: "progress-text" }, `step ${progress.step}/${progress.total}`) : null,
      progress && !ended ? h("progress", { max: progress.total, value: progress.step, "aria-label": "Denoising steps" }) : null,
      !ended && p ? h("button", { type: "button", class: "button small danger", testid: "status-cancel", onclick: () => this.cancel() }, "Cancel") : null));
  }

  renderResult() {
    const last = state.last;
    if (!last) {
      this.result.replaceChildren(h("div", { class: "placeholder", testid: "result-empty" },
        h("p", {}, "Your images appear here."),
        h("p", { class: "small" }, "Each one at its real size, with a download link, the seed and size used, the provider, the time and the cost.")));
      return;
    }
    const { prediction, request: r, req } = last;
    const urls = outputs(prediction);
    const ext = (u) => (new URL(u).pathname.split(".").pop() || "png");
    const figures = urls.map((url, i) => h("figure", { class: "result-figure", testid: "result-figure" },
      h("img", { src: url, alt: `Result ${i + 1} of “${req.prompt}”`, testid: "result-image" }),
      h("div", { class: "actions" },
        h("a", { class: "button small", href: url, download: `kontext-${prediction.id}-${i + 1}.${ext(url)}`, testid: "download" }, "Download"),
        h("button", { type: "button", class: "button small", testid: "edit-result", onclick: (e) => this.editResult(url, e.currentTarget) }, "Edit this result"))));
    const settings = r?.settings || {};
    const row = (k, v, testid) => [h("dt", {}, k), h("dd", { testid }, v)];
    const meta = h("dl", { class: "meta", testid: "result-meta" },
      row("Seed", settings.seed ?? "—", "meta-seed"),
      row("Size", r?.size || settings.size || "—", "meta-size"),
      row("Model", r?.model || req.model, "meta-model"),
      row("Provider", r?.provider || "—", "meta-provider"),
      row("Duration", duration(r?.duration_ms ?? (prediction.metrics?.predict_time ?? 0) * 1000), "meta-duration"),
      row("Cost", money(r?.cost, r?.currency), "meta-cost"));
    this.result.replaceChildren(h("div", { class: "card stack", testid: "result", "data-request-id": prediction.id },
      h("h2", {}, urls.length > 1 ? `${urls.length} images` : "Result"),
      h("div", { class: "results" }, figures),
      meta,
      h("section", { class: "stack", "aria-label": "Copy as code", testid: "copy-as-code" },
        h("h3", {}, "Copy as code"),
        h("p", { class: "hint" }, "The same request through this gateway's OpenAI-compatible Images API."),
        codeTabs(snippets(req), { testid: "result-code", title: "Code for this request" }))));
  }

  /** Iterative editing: the result becomes the input image of the next edit. */
  async editResult(url, button) {
    button.disabled = true;
    try {
      const dataUri = await urlToDataURI(url);
      state.images = [{ name: `result.${new URL(url).pathname.split(".").pop() || "png"}`, dataUri }];
      state.mode = "edit";
      this.fixProvider();
      this.renderForm();
      const prompt = this.form.querySelector('[data-testid="prompt"]');
      prompt.focus();
      prompt.select();
      this.form.scrollIntoView({ behavior: "smooth", block: "start" });
      this.say("The result is now the input image. Describe the next edit.");
    } catch (err) {
      this.showError(err);
    } finally {
      button.disabled = false;
    }
  }

  // ---- errors ------------------------------------------------------------------------------------------

  clearErrors() {
    this.errors.replaceChildren();
    for (const el of this.form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    for (const el of this.form.querySelectorAll('[data-testid="field-error"]')) el.remove();
  }

  /** The error in the result column, and beside the control it is about (marked invalid, focused). */
  showError(err, values = {}) {
    const { title, detail, param } = describeError(err, values);
    this.clearErrors();
    this.errors.replaceChildren(errorBox(err, { values, retry: () => this.submit() }));
    const target = param && this.form.querySelector(`[data-param="${CSS.escape(param)}"]`);
    if (!target) {
      this.errors.scrollIntoView({ block: "nearest" });
      return;
    }
    target.closest("details")?.setAttribute("open", "");
    const control = target.matches("input, select, textarea") ? target : target.querySelector("input, select, textarea");
    const note = h("p", { class: "field-error", id: nextId("err"), testid: "field-error" }, `${title}: ${detail}`);
    (target.closest(".field") || target).append(note);
    target.setAttribute("aria-invalid", "true");
    control?.setAttribute("aria-errormessage", note.id);
    target.addEventListener("input", () => { target.removeAttribute("aria-invalid"); note.remove(); }, { once: true });
    control?.focus?.();
    note.scrollIntoView({ block: "nearest" });
  }

  say(text) {
    this.announce.textContent = text;
  }
}
