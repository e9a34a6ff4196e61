// The official `openai` npm package, configured as the proxy's start-up banner advises for
// Node: HTTPS_PROXY + NODE_EXTRA_CA_CERTS from the environment and, because Node's own fetch
// ignores HTTPS_PROXY, undici's EnvHttpProxyAgent as the global dispatcher (config.envProxy).
// Prints one JSON result: the answer, or the error the SDK raised.
import OpenAI from "openai";
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

const config = JSON.parse(process.argv[2]);
if (config.envProxy) setGlobalDispatcher(new EnvHttpProxyAgent());

const client = new OpenAI({
  apiKey: config.apiKey ?? "anything",
  baseURL: config.baseURL, // undefined: https://api.openai.com/v1, as an unconfigurable app
  maxRetries: 0,
  timeout: 20_000,
});
const messages = [{ role: "user", content: "hi" }];
try {
  const made = await client.chat.completions.create({ model: config.model, messages });
  const pieces = [];
  const stream = await client.chat.completions.create({ model: config.model, messages, stream: true });
  for await (const chunk of stream) pieces.push(chunk.choices[0]?.delta?.content ?? "");
  console.log(JSON.stringify({ text: made.choices[0].message.content, streamed: pieces.join("") }));
} catch (e) {
  const cause = e?.cause?.code ?? e?.cause?.cause?.code ?? null;
  console.log(JSON.stringify({ error: { name: e?.constructor?.name, status: e?.status ?? null, cause } }));
}
