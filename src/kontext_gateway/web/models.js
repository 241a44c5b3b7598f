// Model pages: /models lists the catalog as cards; /models/{id} is one model's page: description,
// strengths and limitations, specifications, providers with price and observed latency / success rate
// (GET /v1/models/{id}/stats), the parameter reference built from the compiled schema, and code.

import { ApiError, availableProviders, getModel, listModels, modelStats, pricePerImage } from "./api.js";
import { snippets } from "./code.js";
import { codeTabs, errorBox, h, label, money, percent } from "./ui.js";

const MODE_NAMES = { "text-to-image": "Text to image", edit: "Edit" };
const T2I_FALLBACK = "A serene mountain landscape at sunset";
const EDIT_PROMPT = "Add a starry night sky to this image";

const cheapest = (m) => {
  const prices = m.providers.map(pricePerImage).filter((x) => x != null);
  return prices.length ? Math.min(...prices) : null;
};

export async function renderList(root) {
  const models = await listModels();
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Models"),
      h("p", {}, `${models.length} models on this gateway. Each runs on one or more providers; the gateway picks one and fails over.`)),
    h("div", { class: "grid model-list", testid: "model-list" }, models.map((m) => {
      const avail = availableProviders(m).length;
      const price = cheapest(m);
      return h("article", { class: "card model-card", testid: "model-card", "data-id": m.id },
        h("div", { class: "row" },
          h("h2", {}, h("a", { href: `/models/${m.id}`, class: "stretched", testid: "model-link" }, m.name)),
          m.status && m.status !== "active" ? h("span", { class: "badge warn" }, m.status) : null),
        h("code", {}, m.id),
        h("p", { class: "desc" }, m.description),
        h("ul", { class: "tags", "aria-label": "Modes" }, m.modes.map((x) => h("li", { class: "badge accent" }, MODE_NAMES[x] || x))),
        h("div", { class: "foot" },
          price != null ? h("span", {}, `from ${money(price, m.providers[0]?.pricing?.currency)} / image`) : null,
          h("span", { class: avail ? "badge ok" : "badge" }, avail ? `ready on ${avail}/${m.providers.length} providers` : "no provider configured")));
    })));
}

export async function renderModel(root, { params, signal }) {
  const id = params[0];
  let m;
  try {
    m = await getModel(id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      root.append(h("h1", {}, "Model not found"), errorBox(err),
        h("p", { class: "space-above" }, h("a", { href: "/models" }, "See all models")));
      return;
    }
    throw err;
  }
  if (m.id !== id) history.replaceState(null, "", `/models/${m.id}`); // an alias: show the canonical URL
  const stats = await modelStats(m.id).catch(() => null);
  if (signal.aborted) return;
  document.title = `${m.name} · Kontext Gateway`;

  root.append(
    h("nav", { "aria-label": "Breadcrumb", class: "small breadcrumb" },
      h("a", { href: "/models" }, "Models"), " / ", h("span", { "aria-current": "page" }, m.name)),
    h("div", { class: "model-head page-head" },
      h("div", {},
        h("h1", { testid: "model-name" }, m.name),
        h("p", {}, `${m.creator || m.owned_by} · `, h("code", {}, m.id), " ",
          h("span", { class: m.status === "active" ? "badge ok" : "badge warn" }, m.status || "unknown"))),
      h("a", { class: "button primary", href: `/playground?model=${encodeURIComponent(m.id)}`, testid: "try-playground" }, "Try in playground")),
    h("p", { testid: "model-description" }, m.description),
    h("div", { class: "two-col" },
      h("section", { class: "card", testid: "strengths" }, h("h2", {}, "Strengths"),
        h("ul", { class: "list" }, (m.strengths || []).map((s) => h("li", {}, s)))),
      h("section", { class: "card", testid: "limitations" }, h("h2", {}, "Limitations"),
        h("ul", { class: "list" }, (m.limitations || []).map((s) => h("li", {}, s))))),
    section("Specifications", specs(m)),
    section("Providers", providersTable(m, stats),
      h("p", { class: "hint" }, `Price per image from the catalog; latency and success rate as this gateway observed them over the last ${stats?.window_days ?? 7} days.`)),
    section("Parameters", paramsTable(m)),
    section("Code examples", examples(m)));
}

function section(title, ...body) {
  const id = `sec-${title.toLowerCase().replace(/\W+/g, "-")}`;
  return h("section", { class: "section stack", "aria-labelledby": id }, h("h2", { id }, title), body);
}

function specs(m) {
  const rows = [
    ["Max resolution", m.max_resolution],
    ["Max input images", m.max_input_images],
    ["Modes", m.modes.map((x) => MODE_NAMES[x] || x).join(", ")],
    ["Input modalities", (m.input_modalities || []).join(", ")],
    ["Output modalities", (m.output_modalities || []).join(", ")],
    ["Aspect ratios", (m.aspect_ratios || []).join(", ")],
    ["Resolutions", (m.resolutions || []).join(", ")],
    ["Default steps", m.default_steps],
    ["Default guidance", m.default_guidance],
    ["Aliases", (m.aliases || []).length ? m.aliases.map((a) => h("code", { class: "listed" }, a)) : null],
    ["Family", m.family],
    ["Licence", m.license || m.licence],
    ["Status", m.status],
    ["Released", m.released],
    ["Tags", (m.tags || []).join(", ")],
  ].filter(([, v]) => v != null && v !== "" && !(Array.isArray(v) && !v.length));
  return h("div", { class: "table-wrap" }, h("table", { class: "spec", testid: "specs" },
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v))))));
}

function providersTable(m, stats) {
  const byKey = Object.fromEntries((stats?.providers || []).map((s) => [s.config_key, s]));
  const noData = () => h("span", { class: "muted" }, "no data yet");
  return h("div", { class: "table-wrap" }, h("table", { testid: "providers-table" },
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Provider"), h("th", { scope: "col" }, "Modes"), h("th", { scope: "col" }, "Status"),
      h("th", { scope: "col", class: "num" }, "Price per image"), h("th", { scope: "col", class: "num" }, "p50 latency"),
      h("th", { scope: "col", class: "num" }, "p95 latency"), h("th", { scope: "col", class: "num" }, "Success rate"),
      h("th", { scope: "col", class: "num" }, "Attempts"))),
    h("tbody", {}, m.providers.map((p) => {
      const s = byKey[p.config_key];
      const price = s?.price_per_image ?? pricePerImage(p);
      const lat = s?.latency_ms;
      return h("tr", { testid: "provider-row", "data-config-key": p.config_key },
        h("td", {}, h("strong", {}, p.provider), h("br"), h("code", { class: "small" }, p.config_key)),
        h("td", {}, (p.modes || m.modes).map((x) => MODE_NAMES[x] || x).join(", ")),
        h("td", {}, h("span", { class: p.available ? "badge ok" : "badge" }, p.available ? "ready" : "not configured")),
        h("td", { class: "num", testid: "price" }, price != null ? money(price, s?.currency || p.pricing?.currency) : "—"),
        h("td", { class: "num", testid: "p50" }, lat ? `${Math.round(lat.p50)} ms` : noData()),
        h("td", { class: "num", testid: "p95" }, lat ? `${Math.round(lat.p95)} ms` : noData()),
        h("td", { class: "num", testid: "success-rate" }, s?.success_rate != null ? percent(s.success_rate) : noData()),
        h("td", { class: "num" }, s ? String(s.attempts) : "0"));
    }))));
}

/** One row per parameter over both modes: type, default, allowed values, and per provider how. */
function paramsTable(m) {
  const modes = m.schema?.modes || {};
  const rows = new Map();
  for (const [mode, schema] of Object.entries(modes)) {
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      if (!rows.has(name)) rows.set(name, { prop, modes: [], providers: {} });
      const row = rows.get(name);
      row.modes.push(mode);
      Object.assign(row.providers, prop["x-providers"] || {});
    }
  }
  const handling = m.schema?.handling || {};
  const typeOf = (p) => (p.type === "array" ? `array of ${p.items?.format === "binary" ? "images" : p.items?.type || "values"}`
    : Array.isArray(p.type) ? p.type.join(" or ") : p.type || "any");
  const allowed = (p) => {
    if (p.enum) return p.enum.map((v) => h("code", { class: "listed" }, String(v)));
    if (p.minimum != null || p.maximum != null) return `${p.minimum ?? "…"} to ${p.maximum ?? "…"}`;
    if (p.maxItems != null) return `${p.minItems ?? 0} to ${p.maxItems} images`;
    if (p.examples) return ["e.g. ", p.examples.slice(0, 6).join(", ")];
    if (p.maxLength != null) return `${p.minLength ?? 0} to ${p.maxLength} characters`;
    return "—";
  };
  // What a provider's own route takes, where the schema says (provider-only parameters).
  const routeFacts = (how) => {
    if (!how.type) return "";
    const values = how.enum ? ` ${how.enum.join(" | ")}` : how.minimum != null ? ` ${how.minimum}–${how.maximum ?? "…"}` : "";
    return ` (${how.type}${values}${how.default != null ? `, default ${how.default}` : ""})`;
  };
  const legend = Object.entries(handling).map(([k, v]) => [h("dt", {}, h("code", {}, k)), h("dd", {}, v)]);
  return [
    h("div", { class: "table-wrap" }, h("table", { testid: "params-table" },
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Parameter"), h("th", { scope: "col" }, "Type"), h("th", { scope: "col" }, "Default"),
        h("th", { scope: "col" }, "Allowed"), h("th", { scope: "col" }, "Modes"), h("th", { scope: "col" }, "Providers and how"))),
      h("tbody", {}, [...rows].map(([name, { prop, modes: ms, providers }]) => h("tr", { testid: "param-row", "data-name": name },
        h("td", {}, h("code", {}, name), prop["x-provider-only"] ? h("span", { class: "only" }, `only ${prop["x-provider-only"].join(", ")}`) : null,
          h("div", { class: "hint" }, label(name), prop.description ? ` — ${prop.description}` : "")),
        h("td", {}, typeOf(prop)),
        h("td", {}, prop.default != null ? h("code", {}, String(prop.default)) : "—"),
        h("td", {}, allowed(prop)),
        h("td", {}, ms.length === Object.keys(modes).length ? "all" : ms.map((x) => MODE_NAMES[x] || x).join(", ")),
        h("td", {}, Object.keys(providers).length
          ? h("ul", { class: "how" }, Object.entries(providers).map(([key, how]) => h("li", {},
            h("code", {}, key), ": ", h("span", { title: handling[how.handling] || "" }, how.handling), how.as ? ` as ${how.as}` : "", routeFacts(how))))
          : h("span", { class: "muted" }, "no provider of this gateway takes it"))))))),
    legend.length ? h("details", {}, h("summary", {}, "What the handling words mean"), h("dl", { class: "meta small" }, legend)) : null,
  ];
}

function examples(m) {
  const parts = [];
  if (m.modes.includes("text-to-image")) {
    parts.push(h("h3", {}, "Text to image"), codeTabs(snippets({
      model: m.id, mode: "text-to-image", prompt: (m.example_prompts || [])[0] || T2I_FALLBACK, params: { size: "1024x1024" },
    }), { testid: "code-t2i", title: "Text to image code" }));
  }
  if (m.modes.includes("edit")) {
    parts.push(h("h3", {}, "Edit"), codeTabs(snippets({
      model: m.id, mode: "edit", prompt: EDIT_PROMPT, images: ["input.png"],
    }), { testid: "code-edit", title: "Edit code" }));
  }
  parts.push(h("p", { class: "hint" }, "Base URL ", h("code", {}, `${location.origin}/v1`),
    ". Parameters the OpenAI SDKs do not know (seed, aspect_ratio, guidance…) go in extra_body (Python) or as plain fields (JavaScript)."));
  return parts;
}
