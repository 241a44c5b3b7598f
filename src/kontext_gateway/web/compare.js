// Compare: one prompt (and optionally one image, which makes it an edit) on several model / provider
// combinations side by side. Each column is its own prediction, pinned to its provider (x-provider),
// with its own status, time, cost and error. All columns share one seed so the comparison is fair.

import { availableProviders, listModels, pricePerImage } from "./api.js";
import { Run, outputs, statusText } from "./run.js";
import { Problem, duration, errorBox, h, imagePicker, isAbort, money, nextId, pastedImages } from "./ui.js";

const MAX_COLUMNS = 6;

export async function render(root, { signal }) {
  const models = await listModels();
  const state = { image: null, checked: new Set(), runs: [] };
  const promptId = nextId("cmp-prompt");
  const sizeId = nextId("cmp-size");
  const seedId = nextId("cmp-seed");

  // Every combination: a model with the gateway choosing, and the model on each of its providers.
  const targets = models.flatMap((m) => [
    { key: `${m.id}|`, model: m, provider: null },
    ...m.providers.map((p) => ({ key: `${m.id}|${p.config_key}`, model: m, provider: p })),
  ]);
  const mode = () => (state.image ? "edit" : "text-to-image");
  const usable = (t) => (t.provider
    ? t.provider.available && (t.provider.modes || t.model.modes).includes(mode())
    : availableProviders(t.model, mode()).length > 0);
  for (const t of targets.filter(usable).slice(0, 2)) state.checked.add(t.key);

  const prompt = h("textarea", { id: promptId, testid: "compare-prompt", rows: 3, placeholder: "One prompt for every column" });
  prompt.value = models.find((m) => availableProviders(m).length)?.example_prompts?.[0] || "";
  const size = h("input", { id: sizeId, type: "text", testid: "compare-size", value: "512x512", autocomplete: "off", spellcheck: "false", "aria-describedby": `${sizeId}-hint` });
  const seed = h("input", { id: seedId, type: "number", min: 0, step: 1, inputmode: "numeric", testid: "compare-seed", placeholder: "random", "aria-describedby": `${seedId}-hint` });
  const imageBox = h("div");
  const targetBox = h("div", { class: "targets", testid: "compare-targets" });
  const runButton = h("button", { type: "submit", class: "button primary", testid: "compare-run" }, "Run side by side");
  const cancelButton = h("button", { type: "button", class: "button danger", testid: "compare-cancel", hidden: true }, "Cancel all");
  const formError = h("div", { "aria-live": "assertive" });
  const columns = h("div", { class: "columns", testid: "compare-columns" });

  const renderImage = () => imageBox.replaceChildren(imagePicker({
    images: state.image ? [state.image] : [], max: 1, testid: "compare",
    labelText: "Image to edit (optional)", hint: "With an image every column edits it; without, every column generates.",
    onAdd: (list) => { state.image = list[0]; renderImage(); renderTargets(); },
    onRemove: () => { state.image = null; renderImage(); renderTargets(); },
  }));

  const renderTargets = () => {
    // Models with no provider configured here are folded away: listed, so people know they exist.
    const group = (m) => h("fieldset", {},
      h("legend", {}, m.name),
      targets.filter((t) => t.model === m).map((t) => {
        const ok = usable(t);
        if (!ok) state.checked.delete(t.key);
        const price = t.provider ? pricePerImage(t.provider) : null;
        const text = t.provider
          ? `${t.provider.config_key}${price != null ? ` · ${money(price, t.provider.pricing?.currency)}` : ""}`
          : "Any provider (the gateway chooses)";
        const configured = t.provider ? t.provider.available : availableProviders(t.model).length > 0;
        const why = ok ? "" : configured ? ` — no ${mode() === "edit" ? "edit" : "text to image"} here` : " — not configured";
        return h("label", { class: `check${ok ? "" : " disabled"}` },
          h("input", {
            type: "checkbox", value: t.key, testid: "target", checked: state.checked.has(t.key), disabled: !ok,
            onchange: (e) => (e.target.checked ? state.checked.add(t.key) : state.checked.delete(t.key)),
          }),
          h("span", {}, text, h("span", { class: "muted small" }, why)));
      }));
    const ready = models.filter((m) => availableProviders(m).length);
    const rest = models.filter((m) => !availableProviders(m).length);
    targetBox.replaceChildren(...ready.map(group),
      rest.length ? h("details", {}, h("summary", {}, `Not configured on this gateway (${rest.length} models)`),
        h("div", { class: "stack" }, rest.map(group))) : "");
  };

  const form = h("form", { class: "compare-form", novalidate: true, "aria-label": "Compare" },
    h("div", { class: "card stack" },
      h("div", { class: "field" }, h("label", { for: promptId }, "Prompt"), prompt),
      imageBox,
      h("div", { class: "fields" },
        h("div", { class: "field" }, h("label", { for: sizeId }, "Size"), size,
          h("p", { class: "hint", id: `${sizeId}-hint` }, "WxH, W:H or auto")),
        h("div", { class: "field" }, h("label", { for: seedId }, "Seed"), seed,
          h("p", { class: "hint", id: `${seedId}-hint` }, "The same for every column; random when empty"))),
      formError,
      h("div", { class: "actions" }, runButton, cancelButton)),
    h("div", { class: "card stack" },
      h("h2", {}, "Models and providers"),
      h("p", { class: "hint" }, `Tick up to ${MAX_COLUMNS}: each becomes a column.`),
      targetBox));
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Compare"),
      h("p", {}, "One prompt on several models or providers, side by side, with the time and cost of each.")),
    form, columns);
  renderImage();
  renderTargets();

  document.addEventListener("paste", async (e) => {
    const list = await pastedImages(e);
    if (!list.length) return;
    e.preventDefault();
    state.image = list[0];
    renderImage();
    renderTargets();
  }, { signal });

  cancelButton.addEventListener("click", () => state.runs.forEach((r) => r.cancel().catch(() => {})));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    formError.replaceChildren();
    const chosen = targets.filter((t) => state.checked.has(t.key));
    const text = prompt.value.trim();
    let problem = null;
    if (!text) problem = new Problem("A prompt is needed", "Write one prompt; every column runs it.");
    else if (chosen.length < 1) problem = new Problem("Nothing to compare", "Tick at least one model or provider.");
    else if (chosen.length > MAX_COLUMNS) problem = new Problem("Too many columns", `Tick at most ${MAX_COLUMNS}.`);
    if (problem) { formError.replaceChildren(errorBox(problem)); return; }

    const input = { prompt: text };
    if (size.value.trim()) input.size = size.value.trim();
    input.seed = seed.value.trim() === "" ? Math.floor(Math.random() * 2 ** 31) : Number(seed.value);
    if (state.image) input.input_image = state.image.dataUri;

    runButton.disabled = true;
    cancelButton.hidden = false;
    columns.replaceChildren();
    state.runs = [];
    await Promise.allSettled(chosen.map((t) => runColumn(t, input, columns, state, signal)));
    if (signal.aborted) return;
    runButton.disabled = false;
    cancelButton.hidden = true;
  });
}

async function runColumn(t, input, columns, state, signal) {
  const status = h("p", { class: "muted", testid: "col-status" }, "Sending…");
  const images = h("div", { class: "images stack" });
  const meta = h("dl", { class: "meta", testid: "col-meta" });
  const error = h("div");
  const col = h("section", { class: "card column", testid: "compare-col", "data-target": t.key, "aria-label": `${t.model.name} ${t.provider ? t.provider.provider : ""}` },
    h("h2", {}, t.model.name),
    h("p", { class: "small muted via" }, t.provider ? t.provider.config_key : "any provider"),
    status, images, meta, error);
  columns.append(col);

  const run = new Run({
    model: t.model.id, provider: t.provider?.config_key || "", input, signal,
    onUpdate: (p) => { status.textContent = `${statusText(p)} ${duration(run.elapsedMs)}`; col.dataset.state = p.status; },
  });
  state.runs.push(run);
  const tick = setInterval(() => {
    if (run.prediction) status.textContent = `${statusText(run.prediction)} ${duration(run.elapsedMs)}${run.prediction.progress ? ` · step ${run.prediction.progress.step}/${run.prediction.progress.total}` : ""}`;
  }, 100);
  try {
    const res = await run.start();
    if (!res) return;
    const { prediction: p, request: r } = res;
    col.dataset.state = p.status;
    status.textContent = p.status === "succeeded" ? `Done in ${duration(run.elapsedMs)}` : `${statusText(p)} after ${duration(run.elapsedMs)}`;
    if (p.status === "succeeded") {
      images.append(...outputs(p).map((url, i) => h("a", { href: url, target: "_blank", rel: "noopener" },
        h("img", { src: url, alt: `${t.model.name} result ${i + 1}`, testid: "col-image", class: "checker" }))));
    } else if (p.status === "failed") {
      error.replaceChildren(errorBox(new Problem("This one failed", p.error || "The provider gave no reason."), { testid: "col-error" }));
    }
    const row = (k, v, testid) => [h("dt", {}, k), h("dd", { testid }, v)];
    meta.append(
      ...row("Time", duration(r?.duration_ms ?? run.elapsedMs), "col-time"),
      ...row("Cost", money(r?.cost ?? (p.status === "succeeded" ? null : 0), r?.currency), "col-cost"),
      ...row("Provider", r?.provider || "—", "col-provider"),
      ...row("Size", r?.size || "—", "col-size"),
      ...row("Seed", r?.settings?.seed ?? input.seed, "col-seed"));
  } catch (err) {
    if (isAbort(err) || signal.aborted) return;
    col.dataset.state = "error";
    status.textContent = "Refused";
    error.replaceChildren(errorBox(err, { values: input, testid: "col-error" }));
  } finally {
    clearInterval(tick);
  }
}
