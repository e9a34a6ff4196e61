// A real browser against the proxy, run by tests/test_clients_browser.py: Debian's chromium,
// headless, driven by puppeteer-core (which never downloads a browser). The page comes from
// another origin than the proxy, and calls it with fetch the way browser chat front ends do:
// JSON with an Authorization header (so every call is preflighted), SSE read with a
// ReadableStream reader.
//
//   node browser.mjs '<json config>'  ->  JSON on stdout
// config: {"page": "http://127.0.0.1:P/", "api": "http://127.0.0.1:R/v1",
//          "tokensApi": "http://127.0.0.1:T/v1", "chromium": "/usr/bin/chromium",
//          "userDataDir": "/tmp/...", "bots": {...},
//          "proxyServer": "127.0.0.1:P" | null, "spki": "<base64 sha256 of mitmproxy's key>"}
// With proxyServer, the page calls https://api.openai.com through mitmproxy as an explicit
// proxy (chosen by a PAC script for that host only), and the browser accepts certificates
// with mitmproxy's key (mitmproxy makes every certificate with its CA's key).
import puppeteer from "puppeteer-core";

const config = JSON.parse(process.argv[2]);

function pac(proxy) {
  return `function FindProxyForURL(url, host) {
    return host === "api.openai.com" ? "PROXY ${proxy}" : "DIRECT";
  }`;
}

const browser = await puppeteer.launch({
  executablePath: config.chromium,
  headless: true,
  userDataDir: config.userDataDir,
  // As root, without a sandbox; no GPU; and none of the background calls to Google's hosts,
  // which this offline machine refuses.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // The browser resolves no name itself: its own calls to Google's hosts fail at once
    // instead of going out, and only api.openai.com goes to the proxy (a PAC script).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ...(config.proxyServer
      ? [
          `--proxy-pac-url=data:application/x-ns-proxy-autoconfig;base64,${btoa(pac(config.proxyServer))}`,
          `--ignore-certificate-errors-spki-list=${config.spki}`,
        ]
      : []),
  ],
});

try {
  const page = await browser.newPage();
  const console_ = [];
  page.on("console", (m) => console_.push(m.text()));
  await page.goto(config.page);
  const result = await page.evaluate(runInPage, config);
  result.pageOrigin = await page.evaluate(() => location.origin);
  result.console = console_;
  process.stdout.write(JSON.stringify(result));
} finally {
  await browser.close();
}

// Everything below runs inside the page (serialized by puppeteer: it must be self-contained).
async function runInPage(config) {
  const headers = (token) => ({
    Authorization: `Bearer ${token}`,
    "Content-Type": "application/json",
  });
  const post = (url, body, token = "client-key") =>
    fetch(url, { method: "POST", headers: headers(token), body: JSON.stringify(body) });

  // An SSE body as (seconds since the request, data) pairs, in the order it arrived.
  async function readEvents(response, start) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const events = [];
    let buffer = "";
    let reads = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      reads += 1;
      const now = (performance.now() - start) / 1000;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").find((l) => l.startsWith("data: "));
        if (data) events.push([now, data.slice(6)]);
      }
    }
    return { events, reads };
  }

  const out = {};
  // Each scenario on its own: one that fails is reported, the others still run.
  async function step(name, run) {
    try {
      out[name] = await run();
    } catch (e) {
      out[name] = { failed: String(e) };
    }
  }
  const user = (content) => [{ role: "user", content }];
  const chatUrl = `${config.api}/chat/completions`;
  const responsesUrl = `${config.api}/responses`;
  const bots = config.bots;

  // A plain answer
  await step("plain", async () => {
    const r = await post(chatUrl, { model: bots.plain, messages: user("hi") });
    return { status: r.status, body: await r.json() };
  });

  // Chat completions stream, read piece by piece
  await step("stream", async () => {
    const start = performance.now();
    const r = await post(chatUrl, { model: bots.stream, messages: user("count"), stream: true });
    const { events, reads } = await readEvents(r, start);
    const deltas = [];
    for (const [t, data] of events) {
      if (data === "[DONE]") continue;
      const content = JSON.parse(data).choices[0]?.delta?.content;
      if (content) deltas.push([t, content]);
    }
    return {
      status: r.status,
      type: r.headers.get("content-type"),
      deltas,
      reads,
      last: events.at(-1)?.[1],
    };
  });

  // Responses stream
  await step("responses_stream", async () => {
    const start = performance.now();
    const body = { model: bots.responses_stream, input: "count", stream: true };
    const r = await post(responsesUrl, body);
    const { events } = await readEvents(r, start);
    const parsed = events.map(([t, d]) => [t, JSON.parse(d)]);
    return {
      status: r.status,
      deltas: parsed
        .filter(([, e]) => e.type === "response.output_text.delta")
        .map(([t, e]) => [t, e.delta]),
      types: parsed.map(([, e]) => e.type),
    };
  });

  // The page's own tool loop: a call, the page runs the tool, sends the result back
  await step("tools", async () => {
    const tools = [
      {
        type: "function",
        function: {
          name: "get_time",
          description: "The time in a city",
          parameters: { type: "object", properties: { city: { type: "string" } } },
        },
      },
    ];
    const messages = user("Time in Paris?");
    const first = await (await post(chatUrl, { model: bots.tools, messages, tools })).json();
    const message = first.choices[0].message;
    messages.push(message);
    for (const call of message.tool_calls ?? []) {
      const { city } = JSON.parse(call.function.arguments);
      messages.push({ role: "tool", tool_call_id: call.id, content: `noon in ${city}` });
    }
    const second = await (await post(chatUrl, { model: bots.tools, messages, tools })).json();
    return {
      finish: first.choices[0].finish_reason,
      calls: (message.tool_calls ?? []).map((c) => c.function.name),
      answer: second.choices[0].message.content,
    };
  });

  // A second turn through the Responses API's stored conversation
  await step("two_turns", async () => {
    const turn1 = { model: bots.two_turns, input: "I am Ann." };
    const first = await (await post(responsesUrl, turn1)).json();
    const second = await (
      await post(responsesUrl, {
        model: bots.two_turns,
        input: "My name?",
        previous_response_id: first.id,
      })
    ).json();
    return {
      first: first.output[0].content[0].text,
      second: second.output[0].content[0].text,
    };
  });

  // Errors: status and OpenAI's JSON readable from this origin (without CORS headers on them,
  // fetch would throw "Failed to fetch" instead)
  await step("errors", async () => {
    const r401 = await post(
      `${config.tokensApi}/chat/completions`,
      { model: bots.plain, messages: user("hi") },
      "wrong-token",
    );
    const r404 = await fetch(`${config.api}/responses/resp_unknown`, {
      headers: headers("client-key"),
    });
    return {
      401: { status: r401.status, body: await r401.json() },
      404: { status: r404.status, body: await r404.json() },
    };
  });
  return out;
}
