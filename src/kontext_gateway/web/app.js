// The single page's router: the gateway serves index.html for /, /playground, /gallery, /compare,
// /models and /models/{id}; this picks the page from location.pathname. In-app links use
// history.pushState, so moving around keeps the loaded catalog and the key prompt state.

import { auth } from "./api.js";
import { navigate, setRouter, takeHandoff } from "./nav.js";
import { errorBox, h, isAbort } from "./ui.js";
import * as playground from "./playground.js";
import * as gallery from "./gallery.js";
import * as models from "./models.js";
import * as compare from "./compare.js";

const ROUTES = [
  { re: /^\/(?:playground\/?)?$/, page: playground.render, nav: "playground", title: "Playground" },
  { re: /^\/gallery\/?$/, page: gallery.render, nav: "gallery", title: "Gallery" },
  { re: /^\/compare\/?$/, page: compare.render, nav: "compare", title: "Compare" },
  { re: /^\/models\/?$/, page: models.renderList, nav: "models", title: "Models" },
  { re: /^\/models\/(.+)$/, page: models.renderModel, nav: "models", title: "Model" },
];

let controller = null; // aborted when the page is left: stops polling, timers and listeners
let first = true;

function route() {
  controller?.abort();
  controller = new AbortController();
  const main = document.getElementById("main");
  main.replaceChildren();
  const path = location.pathname;
  const match = ROUTES.map((r) => ({ r, m: r.re.exec(path) })).find((x) => x.m);
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (match && a.dataset.nav === match.r.nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!match) {
    document.title = "Not found · Kontext Gateway";
    main.append(h("div", { class: "card" }, h("h1", {}, "Page not found"), h("p", {}, h("a", { href: "/" }, "Go to the playground"))));
    return;
  }
  document.title = `${match.r.title} · Kontext Gateway`;
  const ctx = {
    signal: controller.signal,
    params: match.m.slice(1).map((p) => decodeURIComponent(p || "")),
    query: new URLSearchParams(location.search),
    handoff: takeHandoff(),
  };
  const signal = controller.signal;
  Promise.resolve()
    .then(() => match.r.page(main, ctx))
    .catch((err) => {
      if (isAbort(err) || signal.aborted) return;
      main.replaceChildren(errorBox(err, { retry: route }));
    });
  if (!first) {
    window.scrollTo(0, 0);
    main.focus({ preventScroll: true }); // screen readers hear the new page, keyboard starts at its top
  }
  first = false;
}

// Same-origin links to app pages are handled here instead of reloading the document.
document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  if (a.target || a.hasAttribute("download")) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !ROUTES.some((r) => r.re.test(url.pathname))) return;
  e.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
});
window.addEventListener("popstate", route);

// The header shows when a key is in use, with a way to forget it.
function showKeyStatus() {
  document.getElementById("key-status").hidden = !auth.key;
}
window.addEventListener("kontext:key", showKeyStatus);
document.getElementById("key-forget").addEventListener("click", () => {
  auth.clear();
  route();
});
showKeyStatus();
setRouter(route);
route();
