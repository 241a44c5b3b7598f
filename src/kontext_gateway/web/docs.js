// /docs: Swagger UI over this gateway's /openapi.json. A module (deferred), so it runs after the
// deferred swagger-ui-bundle.js defined SwaggerUIBundle; no inline script, so the page's CSP holds.

window.ui = window.SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout", // no top bar: it would offer to load any other URL
  presets: [window.SwaggerUIBundle.presets.apis],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // the default sends the spec to validator.swagger.io for a badge
});
