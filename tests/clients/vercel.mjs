// The Vercel AI SDK (`ai` + `@ai-sdk/openai`) against the proxy, run by tests/test_clients_vercel.py.
//
//   node vercel.mjs '<json config>'   ->  one JSON object on stdout, one key per scenario
//
// config: {"api": "responses" | "chat", "baseURL": "http://127.0.0.1:N/v1" | null,
//          "envProxy": bool, "bots": {"plain": "...", "stream": "...", ...}}
// With baseURL null the SDK keeps its default https://api.openai.com/v1; with envProxy, undici's
// EnvHttpProxyAgent (HTTPS_PROXY) becomes fetch's dispatcher: Node's own fetch ignores HTTPS_PROXY.
// NODE_EXTRA_CA_CERTS (mitmproxy's CA) comes from the environment.
import { createOpenAI } from "@ai-sdk/openai";
import { APICallError, generateText, stepCountIs, streamText, tool } from "ai";
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";
import { z } from "zod";

const config = JSON.parse(process.argv[2]);
if (config.envProxy) setGlobalDispatcher(new EnvHttpProxyAgent());

const sent = []; // request bodies, to show what the SDK put on the wire
const provider = createOpenAI({
  apiKey: "client-key",
  ...(config.baseURL ? { baseURL: config.baseURL } : {}),
  fetch: async (url, init) => {
    sent.push({ url: String(url), body: init?.body ? JSON.parse(init.body) : null });
    return fetch(url, init);
  },
});
const model = (bot) => (config.api === "chat" ? provider.chat(bot) : provider(bot));
const bots = config.bots;
const out = {};

async function scenario(name, run) {
  if (!bots[name]) return;
  const before = sent.length;
  try {
    out[name] = await run(bots[name]);
  } catch (e) {
    out[name] = {
      thrown: e?.constructor?.name,
      isAPICallError: APICallError.isInstance(e),
      statusCode: e?.statusCode,
      isRetryable: e?.isRetryable,
      message: String(e?.message ?? e),
      cause: String(e?.cause?.code ?? e?.cause?.message ?? ""),
    };
  }
  out[name].sent = sent.slice(before).map((s) => s.body);
}

await scenario("plain", async (bot) => {
  const r = await generateText({ model: model(bot), system: "Be brief.", prompt: "Say hello" });
  return { text: r.text, finishReason: r.finishReason, usage: r.usage };
});

await scenario("stream", async (bot) => {
  const start = performance.now();
  const r = streamText({ model: model(bot), prompt: "Count" });
  const deltas = [];
  for await (const delta of r.textStream) deltas.push([(performance.now() - start) / 1000, delta]);
  return { deltas, text: await r.text, finishReason: await r.finishReason };
});

await scenario("tools", async (bot) => {
  const calls = [];
  const r = await generateText({
    model: model(bot),
    prompt: "Weather in Rome?",
    tools: {
      get_weather: tool({
        description: "Current weather in a city",
        inputSchema: z.object({ city: z.string() }),
        execute: async ({ city }) => {
          calls.push(city);
          return `sunny, 24C in ${city}`;
        },
      }),
    },
    stopWhen: stepCountIs(3),
  });
  return { text: r.text, calls, steps: r.steps.length };
});

await scenario("stream_tools", async (bot) => {
  const calls = [];
  const r = streamText({
    model: model(bot),
    prompt: "Weather in Oslo?",
    tools: {
      get_weather: tool({
        description: "Current weather in a city",
        inputSchema: z.object({ city: z.string() }),
        execute: async ({ city }) => {
          calls.push(city);
          return `snow in ${city}`;
        },
      }),
    },
    stopWhen: stepCountIs(3),
  });
  return { text: await r.text, calls, steps: (await r.steps).length };
});

await scenario("two_turns", async (bot) => {
  const messages = [{ role: "user", content: "I am Ann." }];
  const first = await generateText({ model: model(bot), messages });
  messages.push(...first.response.messages, { role: "user", content: "What is my name?" });
  const second = await generateText({ model: model(bot), messages });
  return { first: first.text, second: second.text };
});

await scenario("stream_error", async (bot) => {
  // A failure after the answer began: the SDK hands it to onError and as an "error" part.
  const errors = [];
  const r = streamText({
    model: model(bot),
    prompt: "hi",
    maxRetries: 0,
    onError: ({ error }) => errors.push(String(error?.message ?? JSON.stringify(error))),
  });
  const parts = [];
  for await (const part of r.fullStream) {
    parts.push(part.type === "text-delta" ? `text-delta:${part.text}` : part.type);
  }
  return { parts, errors, text: await r.text };
});

await scenario("error", async (bot) => {
  // maxRetries 0: the AI SDK retries 429 and 5xx whatever x-should-retry says
  await generateText({ model: model(bot), prompt: "hi", maxRetries: 0 });
  return { thrown: null };
});

process.stdout.write(JSON.stringify(out));
