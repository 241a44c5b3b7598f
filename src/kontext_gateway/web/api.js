// Every call to the gateway goes through `api()`: one place adds the API key, asks a person for one
// when the gateway answers 401, and turns the OpenAI-style error envelope into an ApiError.

const KEY_STORAGE = "kontext-gateway.api-key";

/** An error answer of the API: `status`, and the `message`, `param`, `code` of its error object. */
export class ApiError extends Error {
  constructor(status, body, fallback) {
    const e = (body && typeof body.error === "object" && body.error) || {};
    super(e.message || (body && body.detail) || fallback || `The gateway answered HTTP ${status}.`);
    this.name = "ApiError";
    this.status = status;
    this.param = e.param || null;
    this.code = e.code || null;
    this.type = e.type || null;
  }
}

// The key lives in sessionStorage only: gone when the tab closes, never written to disk by us.
export const auth = {
  get key() {
    try { return sessionStorage.getItem(KEY_STORAGE); } catch { return null; }
  },
  set(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
    window.dispatchEvent(new Event("kontext:key"));
  },
  clear() {
    sessionStorage.removeItem(KEY_STORAGE);
    window.dispatchEvent(new Event("kontext:key"));
  },
  // Set once any call answered 401: the code snippets then read the key from an environment variable.
  keyed: false,
};

let keyPrompt = null; // one dialog for all the calls that got a 401 at the same time

/** Show the key form; resolves when a key was entered, rejects when the person cancels. */
export function askForKey(reason) {
  if (!keyPrompt) keyPrompt = openKeyDialog(reason).finally(() => { keyPrompt = null; });
  return keyPrompt;
}

function openKeyDialog(reason) {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const cancel = document.getElementById("key-cancel");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  return new Promise((resolve, reject) => {
    const done = () => {
      form.removeEventListener("submit", onSubmit);
      cancel.removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) { input.focus(); return; }
      auth.set(key);
      done();
      resolve(key);
    };
    const onCancel = (event) => {
      event.preventDefault();
      done();
      reject(new ApiError(401, null, "An API key is needed to use this gateway."));
    };
    form.addEventListener("submit", onSubmit);
    cancel.addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel); // Escape
    dialog.showModal();
    input.focus();
  });
}

/**
 * fetch() for the JSON API. `body` (an object) is sent as JSON. Resolves with the parsed answer,
 * rejects with ApiError (a 4xx/5xx answer) or TypeError (the gateway could not be reached).
 */
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  for (;;) {
    const sent = auth.key;
    const h = { Accept: "application/json", ...headers };
    if (sent) h.Authorization = `Bearer ${sent}`;
    if (body !== undefined) h["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method, headers: h, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await res.json().catch(() => null);
    if (res.status === 401) {
      auth.keyed = true;
      const why = new ApiError(401, data).message;
      if (sent) auth.clear(); // it was refused: do not keep sending it
      await askForKey(sent ? `That key was not accepted: ${why}` : "This gateway asks for an API key.");
      continue; // the same call again, now with the key
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }
}

// ---- the catalog: static for a server's life, so fetched once per page load -----------------------

let modelsPromise = null;
const modelPromises = new Map();

const modelPath = (id) => id.split("/").map(encodeURIComponent).join("/");

/** All models (GET /v1/models). */
export function listModels() {
  if (!modelsPromise) {
    modelsPromise = api("/v1/models").then((r) => r.data);
    modelsPromise.catch(() => { modelsPromise = null; }); // a failure is not cached
  }
  return modelsPromise;
}

/** One model with its compiled parameter schema (GET /v1/models/{id}?schema=true). */
export function getModel(id) {
  if (!modelPromises.has(id)) {
    const p = api(`/v1/models/${modelPath(id)}?schema=true`);
    modelPromises.set(id, p);
    p.catch(() => modelPromises.delete(id));
  }
  return modelPromises.get(id);
}

export function modelStats(id, days = 7) {
  return api(`/v1/models/${modelPath(id)}/stats?days=${days}`);
}

/** Providers of a model that can run now, for a mode. */
export function availableProviders(model, mode) {
  return (model.providers || []).filter((p) => p.available && (!mode || (p.modes || model.modes).includes(mode)));
}

/** Price of one image on a provider entry (the sum of its per-image components), or null. */
export function pricePerImage(provider) {
  const parts = provider?.pricing?.components || [];
  if (!parts.length) return null;
  return parts.reduce((sum, c) => sum + (Number(c.unit_price) || 0), 0);
}

// ---- images -------------------------------------------------------------------------------------------

export function fileToDataURI(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

/** An image URL of this gateway (signed: no key needed) as a data URI, to send it back as an input. */
export async function urlToDataURI(url) {
  const res = await fetch(url);
  if (!res.ok) throw new ApiError(res.status, null, `Could not load the image (HTTP ${res.status}); its link may have expired.`);
  return fileToDataURI(await res.blob());
}

export const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});
