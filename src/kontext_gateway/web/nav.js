// In-app navigation without reloading the page (history.pushState), plus a one-time hand-off of data
// to the next page (gallery "edit this" -> playground). Its own module so that pages can navigate
// without importing the router (app.js), which imports them.

let router = () => location.reload();
let handoff = null;

export function setRouter(fn) {
  router = fn;
}

/** Go to an in-app URL; `data` is given to the next page once (ctx.handoff). */
export function navigate(url, data = null) {
  handoff = data;
  history.pushState(null, "", url);
  router();
}

export function takeHandoff() {
  const d = handoff;
  handoff = null;
  return d;
}
