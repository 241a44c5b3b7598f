// The gallery: what this gateway made (with a key: what that key made), newest first, from
// GET /v1/requests?status=succeeded, filterable by model and paged with its cursor. An item opens
// large, with "reuse prompt and settings" and "edit this", both handing off to the playground.

import { api, availableProviders, listModels, urlToDataURI } from "./api.js";
import { navigate } from "./nav.js";
import { duration, errorBox, h, isAbort, label, money, nextId, timeAgo } from "./ui.js";

const PAGE = 24;

export async function render(root, { signal, query }) {
  const models = await listModels();
  const names = Object.fromEntries(models.map((m) => [m.id, m.name]));
  let model = query.get("model") || "";
  let cursor = null;

  const selectId = nextId("gallery-model");
  const select = h("select", { id: selectId, testid: "gallery-model", value: model },
    h("option", { value: "" }, "All models"),
    models.map((m) => h("option", { value: m.id }, m.name)));
  select.value = model;
  const grid = h("div", { class: "grid", testid: "gallery-grid" });
  const more = h("button", { type: "button", class: "button", testid: "load-more", hidden: true }, "Load more");
  const message = h("div");
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Gallery"),
      h("p", {}, "Images made on this gateway, newest first. Open one to see it large, reuse its settings or edit it.")),
    h("div", { class: "toolbar" },
      h("div", { class: "field" }, h("label", { for: selectId }, "Model"), select)),
    message, grid, h("div", { class: "row more" }, more));

  async function load(reset) {
    if (reset) { cursor = null; grid.replaceChildren(); message.replaceChildren(); }
    more.disabled = true;
    const q = new URLSearchParams({ limit: String(PAGE), status: "succeeded" });
    if (model) q.set("model", model);
    if (cursor) q.set("cursor", cursor);
    try {
      const page = await api(`/v1/requests?${q}`, { signal });
      if (reset && !page.data.length) message.replaceChildren(emptyState(models, model));
      grid.append(...page.data.map((item) => tile(item, names, () => openViewer(root, item, names))));
      cursor = page.next_cursor;
      more.hidden = !page.has_more;
    } catch (err) {
      if (isAbort(err) || signal.aborted) return;
      message.replaceChildren(errorBox(err, { retry: () => load(reset) }));
    } finally {
      more.disabled = false;
    }
  }

  select.addEventListener("change", () => {
    model = select.value;
    history.replaceState(null, "", model ? `/gallery?model=${encodeURIComponent(model)}` : "/gallery");
    load(true);
  });
  more.addEventListener("click", () => load(false));
  await load(true);
}

function tile(item, names, open) {
  const first = item.output[0];
  return h("button", { type: "button", class: "tile", testid: "gallery-item", "data-id": item.id, onclick: open },
    h("span", { class: "frame" },
      first ? h("img", { src: first, alt: "", loading: "lazy" }) : h("span", { class: "muted small" }, "Image removed"),
      item.output.length > 1 ? h("span", { class: "badge count" }, `×${item.output.length}`) : null),
    h("span", { class: "caption" },
      h("span", { class: "prompt", testid: "gallery-prompt" }, item.prompt || "(prompt not kept)"),
      h("span", { class: "sub" }, [names[item.model] || item.model, item.mode === "edit" ? "edit" : null, item.size, timeAgo(item.created_at)]
        .filter(Boolean).join(" · "))));
}

/** Nothing yet: invite a first generation, with the catalog's example prompts as one-click starts. */
function emptyState(models, model) {
  const pool = model ? models.filter((m) => m.id === model) : [...models].sort((a, b) => availableProviders(b).length - availableProviders(a).length);
  const examples = [];
  for (const m of pool) for (const p of m.example_prompts || []) examples.push({ m, p });
  const shown = examples.slice(0, 6);
  const name = model && models.find((m) => m.id === model)?.name;
  return h("div", { class: "card empty", testid: "gallery-empty" },
    h("h2", {}, name ? `No images from ${name} yet` : "No images yet"),
    h("p", { class: "muted" }, "Make the first one in the playground, or start from one of these prompts:"),
    h("div", { class: "suggestions" },
      shown.map(({ m, p }) => h("button", {
        type: "button", class: "suggestion", testid: "example-prompt",
        onclick: () => navigate(`/playground?model=${encodeURIComponent(m.id)}`, { model: m.id, prompt: p, mode: "text-to-image" }),
      }, p, h("span", { class: "muted small" }, ` — ${m.name}`)))),
    h("p", { class: "space-above" }, h("a", { class: "button primary", href: model ? `/playground?model=${encodeURIComponent(model)}` : "/playground" }, "Open the playground")));
}

function openViewer(root, item, names) {
  const titleId = nextId("viewer-title");
  const row = (k, v, testid) => (v == null || v === "" ? [] : [h("dt", {}, k), h("dd", { testid }, v)]);
  const s = item.settings || {};
  const shownSettings = Object.entries({ ...s, ...(s.extra || {}) })
    .filter(([k, v]) => !["seed", "size", "extra"].includes(k) && v != null && typeof v !== "object");
  const status = h("p", { class: "small muted", "aria-live": "polite" });
  const dialog = h("dialog", { class: "dialog", testid: "gallery-viewer", "aria-labelledby": titleId });
  const close = () => dialog.close();
  dialog.append(h("div", { class: "dialog-body" },
    h("div", { class: "dialog-head" },
      h("h2", { id: titleId }, names[item.model] || item.model),
      h("button", { type: "button", class: "button small", testid: "viewer-close", onclick: close }, "Close")),
    h("div", { class: "viewer" },
      h("div", { class: "images" }, item.output.map((url, i) => h("img", {
        src: url, alt: `Image ${i + 1} of “${item.prompt || "an earlier request"}”`, testid: "viewer-image", class: "checker",
      }))),
      h("div", { class: "stack" },
        h("p", { testid: "viewer-prompt" }, item.prompt || h("span", { class: "muted" }, "(prompt not kept)")),
        h("dl", { class: "meta" },
          row("Mode", item.mode === "edit" ? "Edit" : "Text to image"),
          row("Provider", item.provider, "viewer-provider"),
          row("Size", item.size, "viewer-size"),
          row("Seed", s.seed, "viewer-seed"),
          row("Created", item.created_at ? new Date(item.created_at).toLocaleString() : null),
          row("Duration", item.duration_ms != null ? duration(item.duration_ms) : null),
          row("Cost", item.cost != null ? money(item.cost, item.currency) : null),
          shownSettings.map(([k, v]) => row(label(k), String(v)))),
        h("div", { class: "actions" },
          h("button", {
            type: "button", class: "button primary", testid: "reuse",
            onclick: () => navigate(`/playground?model=${encodeURIComponent(item.model)}`, {
              model: item.model, prompt: item.prompt || "", mode: item.mode || "text-to-image",
              settings: item.settings, provider: item.provider || "",
            }),
          }, "Reuse prompt and settings"),
          item.output.length ? h("button", {
            type: "button", class: "button", testid: "edit-this",
            onclick: async (e) => {
              e.currentTarget.disabled = true;
              status.textContent = "Loading the image…";
              try {
                const dataUri = await urlToDataURI(item.output[0]);
                navigate(`/playground?model=${encodeURIComponent(item.model)}`, {
                  model: item.model, mode: "edit", prompt: "", images: [{ name: "input.png", dataUri }],
                });
              } catch (err) {
                status.replaceChildren(errorBox(err));
              }
            },
          }, "Edit this") : null,
          item.output.map((url, i) => h("a", { class: "button", href: url, download: `kontext-${item.id}-${i + 1}.${new URL(url).pathname.split(".").pop()}`, testid: "viewer-download" },
            item.output.length > 1 ? `Download ${i + 1}` : "Download"))),
        status))));
  dialog.addEventListener("close", () => dialog.remove());
  dialog.addEventListener("click", (e) => { if (e.target === dialog) close(); }); // a click on the backdrop
  root.append(dialog);
  dialog.showModal();
}
