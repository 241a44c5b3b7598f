// A request as code for this gateway's Images API, in the README's style: curl, Python with the
// official `openai` SDK and JavaScript with the `openai` npm package, pointed at location.origin + "/v1".
// Parameters OpenAI's SDKs do not know (seed, aspect_ratio, guidance, provider options...) go in
// `extra_body` in Python and as plain fields in JavaScript; a chosen provider is the `x-provider` header.

import { auth } from "./api.js";

// The image parameters the OpenAI SDKs take as keyword arguments.
const OPENAI_PARAMS = new Set(["n", "size", "output_format", "output_compression", "response_format",
  "quality", "background", "moderation", "user", "style"]);

export const baseURL = () => `${location.origin}/v1`;

/**
 * req: {model, mode: "text-to-image" | "edit", prompt, params: {name: value}, images: [file names],
 * provider: a config key or ""}. Returns [{id, label, code}] for codeTabs().
 */
export function snippets(req, { keyed = auth.keyed || Boolean(auth.key) } = {}) {
  const r = { params: {}, images: [], provider: "", ...req };
  if (r.mode === "edit" && !r.images.length) r.images = ["input.png"];
  r.images = r.images.map(safeName);
  return [
    { id: "curl", label: "curl", code: curl(r, keyed) },
    { id: "python", label: "Python", code: python(r, keyed) },
    { id: "js", label: "JavaScript", code: javascript(r, keyed) },
  ];
}

function safeName(name, i) {
  return /^[\w][\w.\- ]{0,80}$/.test(name || "") ? name : `input-${i + 1}.png`;
}

// ---- curl ------------------------------------------------------------------------------------------------

const sq = (s) => `'${String(s).replace(/'/g, "'\\''")}'`;
const shellSafe = (s) => /^[\w@%+=:,./\-[\]]+$/.test(s);
const arg = (s) => (shellSafe(s) ? s : sq(s));

function curl(r, keyed) {
  const lines = [];
  const authHeader = keyed ? [`-H "Authorization: Bearer $KONTEXT_API_KEY"`] : [];
  const provider = r.provider ? [`-H ${sq(`x-provider: ${r.provider}`)}`] : [];
  if (r.mode === "edit") {
    lines.push(`curl ${baseURL()}/images/edits`, ...authHeader, ...provider, `-F ${arg(`model=${r.model}`)}`);
    const field = r.images.length > 1 ? "image[]" : "image";
    for (const name of r.images) lines.push(`-F ${arg(`${field}=@${name}`)}`);
    // --form-string: a prompt starting with @ or < would otherwise name a file to read
    const promptFlag = /^[@<]/.test(r.prompt) ? "--form-string" : "-F";
    lines.push(`${promptFlag} ${arg(`prompt=${r.prompt}`)}`);
    for (const [k, v] of Object.entries(r.params)) {
      const text = typeof v === "object" ? JSON.stringify(v) : String(v);
      lines.push(`-F ${arg(`${k}=${text}`)}`);
    }
  } else {
    const body = { model: r.model, prompt: r.prompt, ...r.params };
    const json = `{${Object.entries(body).map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(", ")}}`;
    lines.push(`curl ${baseURL()}/images/generations`, ...authHeader, ...provider,
      `-H 'Content-Type: application/json'`, `-d ${sq(json)}`);
  }
  return lines.join(" \\\n  ");
}

// ---- Python ---------------------------------------------------------------------------------------------

function py(v) {
  if (v === true) return "True";
  if (v === false) return "False";
  if (v == null) return "None";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(py).join(", ")}]`;
  return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${py(x)}`).join(", ")}}`;
}

function python(r, keyed) {
  const head = keyed
    ? `import os\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=${py(baseURL())}, api_key=os.environ["KONTEXT_API_KEY"])`
    : `from openai import OpenAI\n\nclient = OpenAI(base_url=${py(baseURL())}, api_key="unused")  # this gateway needs no key`;
  const args = [`model=${py(r.model)}`];
  if (r.mode === "edit") {
    const files = r.images.map((n) => `open(${py(n)}, "rb")`);
    args.push(`image=${files.length > 1 ? `[${files.join(", ")}]` : files[0]}`);
  }
  args.push(`prompt=${py(r.prompt)}`);
  const extra = {};
  for (const [k, v] of Object.entries(r.params)) {
    if (OPENAI_PARAMS.has(k)) args.push(`${k}=${py(v)}`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) args.push(`extra_body=${py(extra)}`);
  if (r.provider) args.push(`extra_headers={"x-provider": ${py(r.provider)}}`);
  const call = r.mode === "edit" ? "client.images.edit" : "client.images.generate";
  return `${head}\nimg = ${call}(\n${args.map((a) => `    ${a},`).join("\n")}\n)\nfor image in img.data:\n    print(image.url)  # a signed URL on this gateway, valid for an hour\n`;
}

// ---- JavaScript -----------------------------------------------------------------------------------------

const jsKey = (k) => (/^[A-Za-z_$][\w$]*$/.test(k) ? k : JSON.stringify(k));

function javascript(r, keyed) {
  const imports = r.mode === "edit" ? `import fs from "node:fs";\nimport OpenAI from "openai";` : `import OpenAI from "openai";`;
  const key = keyed ? "process.env.KONTEXT_API_KEY" : `"unused"`;
  const fields = [`model: ${JSON.stringify(r.model)}`];
  if (r.mode === "edit") {
    const files = r.images.map((n) => `fs.createReadStream(${JSON.stringify(n)})`);
    fields.push(`image: ${files.length > 1 ? `[${files.join(", ")}]` : files[0]}`);
  }
  fields.push(`prompt: ${JSON.stringify(r.prompt)}`);
  for (const [k, v] of Object.entries(r.params)) fields.push(`${jsKey(k)}: ${JSON.stringify(v)}`);
  const call = r.mode === "edit" ? "client.images.edit" : "client.images.generate";
  const options = r.provider ? `, { headers: { "x-provider": ${JSON.stringify(r.provider)} } }` : "";
  return `${imports}\n\nconst client = new OpenAI({ baseURL: ${JSON.stringify(baseURL())}, apiKey: ${key} });\n`
    + `const img = await ${call}({\n${fields.map((f) => `  ${f},`).join("\n")}\n}${options});\n`
    + `for (const image of img.data) console.log(image.url);\n`;
}
