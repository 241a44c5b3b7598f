// The official openai npm package, unchanged, against the gateway: generate and edit, print what came back.
import OpenAI, { toFile } from "openai";
import { readFileSync } from "node:fs";

const [baseURL, imagePath] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "not-needed", maxRetries: 0 });

const generated = await client.images.generate({
  model: "kontext-tiny", prompt: "A serene mountain landscape at sunset", size: "96x64",
  response_format: "b64_json", output_format: "webp",
});
const edited = await client.images.edit({
  model: "kontext-tiny", image: await toFile(readFileSync(imagePath), "source.png", { type: "image/png" }),
  prompt: "Add a starry night sky to this image", size: "64x64",
});
let notFound = null;
try {
  await client.images.generate({ model: "flux-kontext-prro", prompt: "x" });
} catch (err) {
  notFound = { status: err.status, code: err.code, message: err.message };
}
console.log(JSON.stringify({
  generated: { b64: generated.data[0].b64_json, size: generated.size, metadata: generated.metadata },
  edited: { url: edited.data[0].url, size: edited.size },
  notFound,
}));
