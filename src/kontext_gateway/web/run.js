// Running one request with live status: create a prediction, poll it every 250 ms until it ends,
// then read its request record (provider, cost, duration, seed) for the result panel.
// Shared by the playground and each column of the compare page.

import { api, sleep } from "./api.js";

const ENDED = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 250;

export class Run {
  /**
   * model: a catalog id; provider: a provider config key or "" (the gateway picks); input: the
   * prediction input (unified parameter names, images as data URIs).
   * onUpdate(prediction) is called on each poll.
   */
  constructor({ model, provider = "", input, onUpdate = () => {}, signal }) {
    Object.assign(this, { model, provider, input, onUpdate, signal });
    this.prediction = null;
    this.request = null;
    this.started = performance.now();
  }

  get elapsedMs() { return (this.ended ?? performance.now()) - this.started; }

  /** Resolves with {prediction, request} once the prediction ended; rejects with an ApiError when
   * the create itself was refused (validation, budget, no provider...). */
  async start() {
    // The prediction routes take a provider config key as the model to pin that provider; the
    // x-provider header says the same to the routes that read it (the Images API).
    const headers = this.provider ? { "x-provider": this.provider } : {};
    this.prediction = await api("/v1/predictions", {
      method: "POST", headers, signal: this.signal,
      body: { model: this.provider || this.model, input: this.input },
    });
    this.onUpdate(this.prediction);
    while (!ENDED.has(this.prediction.status)) {
      await sleep(POLL_MS, this.signal);
      if (this.signal?.aborted) return null; // the page was left: stop watching, the job goes on
      this.prediction = await api(`/v1/predictions/${this.prediction.id}`, { signal: this.signal });
      this.onUpdate(this.prediction);
    }
    this.ended = performance.now();
    try {
      this.request = await api(`/v1/requests/${this.prediction.id}`, { signal: this.signal });
    } catch {
      this.request = null; // the panel shows what the prediction says; its details are optional
    }
    return { prediction: this.prediction, request: this.request };
  }

  async cancel() {
    if (!this.prediction || ENDED.has(this.prediction.status)) return;
    this.prediction = await api(`/v1/predictions/${this.prediction.id}/cancel`, { method: "POST" });
    this.onUpdate(this.prediction);
  }
}

/** The output URLs of a prediction: one URL (n = 1) or a list. */
export function outputs(prediction) {
  const out = prediction?.output;
  if (!out) return [];
  return Array.isArray(out) ? out : [out];
}

export function statusText(prediction, verb = "Generating") {
  switch (prediction?.status) {
    case "starting": return "Starting…";
    case "processing": return `${verb}…`;
    case "succeeded": return "Done";
    case "failed": return "Failed";
    case "canceled": return "Canceled";
    default: return "Sending…";
  }
}
